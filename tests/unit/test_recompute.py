"""Selective and full recomputation (report sec 3.2.3) against storing everything.

Recomputation runs the same operations on the same inputs in backward, so on CPU (deterministic
kernels) the gradients must be identical bit for bit. The saved bytes must fall: selective by at least
the normalised block input that the MLA down-projections keep otherwise (tokens x dim x 4 bytes per
block, fp32), full to little more than the block inputs.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.conftest import TINY
from train.config import ModelConfig
from train.losses import compute_losses
from train.memory import saved_activation_bytes
from train.model import Transformer, set_recompute

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("q_lora_rank", [0, 16])
def test_recompute_gives_identical_gradients_and_saves_memory(q_lora_rank):
    cfg = ModelConfig(**{**TINY, "q_lora_rank": q_lora_rank, "n_layers": 3})
    torch.manual_seed(0)
    base = Transformer(cfg)
    base.init_weights(0.05, seed=0)
    window = torch.randint(0, cfg.vocab_size, (2, 17))
    results = {}
    for mode in ("none", "selective", "full"):
        model = copy.deepcopy(base)
        set_recompute(model, mode)
        nbytes, out = saved_activation_bytes(model, lambda m=model: m(window[:, :-1]))
        compute_losses(out, window, 0.3, 0.01).loss.backward()
        results[mode] = nbytes, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    none_bytes, none_grads = results["none"]
    for mode in ("selective", "full"):
        _, grads = results[mode]
        assert grads.keys() == none_grads.keys()
        for name in grads:
            assert torch.equal(grads[name], none_grads[name]), f"{mode}: {name}"
    tokens = window[:, :-1].numel()
    normed_input = tokens * cfg.dim * 4  # fp32 RMSNorm output kept by wq(_a) / wkv_a without recompute
    blocks = cfg.n_layers + cfg.mtp_depth
    assert results["selective"][0] <= none_bytes - blocks * normed_input
    assert results["full"][0] < results["selective"][0]


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="recompute mode 'some'"):
        set_recompute(Transformer(ModelConfig(**TINY)), "some")
