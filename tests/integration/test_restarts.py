"""Crashes, preemption and restarts of real training processes (signals, SIGKILL, torchrun's restarts).

Every case compares the losses of the disturbed run, after it resumed, with an undisturbed run of the
same config: on CPU the resumed run must give them bit for bit (the data position, RNG, optimizer and
gate biases all come back from the checkpoint), and the run directory must never hold a checkpoint
that ``resume=auto`` would pick but cannot load.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.pretrain_runs import REPO, failure_report, pretrain_command, run_pretrain, torchrun_command
from train import checkpoint
from train.trainer import read_metrics

KEYS = ("loss", "lm_loss", "mtp_loss", "balance_loss", "grad_norm", "max_vio", "lr", "tokens")
FAST = ["train.seq_len=64", "train.micro_batch_size=8", "train.batch_size=8", "train.batch_size_start=8"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}


STARTED: list[subprocess.Popen] = []


def start(command: list[str], log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    STARTED.append(proc)
    return proc


@pytest.fixture(autouse=True)
def no_stragglers():
    """A failed or timed-out test leaves no training processes behind (each run is its own session)."""
    yield
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended early with status {proc.returncode}"
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def steps_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def assert_same_losses(run_dir: Path, reference: list[dict], steps: int) -> None:
    resumed = read_metrics(run_dir)
    assert [m["step"] for m in resumed] == list(range(1, steps + 1))
    for ours, theirs in zip(resumed, reference):
        for key in KEYS:
            assert ours[key] == theirs[key], (ours["step"], key, ours[key], theirs[key])  # bitwise on CPU


def test_sigterm_saves_exits_zero_and_resumes_exactly(tmp_path, data_cache):
    run_dir = tmp_path / "preempted"
    proc = start(pretrain_command(run_dir, data_cache, "train.steps=40", "checkpoint.every=0", *FAST),
                 tmp_path / "preempted.log")
    wait_for(lambda: steps_logged(run_dir) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, (tmp_path / "preempted.log").read_text()[-3000:]
    output = (tmp_path / "preempted.log").read_text()
    stopped = checkpoint.latest_checkpoint(run_dir)
    step = int(stopped.name.split("_")[1])
    assert 3 <= step < 40 and f"stopped by SIGTERM after step {step}" in output
    assert steps_logged(run_dir) == step

    total = step + 3
    result = run_pretrain(run_dir, data_cache, f"train.steps={total}", *FAST)
    assert result.returncode == 0, failure_report(result)
    assert f"resumed from {stopped}" in result.stdout
    reference_dir = tmp_path / "reference"
    result = run_pretrain(reference_dir, data_cache, f"train.steps={total}", *FAST)
    assert result.returncode == 0, failure_report(result)
    assert_same_losses(run_dir, read_metrics(reference_dir), total)


def test_kill_at_random_instants_then_resume_gives_identical_losses(tmp_path, data_cache):
    """SIGKILL at random instants of a run that saves after every step, so some kills land inside a
    checkpoint write; after each kill, the newest checkpoint resume=auto would take must load."""
    steps = ["train.steps=10", "checkpoint.every=1", "checkpoint.keep=2", *FAST]
    reference_dir = tmp_path / "reference"
    result = run_pretrain(reference_dir, data_cache, *steps)
    assert result.returncode == 0, failure_report(result)
    reference = read_metrics(reference_dir)

    run_dir = tmp_path / "killed"
    rng = random.Random(1234)
    kills = 0
    for attempt in range(6):
        proc = start(pretrain_command(run_dir, data_cache, *steps), tmp_path / f"attempt{attempt}.log")
        if attempt < 3:  # kill a few times while it trains, at a random time after its first step
            before = steps_logged(run_dir)
            wait_for(lambda: steps_logged(run_dir) > before or proc.poll() is not None, proc)
            time.sleep(rng.uniform(0.0, 0.6))
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                kills += 1
            proc.wait()
            latest = checkpoint.latest_checkpoint(run_dir)
            if latest is not None:  # what resume=auto takes must be complete and loadable
                assert checkpoint.verify_checkpoint(latest, "full") > 0  # every file of its manifest, intact
                assert checkpoint.check_experts_complete(latest) > 0
                assert checkpoint.read_meta(latest)["step"] == int(latest.name.split("_")[1])
            continue
        assert proc.wait(timeout=600) == 0, (tmp_path / f"attempt{attempt}.log").read_text()[-3000:]
        break
    assert kills >= 2
    assert_same_losses(run_dir, reference, 10)


def test_torchrun_restarts_a_crashed_rank_and_finishes_with_the_same_losses(tmp_path, data_cache):
    overrides = ["train.steps=8", "checkpoint.every=2", "train.micro_batch_size=4", "train.seq_len=64",
                 "train.batch_size=8", "train.batch_size_start=8"]
    reference_dir = tmp_path / "reference"
    proc = start(torchrun_command(2, reference_dir, data_cache, *overrides), tmp_path / "reference.log")
    assert proc.wait(timeout=600) == 0, (tmp_path / "reference.log").read_text()[-3000:]

    run_dir = tmp_path / "crashed"
    log = tmp_path / "crashed.log"
    proc = start(torchrun_command(2, run_dir, data_cache, *overrides,
                                  launcher_args=("--standalone", "--max-restarts=1")), log)
    wait_for(lambda: steps_logged(run_dir) >= 3, proc)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(workers[1]), signal.SIGKILL)  # rank 1 dies; the agent restarts both ranks once
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    output = log.read_text()
    assert "resumed from" in output  # the newest checkpoint written before the crash
    assert_same_losses(run_dir, read_metrics(reference_dir), 8)


def test_async_checkpoints_are_complete_and_resume_exactly(tmp_path, data_cache):
    """checkpoint.async=true: the files are written in the background while training goes on; every
    checkpoint ends up complete and verified, and resuming from one gives the synchronous run's losses."""
    run_dir = tmp_path / "async"
    result = run_pretrain(run_dir, data_cache, "train.steps=6", "checkpoint.every=2", "checkpoint.async=true", *FAST)
    assert result.returncode == 0, failure_report(result)
    saved = checkpoint.list_checkpoints(run_dir)
    assert [p.name for p in saved] == ["step_00000002", "step_00000004", "step_00000006"]
    for path in saved:
        assert checkpoint.verify_checkpoint(path, "full") > 0
    result = run_pretrain(run_dir, data_cache, "train.steps=8", "checkpoint.async=true", *FAST)
    assert result.returncode == 0, failure_report(result)
    reference_dir = tmp_path / "sync"
    result = run_pretrain(reference_dir, data_cache, "train.steps=8", *FAST)
    assert result.returncode == 0, failure_report(result)
    assert_same_losses(run_dir, read_metrics(reference_dir), 8)
