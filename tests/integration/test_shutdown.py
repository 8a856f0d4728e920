"""A finished run leaves no process-group threads behind (train.runtime.release_process_groups).

gloo's worker threads stop only when their group's C++ object is freed; torch's DeviceMesh keeps the groups
in reference cycles, so without a collection they lived until the interpreter's teardown, where a worker
asking for the GIL aborts the process after a successful run (SIGABRT seen in CI under torchrun)."""

from __future__ import annotations

import os
import sys
from collections import Counter

import pytest

from tests.integration.pretrain_runs import TINY_DATA
from train.config import load_config
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


def test_train_joins_its_process_group_threads(tmp_path, data_cache):
    before = gloo_threads()
    cfg = load_config(["+conf=tiny", f"run.dir={tmp_path}", f"data.cache_dir={data_cache}", *TINY_DATA,
                       "train.seq_len=64", "train.micro_batch_size=8", "train.batch_size=8",
                       "train.batch_size_start=8", "train.steps=1"])
    history = train(cfg)
    assert len(history) == 1
    assert gloo_threads() == before
