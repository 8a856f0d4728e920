"""checkpoint.init_from: a new run (an extension stage, report sec 4.3) from trained weights: step 0, a
fresh optimizer and schedule, the context fields may change, nothing else may."""

from __future__ import annotations

import pytest

from tests.integration.pretrain_runs import failure_report, run_pretrain
from train import checkpoint
from train.trainer import read_metrics

pytestmark = pytest.mark.slow

SHORT = ["train.seq_len=64", "train.batch_size_start=8", "train.batch_size=8"]


def test_new_stage_starts_from_trained_weights_with_a_longer_context(tmp_path, data_cache):
    base = tmp_path / "base"
    result = run_pretrain(base, data_cache, "train.steps=30", *SHORT)
    assert result.returncode == 0, failure_report(result)
    trained = read_metrics(base)[-1]["lm_loss"]

    stage = tmp_path / "ext"
    longer = ["model.max_seq_len=1024", "model.rope_factor=4", "train.seq_len=512",
              "train.batch_size_start=4", "train.batch_size=4", "train.steps=2", "optim.warmup_steps=0",
              f"checkpoint.init_from={base}"]
    result = run_pretrain(stage, data_cache, *longer)
    assert result.returncode == 0, failure_report(result)
    assert "initialised from" in result.stdout and "step_00000030" in result.stdout
    assert "context changed: max_seq_len 256 -> 1024, rope_factor 1.0 -> 4.0" in result.stdout
    metrics = read_metrics(stage)
    assert [m["step"] for m in metrics] == [1, 2] and metrics[0]["tokens"] == 4 * 512  # a new run
    # the trained weights carried over: far below a fresh model's ln(2048) = 7.6, near the base's loss
    assert metrics[0]["lm_loss"] < min(trained + 1.0, 7.0), (metrics[0]["lm_loss"], trained)
    # and after the first update too: the optimizer's FP32 masters hold the loaded weights, not the init
    assert metrics[1]["lm_loss"] < min(trained + 1.0, 7.0), (metrics[1]["lm_loss"], trained)

    # resume=auto inside the new run takes its own checkpoint, not init_from again
    result = run_pretrain(stage, data_cache, *longer[:-2], "train.steps=3", f"checkpoint.init_from={base}")
    assert result.returncode == 0, failure_report(result)
    assert "resumed from" in result.stdout and "initialised from" not in result.stdout
    assert checkpoint.latest_checkpoint(stage).name == "step_00000003"


def test_init_from_another_architecture_is_one_line(tmp_path, data_cache):
    base = tmp_path / "base"
    assert run_pretrain(base, data_cache, "train.steps=1", *SHORT).returncode == 0
    result = run_pretrain(tmp_path / "other", data_cache, "train.steps=1", *SHORT, "model.n_heads=2",
                          f"checkpoint.init_from={base}")
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "model.n_heads (checkpoint 4, run 2)" in lines[0], result.stderr[-2000:]
    result = run_pretrain(tmp_path / "other2", data_cache, "train.steps=1", *SHORT,
                          f"checkpoint.init_from={tmp_path / 'nowhere'}")
    assert result.returncode == 1 and "no complete checkpoint there" in result.stderr
