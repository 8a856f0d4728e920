"""Plain data parallelism: average gradients over all processes (replaced by ZeRO-1 in parallel/zero.py).

Gradients are flattened into buckets of about ``bucket_mb`` so that a model with hundreds of tensors
costs a handful of all-reduces, not one per tensor.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def _buckets(tensors: list[torch.Tensor], bucket_bytes: int) -> list[list[torch.Tensor]]:
    buckets: list[list[torch.Tensor]] = [[]]
    size = 0
    for t in tensors:
        if buckets[-1] and (size + t.numel() * t.element_size() > bucket_bytes or t.dtype != buckets[-1][0].dtype):
            buckets.append([])
            size = 0
        buckets[-1].append(t)
        size += t.numel() * t.element_size()
    return [b for b in buckets if b]


@torch.no_grad()
def all_reduce_gradients(model: nn.Module, group: dist.ProcessGroup | None = None, bucket_mb: int = 25) -> None:
    """grad <- mean over the group's ranks of grad, for every parameter that has one."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    world = dist.get_world_size(group)
    for bucket in _buckets(grads, bucket_mb * 2**20):
        flat = _flatten_dense_tensors(bucket)
        dist.all_reduce(flat, group=group)
        flat.div_(world)
        for grad, reduced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            grad.copy_(reduced)


@torch.no_grad()
def all_reduce_sum(*tensors: torch.Tensor, group: dist.ProcessGroup | None = None) -> None:
    """Sum small statistics (losses, expert loads) over the group, in place."""
    for t in tensors:
        dist.all_reduce(t, group=group)
