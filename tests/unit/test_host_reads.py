"""Issue 9's "no host syncs in the step", as far as the CPU can tell: the model's forward and backward
read no value back to the host (``bench.host_syncs.HostReads``: ``.item()``, ``bool()``, ``int()``, and
outputs sized by values such as ``nonzero``, each of which makes a GPU step wait). ``bench/host_syncs.py --device cuda`` measures the real thing on a GPU,
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
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, str(REPO / "bench" / "host_syncs.py"), "--device", "cpu", "--preset",
                             "tiny", "--micro-batches", "1"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "forward + backward: 0 host reads" in result.stdout, result.stdout
    assert re.search(r"optimizer step: 1 host reads\n\s+1\s+parallel/zero\.py:\d+ \(_global_norm\)", result.stdout), \
        result.stdout


def test_value_sized_outputs_count_as_reads():
    """Operations whose output size depends on the input's values wait for the GPU as ``.item()`` does:
    ``nonzero``, a boolean mask as an index (read or write), ``bincount``, ``repeat_interleave`` without
    its ``output_size``. Their size-given counterparts and integer indexing do not."""
    x = torch.randn(16)
    mask = x > 0
    counts = torch.tensor([1, 2, 0, 3])
    reading = {"nonzero": lambda: mask.nonzero(), "boolean index": lambda: x[mask],
               "boolean index_put": lambda: x.clone().index_put_((mask,), torch.tensor(0.0)),
               "masked_select": lambda: x.masked_select(mask), "bincount": lambda: torch.bincount(counts),
               "repeat_interleave": lambda: torch.repeat_interleave(counts), "unique": lambda: counts.unique()}
    for what, fn in reading.items():
        with HostReads() as reads:
            fn()
        assert reads.count == 1, what
        assert all("[" in place for place in reads.places), (what, reads.places)  # names the operation
    size = int(mask.sum())
    quiet = {"nonzero_static": lambda: torch.nonzero_static(mask, size=size),
             "integer index": lambda: x[counts], "scatter_add": lambda: torch.zeros(4).scatter_add_(0, counts, x[:4]),
             "repeat_interleave, sized": lambda: torch.repeat_interleave(counts, output_size=6),
             "argsort": lambda: x.argsort(stable=True)}
    for what, fn in quiet.items():
        with HostReads() as reads:
            fn()
        assert reads.count == 0, (what, reads.places)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.set_sync_debug_mode)")
def test_expert_dispatch_index_lists_do_not_sync_on_cuda():
    """``parallel.expert.nonzero_sized`` (the dispatch's index lists, sized from the all-gathered counts) runs
    under ``set_sync_debug_mode("error")`` and equals ``nonzero``; ``nonzero`` itself raises there."""
    from parallel.expert import nonzero_sized

    mask = torch.rand(64, 8, device="cuda") > 0.7
    size = int(mask.sum())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = nonzero_sized(mask.t(), size)
        with pytest.raises(RuntimeError, match="synchroniz"):
            mask.nonzero()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    want = mask.t().nonzero(as_tuple=True)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    assert nonzero_sized(torch.zeros(0, 3, dtype=torch.bool, device="cuda"), 0)[0].numel() == 0  # no token at all
