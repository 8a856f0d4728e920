"""Training MFU and the FP8 / BF16 step ratio, measured by the trainer itself (issue goals on one GPU:
>= 40% MFU in BF16, FP8 step >= 1.3x BF16).

Runs ``launch/pretrain.py`` twice per preset, with ``fp8.enabled=false`` (the baseline) and ``true``,
from the same seed and data, and reads RUN_DIR/metrics.jsonl: median tokens/s and MFU over the steps
after the warm-up (``train/mfu.py``: the planner's model FLOPs over the device's dense BF16 peak, for
both precisions). Checked in the same run: the FP8 run's mean loss over the steps is within
``--loss-tolerance`` of the BF16 run's (a wrong FP8 path shows up as a different loss at once). Each run's
peak memory (the trainer's ``memory_gib``) is printed next to the planner's estimate for it without the
planner's fixed reserve: on a GPU a check of the planner (BF16 working weights and FP32 masters included);
on a CPU the resident set also holds the Python and torch runtime.

    python bench/mfu.py --device cuda                         # +conf=small on one GPU
    python bench/mfu.py --device cuda --preset small --set train.micro_batch_size=16
    python bench/mfu.py --device cuda --preset 1gpu --fp8-backends triton,torch   # two FP8 GEMM backends
    python bench/mfu.py --device cpu --peak-tflops 1 --preset tiny --steps 6   # the plumbing, on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class RunResult:
    tokens_per_s: float  # median over the measured steps
    mfu: float | None  # median, None where the peak is unknown
    mean_loss: float  # over all steps
    memory_gib: float  # the largest step peak (GPU: allocated; CPU: the process's resident set)
    planned_gib: float  # the planner's total for the same config, less its reserve (CUDA context, fragmentation)


def run_trainer(preset: str, fp8: bool, device: str, steps: int, warmup: int, peak: float, extra: list[str],
                workdir: Path, tag: str = "") -> RunResult:
    run_dir = workdir / f"{preset}_{'fp8' if fp8 else 'bf16'}{tag}"
    command = [sys.executable, str(ROOT / "launch" / "pretrain.py"), f"+conf={preset}", f"run.dir={run_dir}",
               f"train.steps={steps}", f"train.device={device}", f"fp8.enabled={str(fp8).lower()}",
               f"logging.peak_tflops={peak}", "checkpoint.every=0", "logging.every=1",
               f"data.cache_dir={workdir / 'data_cache'}", *extra]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    measured = records[warmup:] or records[-1:]
    mfus = [r["mfu"] for r in measured if "mfu" in r]
    return RunResult(tokens_per_s=statistics.median(r["tokens_per_s"] for r in measured),
                     mfu=statistics.median(mfus) if mfus else None,
                     mean_loss=statistics.fmean(r["loss"] for r in records),
                     memory_gib=max(r.get("memory_gib", 0.0) for r in records),
                     planned_gib=planned_memory_gib(preset, fp8, device, extra))


def planned_memory_gib(preset: str, fp8: bool, device: str, extra: list[str]) -> float:
    """``launch/plan.py``'s memory for this run on one device, without its fixed reserve."""
    from train.config import load_config
    from train.plan import plan
    from train.plan_cluster import Cluster

    cfg = load_config([f"+conf={preset}", f"fp8.enabled={str(fp8).lower()}", *extra])
    memory = plan(cfg, Cluster(gpus=1, device=device), suggest=False).memory
    return sum(v for k, v in memory.items() if k != "reserve") / 2**30


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10, help="first steps left out of the medians")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="0: look the GPU up (train/mfu.py)")
    ap.add_argument("--loss-tolerance", type=float, default=0.01, help="relative, FP8 mean loss vs BF16")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra trainer override")
    ap.add_argument("--fp8-backends", default="auto", help="comma-separated fp8.backend values: one FP8 run each")
    args = ap.parse_args(argv)
    backends = [b for b in args.fp8_backends.split(",") if b]
    failures: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        bf16 = run_trainer(args.preset, False, args.device, args.steps, args.warmup, args.peak_tflops, args.set,
                           Path(tmp))
        fp8_runs = {}
        for backend in backends:
            extra = [*args.set, f"fp8.backend={backend}"] if backend != "auto" else args.set
            try:
                fp8_runs[backend] = run_trainer(args.preset, True, args.device, args.steps, args.warmup,
                                                args.peak_tflops, extra, Path(tmp), f"_{backend}")
            except RuntimeError as exc:  # e.g. a backend this machine refuses: the others still run
                lines = str(exc).strip().splitlines()
                failures[backend] = next((line for line in lines if line.startswith("error")), lines[-1])[:200]
    print(f"+conf={args.preset} on {args.device}, {args.steps} steps ({args.warmup} warm-up), overrides {args.set}")
    runs = [("no FP8", bf16)] + [(f"FP8 {b}" if b != "auto" else "FP8", r) for b, r in fp8_runs.items()]
    for name, r in runs:  # no FP8: BF16 autocast on a GPU, FP32 on a CPU
        mfu = f"{r.mfu:.1%}" if r.mfu is not None else "- (peak unknown: --peak-tflops)"
        print(f"  {name:<12} {r.tokens_per_s:>12,.0f} tokens/s   MFU {mfu:<8}   mean loss {r.mean_loss:.4f}   "
              f"peak memory {r.memory_gib:.2f} GiB (planned {r.planned_gib:.2f})")
    ok = not failures
    for backend, why in failures.items():
        print(f"  FP8 {backend}: the run failed: {why}")
    for name, r in runs[1:]:
        diff = abs(r.mean_loss - bf16.mean_loss) / bf16.mean_loss
        ok &= diff <= args.loss_tolerance
        print(f"  {name} / BF16 step speed: {r.tokens_per_s / bf16.tokens_per_s:.2f}x; mean loss relative difference "
              f"{diff:.2e} ({'ok' if diff <= args.loss_tolerance else 'FAILED'}, tolerance {args.loss_tolerance:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
