"""The one-process reference run that the multi-process end-to-end tests compare against."""

from __future__ import annotations

import pytest

from tests.distributed.reference import FIXED_BATCH
from tests.integration.pretrain_runs import failure_report, run_pretrain
from train.trainer import read_metrics


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, data_cache):
    """One process, checkpoints at steps 10 and 20: (run directory, metrics)."""
    run_dir = tmp_path_factory.mktemp("one_process")
    result = run_pretrain(run_dir, data_cache, *FIXED_BATCH, "checkpoint.every=10")
    assert result.returncode == 0, failure_report(result)
    return run_dir, read_metrics(run_dir)


@pytest.fixture(scope="session")
def reference(reference_run):
    return reference_run[1]
