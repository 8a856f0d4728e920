"""Expert-parallel dispatch + combine: flat against hierarchical, and the MoE layer with EP against one process.

Starts 4 processes itself (forked, gloo, on CPU; spawned, NCCL, on GPUs) that emulate 2 nodes
of 2 ranks (parallel.ranks_per_node=2, ep=4), each with one MoE layer of the same weights. Measures
  1. dispatch + combine alone (the experts replaced by the identity): tokens/s and bytes per token
     between and inside nodes, flat (baseline) against hierarchical (report sec 3.2.2);
  2. the MoE layer forward + backward with EP (4 processes, each with a quarter of the experts and of the
     tokens) against one process running the whole layer on all tokens (baseline).
On CPU the "nodes" are processes of one machine sharing its cores, and gloo's all-to-all goes through
local TCP: the timings are only indicative. EP across GPUs needs at least 4 of them (NCCL); on fewer
GPUs the numbers would not be meaningful and --device cuda skips.

    python bench/ep_dispatch.py                      # CPU, fp32, 2048 tokens per rank
    python bench/ep_dispatch.py --tokens 4096 --iters 20
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from parallel.expert import ExpertParallelExperts, parallelize_experts
from parallel.local_ranks import run_ranks
from parallel.mesh import build_process_groups, plan_layout
from train.config import Config, ModelConfig
from train.model import Transformer
from train.runtime import release_process_groups

WORLD, RANKS_PER_NODE = 4, 2
BENCH_MOE = ModelConfig(  # one MoE layer; 8 groups of 4 experts, top-8 experts in at most 4 groups (M = 4)
    vocab_size=256, dim=512, inter_dim=1024, moe_inter_dim=256, n_layers=2, n_dense_layers=1, n_heads=4,
    q_lora_rank=0, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
    n_routed_experts=32, n_shared_experts=1, n_activated_experts=8, n_expert_groups=8, topk_groups=4,
    route_scale=2.5, mtp_depth=0, max_seq_len=128, original_seq_len=128, expert_impl="loop",
)
SEQ_LEN = 128
MODES = ("flat", "hierarchical")


def build_model(cfg: ModelConfig, device: torch.device) -> Transformer:
    model = Transformer(cfg).to(device)
    model.init_weights(std=0.02, seed=0)
    return model


def tokens_of(rank: int, n_tokens: int, cfg: ModelConfig, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 + rank)
    return torch.randn(n_tokens // SEQ_LEN, SEQ_LEN, cfg.dim, generator=generator).to(device)


def median_times(fns: dict[str, Callable[[], None]], iters: int, sync: Callable[[], None]) -> dict[str, float]:
    """Median seconds of each function over ``iters`` rounds that alternate between them (the first one
    rotating), after one warm-up call each; ``sync`` before and after every call."""
    for fn in fns.values():
        fn()
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(iters):
        for name in names[i % len(names):] + names[:i % len(names)]:
            sync()
            start = time.perf_counter()
            fns[name]()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def rank_results(rank: int, args: argparse.Namespace) -> dict:
    """One rank's measurements (its process group initialized): per mode, the exchange and layer seconds
    (rounds alternating between the modes), the traffic counters and the EP output's relative difference
    from the single-device layer."""
    cfg: ModelConfig = args.cfg
    device = torch.device(f"cuda:{rank}" if args.device == "cuda" else "cpu")
    config = Config(model=cfg)
    config.parallel.ep, config.parallel.ranks_per_node = WORLD, RANKS_PER_NODE
    groups = build_process_groups(plan_layout(config, WORLD, rank, RANKS_PER_NODE), device.type)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()

    x = tokens_of(rank, args.tokens, cfg, device)
    flat = x.reshape(-1, cfg.dim)
    with torch.no_grad():  # the single-device MoE on this rank's tokens: what EP must reproduce
        expected, _ = build_model(cfg, device).moe_layers()[0](x)
    results, exchanges, layers = {}, {}, {}
    for mode in MODES:
        model = build_model(cfg, device)
        parallelize_experts(model, groups, mode)
        moe = model.moe_layers()[0]
        experts: ExpertParallelExperts = moe.experts
        with torch.no_grad():
            got, _ = moe(x)
            got = got * (1 + args.perturb)  # 0 in a real run; the harness's tests set it to see the check fail
            error = ((got - expected).norm() / expected.norm()).item()
            routing = moe.gate(flat)

        def exchange(experts: ExpertParallelExperts = experts, routing=routing) -> None:
            with torch.no_grad():  # dispatch and combine, the identity in between
                handle = experts.dispatch(flat, routing)
                experts.combine(handle.wait().x, handle).wait()

        def layer(model: Transformer = model, moe=moe) -> None:
            model.zero_grad(set_to_none=True)
            out, _ = moe(x)
            out.sum().backward()

        experts.traffic.reset()
        exchange()
        results[mode] = {"rel_err": error, **experts.traffic.as_dict()}
        exchanges[mode], layers[mode] = exchange, layer
    for mode, seconds in median_times(exchanges, args.iters, sync).items():
        results[mode]["exchange_s"] = seconds
    for mode, seconds in median_times(layers, args.iters, sync).items():
        results[mode]["layer_s"] = seconds
    return results


def _gloo_rank(rank: int, world: int, args: argparse.Namespace) -> dict:
    return rank_results(rank, args)


def nccl_worker(rank: int, port: int, args: argparse.Namespace, queue) -> None:
    """A spawned GPU rank (CUDA cannot be forked): NCCL group, measurements gathered on rank 0."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=WORLD)
    results = rank_results(rank, args)
    gathered = [None] * WORLD
    dist.all_gather_object(gathered, results)
    if rank == 0:
        queue.put(gathered)
    dist.barrier()
    release_process_groups()


