"""Run launch/pretrain.py in a subprocess on the tiny preset."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# A smaller corpus than the tiny preset's default keeps the first (uncached) preparation short in CI.
TINY_DATA = ["data.max_bytes=1500000"]


def pretrain_command(run_dir: Path, data_cache: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(REPO / "launch" / "pretrain.py"), "+conf=tiny", f"run.dir={run_dir}",
            f"data.cache_dir={data_cache}", *TINY_DATA, *overrides]


def run_pretrain(run_dir: Path, data_cache: Path, *overrides: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    return subprocess.run(pretrain_command(run_dir, data_cache, *overrides), cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=timeout)


def run_pretrains_side_by_side(runs: dict[str, tuple[Path, list[str]]], data_cache: Path, timeout: float = 900
                               ) -> dict[str, subprocess.CompletedProcess]:
    """Independent one-thread runs (name -> run dir, overrides), as many at a time as this process may use
    CPU cores; list the longest first. Each run's numbers are its own: one thread, a deterministic
    order of operations."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(1, min(cores, len(runs)))) as pool:
        futures = {name: pool.submit(run_pretrain, run_dir, data_cache, *overrides, timeout=timeout)
                   for name, (run_dir, overrides) in runs.items()}
        return {name: future.result() for name, future in futures.items()}


def torchrun_command(nproc: int, run_dir: Path, data_cache: Path, *overrides: str,
                     launcher_args: tuple[str, ...] = ("--standalone",)) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *launcher_args, f"--nproc-per-node={nproc}",
            *pretrain_command(run_dir, data_cache, *overrides)[1:]]


def run_torchrun(nproc: int, run_dir: Path, data_cache: Path, *overrides: str,
                 timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    return subprocess.run(torchrun_command(nproc, run_dir, data_cache, *overrides), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


# torchrun's own traceback when a worker fails: it says only that one did, and hides the worker's output
LAUNCHER_TRACEBACK = re.compile(r'Traceback \(most recent call last\):\n  File "<frozen runpy>".*?ChildFailedError: \n',
                                re.S)


def failure_report(result: subprocess.CompletedProcess) -> str:
    """What a failed run printed last, for an assertion message: the end of its stdout and of its stderr,
    without torchrun's launcher traceback."""
    stdout = "\n".join(result.stdout.splitlines()[-15:])
    stderr = LAUNCHER_TRACEBACK.sub("[torchrun's launcher traceback cut]\n", result.stderr)
    return f"exit {result.returncode}\n--- stdout (end)\n{stdout}\n--- stderr (end)\n{stderr[-5000:]}"
