"""FP8 training end to end (report sec 3.3): checkpoints hold FP32 master weights whatever the compute
precision, so an FP8 run resumes in full precision and the other way round."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from tests.integration.pretrain_runs import run_pretrain
from train import checkpoint
from train.trainer import read_metrics

pytestmark = pytest.mark.slow

FP8 = ["fp8.enabled=true", "fp8.backend=emulate"]
SHORT = ["train.seq_len=64", "train.batch_size_start=8", "train.batch_size=8", "checkpoint.every=2"]


def weight_dtypes(path) -> dict[str, torch.dtype]:
    meta = FileSystemReader(str(path)).read_metadata()
    return {k: v.properties.dtype for k, v in meta.state_dict_metadata.items() if hasattr(v, "properties")
            and k.startswith("model.")}


@pytest.mark.parametrize("first,then", [(FP8, []), ([], FP8)], ids=["fp8-then-fp32", "fp32-then-fp8"])
def test_checkpoints_move_between_fp8_and_full_precision(tmp_path, data_cache, first, then):
    run_dir = tmp_path / "run"
    result = run_pretrain(run_dir, data_cache, "train.steps=2", *SHORT, *first)
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("fp8 (emulate)" in result.stdout) == bool(first)
    saved = checkpoint.latest_checkpoint(run_dir)
    dtypes = weight_dtypes(saved)
    linear = [k for k in dtypes if k.endswith(("attn.wkv_b.weight", "ffn.experts.w1", "attn.wo.weight"))]
    assert linear and all(dtypes[k] == torch.float32 for k in linear), {k: dtypes[k] for k in linear}

    result = run_pretrain(run_dir, data_cache, "train.steps=4", *SHORT, *then)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout and "step_00000002" in result.stdout
    assert ("fp8 (emulate)" in result.stdout) == bool(then)
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(m["loss"] == m["loss"] and m["loss"] < 12 for m in metrics)  # finite, sane
