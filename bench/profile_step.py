"""Where the GPU time of a training step goes: the trainer's step (``bench/host_syncs.py``'s
``trainer_step``: ``forward_backward`` over the micro-batches, then ``ZeroAdamW.step``) under
``torch.profiler``, after warm-up steps. Prints the step's wall time, the GPU's busy time in it (the sum of
kernel times: a step far longer than that waits on the host, launch-bound), the kernel launches per step,
then the kernels and the operators that cost most.

    python bench/profile_step.py --device cuda                          # +conf=small, BF16
    python bench/profile_step.py --device cuda --set fp8.enabled=true   # the FP8 step
    python bench/profile_step.py --device cpu --preset tiny --steps 1   # the operators on a CPU
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.host_syncs import trainer_step  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--micro-batches", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="profiled steps (after 2 warm-up steps)")
    ap.add_argument("--rows", type=int, default=20, help="rows per table")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/profile_step.py --device cuda needs a CUDA GPU; nothing measured")
        return 0
    with trainer_step(args.preset, args.device, args.set, args.micro_batches) as (cfg, runtime, fwd_bwd, opt_step):
        cuda = runtime.device.type == "cuda"

        def step() -> None:
            fwd_bwd()
            opt_step()

        def sync() -> None:
            if cuda:
                torch.cuda.synchronize(runtime.device)

        for _ in range(2):
            step()
        sync()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        wall = (time.perf_counter() - t0) / args.steps
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                step()
            sync()
        events = prof.key_averages()
        tokens = args.micro_batches * cfg.train.micro_batch_size * cfg.train.seq_len
        print(f"+conf={args.preset} on {torch.cuda.get_device_name(runtime.device) if cuda else 'cpu'}, "
              f"{args.micro_batches} micro-batches of {cfg.train.micro_batch_size} x {cfg.train.seq_len}, "
              f"fp8 {cfg.fp8.enabled}, overrides {args.set}")
        print(f"step {wall * 1e3:.1f} ms unprofiled ({tokens / wall:,.0f} tokens/s)")
        if cuda:
            kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            busy = sum(e.device_time_total for e in kernels) / args.steps / 1e3  # us -> ms
            print(f"GPU busy {busy:.1f} ms per step ({busy / (wall * 1e3):.0%} of the step), "
                  f"{len(kernels) / args.steps:,.0f} kernels per step")
            print(events.table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=60))
        print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
