"""Activation memory per token with and without recomputation, and the CPU parameter EMA's cost to the
step (report sec 3.2.3), measured in one run.

(1) For each ``memory.recompute`` mode: the bytes autograd keeps for backward per token
    (``train/memory.py``: saved-tensor accounting, works on CPU), and the forward+backward time
    against ``none`` (the price of recomputing).
(2) The planner's activation bytes per token against what autograd keeps (FP32, BF16, BF16 + FP8; each
    recompute mode): on a GPU this checks the table against the GPU's attention kernels.
(3) EMA: the time ``CpuEma.update()`` takes inside the step (copy + waiting for the previous blend)
    against a synchronous blend of the same parameters, while training steps run in between.

    python bench/memory.py                       # +conf=small, one sequence of 1024 tokens, fp32
    python bench/memory.py --shape tiny --tokens 1 128
    python bench/memory.py --plan-only --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from train.config import load_config
from train.ema import CpuEma
from train.losses import compute_losses
from train.memory import activation_bytes_per_token, planned_activation_bytes_per_token, saved_activation_bytes
from train.model import RECOMPUTE_MODES, Transformer, set_recompute


@dataclass
class RecomputeRow:
    """One ``memory.recompute`` mode: bytes autograd keeps, median forward+backward seconds (rounds alternating
    between the modes), and the largest relative difference of its loss and gradients from mode ``none``
    (recomputation must not change them)."""

    mode: str
    saved_bytes: int
    seconds: float
    loss_rel_err: float
    grad_rel_err: float


def measure_recompute(model: Transformer, window: torch.Tensor, repeats: int,
                      perturb: float = 0.0) -> list[RecomputeRow]:
    """Each of RECOMPUTE_MODES on ``model`` (left in mode none) with the same window; ``none`` first.
    ``perturb`` scales the other modes' gradients by (1 + perturb) before the comparison (to see the check
    fail; 0 in a real run)."""

    def step() -> torch.Tensor:
        out = model(window[:, :-1], window)  # as the trainer: each head's cross-entropy after it
        loss = compute_losses(out, window, 0.3, 1e-4).loss
        loss.backward()
        return loss.detach()

    measured, reference = {}, None
    for mode in RECOMPUTE_MODES:
        set_recompute(model, mode)
        nbytes, out = saved_activation_bytes(model, lambda: model(window[:, :-1]))
        del out
        model.zero_grad(set_to_none=True)
        loss = step()  # warm-up, and the numbers compared with mode none
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        if reference is not None:
            grads = {n: g * (1 + perturb) for n, g in grads.items()}
        reference = reference or (loss, grads)
        loss_err = abs(loss - reference[0]).item() / abs(reference[0]).item()
        grad_err = max(((g - reference[1][n]).norm() / reference[1][n].norm().clamp_min(1e-30)).item()
                       for n, g in grads.items())
        measured[mode] = (nbytes, loss_err, grad_err)
    times: dict[str, list[float]] = {mode: [] for mode in RECOMPUTE_MODES}
    for rep in range(repeats):  # rounds alternate between the modes, the first one rotating
        k = rep % len(RECOMPUTE_MODES)
        for mode in RECOMPUTE_MODES[k:] + RECOMPUTE_MODES[:k]:
            set_recompute(model, mode)
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            step()
            times[mode].append(time.perf_counter() - t0)
    set_recompute(model, "none")
    return [RecomputeRow(mode, nbytes, statistics.median(times[mode]), loss_err, grad_err)
            for mode, (nbytes, loss_err, grad_err) in measured.items()]


def plan_table(shape: str, device: str) -> None:
    """Bytes per token kept for backward by the forward and the losses, measured against the planner's
    table (docs/planner.md), for each train.dtype, recompute mode and, in BF16, FP8."""
    print(f"bytes per token kept for backward (forward and losses) on {device}, measured "
          f"(train.memory.activation_bytes_per_token) against the planner's table, +conf={shape}:")
    print(f"{'train.dtype':<12} {'fp8':<5} {'recompute':<10} {'measured KiB':>12} {'planned KiB':>12} "
          f"{'planned/measured':>17}")
    for dtype, fp8 in (("float32", False), ("bfloat16", False), ("bfloat16", True)):
        for mode in RECOMPUTE_MODES:
            cfg = load_config([f"+conf={shape}", f"train.dtype={dtype}", f"memory.recompute={mode}",
                               f"fp8.enabled={str(fp8).lower()}"])
            measured = activation_bytes_per_token(cfg, device=device)
            planned = planned_activation_bytes_per_token(cfg)
            print(f"{dtype:<12} {'yes' if fp8 else 'no':<5} {mode:<10} {measured / 1024:>12.1f} "
                  f"{planned / 1024:>12.1f} {planned / measured:>17.3f}", flush=True)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="small", help="the +conf= preset whose model to use")
    ap.add_argument("--tokens", type=int, nargs=2, default=[1, 1024], metavar=("BATCH", "SEQ"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--plan-only", action="store_true",
                    help="only the planner-vs-measured table (with --device cuda: the GPU's attention kernels)")
    ap.add_argument("--device", default="cpu", help="where the planner-vs-measured table is measured")
    args = ap.parse_args(argv)
    if args.plan_only:
        plan_table(args.shape, args.device)
        return 0
    cfg = load_config([f"+conf={args.shape}"]).model
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    batch, seq = args.tokens
    window = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
    tokens = batch * seq

    def step() -> None:
        out = model(window[:, :-1], window)  # as the trainer: each head's cross-entropy after it
        compute_losses(out, window, 0.3, 1e-4).loss.backward()

    print(f"+conf={args.shape}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"{batch} x {seq} tokens, fp32, {torch.get_num_threads()} threads")
    print(f"{'recompute':<10} {'saved MiB':>10} {'KiB/token':>10} {'vs none':>8} {'fwd+bwd s':>10} {'vs none':>8}"
          f" {'grad diff':>10}")
    rows = measure_recompute(model, window, args.repeats)
    base = rows[0]
    for r in rows:
        print(f"{r.mode:<10} {r.saved_bytes / 2**20:>10.1f} {r.saved_bytes / tokens / 1024:>10.1f} "
              f"{r.saved_bytes / base.saved_bytes:>8.2f} {r.seconds:>10.3f} {r.seconds / base.seconds:>8.2f} "
              f"{r.grad_rel_err:>10.1e}")

    print()
    plan_table(args.shape, args.device)

    ema = CpuEma(model, 0.999)
    t0 = time.perf_counter()
    ema._blend(None)  # one synchronous blend: what the step would pay without the background thread
    sync = time.perf_counter() - t0
    waits, steps = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        steps.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ema.update()
        waits.append(time.perf_counter() - t0)
    ema.close()
    print(f"EMA of {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters: synchronous blend "
          f"{sync * 1e3:.1f} ms; in the step with the background thread {statistics.median(waits) * 1e3:.1f} ms "
          f"(median of {args.repeats}; copy to staging + waiting for the previous blend), step "
          f"{statistics.median(steps):.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
