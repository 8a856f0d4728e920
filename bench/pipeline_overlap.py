"""The overlapped F&B chunk against forward-then-backward, same schedule, same run (report sec 3.2.1, Fig. 4).

pp x ep gloo processes (forked, one thread each) run DualPipe steps of a tiny-shaped MoE model with
expert parallelism, alternating ``overlap=False`` (every FB action: the forward, then the backward) and
``overlap=True`` (the halves interleaved at every expert all-to-all, ``parallel/pipeline/overlap.py``).
Prints the median step time of each and the ratio, and checks in the same run that both give the same
losses and gradients (fp32, within 3e-6 relative: the residual's gradient sums in another order).

    python bench/pipeline_overlap.py                       # pp 2 x ep 2 (4 processes), 8 blocks
    python bench/pipeline_overlap.py --tokens 8 256 --rounds 6

On CPU the all-to-alls are memory copies between local processes (gloo runs them on its own threads),
so there is little to hide and 4 processes on 2 cores oversubscribe the machine: the ratio shows the
cost of cutting the graph more than the gain. The gain needs a real network (InfiniBand/NVLink) with
NCCL on its own stream; the same code path runs there.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from parallel.expert import parallelize_experts
from parallel.local_ranks import run_ranks
from parallel.mesh import Layout, build_process_groups
from parallel.pipeline.runtime import PipelineRuntime
from parallel.pipeline.schedule import make_schedule
from parallel.pipeline.stages import rank_module, split_model
from train.config import ModelConfig
from train.model import Transformer

ROOT = Path(__file__).resolve().parents[1]


def tiny_shape(n_layers: int, seq: int) -> ModelConfig:
    """The +conf=tiny model (conf/tiny.yaml) with ``n_layers`` blocks."""
    with open(ROOT / "conf" / "tiny.yaml") as f:
        model = yaml.safe_load(f)["model"]
    return ModelConfig(**{**model, "n_layers": n_layers, "max_seq_len": max(model.get("max_seq_len", 0), seq)})


def _rank(rank: int, world: int, args: argparse.Namespace) -> dict:
    pp, ep = args.pp, args.ep
    layout = Layout(world_size=world, rank=rank, pp=pp, ep=ep, ranks_per_node=world)
    groups = build_process_groups(layout, "cpu")
    cfg = tiny_shape(args.layers, args.tokens[1])
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights(0.02, seed=0)
    parallelize_experts(model, groups)
    m = args.per_rank * pp
    schedule = make_schedule("dualpipe", pp, m)
    stages = split_model(model, schedule.n_stages)
    mine = {c: stages[s] for c, s in enumerate(schedule.placement[layout.pp_rank])}
    params = dict(rank_module(list(mine.values())).named_parameters())
    g = torch.Generator().manual_seed(1 + layout.dp_rank)
    windows = [torch.randint(0, cfg.vocab_size, (args.tokens[0], args.tokens[1] + 1), generator=g) for _ in range(m)]
    runtimes = {flag: PipelineRuntime(schedule, mine, groups, overlap=flag) for flag in (False, True)}

    def run(flag: bool) -> tuple[float, float, dict]:
        for p in params.values():
            p.grad = None
        dist.barrier()
        t0 = time.perf_counter()
        loss = runtimes[flag].step(windows, 0.3, 1e-4).sums[0].item()
        dist.barrier()
        return time.perf_counter() - t0, loss, {n: p.grad for n, p in params.items()}

    _, loss_off, grads_off = run(False)
    _, loss_on, grads_on = run(True)
    worst = max(((grads_on[n] - grads_off[n]).norm() / grads_off[n].norm().clamp_min(1e-30)).item()
                for n in grads_off if grads_off[n] is not None)
    times: dict[bool, list[float]] = {False: [], True: []}
    for r in range(args.rounds):
        for flag in ((False, True) if r % 2 == 0 else (True, False)):
            for _ in range(args.steps):
                times[flag].append(run(flag)[0])
    return {"times": times, "loss": (loss_off, loss_on), "grad_err": worst, "segmented": runtimes[True].segmented}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--ep", type=int, default=2)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tokens", type=int, nargs=2, default=[4, 128], metavar=("MB", "SEQ"))
    ap.add_argument("--per-rank", type=int, default=2, help="micro-batches = K x pp")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args(argv)
    world = args.pp * args.ep
    results = run_ranks(_rank, world, args, env={"OMP_NUM_THREADS": "1"}, timeout=1800)
    r0 = results[0]
    off, on = statistics.median(r0["times"][False]), statistics.median(r0["times"][True])
    print(f"DualPipe pp {args.pp} x ep {args.ep} ({world} processes x 1 thread, {os.cpu_count()} cores"
          f"{', OVERSUBSCRIBED' if world > (os.cpu_count() or 1) else ''}), {args.layers} blocks of the tiny shape, "
          f"{args.per_rank * args.pp} micro-batches of {args.tokens[0]} x {args.tokens[1]} tokens, fp32; "
          f"median of {len(r0['times'][False])} steps each")
    print(f"  forward then backward : {off:.3f} s")
    print(f"  overlapped F&B        : {on:.3f} s   ({on / off:.2f}x; segmented graphs: {r0['segmented']})")
    err = max(r["grad_err"] for r in results)
    lo, ln = r0["loss"]
    print(f"  same numbers: summed loss {lo:.6f} vs {ln:.6f}, worst relative gradient difference {err:.1e}")
    if err > 3e-6 or abs(lo - ln) > 1e-6 * abs(lo):
        print("error: the overlapped F&B disagrees with forward-then-backward", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
