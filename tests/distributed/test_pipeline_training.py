"""Pipeline-parallel training end to end under torchrun (gloo): DualPipe over pp 2 x dp 2 with expert
parallelism trains like one process, the model is cut where parallel.stage_boundaries says, and checkpoints
move between pipelined and non-pipelined layouts."""

from __future__ import annotations

import pytest
from torch.distributed.checkpoint import FileSystemReader

from tests.distributed.reference import FIXED_BATCH, STEPS, assert_same_losses
from tests.integration.pretrain_runs import failure_report, run_pretrain, run_torchrun
from train import checkpoint
from train.trainer import read_metrics

pytestmark = pytest.mark.slow


def test_dualpipe_pp2_dp2_with_experts_matches_one_process_and_resumes_without_pipeline(tmp_path, data_cache,
                                                                                     reference):
    run_dir = tmp_path / "dualpipe"
    result = run_torchrun(4, run_dir, data_cache, *FIXED_BATCH, "parallel.pp=2", "parallel.ep=2",
                          "parallel.schedule=dualpipe", "checkpoint.every=10")
    assert result.returncode == 0, failure_report(result)
    assert "dp 2 (ep 2 x edp 1), pp 2 (dualpipe)" in result.stdout
    assert_same_losses(read_metrics(run_dir), reference, range(1, STEPS + 1))

    saved = run_dir / "checkpoints" / "step_00000010"
    assert checkpoint.is_complete(saved)
    resumed_dir = tmp_path / "dualpipe_to_one_process"
    result = run_pretrain(resumed_dir, data_cache, *FIXED_BATCH, f"checkpoint.resume={saved}")
    assert result.returncode == 0, failure_report(result)
    assert "at step 10" in result.stdout
    assert_same_losses(read_metrics(resumed_dir), reference, range(11, STEPS + 1))


@pytest.mark.parametrize("schedule", ["1f1b", "zb1p", "dualpipev"])
def test_one_process_checkpoint_resumes_under_a_pipeline(tmp_path, data_cache, reference_run, schedule):
    reference_dir, reference = reference_run
    saved = reference_dir / "checkpoints" / "step_00000010"
    run_dir = tmp_path / schedule
    result = run_torchrun(2, run_dir, data_cache, *FIXED_BATCH, "parallel.pp=2", f"parallel.schedule={schedule}",
                          f"checkpoint.resume={saved}")
    assert result.returncode == 0, failure_report(result)
    assert f"pp 2 ({schedule})" in result.stdout and "at step 10" in result.stdout
    assert_same_losses(read_metrics(run_dir), reference, range(11, STEPS + 1))


def test_explicit_stage_boundaries_cut_the_model_there(tmp_path, data_cache, reference):
    """1F1B over pp 2 (one stage per rank) with parallel.stage_boundaries=[1]: rank 1 holds blocks 1 and 2
    (the planner alone would keep all three on rank 0, docs/planner.md "The split"), as the checkpoint's
    DCP metadata shows (the file each tensor was written to names the rank), and the losses are one
    process's."""
    run_dir = tmp_path / "cut"
    result = run_torchrun(2, run_dir, data_cache, *FIXED_BATCH, "parallel.pp=2", "parallel.schedule=1f1b",
                          "parallel.stage_boundaries=[1]", "checkpoint.every=10")
    assert result.returncode == 0, failure_report(result)
    assert_same_losses(read_metrics(run_dir), reference, range(1, STEPS + 1))
    storage = FileSystemReader(str(run_dir / "checkpoints" / "step_00000010")).read_metadata().storage_data
    writer = {}  # block -> the ranks that wrote its weights
    for index, info in storage.items():
        parts = index.fqn.split(".")
        if parts[:2] == ["model", "layers"]:
            writer.setdefault(int(parts[2]), set()).add(int(info.relative_path.split("_")[2]))
    assert writer == {0: {0}, 1: {1}, 2: {1}}
