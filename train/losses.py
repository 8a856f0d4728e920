"""Training objective: next-token CE + lambda * MTP + alpha * sequence-wise balance (sec 2.1.2, 2.2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:  # train.model computes each head's cross-entropy with ``cross_entropy`` below
    from train.model import ModelOutput


@dataclass
class Losses:
    loss: Tensor  # what is back-propagated: lm_loss + mtp_weight * mtp_loss + balance_loss
    lm_loss: Tensor  # main next-token cross-entropy
    mtp_loss: Tensor  # (1/D) sum_k L_MTP^k, before the weight lambda
    balance_loss: Tensor  # alpha * sum over MoE layers of L_Bal (already weighted)


# Elements of the FP32 temporary per chunk of rows in ``cross_entropy``: about L2-sized on the CPU; on
# accelerators large (few kernel launches), still a small fraction of the logits of a long sequence.
CPU_CHUNK_ELEMENTS = 2**18
ACCELERATOR_CHUNK_ELEMENTS = 2**26


class _CrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of rows of logits, FP32 math on chunks of rows, no [N, V] FP32 tensor.

    Forward keeps the logits as they are (BF16 under autocast) and the per-row log-sum-exp; backward
    writes softmax - onehot, times the incoming gradient / N, straight into a gradient in the logits'
    dtype. ``F.cross_entropy(logits.float())`` instead makes an FP32 copy, keeps FP32 log-probabilities
    for backward, and in backward fills an FP32 zero tensor, scatters into it and casts: for a 4K-token
    sequence over V3's 129K vocabulary that is ~5 GB more at its peak (per depth, with MTP) on the rank
    holding the head, and about 1.5x the time on the CPU (``tests/unit/test_losses.py``, docs/perf.md).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor) -> Tensor:
        n, vocab = logits.shape
        limit = CPU_CHUNK_ELEMENTS if logits.device.type == "cpu" else ACCELERATOR_CHUNK_ELEMENTS
        rows = max(1, limit // vocab)
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        for start in range(0, n, rows):
            lse[start:start + rows] = torch.logsumexp(logits[start:start + rows].float(), dim=1)
        target_logits = logits.gather(1, targets[:, None]).squeeze(1).float()
        ctx.save_for_backward(logits, targets, lse)
        ctx.rows = rows
        return (lse - target_logits).mean()

    @staticmethod
    def backward(ctx, grad: Tensor):
        logits, targets, lse = ctx.saved_tensors
        rows, n = ctx.rows, logits.shape[0]
        scale = grad.float() / n
        out = torch.empty_like(logits)
        minus_one = torch.full((min(rows, n), 1), -1.0, device=logits.device)
        for start in range(0, n, rows):
            chunk = slice(start, start + rows)
            in_place = logits.dtype == torch.float32  # computed in the gradient's own rows (never in the logits)
            probs = out[chunk] if in_place else torch.empty_like(logits[chunk], dtype=torch.float32)
            torch.sub(logits[chunk], lse[chunk, None], out=probs).exp_()  # FP32 math (a temporary for BF16)
            probs.scatter_add_(1, targets[chunk, None], minus_one[:probs.shape[0]])
            probs.mul_(scale)
            if not in_place:
                out[chunk] = probs  # rounded into the gradient's dtype
        return out, None


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean token cross-entropy of logits [..., V] against targets [...], computed in FP32 (chunked,
    see ``_CrossEntropy``); equals ``cross_entropy_reference`` to FP32 rounding."""
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"cross_entropy: logits {tuple(logits.shape)} do not match targets {tuple(targets.shape)}")
    return _CrossEntropy.apply(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def head_cross_entropy(logits: Tensor, window: Tensor, depth: int = 0) -> Tensor:
    """Cross-entropy of the head at MTP ``depth`` (0: the main head) on micro-batch ``window`` [B, T+1]: its
    position i predicts token i+depth+1, so its targets are window[:, depth+1:]."""
    return cross_entropy(logits, window[:, depth + 1:])


def cross_entropy_reference(logits: Tensor, targets: Tensor) -> Tensor:
    """``F.cross_entropy`` on an FP32 copy of the logits (what HF's causal-LM loss does): the reference."""
    return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten())


def compute_losses(out: ModelOutput, window: Tensor, mtp_weight: float, balance_alpha: float) -> Losses:
    """Losses for one micro-batch.

    window: [B, T+1] tokens; the model saw window[:, :T]. Main targets are window[:, 1:]; MTP depth k
    at position i predicts token i+k+1, so its targets are window[:, k+1:]. L_MTP = (lambda/D) sum_k
    L_MTP^k (eq. 25): the average over depths, not the sum. Where the model already computed each head's
    cross-entropy (``Transformer.forward(tokens, window)``), those are used: the same numbers.
    """
    if out.cross_entropies:
        lm_loss, depth_losses = out.cross_entropies[0], out.cross_entropies[1:]
    else:
        lm_loss = head_cross_entropy(out.logits, window)
        depth_losses = [head_cross_entropy(logits, window, k) for k, logits in enumerate(out.mtp_logits, start=1)]
    if depth_losses:
        mtp_loss = torch.stack(depth_losses).mean()
    else:
        mtp_loss = lm_loss.new_zeros(())
    balance_loss = balance_alpha * out.balance_loss
    return Losses(lm_loss + mtp_weight * mtp_loss + balance_loss, lm_loss, mtp_loss, balance_loss)
