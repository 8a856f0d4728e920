"""Plots of a real tiny run (train/plots.py, launch/report.py) and the per-layer MoE series the trainer logs
(train/observe.py), with and without pipeline stages."""

from __future__ import annotations

import subprocess
import sys

import matplotlib.image
import pytest

from tests.integration.pretrain_runs import REPO, failure_report, run_pretrain, run_torchrun
from train.trainer import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread"),
              pytest.mark.filterwarnings("ignore:torch.distributed is disabled")]

STEPS = 4
FAST = [f"train.steps={STEPS}", "train.seq_len=64", "train.micro_batch_size=8", "train.batch_size=8",
        "train.batch_size_start=8"]
BASIC = ["loss.png", "schedules.png", "grad_norm.png", "tokens_per_s.png", "max_vio.png"]
MOE = ["expert_load.png", "gate_bias.png"]


def assert_png(path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000, path
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, (path, image.shape)


def check_moe_record(record: dict) -> None:
    assert set(record["max_vio_layers"]) == {"1", "2", "3"}  # 2 MoE blocks and the MTP block
    for key in ("load_min_layers", "load_max_layers", "load_std_layers", "gate_bias_abs_mean_layers"):
        assert set(record[key]) == {"1", "2", "3"}, key
    assert record["gate_bias_abs_mean_layers"]["1"] > 0  # the biases moved (gamma > 0 in the tiny preset)
    assert record["load_min_layers"]["1"] <= 1.0 <= record["load_max_layers"]["1"]  # fractions of the mean
    assert record["dead_experts"] >= 0


def test_plots_of_a_real_run(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    result = run_pretrain(run_dir, data_cache, *FAST, "logging.plot_every=2", "logging.expert_load_every=2")
    assert result.returncode == 0, failure_report(result)
    # the trainer refreshed the plots during the run
    assert sorted(p.name for p in (run_dir / "plots").iterdir()) == sorted(BASIC + MOE)
    records = read_metrics(run_dir)
    for record in records:
        check_moe_record(record)
    assert ["expert_load" in r for r in records] == [False, True, False, True]
    assert len(records[1]["expert_load"]["2"]) == 8  # a row of the 8 experts' loads

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()  # a crash cut the last line short
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n" + lines[-1][: len(lines[-1]) // 2])
    report = subprocess.run([sys.executable, str(REPO / "launch" / "report.py"), str(run_dir)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr
    printed = report.stdout.split()
    assert [p.rsplit("/", 1)[-1] for p in printed] == BASIC + MOE
    for path in printed:
        assert_png(run_dir / "plots" / path.rsplit("/", 1)[-1])


def test_pipeline_stages_merge_their_layers(tmp_path, data_cache):
    """With pp = 2 each stage holds some MoE layers; the record on rank 0 has all of them."""
    run_dir = tmp_path / "pp"
    result = run_torchrun(2, run_dir, data_cache, *FAST[:1], "train.steps=2", "parallel.pp=2",
                          "parallel.schedule=1f1b", "logging.expert_load_every=1")
    assert result.returncode == 0, failure_report(result)
    for record in read_metrics(run_dir):
        check_moe_record(record)
        assert list(record["expert_load"]) == ["1", "2", "3"]


def test_report_errors_are_one_line(tmp_path):
    for target in (tmp_path / "missing", tmp_path):  # no directory; a directory without metrics.jsonl
        result = subprocess.run([sys.executable, str(REPO / "launch" / "report.py"), str(target)], cwd=REPO,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 1
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
