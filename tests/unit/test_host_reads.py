"""Issue 9's "no host syncs in the step", as far as the CPU can tell: the model's forward and backward
read no value back to the host (``bench.host_syncs.HostReads``: ``.item()``, ``bool()``, ``int()``, each
of which makes a GPU step wait). ``bench/host_syncs.py --device cuda`` measures the real thing on a GPU,
``.tolist()`` included."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.host_syncs import HostReads
from fp8.convert import convert_to_fp8
from train.losses import compute_losses
from train.model import Transformer

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("fp8", [False, True], ids=["full", "fp8"])
def test_forward_backward_reads_nothing_back(tiny_cfg, fp8, single_thread):
    torch.manual_seed(0)
    cfg = tiny_cfg(mtp_depth=1)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    if fp8:
        convert_to_fp8(model, "emulate", "cpu")
    model.train()
    window = torch.randint(0, cfg.vocab_size, (2, 33))
    with HostReads() as reads:
        losses = compute_losses(model(window[:, :-1]), window, 0.3, 1e-4)
        losses.loss.backward()
    assert reads.count == 0, reads.places
    assert reads.seen > 100  # the mode saw the step's operations
    with HostReads() as reads:  # and it does count a read
        losses.loss.item()
    assert reads.count == 1


def test_bench_lists_the_reads_of_the_trainers_step_on_the_cpu():
    """``bench/host_syncs.py --device cpu``: the trainer's forward_backward reads nothing; the optimizer
    step reads its gradient norm once (for the clip and the metrics)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, str(REPO / "bench" / "host_syncs.py"), "--device", "cpu", "--preset",
                             "tiny", "--micro-batches", "1"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "forward + backward: 0 host reads" in result.stdout, result.stdout
    assert re.search(r"optimizer step: 1 host reads\n\s+1\s+parallel/zero\.py:\d+ \(_global_norm\)", result.stdout), \
        result.stdout
