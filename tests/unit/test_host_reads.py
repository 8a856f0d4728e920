"""Issue 9's "no host syncs in the step", as far as the CPU can tell: the model's forward and backward
read no value back to the host (``tests/host_reads.py``: ``.item()``, ``bool()``, ``int()``; each makes a
GPU step wait). ``bench/host_syncs.py`` measures the real thing on a GPU, ``.tolist()`` included."""

from __future__ import annotations

import pytest
import torch

from fp8.convert import convert_to_fp8
from tests.host_reads import HostReads
from train.losses import compute_losses
from train.model import Transformer


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
    assert reads.count == 0
    assert reads.seen > 100  # the mode saw the step's operations
