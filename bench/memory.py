"""Activation memory per token with and without recomputation, and the CPU parameter EMA's cost to the
step (report sec 3.2.3), measured in one run.

(1) For each ``memory.recompute`` mode: the bytes autograd keeps for backward per token
    (``train/memory.py``: saved-tensor accounting, works on CPU), and the forward+backward time
    against ``none`` (the price of recomputing).
(2) EMA: the time ``CpuEma.update()`` takes inside the step (copy + waiting for the previous blend)
    against a synchronous blend of the same parameters, while training steps run in between.

    python bench/memory.py                       # +conf=small, one sequence of 1024 tokens, fp32
    python bench/memory.py --shape tiny --tokens 1 128
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from train.config import load_config
from train.ema import CpuEma
from train.losses import compute_losses
from train.memory import saved_activation_bytes
from train.model import RECOMPUTE_MODES, Transformer, set_recompute


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="small", help="the +conf= preset whose model to use")
    ap.add_argument("--tokens", type=int, nargs=2, default=[1, 1024], metavar=("BATCH", "SEQ"))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    cfg = load_config([f"+conf={args.shape}"]).model
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    batch, seq = args.tokens
    window = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
    tokens = batch * seq

    def step() -> None:
        out = model(window[:, :-1])
        compute_losses(out, window, 0.3, 1e-4).loss.backward()

    print(f"+conf={args.shape}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"{batch} x {seq} tokens, fp32, {torch.get_num_threads()} threads")
    print(f"{'recompute':<10} {'saved MiB':>10} {'KiB/token':>10} {'vs none':>8} {'fwd+bwd s':>10} {'vs none':>8}")
    base_bytes = base_time = None
    for mode in RECOMPUTE_MODES:
        set_recompute(model, mode)
        nbytes, out = saved_activation_bytes(model, lambda: model(window[:, :-1]))
        del out
        step()  # warm-up
        times = []
        for _ in range(args.repeats):
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        elapsed = statistics.median(times)
        base_bytes, base_time = base_bytes or nbytes, base_time or elapsed
        print(f"{mode:<10} {nbytes / 2**20:>10.1f} {nbytes / tokens / 1024:>10.1f} {nbytes / base_bytes:>8.2f} "
              f"{elapsed:>10.3f} {elapsed / base_time:>8.2f}")
    set_recompute(model, "none")

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
