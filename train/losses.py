"""Training objective: next-token CE + lambda * MTP + alpha * sequence-wise balance (sec 2.1.2, 2.2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from train.model import ModelOutput


@dataclass
class Losses:
    loss: Tensor  # what is back-propagated: lm_loss + mtp_weight * mtp_loss + balance_loss
    lm_loss: Tensor  # main next-token cross-entropy
    mtp_loss: Tensor  # (1/D) sum_k L_MTP^k, before the weight lambda
    balance_loss: Tensor  # alpha * sum over MoE layers of L_Bal (already weighted)


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean token cross-entropy in fp32."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def compute_losses(out: ModelOutput, window: Tensor, mtp_weight: float, balance_alpha: float) -> Losses:
    """Losses for one micro-batch.

    window: [B, T+1] tokens; the model saw window[:, :T]. Main targets are window[:, 1:]; MTP depth k
    at position i predicts token i+k+1, so its targets are window[:, k+1:]. L_MTP = (lambda/D) sum_k
    L_MTP^k (eq. 25): the average over depths, not the sum.
    """
    lm_loss = cross_entropy(out.logits, window[:, 1:])
    if out.mtp_logits:
        depth_losses = [cross_entropy(logits, window[:, k + 1 :]) for k, logits in enumerate(out.mtp_logits, start=1)]
        mtp_loss = torch.stack(depth_losses).mean()
    else:
        mtp_loss = lm_loss.new_zeros(())
    balance_loss = balance_alpha * out.balance_loss
    return Losses(lm_loss + mtp_weight * mtp_loss + balance_loss, lm_loss, mtp_loss, balance_loss)
