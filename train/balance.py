"""Auxiliary-loss-free load balancing (sec 2.1.2): the per-expert bias update and MaxVio."""

from __future__ import annotations

import torch
from torch import Tensor

from train.model import MoE


@torch.no_grad()
def update_gate_biases(moe_layers: list[MoE], expert_load: Tensor, speed: float) -> None:
    """b_i += gamma * sign(mean_load - load_i) per layer, once per optimizer step.

    expert_load: [n_layers, E] tokens per expert summed over every micro-batch (and rank) of the step.
    Overloaded experts (above the mean) get their bias lowered, underloaded ones raised.
    """
    if speed == 0.0:
        return
    load = expert_load.float()
    for layer, row in zip(moe_layers, load, strict=True):
        layer.gate.bias.add_(speed * torch.sign(row.mean() - row).to(layer.gate.bias.device))


def max_violation(expert_load: Tensor) -> Tensor:
    """MaxVio per layer = max_i load_i / mean_load - 1 (0 = perfectly balanced)."""
    load = expert_load.float()
    return load.max(dim=-1).values / load.mean(dim=-1).clamp_min(1e-9) - 1.0
