"""Checkpoint cost on ``+conf=small``: save / load throughput, checksum cost, and the training stall of a
synchronous against a background (``CheckpointWriter(async_save=True)``) save, measured in the same run.

The model (116M parameters, fp32) and its ZeRO-1 AdamW state (fp32 masters, bf16 moments; one rank of a
one-process gloo group, as a plain ``python launch/pretrain.py`` run) are built as the trainer builds them.
Measured, each ``--reps`` times (median shown):

  save        ``save_checkpoint`` (DCP write + each rank's sha256 of its files + manifest + rename)
  checksum    sha256 of every file of the checkpoint (warm page cache), and the same bytes hashed in memory
              with sha256 and blake2b (the choice of hash)
  verify      ``verify_checkpoint(level="full")``
  load        ``load_checkpoint(verify="none")`` into a fresh model and optimizer
  stall       what a training step waits for: sync = the whole ``save``; async = ``save`` returning (DCP
              copies the state to CPU) + ``wait`` after ``--step-s`` seconds of simulated training (a
              one-thread matmul loop, so the background has the other core)

    python bench/checkpoint.py                    # ~3 min on 2 cores; --dir to measure another disk
    python -m bench checkpoint --quick            # +conf=tiny, in the harness

Checked in the same run: a fresh model loaded from the checkpoint equals the saved one bit for bit.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from parallel.mesh import build_process_groups, plan_layout  # noqa: E402
from parallel.zero import ZeroAdamW  # noqa: E402
from train import checkpoint  # noqa: E402
from train.config import load_config  # noqa: E402
from train.model import Transformer  # noqa: E402
from train.runtime import release_process_groups  # noqa: E402

GB = 1e9


def build(cfg, groups) -> tuple[Transformer, ZeroAdamW]:
    model = Transformer(cfg.model)
    model.init_weights(seed=cfg.train.seed)
    return model, ZeroAdamW(model, groups, cfg.optim)


def checkpoint_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def busy(seconds: float) -> None:
    """Simulated training: matmuls on the caller's thread for ``seconds``."""
    a = torch.randn(512, 512)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        a = torch.tanh(a @ a)


def hash_speed(name: str, data: bytes) -> float:
    view = memoryview(data)
    start = time.perf_counter()
    digest = hashlib.new(name)
    for offset in range(0, len(data), 4 << 20):
        digest.update(view[offset:offset + (4 << 20)])
    return len(data) / (time.perf_counter() - start) / GB


@dataclass
class CheckpointResult:
    size: int  # bytes of one checkpoint
    medians: dict[str, float]  # seconds per measure (see the module docstring)
    runs: dict[str, list[float]]
    step_s: float  # simulated training between an async save and its wait
    rel_err: float  # loaded state vs saved state, relative (0: bit for bit)
    sha256_gbs: float
    blake2b_gbs: float


