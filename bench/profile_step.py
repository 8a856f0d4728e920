"""Where the GPU time of a training step goes: the trainer's step (``bench/host_syncs.py``'s
``trainer_step``: ``forward_backward`` over the micro-batches, then ``ZeroAdamW.step``) under
``torch.profiler``, after warm-up steps. Prints the step's wall time, the GPU's busy time in it (the sum of
kernel times: a step far longer than that waits on the host, launch-bound), the kernel launches per step,
then the kernels and the operators that cost most. ``--memory``: where one step's peak of memory comes
from, above what was allocated before the step: the allocations live at the peak, by the innermost place
in our code that made them (on CUDA the allocator's history, ``torch.cuda.memory``; on the CPU a dispatch
mode that follows every tensor the step makes, ``LiveTensors``), next to the planner's terms; the
planner's activation table already matches autograd (bench/memory.py), so what is left shows here (on
the CPU it found the MTP logits' gradient the planner missed).

    python bench/profile_step.py --device cuda                          # +conf=small, BF16
    python bench/profile_step.py --device cuda --set fp8.enabled=true   # the FP8 step
    python bench/profile_step.py --device cpu --preset tiny --steps 1   # the operators on a CPU
    python bench/profile_step.py --device cuda --memory                 # the step's memory peak
    python bench/profile_step.py --device cpu --micro-batches 1 --memory --set train.dtype=bfloat16 \
        --set train.param_dtype=bfloat16                                # the same on a CPU (2 min)
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
import weakref
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.host_syncs import OURS, ROOT, add_step_arguments, trainer_step  # noqa: E402

TORCH_DIR = str(Path(torch.__file__).parent)


def allocation_site(frames: list[dict]) -> str:
    """``path:line (function)`` of the innermost frame in our packages (frames innermost first, as the
    allocator records them), else of the innermost frame outside torch, else of the innermost; "?" without
    frames."""
    if not frames:
        return "?"
    frame = (next((f for f in frames if f["filename"].startswith(OURS)), None)
             or next((f for f in frames if not f["filename"].startswith(TORCH_DIR)), frames[0]))
    name = frame["filename"]
    if name.startswith(str(ROOT)):
        name = str(Path(name).relative_to(ROOT))
    return f"{name}:{frame['line']} ({frame['name']})"


def live_at_peak(events: list[dict]) -> tuple[int, dict[str, int]]:
    """From the allocator's trace (``alloc`` / ``free_requested`` entries; others ignored): the peak of
    the bytes allocated within the trace, and those bytes live at that moment by allocation site.
    Blocks freed in the trace but allocated before it do not count."""
    live: dict[int, int] = {}
    current = peak = 0
    peak_index = -1
    for index, event in enumerate(events):
        if event["action"] == "alloc":
            live[event["addr"]] = event["size"]
            current += event["size"]
            if current > peak:
                peak, peak_index = current, index
        elif event["action"] == "free_requested" and event["addr"] in live:
            current -= live.pop(event["addr"])
    sites: dict[int, tuple[int, str]] = {}
    for event in events[:peak_index + 1]:  # replay up to the peak, now keeping the sites
        if event["action"] == "alloc":
            sites[event["addr"]] = (event["size"], allocation_site(event.get("frames", [])))
        elif event["action"] == "free_requested":
            sites.pop(event["addr"], None)
    by_site: dict[str, int] = {}
    for size, site in sites.values():
        by_site[site] = by_site.get(site, 0) + size
    return peak, dict(sorted(by_site.items(), key=lambda item: -item[1]))


class LiveTensors(TorchDispatchMode):
    """CPU: every tensor an operation makes under this mode, by the innermost place in our code that made it
    (and the operation), until its storage is freed; the peak of their bytes and what was live then. The
    allocator's history does this on CUDA; here each new storage of at least ``min_bytes`` is recorded."""

    def __init__(self, min_bytes: int = 1 << 20):
        super().__init__()
        self.min_bytes = min_bytes
        self.live: dict[int, tuple[int, str]] = {}
        self.current = self.peak = 0
        self.at_peak: dict[str, int] = {}

    def _freed(self, key: int) -> None:
        self.current -= self.live.pop(key, (0, ""))[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            key, size = storage._cdata, storage.nbytes()
            if key in self.live or size < self.min_bytes:
                continue
            frames = [{"filename": f.filename, "line": f.lineno, "name": f.name}
                      for f in reversed(traceback.extract_stack()[:-1])]
            self.live[key] = (size, f"{allocation_site(frames)} [{func.__name__}]")
            weakref.finalize(storage, self._freed, key)
            self.current += size
            if self.current > self.peak:
                self.peak = self.current
                self.at_peak = {}
                for bytes_, site in self.live.values():
                    self.at_peak[site] = self.at_peak.get(site, 0) + bytes_
        return out


def memory_peak_cpu(step, cfg, rows: int) -> None:
    """One step under ``LiveTensors``: the peak of the tensors made in it, by site, next to the planner."""
    from train.plan import plan
    from train.plan_cluster import Cluster

    tracker = LiveTensors()
    with tracker:
        step()
    gib = 2 ** 30
    print(f"the step's peak of tensors of 1 MiB or more made in it: {tracker.peak / gib:.3f} GiB; planner, "
          "without its reserve:")
    memory = plan(cfg, Cluster(gpus=1, device="cpu"), suggest=False).memory
    print("  " + ", ".join(f"{k} {v / gib:.3f}" for k, v in memory.items() if k != "reserve"))
    print(f"live at the peak, by site (top {rows}):")
    for site, size in sorted(tracker.at_peak.items(), key=lambda item: -item[1])[:rows]:
        print(f"  {size / 2**20:10.1f} MiB  {site}")


def memory_peak(step, cfg, rows: int) -> None:
    """One step under the allocator's history: the peak over what was allocated before it, by site."""
    from train.plan import plan
    from train.plan_cluster import Cluster

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(context="alloc", stacks="python", max_entries=2_000_000)
    try:
        step()
        torch.cuda.synchronize()
        events = torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()]
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    peak, by_site = live_at_peak(events)
    gib = 2 ** 30
    print(f"allocated before the step {before / gib:.3f} GiB, the step's peak {torch.cuda.max_memory_allocated() / gib:.3f}"
          f" GiB (trace: {before / gib:.3f} + {peak / gib:.3f}); planner, without its reserve:")
    memory = plan(cfg, Cluster(gpus=1, device="cuda"), suggest=False).memory
    print("  " + ", ".join(f"{k} {v / gib:.3f}" for k, v in memory.items() if k != "reserve") +
          f"; total {sum(v for k, v in memory.items() if k != 'reserve') / gib:.3f} GiB")
    print(f"live at the peak, allocated during the step, by site (top {rows}):")
    for site, size in list(by_site.items())[:rows]:
        print(f"  {size / 2**20:10.1f} MiB  {site}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_step_arguments(ap)
    ap.add_argument("--steps", type=int, default=3, help="profiled steps (after 2 warm-up steps)")
    ap.add_argument("--rows", type=int, default=20, help="rows per table")
    ap.add_argument("--memory", action="store_true", help="where the step's memory peak comes from")
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
        if args.memory:
            (memory_peak if cuda else memory_peak_cpu)(step, cfg, args.rows)
            return 0
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
