"""The tiny preset end to end: loss falls, metrics and config are written, kill + resume is exact."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import time

import pytest
import yaml

from tests.integration.pretrain_runs import REPO, failure_report, pretrain_command, run_pretrain
from train import checkpoint
from train.config import load_config
from train.metrics import REQUIRED_KEYS
from train.plan_flops import training_flops_per_token
from train.trainer import read_metrics

pytestmark = pytest.mark.slow


def test_tiny_run_learns_and_writes_its_outputs(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    result = run_pretrain(run_dir, data_cache, "train.steps=40", "checkpoint.every=20", "logging.wandb=offline",
                          "logging.peak_tflops=0.5", "logging.profile_steps=[3,4]")
    assert result.returncode == 0, failure_report(result)
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, 41))
    written = load_config(["+conf=tiny", f"train.seq_len={yaml.safe_load((run_dir / 'config.yaml').read_text())['train']['seq_len']}"])
    flops_per_token = training_flops_per_token(written.model, written.train.seq_len)
    for record in metrics:
        assert set(REQUIRED_KEYS) <= record.keys()
        assert all(isinstance(record[k], (int, float)) for k in REQUIRED_KEYS)
        # MFU against the configured 0.5 TFLOP/s, one process
        assert record["mfu"] == pytest.approx(flops_per_token * record["tokens_per_s"] / 0.5e12, rel=1e-9)
    first, last = metrics[0]["lm_loss"], sum(m["lm_loss"] for m in metrics[-5:]) / 5
    # uniform guessing over 2048 tokens is ln 2048 = 7.6; the tiny model reaches ~5.5 in 40 steps
    assert first > 7.0 and last < first - 1.5, (first, last)
    assert metrics[-1]["mtp_loss"] < metrics[0]["mtp_loss"] - 1.0
    assert metrics[0]["batch_size"] == 8 and metrics[-1]["batch_size"] == 16  # the batch ramp ran
    assert metrics[0]["lr"] < metrics[20]["lr"]  # warm-up
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["model"]["dim"] == 128 and config["train"]["steps"] == 40
    assert [p.name for p in checkpoint.list_checkpoints(run_dir)] == ["step_00000020", "step_00000040"]
    assert list((run_dir / "wandb").glob("offline-run-*")), "wandb offline run missing"
    assert "step     40" in result.stdout and "| mfu " in result.stdout and " GiB" in result.stdout
    # logging.profile_steps: one window over steps 3-4, its trace and table, those steps' records marked
    profiled = run_dir / "profile" / "steps_3-4"
    assert sorted(p.name for p in (run_dir / "profile").iterdir()) == ["steps_3-4"]
    with gzip.open(profiled / "rank0.trace.json.gz", "rt") as f:
        names = {event.get("name") for event in json.load(f)["traceEvents"]}
    assert {"aten::mm", "Optimizer.step#AdamW.step"} <= names  # the forward/backward and the update are in it
    assert "aten::mm" in (profiled / "rank0.txt").read_text()
    assert [m["step"] for m in metrics if m.get("profiled")] == [3, 4]
    assert f"profile of steps 3-4: {profiled}" in result.stdout
    # on a CPU the process's peak resident set: more than the weights and data, never falling
    peaks = [m["memory_gib"] for m in metrics]
    assert 0.05 < peaks[0] < 16 and peaks == sorted(peaks), peaks


def test_kill_and_resume_gives_identical_losses(tmp_path, data_cache):
    steps = ["train.steps=12", "checkpoint.every=6"]
    reference_dir = tmp_path / "reference"
    result = run_pretrain(reference_dir, data_cache, *steps)
    assert result.returncode == 0, failure_report(result)
    reference = read_metrics(reference_dir)

    # Same run, killed (SIGKILL, no clean-up) once its step-6 checkpoint is complete.
    run_dir = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(pretrain_command(run_dir, data_cache, *steps), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while checkpoint.latest_checkpoint(run_dir) is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert checkpoint.latest_checkpoint(run_dir).name == "step_00000006"
    # leave debris of a save interrupted later on: resume=auto must not take it
    (run_dir / "checkpoints" / ".tmp-step_00000012").mkdir()
    (run_dir / "checkpoints" / "step_00000012").mkdir()

    result = run_pretrain(run_dir, data_cache, *steps)
    assert result.returncode == 0, failure_report(result)
    assert "resumed from" in result.stdout and "step_00000006" in result.stdout
    resumed = read_metrics(run_dir)
    assert [m["step"] for m in resumed] == list(range(1, 13))
    for ours, theirs in zip(resumed, reference):
        for key in ("loss", "lm_loss", "mtp_loss", "balance_loss", "grad_norm", "max_vio", "lr", "tokens"):
            assert ours[key] == theirs[key], (ours["step"], key, ours[key], theirs[key])  # bitwise on CPU


def test_compiled_run_resumes_an_eager_checkpoint(tmp_path, data_cache):
    """train.compile=true inside the trainer: it resumes an eager run's checkpoint (parameter names are
    unchanged by compile) and continues with the eager run's losses, to FP32 rounding (the fused
    element-wise kernels round differently: 1e-5 relative, as tests/unit/test_compile.py)."""
    fast = ["train.steps=4", "checkpoint.every=2", "train.seq_len=64", "train.micro_batch_size=8",
            "train.batch_size=8", "train.batch_size_start=8"]
    eager_dir = tmp_path / "eager"
    result = run_pretrain(eager_dir, data_cache, *fast)
    assert result.returncode == 0, failure_report(result)
    compiled_dir = tmp_path / "compiled"
    result = run_pretrain(compiled_dir, data_cache, *fast, "train.compile=true",
                          f"checkpoint.resume={eager_dir / 'checkpoints' / 'step_00000002'}")
    assert result.returncode == 0, failure_report(result)
    assert "compile: torch.compile on" in result.stdout
    eager, compiled = read_metrics(eager_dir), read_metrics(compiled_dir)
    assert [m["step"] for m in compiled] == [3, 4]
    for ours, theirs in zip(compiled, eager[2:]):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5), ours["step"]
