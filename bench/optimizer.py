"""The optimizer step: our AdamW (BF16 moments, sec 3.3.3), its fast path (torch's fused kernel on the CPU, the
one-pass Triton kernel on CUDA) vs its foreach reference, and torch's
AdamW as HF training would run it (FP32 moments, default and fused), on one model's parameters; and
DeepSpeed's CPU Adam (FP32 moments, its own AVX kernel) where ``deepspeed`` is installed and the device is
the CPU (docs/dependencies.md: why the trainer does not use it).

    python bench/optimizer.py                    # the bench shape of bench/train_throughput.py, CPU
    python bench/optimizer.py --shape small --device cuda

Checked in the same run: after a few steps from the same gradients, the fast path's parameters equal
the reference's to FP32 rounding (tests/unit/test_optim.py and test_optim_triton.py state the bounds).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: find bench.*

from train.config import ModelConfig
from train.model import Transformer
from train.optim import AdamW, param_groups, triton_importable

# Relative (Frobenius) difference of the parameters' movement, fast path vs foreach, per device type. CPU:
# torch's fused kernel and the foreach ops round the same FP32 operations (1e-6 leaves room for FMA
# contraction). CUDA: the fused kernel orders its FP32 arithmetic differently; a moment one FP32 ulp
# off lands on the other side of a BF16 rounding boundary in about 2^-15 of the elements, which then move
# by a BF16 ulp of their moment (2^-8 relative): sqrt(2^-15) x 2^-8 ~ 2e-5 after a few steps (1.7e-5
# measured on an H200, 3 steps, torch's fused kernel; the Triton kernel's roundings differ from the
# foreach ops' in the same way), hence 1e-4.
TOLERANCES = {"cpu": 1e-6, "cuda": 1e-4}


def tolerance(device: str) -> float:
    return TOLERANCES.get(torch.device(device).type, TOLERANCES["cuda"])


@dataclass
class OptimizerResult:
    params: int
    seconds: dict[str, float]  # median step per implementation
    rel_err: float  # fast vs foreach, relative to how far the parameters moved
    fast: str  # the device's fast path: "fused" (CPU) or "triton" (CUDA with Triton)


def _model_params(cfg: ModelConfig, device: torch.device) -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    model = Transformer(cfg).to(device)
    model.init_weights(seed=0)
    return list(model.parameters())


def compare(cfg: ModelConfig, device: str = "cpu", rounds: int = 5, steps: int = 3,
            perturb: float = 0.0, with_deepspeed: bool = True) -> OptimizerResult:
    dev = torch.device(device)
    lr, wd = 1e-3, 0.1
    fast = "triton" if dev.type == "cuda" and triton_importable() else "fused"
    makers = {
        "ours triton": lambda ps: AdamW(param_groups_of(ps, wd), lr=lr, update="triton"),
        "ours fused": lambda ps: AdamW(param_groups_of(ps, wd), lr=lr, update="fused"),
        "ours foreach": lambda ps: AdamW(param_groups_of(ps, wd), lr=lr, update="foreach"),
        "torch AdamW (HF)": lambda ps: torch.optim.AdamW(param_groups_of(ps, wd), lr=lr, betas=(0.9, 0.95)),
        "torch AdamW fused fp32": lambda ps: torch.optim.AdamW(param_groups_of(ps, wd), lr=lr, betas=(0.9, 0.95),
                                                               fused=True),
    }
    if fast != "triton":
        del makers["ours triton"]
    deepspeed_adam = _deepspeed_cpu_adam() if with_deepspeed and dev.type == "cpu" else None
    if deepspeed_adam is not None:
        makers["DeepSpeedCPUAdam fp32"] = lambda ps: deepspeed_adam(param_groups_of(ps, wd), lr=lr, betas=(0.9, 0.95),
                                                                    weight_decay=wd, adamw_mode=True)
    params = {name: _model_params(cfg, dev) for name in makers}
    start = [p.detach().clone() for p in params["ours fused"]]
    gen = torch.Generator(device=dev).manual_seed(1)
    grads = [[torch.randn(p.shape, generator=gen, device=dev) * 1e-2 for p in start] for _ in range(steps)]
    optimizers = {name: make(params[name]) for name, make in makers.items()}

    def step(name: str, k: int) -> float:
        for p, g in zip(params[name], grads[k % steps]):
            p.grad = g
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        optimizers[name].step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t0

    for name in makers:  # the checked steps (also the warm-up: state, scratch)
        for k in range(steps):
            step(name, k)
    moved = torch.cat([(p.detach() - s).flatten() for p, s in zip(params["ours foreach"], start)])
    diff = torch.cat([(a.detach() * (1 + perturb) - b.detach()).flatten()
                      for a, b in zip(params[f"ours {fast}"], params["ours foreach"])])
    rel_err = float(diff.double().norm() / moved.double().norm())
    names = list(makers)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):  # alternate, starting with another implementation each round
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(step(name, r))
    return OptimizerResult(params=sum(p.numel() for p in start),
                           seconds={k: statistics.median(v) for k, v in times.items()}, rel_err=rel_err, fast=fast)


def _deepspeed_cpu_adam():
    """DeepSpeed's CPU Adam class, or None where deepspeed is not installed (it is not a dependency)."""
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
    except ImportError:
        return None
    return DeepSpeedCPUAdam


def param_groups_of(params: list[torch.nn.Parameter], weight_decay: float) -> list[dict]:
    """param_groups' split (decay on matrices) for a bare parameter list."""
    module = torch.nn.Module()
    module.params = torch.nn.ParameterList(params)
    return param_groups(module, weight_decay)


def main(argv: list[str] | None = None) -> int:
    from bench import train_throughput as tt

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=["bench", "small"], default="bench")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    cfg = tt.BENCH_MODEL if args.shape == "bench" else tt.SMALL_MODEL
    r = compare(cfg, args.device, args.rounds)
    print(f"{r.params / 1e6:.1f}M parameters ({args.shape}), {args.device}, {torch.get_num_threads()} threads; "
          f"median step of {args.rounds} alternating rounds")
    base = r.seconds["ours foreach"]
    for name, s in r.seconds.items():
        print(f"  {name:<24} {s * 1e3:8.1f} ms  {base / s:5.2f}x the foreach reference")
    ok = r.rel_err <= tolerance(args.device)
    print(f"{r.fast} vs foreach: relative difference {r.rel_err:.1e} ({'ok' if ok else 'FAILED'}, "
          f"tolerance {tolerance(args.device):g})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
