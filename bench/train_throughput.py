"""Training tokens/s of our DeepSeek-V3 against HF transformers' DeepseekV3ForCausalLM, in one process.

Both models get the same architecture and weights (copied through train/hf.py, so routing and expert
loads are identical), the same batch, and one full step each: forward, cross-entropy, backward,
AdamW, each model with its own loss (ours the chunked FP32 cross-entropy of train/losses.py, HF's
F.cross_entropy on FP32 logits as its ForCausalLMLoss). Ours runs without MTP for parity (HF drops
MTP layers; `--mtp` adds it to ours). Rounds alternate between the two so that machine noise hits
both alike; the median step time is reported.

    python bench/train_throughput.py                    # CPU, fp32
    python bench/train_throughput.py --allocator default  # glibc's own malloc (HF pays page faults)
    python bench/train_throughput.py --device cuda      # bf16 autocast, grouped GEMM experts
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: find bench.*

from bench import add_allocator_option, use_allocator  # noqa: E402
from train.compile import compile_model
from train.config import ModelConfig, OptimConfig
from train.hf import config_to_hf, to_hf_fused_experts, to_hf_state_dict
from train.losses import cross_entropy, cross_entropy_reference
from train.model import Transformer, count_parameters
from train.optim import build_optimizer

BENCH_MODEL = ModelConfig(
    vocab_size=8192, dim=256, inter_dim=768, moe_inter_dim=128, n_layers=4, n_dense_layers=1, n_heads=8,
    q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
    n_routed_experts=32, n_shared_experts=1, n_activated_experts=4, n_expert_groups=4, topk_groups=2,
    route_scale=2.5, mtp_depth=0, max_seq_len=1024, original_seq_len=1024, init_std=0.02,
)
SMALL_MODEL = dataclasses.replace(  # the shape of conf/small.yaml
    BENCH_MODEL, vocab_size=16384, dim=512, inter_dim=1536, moe_inter_dim=256, n_layers=8, q_lora_rank=192,
    kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
)


def build_hf(cfg: ModelConfig, ours: Transformer, device: torch.device, experts_impl: str | None):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    hf_cfg = DeepseekV3Config(**config_to_hf(cfg))
    kwargs = {"attn_implementation": "sdpa"}
    if experts_impl:
        kwargs["experts_implementation"] = experts_impl
    model = DeepseekV3ForCausalLM._from_config(hf_cfg, **kwargs)
    state = to_hf_fused_experts(to_hf_state_dict(ours.state_dict(), cfg))
    state = {k: v for k, v in state.items() if not k.startswith(f"model.layers.{cfg.n_layers}.")}  # no MTP
    model.load_state_dict(state, strict=True)
    return model.to(device)


def compile_blocks(layers: torch.nn.ModuleList) -> None:
    """torch.compile each transformer block in place (the torchtitan way: one graph per block)."""
    for i, block in enumerate(layers):
        layers[i] = torch.compile(block)


def make_step(forward: Callable[[torch.Tensor], torch.Tensor], params, optimizer, device: torch.device,
              dtype: torch.dtype) -> Callable[[torch.Tensor], float]:
    def step(window: torch.Tensor) -> float:
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = forward(window)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return step


@dataclass
class Throughput:
    """One comparison: tokens/s and median step seconds per runner ("ours", "hf[IMPL]"), and each model's
    loss on the same first batch before any step (same weights: they should agree)."""

    device: torch.device
    dtype: torch.dtype
    cfg: ModelConfig
    tokens_per_step: int
    speeds: dict[str, float]
    median_s: dict[str, float]
    initial_loss: dict[str, float]


def compare(cfg: ModelConfig, device: torch.device, batch: int, seq: int, rounds: int, steps_per_round: int,
            hf_experts: list[str], mtp: bool = False, compile: bool = False, compile_ours: bool = False,
            dtype: torch.dtype | None = None) -> Throughput:
    """Time ours against HF ``DeepseekV3ForCausalLM`` (one per experts implementation), rounds alternating.
    ``dtype``: the autocast dtype of both (None: bf16 on CUDA, fp32 elsewhere, as ``train.dtype=auto``)."""
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = dataclasses.replace(cfg, max_seq_len=max(cfg.max_seq_len, seq), original_seq_len=max(cfg.max_seq_len, seq))
    torch.manual_seed(0)
    ours = Transformer(dataclasses.replace(cfg, mtp_depth=1 if mtp else 0)).to(device)
    ours.init_weights()
    windows = torch.randint(0, cfg.vocab_size, (rounds * steps_per_round + 2, batch, seq + 1), device=device)

    def ours_forward(window: torch.Tensor) -> torch.Tensor:
        out = ours(window[:, :-1])
        loss = cross_entropy(out.logits, window[:, 1:])
        if out.mtp_logits:
            loss = loss + 0.3 * cross_entropy(out.mtp_logits[0], window[:, 2:])
        return loss

    def ours_lm_loss(window: torch.Tensor) -> torch.Tensor:
        return cross_entropy(ours(window[:, :-1]).logits, window[:, 1:])

    runners = {"ours": make_step(ours_forward, ours.parameters(), build_optimizer(ours, OptimConfig(lr=1e-4)),
                                 device, dtype)}
    losses: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"ours": ours_lm_loss}
    if compile_ours:  # a second copy of ours with train.compile's treatment, same weights
        compiled = copy.deepcopy(ours)
        compile_model(compiled, "none")

        def compiled_forward(window: torch.Tensor) -> torch.Tensor:
            return cross_entropy(compiled(window[:, :-1]).logits, window[:, 1:])

        runners["ours[compiled]"] = make_step(compiled_forward, compiled.parameters(),
                                              build_optimizer(compiled, OptimConfig(lr=1e-4)), device, dtype)
        losses["ours[compiled]"] = compiled_forward
    hf_models = {impl: build_hf(cfg, ours, device, None if impl == "default" else impl)  # before compiling ours
                 for impl in hf_experts}
    if compile:
        compile_blocks(ours.layers)
    for impl, hf in hf_models.items():
        if compile:
            compile_blocks(hf.model.layers)
        optimizer = torch.optim.AdamW(hf.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)

        def hf_forward(window: torch.Tensor, model=hf) -> torch.Tensor:
            # HF's loss as its ForCausalLMLoss computes it: F.cross_entropy on FP32 logits
            return cross_entropy_reference(model(input_ids=window[:, :-1]).logits, window[:, 1:])

        runners[f"hf[{impl}]"] = make_step(hf_forward, hf.parameters(), optimizer, device, dtype)
        losses[f"hf[{impl}]"] = hf_forward

    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        initial = {name: float(loss(windows[0])) for name, loss in losses.items()}
    times: dict[str, list[float]] = {name: [] for name in runners}
    for name, step in runners.items():  # warm-up (allocator, kernels, lazy optimizer state)
        step(windows[0])
        step(windows[1])
    for r in range(rounds):
        for name, step in runners.items():
            for s in range(steps_per_round):
                times[name].append(step(windows[2 + r * steps_per_round + s]))
    tokens = batch * seq
    median = {name: statistics.median(t) for name, t in times.items()}
    return Throughput(device=device, dtype=dtype, cfg=cfg, tokens_per_step=tokens,
                      speeds={name: tokens / s for name, s in median.items()}, median_s=median, initial_loss=initial)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", choices=["bench", "small"], default="bench")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-per-round", type=int, default=3)
    parser.add_argument("--mtp", action="store_true", help="train our model with one MTP module (HF has none)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model's blocks (ours and HF)")
    parser.add_argument("--compile-ours", action="store_true",
                        help="also time a copy of ours compiled as train.compile=true does (train/compile.py)")
    parser.add_argument("--hf-experts", default="default",
                        help="comma list of HF experts implementations to time: default,eager,batched_mm,grouped_mm")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="both models' autocast dtype (auto: bf16 on CUDA, fp32 on the CPU)")
    add_allocator_option(parser)
    args = parser.parse_args()

    use_allocator(args.allocator)
    device = torch.device(args.device)
    cfg = BENCH_MODEL if args.shape == "bench" else SMALL_MODEL
    result = compare(cfg, device, args.batch, args.seq, args.rounds, args.steps_per_round, args.hf_experts.split(","),
                     mtp=args.mtp, compile=args.compile, compile_ours=args.compile_ours,
                     dtype=None if args.dtype == "auto" else getattr(torch, args.dtype))
    counts = count_parameters(cfg)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"threads {torch.get_num_threads()}, dtype {result.dtype}, torch {torch.__version__}, "
          f"allocator {args.allocator}")
    print(f"model: {counts.total / 1e6:.1f}M params ({counts.active / 1e6:.1f}M active), {cfg.n_layers} layers, "
          f"{cfg.n_routed_experts} experts top-{cfg.n_activated_experts}; batch {args.batch} x seq {args.seq}"
          f"{' ; ours with MTP' if args.mtp else ''}{' ; compiled' if args.compile else ''}")
    for name, speed in result.speeds.items():
        print(f"  {name:<16} {speed:>10,.0f} tokens/s   median step {result.median_s[name] * 1e3:8.1f} ms"
              f"   first-batch loss {result.initial_loss[name]:.6f}")
    for name, speed in result.speeds.items():
        if name != "ours":
            print(f"  ratio ours / {name}: {result.speeds['ours'] / speed:.2f}x")
    if "ours[compiled]" in result.speeds:
        for name, speed in result.speeds.items():
            if name.startswith("hf"):
                print(f"  ratio ours[compiled] / {name}: {result.speeds['ours[compiled]'] / speed:.2f}x")


if __name__ == "__main__":
    main()