def measure(preset: str = "small", reps: int = 2, step_s: float = 0.0, directory: str | None = None,
            perturb: float = 0.0) -> CheckpointResult:
    """Every measure of the module docstring on ``+conf=PRESET``, ``reps`` times. Checked: a fresh model
    and optimizer loaded from the checkpoint equal the saved ones (``perturb`` scales the loaded
    parameters before that comparison, to see the check fail)."""
    torch.set_num_threads(1)
    cfg = load_config([f"+conf={preset}"])
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    groups = build_process_groups(plan_layout(cfg, 1, 0, 1), "cpu")
    model, optimizer = build(cfg, groups)
    fresh, fresh_optimizer = build(cfg, groups)
    with torch.no_grad():  # the fresh copy must differ before the load, or the check proves nothing
        for p in fresh.parameters():
            p.add_(1.0)
    trainer_state = {"loader": {"consumed": 0}, "rng": {"cpu": torch.get_rng_state()}}
    config = {"model": vars(cfg.model)}
    base = Path(directory or tempfile.mkdtemp(prefix="bench_checkpoint_"))

    def state():
        return checkpoint.model_state(model, groups), optimizer.state_dict()

    times: dict[str, list[float]] = {k: [] for k in ("save", "checksum", "verify", "load", "sync_stall",
                                                     "async_return", "async_wait", "async_stall", "async_total")}
    size, rel_err = 0, math.inf
    try:
        for rep in range(reps):
            run = base / f"sync{rep}"
            start = time.perf_counter()
            path = checkpoint.save_checkpoint(run, 1, 0, *state(), cfg.model, trainer_state, keep=1, config=config)
            times["save"].append(time.perf_counter() - start)
            size = checkpoint_bytes(path)

            start = time.perf_counter()
            for file in path.iterdir():
                checkpoint.file_sha256(file)
            times["checksum"].append(time.perf_counter() - start)
            start = time.perf_counter()
            checkpoint.verify_checkpoint(path, "full")
            times["verify"].append(time.perf_counter() - start)

            fresh_state = fresh_optimizer.state_dict()
            start = time.perf_counter()
            checkpoint.load_checkpoint(path, checkpoint.model_state(fresh, groups), fresh_state, cfg.model,
                                       verify="none")
            times["load"].append(time.perf_counter() - start)
            saved = torch.cat([p.detach().flatten() for p in model.parameters()])
            loaded = torch.cat([p.detach().flatten() for p in fresh.parameters()]) * (1 + perturb)
            rel_err = float((loaded - saved).double().norm() / saved.double().norm())

            writer = checkpoint.CheckpointWriter(base / f"sync_writer{rep}", keep=1, async_save=False)
            start = time.perf_counter()
            writer.save(1, 0, *state(), cfg.model, trainer_state, config=config)
            times["sync_stall"].append(time.perf_counter() - start)
            writer.close()

            step_s = step_s or 3 * times["sync_stall"][-1]
            writer = checkpoint.CheckpointWriter(base / f"async{rep}", keep=1, async_save=True)
            start = time.perf_counter()
            writer.save(1, 0, *state(), cfg.model, trainer_state, config=config)
            returned = time.perf_counter() - start
            busy(step_s)
            waited = time.perf_counter()
            writer.wait()
            end = time.perf_counter()
            times["async_return"].append(returned)
            times["async_wait"].append(end - waited)
            times["async_stall"].append(returned + end - waited)
            times["async_total"].append(end - start - step_s)  # the background's length beyond the training
            writer.close()
            for done in (run, base / f"sync_writer{rep}", base / f"async{rep}"):
                shutil.rmtree(done)
        sample = os.urandom(64 << 20)
        sha256, blake2b = hash_speed("sha256", sample), hash_speed("blake2b", sample)
    finally:
        if not directory:
            shutil.rmtree(base, ignore_errors=True)
        if own_group:
            release_process_groups()
    return CheckpointResult(size=size, medians={k: statistics.median(v) for k, v in times.items()}, runs=times,
                            step_s=step_s, rel_err=rel_err, sha256_gbs=sha256, blake2b_gbs=blake2b)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", help="where to write the checkpoints (default: a temporary directory)")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--step-s", type=float, default=0.0,
                        help="simulated training between async save and wait (default: 3 x the sync save)")
    args = parser.parse_args()
    r = measure(args.preset, args.reps, args.step_s, args.dir)
    med, size = r.medians, r.size
    print(f"+conf={args.preset}; checkpoint: {size / GB:.3f} GB in 4 files; median of {args.reps}; simulated "
          f"training between an async save and its wait: {r.step_s:.1f} s")
    print("| measure | time | rate / ratio |")
    print("|---|---|---|")
    print(f"| sync save (DCP write + checksums + manifest + rename) | {med['save']:.2f} s | "
          f"{size / med['save'] / GB:.2f} GB/s |")
    print(f"| sha256 of the files (warm page cache) | {med['checksum']:.2f} s | "
          f"{size / med['checksum'] / GB:.2f} GB/s, {med['checksum'] / med['save']:.2f} of the save |")
    print(f"| in-memory hash, 64 MiB | sha256 {r.sha256_gbs:.2f} GB/s | blake2b {r.blake2b_gbs:.2f} GB/s |")
    print(f"| verify_checkpoint(full) | {med['verify']:.2f} s | {size / med['verify'] / GB:.2f} GB/s |")
    print(f"| load_checkpoint(verify=none) | {med['load']:.2f} s | {size / med['load'] / GB:.2f} GB/s |")
    print(f"| sync stall (CheckpointWriter.save) | {med['sync_stall']:.2f} s | 1.00 |")
    print(f"| async stall = save returns + wait | {med['async_return']:.2f} + {med['async_wait']:.2f} = "
          f"{med['async_stall']:.2f} s | {med['async_stall'] / med['sync_stall']:.2f} of sync |")
    print(f"| async background beyond the training | {med['async_total']:.2f} s | |")
    print("all runs:", {k: [round(x, 2) for x in v] for k, v in r.runs.items()})
    ok = r.rel_err == 0.0
    print(f"loaded state vs saved: relative difference {r.rel_err:.1e} ({'ok' if ok else 'FAILED'}: must be 0)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