def single_process_layer(args: argparse.Namespace) -> float:
    model = build_model(args.cfg, torch.device(args.device))
    moe = model.moe_layers()[0]
    x = torch.cat([tokens_of(rank, args.tokens, args.cfg, torch.device(args.device)) for rank in range(WORLD)])

    def layer() -> None:
        model.zero_grad(set_to_none=True)
        out, _ = moe(x)
        out.sum().backward()

    return median_times({"layer": layer}, args.iters,
                        lambda: torch.cuda.synchronize() if args.device == "cuda" else None)["layer"]


@dataclass
class EpResult:
    """Per mode (flat, hierarchical): tokens/s of dispatch + combine, bytes per token between and inside
    nodes (summed over ranks), seconds of the MoE layer's forward + backward (slowest rank), and the
    largest relative difference of the EP layer's output from the single-device layer's on a rank's tokens;
    and the single-process layer's seconds on all tokens (the baseline)."""

    tokens: int  # in all (WORLD x per rank)
    exchange_tokens_per_s: dict[str, float]
    inter_node_bytes_per_token: dict[str, float]
    intra_node_bytes_per_token: dict[str, float]
    max_nodes_per_token: dict[str, int]
    layer_s: dict[str, float]
    rel_err: dict[str, float]
    single_s: float


