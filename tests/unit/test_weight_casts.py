"""One BF16 cast of each weight per training step (train/runtime.py ``one_weight_cast_per_step``).

Under autocast with FP32 parameters every linear casts its weight and keeps the cast for backward.
With one autocast context per micro-batch forward each micro-batch in flight kept its own copy; inside
the step context the micro-batches share one. Measured with the saved-tensor accounting of
train/memory.py on two forwards kept alive at once (as a pipeline schedule keeps micro-batches), and
checked to leave losses and gradients bit-identical (the same casts of the same weights).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from tests.conftest import TINY
from train.config import ModelConfig
from train.losses import compute_losses
from train.memory import saved_activation_bytes
from train.model import Transformer
from train.runtime import one_weight_cast_per_step

pytestmark = pytest.mark.usefixtures("single_thread")


def bf16() -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=torch.bfloat16)


def two_micro_batches(model: Transformer, step_context: contextlib.AbstractContextManager):
    """Forward two micro-batches, keeping both graphs alive, then backward both; returns the bytes saved
    for backward by the two forwards and the summed loss and gradients."""
    windows = [torch.randint(0, model.cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(s))
               for s in (1, 2)]
    model.zero_grad(set_to_none=True)
    with step_context:
        def forwards():
            losses = []
            for window in windows:
                with bf16():
                    losses.append(compute_losses(model(window[:, :-1]), window, 0.3, 1e-4).loss)
            return losses

        nbytes, losses = saved_activation_bytes(model, forwards)
        for loss in losses:
            loss.backward()
    return nbytes, sum(float(x.detach()) for x in losses), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_micro_batches_share_one_cast_of_each_weight():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**TINY))
    model.init_weights(seed=0)
    separate, loss, grads = two_micro_batches(model, contextlib.nullcontext())
    shared, loss_shared, grads_shared = two_micro_batches(model, one_weight_cast_per_step(bf16, "cpu"))
    # the weights autocast casts: every nn.Linear's and the routed experts' (not the embedding, norms, gate)
    cast = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    cast += sum(p.numel() for n, p in model.named_parameters() if ".experts.w" in n)
    assert separate - shared == 2 * cast  # one BF16 copy (2 bytes per weight) fewer
    assert loss == loss_shared
    for name in grads:
        assert torch.equal(grads[name], grads_shared[name]), name


def test_without_autocast_it_does_nothing():
    assert not torch.is_autocast_enabled("cpu")
    with one_weight_cast_per_step(contextlib.nullcontext, "cpu"):
        assert not torch.is_autocast_enabled("cpu")
    with one_weight_cast_per_step(bf16, "cpu"):
        assert not torch.is_autocast_enabled("cpu")  # off between the forwards (backward runs here)
        with bf16():
            assert torch.is_autocast_enabled("cpu")
