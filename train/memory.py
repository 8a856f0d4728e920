"""Activation memory accounting (report sec 3.2.3): the bytes autograd keeps for the backward.

``saved_activation_bytes`` runs a forward under ``torch.autograd.graph.saved_tensors_hooks`` and adds up
the storages saved for backward once each (views and tensors saved by several operations count once),
leaving out parameters and buffers. Recomputed regions (``torch.utils.checkpoint``) save only their
inputs, which the hooks see; what they recompute is not saved and not counted. Works on any device,
the CPU included (no allocator statistics needed).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


def saved_activation_bytes(model: nn.Module, forward: Callable[[], Any]) -> tuple[int, Any]:
    """Run ``forward()`` (with grad enabled) and return (bytes saved for backward, its result)."""
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip and storage.nbytes():
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = forward()
    return sum(saved.values()), result
