"""Parameter EMA in training (memory.ema, report sec 3.2.3): saved in checkpoints and resumed exactly."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests.integration.pretrain_runs import failure_report, run_pretrain
from train import checkpoint
from train.trainer import read_metrics

pytestmark = pytest.mark.slow

SHORT = ["train.seq_len=64", "train.batch_size_start=8", "train.batch_size=8", "memory.ema=true",
         "memory.ema_decay=0.9"]


def saved_tensors(path, tmp_path, section: str) -> dict[str, torch.Tensor]:
    """One section ("model", "ema") of a DCP checkpoint, by parameter name."""
    out = tmp_path / f"{path.parent.parent.name}-{path.name}.pt"
    dcp_to_torch_save(str(path), str(out))
    return torch.load(out, weights_only=True).get(section, {})


def test_ema_is_checkpointed_and_resumes_exactly(tmp_path, data_cache):
    straight = tmp_path / "straight"
    result = run_pretrain(straight, data_cache, "train.steps=4", "checkpoint.every=4", *SHORT)
    assert result.returncode == 0, failure_report(result)
    metrics = read_metrics(straight)
    assert all("ema_update_s" in m for m in metrics)

    split = tmp_path / "split"
    result = run_pretrain(split, data_cache, "train.steps=2", "checkpoint.every=2", *SHORT)
    assert result.returncode == 0, failure_report(result)
    assert checkpoint.has_ema(checkpoint.latest_checkpoint(split))
    result = run_pretrain(split, data_cache, "train.steps=4", "checkpoint.every=2", *SHORT)
    assert result.returncode == 0, failure_report(result)
    assert "holds no EMA" not in result.stdout

    a = saved_tensors(checkpoint.latest_checkpoint(straight), tmp_path, "ema")
    b = saved_tensors(checkpoint.latest_checkpoint(split), tmp_path, "ema")
    model = saved_tensors(checkpoint.latest_checkpoint(straight), tmp_path, "model")
    assert a and a.keys() == b.keys() and set(a) <= set(model)
    for name in a:
        assert torch.equal(a[name], b[name]), name  # resumed EMA = uninterrupted EMA, bit for bit on CPU
    moved = [n for n in a if not torch.equal(a[n], model[n])]
    assert moved, "the EMA lags the trained parameters"

    # launch/eval.py use_ema=true evaluates those averages (the model's own buffers stay)
    from train.evaluate import EvalConfig, load_run

    run = load_run(EvalConfig(checkpoint=str(straight), use_ema=True))
    assert all(torch.equal(p, a[n]) for n, p in run.model.named_parameters())
    plain = load_run(EvalConfig(checkpoint=str(straight)))
    assert any(not torch.equal(p, a[n]) for n, p in plain.model.named_parameters())
