"""A finished run leaves no process-group threads behind (train.runtime.release_process_groups).

gloo's worker threads stop only when their group's C++ object is freed; torch's DeviceMesh keeps the groups
in reference cycles, so without a collection they lived until the interpreter's teardown, where a worker
asking for the GIL aborts the process after a successful run (SIGABRT seen in CI under torchrun)."""

from __future__ import annotations

import gc
import os
import sys
from collections import Counter

import pytest

from tests.integration.pretrain_runs import TINY_DATA
from train.config import load_config
from train.errors import UserError
from train.trainer import train

pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in /proc")]


def gloo_threads() -> int:
    names = Counter()
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                names[f.read().strip()] += 1
        except FileNotFoundError:  # a thread that ended while we looked
            pass
    return names["pt_gloo_runloop"] + names["gloo_tcp_loop"]


def config(run_dir, data_cache, *overrides):
    return load_config(["+conf=tiny", f"run.dir={run_dir}", f"data.cache_dir={data_cache}", *TINY_DATA,
                        "train.seq_len=64", "train.micro_batch_size=8", "train.batch_size=8",
                        "train.batch_size_start=8", "train.steps=1", *overrides])


def test_train_joins_its_process_group_threads(tmp_path, data_cache):
    before = gloo_threads()
    history = train(config(tmp_path, data_cache))
    assert len(history) == 1
    assert gloo_threads() == before


def test_a_failed_run_holds_its_groups_only_through_its_traceback(tmp_path, data_cache):
    """launch/pretrain.py collects once the error is reported: nothing else may keep the groups alive."""
    before = gloo_threads()
    try:
        train(config(tmp_path, data_cache, f"checkpoint.resume={tmp_path / 'missing'}"))
    except UserError as err:
        assert "checkpoint directory not found" in str(err)
    else:
        pytest.fail("resuming from a missing checkpoint did not fail")
    gc.collect()
    assert gloo_threads() == before