def measure(tokens: int = 2048, iters: int = 5, device: str = "cpu", threads: int = 1,
            cfg: ModelConfig = BENCH_MOE, perturb: float = 0.0) -> EpResult:
    """Start the WORLD ranks (forked gloo processes on CPU, spawned NCCL ones on GPUs), run both dispatch
    modes, then the one-process baseline in this process. ``perturb`` scales the EP output by (1 + perturb)
    before it is compared with the single-device one (to see the check fail; 0 in a real run)."""
    args = argparse.Namespace(tokens=tokens, iters=iters, device=device, cfg=cfg, perturb=perturb)
    if device == "cpu":
        per_rank = run_ranks(_gloo_rank, WORLD, args, env={"OMP_NUM_THREADS": "1"}, timeout=1200)
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        queue = mp.get_context("spawn").SimpleQueue()
        mp.start_processes(nccl_worker, args=(port, args, queue), nprocs=WORLD, start_method="spawn")
        per_rank = queue.get()
    torch.set_num_threads(threads)
    single_s = single_process_layer(args)
    total = WORLD * tokens

    def summed(mode: str, kind: str) -> float:
        return sum(r[mode][f"dispatch_{kind}_node_bytes"] + r[mode][f"combine_{kind}_node_bytes"]
                   for r in per_rank) / total

    return EpResult(
        tokens=total,
        exchange_tokens_per_s={m: total / max(r[m]["exchange_s"] for r in per_rank) for m in MODES},
        inter_node_bytes_per_token={m: summed(m, "inter") for m in MODES},
        intra_node_bytes_per_token={m: summed(m, "intra") for m in MODES},
        max_nodes_per_token={m: max(r[m]["max_nodes_per_token"] for r in per_rank) for m in MODES},
        layer_s={m: max(r[m]["layer_s"] for r in per_rank) for m in MODES},
        rel_err={m: max(r[m]["rel_err"] for r in per_rank) for m in MODES},
        single_s=single_s,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per rank (a multiple of 128)")
    parser.add_argument("--iters", type=int, default=5, help="timed iterations (median reported)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of the single-process baseline")
    args = parser.parse_args()
    if args.device == "cuda" and torch.cuda.device_count() < WORLD:
        print(f"skipped: {torch.cuda.device_count()} GPU(s); expert parallelism over {WORLD} ranks needs {WORLD} "
              "GPUs, and EP numbers on fewer GPUs are not meaningful. Run without --device for the CPU/gloo numbers.")
        return

    result = measure(args.tokens, args.iters, args.device, args.threads)
    cfg = BENCH_MOE
    total = result.tokens
    print(f"{WORLD} processes = 2 nodes x {RANKS_PER_NODE} ranks ({args.device}, "
          f"{'gloo' if args.device == 'cpu' else 'nccl'}), {args.tokens} tokens per rank, dim {cfg.dim}, "
          f"{cfg.n_routed_experts} experts top-{cfg.n_activated_experts}, {cfg.n_expert_groups} groups, "
          f"at most {cfg.topk_groups} groups per token, fp32, median of {args.iters}")
    if args.device == "cpu":
        print(f"CPU: {os.cpu_count()} cores shared by the {WORLD} processes, all-to-all over local TCP: "
              "timings are only indicative")
    print("dispatch + combine (identity experts); bytes per token summed over ranks, self-sends excluded:")
    base = result.exchange_tokens_per_s["flat"]
    for mode in MODES:
        speed = result.exchange_tokens_per_s[mode]
        print(f"  {mode:<17} {speed:>10,.0f} tokens/s  {total / speed * 1e3:7.1f} ms  inter-node "
              f"{result.inter_node_bytes_per_token[mode]:7.0f} B/token  intra-node "
              f"{result.intra_node_bytes_per_token[mode]:7.0f} B/token  max nodes/token "
              f"{result.max_nodes_per_token[mode]}  ratio {speed / base:.2f}x")
    single_s = result.single_s
    print(f"MoE layer forward + backward on {total} tokens:")
    print(f"  {'one process':<17} {total / single_s:>10,.0f} tokens/s  {single_s * 1e3:7.1f} ms  ({args.threads} thread(s))"
          f"  ratio 1.00x")
    for mode in MODES:
        seconds = result.layer_s[mode]
        print(f"  {f'EP {WORLD} {mode}':<17} {total / seconds:>10,.0f} tokens/s  {seconds * 1e3:7.1f} ms  (1 thread each)"
              f"  ratio {single_s / seconds:.2f}x  output vs one device: relative difference {result.rel_err[mode]:.1e}")


if __name__ == "__main__":
    main()
