"""Plots of a real tiny run (train/plots.py, launch/report.py), with the per-layer MoE series of
train/observe.py computed from the expert loads of the run's trained model on the run's data."""

from __future__ import annotations

import json
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from data.prepare import TOKEN_DTYPE, prepare_data
from tests.integration.pretrain_runs import REPO, TINY_DATA, run_pretrain
from train import checkpoint
from train.balance import update_gate_biases
from train.config import load_config
from train.model import Transformer
from train.observe import DeadExpertMonitor, moe_layer_ids, moe_metrics
from train.plots import read_records, write_plots
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


def add_moe_series(run_dir, data_cache) -> None:
    """Add the trainer-to-be's per-layer keys to each record of the run: the run's final model routes
    consecutive windows of the run's token stream, one batch per step, and its gate biases move as
    the trainer moves them (train.balance.update_gate_biases with the step's bias_update_speed)."""
    cfg = load_config(["+conf=tiny", f"data.cache_dir={data_cache}", *TINY_DATA])
    tokens = np.fromfile(prepare_data(cfg.data, vocab_size=cfg.model.vocab_size, seed=cfg.train.seed).tokens_path,
                         dtype=TOKEN_DTYPE)
    model = Transformer(cfg.model)
    model.init_weights(seed=0)
    dcp.load({"model": checkpoint.model_state(model)}, checkpoint_id=str(checkpoint.latest_checkpoint(run_dir)),
             no_dist=True)
    model.eval()
    layers, ids = model.moe_layers(), moe_layer_ids(model, cfg.model.n_layers)
    monitor = DeadExpertMonitor(window=2)
    records = read_metrics(run_dir)
    seq, batch = 64, 8
    for i, record in enumerate(records):
        start = i * batch * seq
        windows = torch.from_numpy(tokens[start:start + batch * seq].astype(np.int64)).view(batch, seq)
        with torch.no_grad():
            load = model(windows).expert_load
        monitor.update(load, ids)
        update_gate_biases(layers, load, record["bias_update_speed"])
        record.update(moe_metrics(record["step"], load, ids, layers, expert_load_every=2, monitor=monitor))
    lines = [json.dumps(r) for r in records]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n" + lines[-1][: len(lines[-1]) // 2])  # cut short


def test_plots_of_a_real_run(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    result = run_pretrain(run_dir, data_cache, *FAST)
    assert result.returncode == 0, result.stderr[-3000:]

    # what the trainer logs today: the basic plots (MaxVio from the mean and worst over layers)
    written = write_plots(run_dir)
    assert [p.name for p in written] == BASIC
    for path in written:
        assert_png(path)

    add_moe_series(run_dir, data_cache)
    record = read_records(run_dir / "metrics.jsonl")[-1]  # the last complete line
    assert set(record["max_vio_layers"]) == {"1", "2", "3"}  # 2 MoE blocks and the MTP block
    assert record["gate_bias_abs_mean_layers"]["1"] > 0  # the trained run's biases have moved
    assert "expert_load" in record and record["dead_experts"] >= 0

    report = subprocess.run([sys.executable, str(REPO / "launch" / "report.py"), str(run_dir)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr
    printed = report.stdout.split()
    assert [p.rsplit("/", 1)[-1] for p in printed] == BASIC + MOE
    assert sorted(p.name for p in (run_dir / "plots").iterdir()) == sorted(BASIC + MOE)
    for path in printed:
        assert_png(run_dir / "plots" / path.rsplit("/", 1)[-1])


def test_report_errors_are_one_line(tmp_path):
    for target in (tmp_path / "missing", tmp_path):  # no directory; a directory without metrics.jsonl
        result = subprocess.run([sys.executable, str(REPO / "launch" / "report.py"), str(target)], cwd=REPO,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 1
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
