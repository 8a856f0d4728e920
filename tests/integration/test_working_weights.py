"""BF16 working weights with FP32 masters (train.param_dtype, train/precision.py; report sec 3.3) end to end.

Under BF16 compute every GEMM reads the BF16 rounding of its FP32 weight either way, so training with BF16
parameters (FP32 masters in ZeRO-1, FP32 gradients) must compute exactly what FP32 parameters compute:
the same losses, gradient norms and FP32 weights, bit for bit. The one place the two differ by design is a
weight read twice in one forward: the output head, shared by the main model and an MTP module. With FP32
parameters autocast's one BF16 cast receives both gradients and sums them in BF16; a BF16 parameter's two
gradients are summed by autograd into its FP32 gradient. These runs therefore use no MTP module
(``model.mtp_depth=0``); tests/unit/test_precision.py covers the shared head.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

from tests.integration.pretrain_runs import failure_report, run_pretrain, run_torchrun
from train import checkpoint
from train.trainer import read_metrics

pytestmark = pytest.mark.slow

BF16 = ["train.dtype=bfloat16", "model.mtp_depth=0", "train.seq_len=64", "train.batch_size_start=8",
        "train.batch_size=8", "checkpoint.every=2"]
WEIGHTS = {"bf16": ["train.param_dtype=bfloat16"], "fp32": ["train.param_dtype=float32"]}


def curve(run_dir: Path) -> list[tuple[float, float, float]]:
    return [(m["step"], m["loss"], m["grad_norm"]) for m in read_metrics(run_dir)]


def saved_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The model section of the run's newest checkpoint, read whole (FP32 where the checkpoint holds FP32)."""
    path = checkpoint.latest_checkpoint(run_dir)
    meta = FileSystemReader(str(path)).read_metadata()
    state = {k.removeprefix("model."): torch.empty(v.size, dtype=v.properties.dtype)
             for k, v in meta.state_dict_metadata.items() if k.startswith("model.") and hasattr(v, "properties")}
    dcp.load({"model": state}, checkpoint_id=str(path), no_dist=True)
    return state


def test_bf16_weights_train_and_resume_exactly_as_fp32_weights(tmp_path, data_cache):
    runs = {}
    for name in ("bf16", "fp32"):
        run_dir = tmp_path / name
        result = run_pretrain(run_dir, data_cache, "train.steps=4", *BF16, *WEIGHTS[name])
        assert result.returncode == 0, failure_report(result)
        assert ("weights: bfloat16 working copies" in result.stdout) == (name == "bf16")
        runs[name] = run_dir
    assert curve(runs["bf16"]) == curve(runs["fp32"])
    bf16, fp32 = saved_weights(runs["bf16"]), saved_weights(runs["fp32"])
    assert all(t.dtype == torch.float32 for t in bf16.values())  # the masters, whatever the compute precision
    assert bf16.keys() == fp32.keys() and all(torch.equal(bf16[k], fp32[k]) for k in fp32)

    # interrupted after step 2 with BF16 weights, resumed with FP32 ones: the checkpoint's FP32 masters
    # become the FP32 parameters, and the run goes on as if never stopped
    mixed = tmp_path / "mixed"
    result = run_pretrain(mixed, data_cache, "train.steps=2", *BF16, *WEIGHTS["bf16"])
    assert result.returncode == 0, failure_report(result)
    result = run_pretrain(mixed, data_cache, "train.steps=4", *BF16, *WEIGHTS["fp32"])
    assert result.returncode == 0, failure_report(result)
    assert "resumed from" in result.stdout
    assert curve(mixed) == curve(runs["bf16"])
    resumed = saved_weights(mixed)
    assert all(torch.equal(resumed[k], fp32[k]) for k in fp32)


def test_bf16_weights_under_pipeline_and_expert_parallelism(tmp_path, data_cache):
    """4 processes, DualPipe over 2 stages, ep 2 (dp 2): the BF16 all-gather, the pipeline's gradient sums
    over the stages' copies and the expert gradients keep the FP32 run's arithmetic."""
    args = ["parallel.pp=2", "parallel.ep=2", "train.micro_batch_size=2", "train.steps=3", *BF16]
    curves = {}
    for name in ("bf16", "fp32"):
        result = run_torchrun(4, tmp_path / name, data_cache, *args, *WEIGHTS[name])
        assert result.returncode == 0, failure_report(result)
        curves[name] = curve(tmp_path / name)
    assert len(curves["bf16"]) == 3 and curves["bf16"] == curves["fp32"]
    bf16, fp32 = saved_weights(tmp_path / "bf16"), saved_weights(tmp_path / "fp32")
    assert all(t.dtype == torch.float32 for t in bf16.values())
    assert bf16.keys() == fp32.keys() and all(torch.equal(bf16[k], fp32[k]) for k in fp32)


def test_bf16_weights_need_bf16_compute(tmp_path, data_cache):
    result = run_pretrain(tmp_path / "run", data_cache, "train.steps=1", "train.dtype=float32",
                          "train.param_dtype=bfloat16")
    assert result.returncode != 0
    assert "train.param_dtype=bfloat16 needs BF16 compute" in result.stdout + result.stderr
    result = run_pretrain(tmp_path / "run", data_cache, "train.steps=1", "train.param_dtype=bfloat16")
    assert result.returncode != 0  # train.dtype=auto is FP32 on a CPU
    assert "train.param_dtype=bfloat16 needs BF16 compute" in result.stdout + result.stderr
