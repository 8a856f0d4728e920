"""The chunked cross-entropy (train/losses.py) against F.cross_entropy on FP32 logits (the reference)."""

from __future__ import annotations

import pytest
import torch

from train import losses
from train.losses import cross_entropy, cross_entropy_reference

pytestmark = pytest.mark.usefixtures("single_thread")


def inputs(shape=(3, 50), vocab=1000, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, vocab, generator=g) * 3).to(dtype).requires_grad_()
    return logits, torch.randint(0, vocab, shape, generator=g)


def loss_and_grad(fn, logits, targets, weight=1.0):
    logits.grad = None
    loss = fn(logits, targets)
    (weight * loss).backward()
    return loss.detach(), logits.grad.clone()


@pytest.mark.parametrize("weight", [1.0, 0.3])
def test_fp32_matches_reference(weight):
    """Same math in FP32, another order: loss to 1e-6 relative; gradients (softmax - onehot) * w / N to
    a few FP32 ulps of the largest entry."""
    logits, targets = inputs()
    loss, grad = loss_and_grad(cross_entropy, logits, targets, weight)
    ref_loss, ref_grad = loss_and_grad(cross_entropy_reference, logits, targets, weight)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7 * ref_grad.abs().max().item())


def test_bf16_logits_get_bf16_gradients_within_one_rounding():
    """BF16 logits (the head's output under autocast): the loss is computed in FP32 from them exactly as
    the reference does; the gradient comes out BF16, the reference's FP32 gradient rounded (one BF16
    rounding, 2^-8 relative, sometimes the other way after FP32 differences)."""
    logits, targets = inputs(dtype=torch.bfloat16)
    loss, grad = loss_and_grad(cross_entropy, logits, targets)
    ref_loss, ref_grad = loss_and_grad(cross_entropy_reference, logits, targets)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=2.0**-7, atol=1e-9)


def test_chunks_do_not_change_the_result(monkeypatch):
    """Rows are independent: chunks of 1 row (and an uneven last chunk of 3) give the same bits as one."""
    logits, targets = inputs(shape=(7,), vocab=300)
    whole = loss_and_grad(cross_entropy, logits, targets)
    for rows in (1, 2):
        monkeypatch.setattr(losses, "CPU_CHUNK_ELEMENTS", rows * 300)
        chunked = loss_and_grad(cross_entropy, logits, targets)
        assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])


def test_keeps_no_fp32_copy_of_the_logits():
    """What autograd keeps for backward, BF16 logits [N, V]: ours the logits themselves plus N FP32
    log-sum-exps; the reference FP32 log-probabilities, twice the logits' bytes."""
    logits, targets = inputs(shape=(64,), vocab=4096, dtype=torch.bfloat16)

    def saved_bytes(fn) -> int:
        seen: dict[int, int] = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(logits, targets)
        return sum(seen.values())

    ours, ref = saved_bytes(cross_entropy), saved_bytes(cross_entropy_reference)
    assert ours <= logits.numel() * 2 + 64 * (4 + 8)  # logits, lse, targets
    assert ref >= logits.numel() * 4


def test_shape_mismatch_is_refused():
    logits, targets = inputs()
    with pytest.raises(ValueError, match="do not match targets"):
        cross_entropy(logits, targets[:, :-1])
