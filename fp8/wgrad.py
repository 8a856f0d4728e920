"""Weight gradients of the FP8 autograd functions as their own graph node, so a split backward defers
them (report sec 2.3.2 / DualPipe: "backward for input" B now, "backward for weights" W later).

A custom autograd function computes all its input gradients in one ``backward`` call, and its
``ctx.needs_input_grad`` is fixed at forward time. Torch's split backward
(``torch.distributed.pipelining._backward``: ``stage_backward_input`` asks only for the stage inputs'
gradients, ``stage_backward_weight`` later re-runs the node where a weight's path joins the input path
with the gradient it captured) would therefore run every FP8 GEMM of such a node twice: Dgrad and Wgrad
in B, then both again in W. Built-in ops avoid this because they check per call which outputs are needed.

The FP8 functions here take their weights through ``WeightEntry`` (an identity on the FP32 masters):

    weights' = WeightEntry(box, *weights)          # its backward runs box.take()  -> the Wgrad GEMMs
    y = Fp8Function(x, *weights', box)             # its backward runs the Dgrad GEMMs, box.defer(...)

* plain backward: the FP8 node computes dx and stores a closure for the weight gradients in the box;
  the entry node, which depends on it, runs next and calls the closure. Each GEMM once.
* split backward: B reaches the stage input through the FP8 node only (the entry node leads to
  weights), so B computes dx and stores the closure. W re-runs the FP8 node with the gradient it captured
  in B: ``box.is_replay()`` (a Wgrad is pending) recognises it and skips Dgrad; the entry node then runs
  the closure. Each GEMM once, and the Wgrad ones in W.

The closure holds what Wgrad needs (FP8 operands), which B would otherwise have freed: that is the
memory a split backward costs in any implementation (the gradient of every deferred weight's output).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor


@dataclass(frozen=True)
class WeightSpec:
    """Shape, dtype and device of a weight (kept on ctx so a replay need not unpack saved tensors,
    which would re-run a recomputed forward)."""
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, weight: Tensor) -> WeightSpec:
        return cls(weight.shape, weight.dtype, weight.device)


class WeightGradBox:
    """Hand-over between an FP8 function's backward (Dgrad) and its ``WeightEntry`` node (Wgrad)."""

    def __init__(self) -> None:
        self._wgrad: Callable[[], tuple[Tensor, ...]] | None = None

    def is_replay(self) -> bool:
        """True when this node's Wgrad is still pending, i.e. this is the W pass re-running the node: a
        plain backward runs the entry node (which takes the closure) right after this one, so only a split
        backward leaves it pending. Not by the gradient object: torch 2.13 hands the captured object back,
        2.11 a sum of the captured gradients (a new tensor; seen on an H200). Hence a second input-only
        backward over a retained graph before the W pass counts as the W pass (nothing in the trainer
        does that)."""
        return self._wgrad is not None

    def defer(self, wgrad: Callable[[], tuple[Tensor, ...]]) -> None:
        """Remember the Wgrad closure of the backward that just ran (its Dgrad)."""
        self._wgrad = wgrad

    def take(self) -> tuple[Tensor, ...]:
        """Run and drop the pending Wgrad closure."""
        if self._wgrad is None:
            raise RuntimeError("FP8 weight gradient requested before the backward of its layer ran")
        wgrad, self._wgrad = self._wgrad, None
        return wgrad()


class _WeightEntry(torch.autograd.Function):
    @staticmethod
    def forward(ctx, box: WeightGradBox, *weights: Tensor) -> tuple[Tensor, ...]:
        ctx.box = box
        return tuple(w.view_as(w) for w in weights)

    @staticmethod
    def backward(ctx, *unused_grads: Tensor):
        return (None, *ctx.box.take())


def weight_entry(box: WeightGradBox, *weights: Tensor) -> tuple[Tensor, ...]:
    """The weights as inputs of an FP8 function whose weight gradients ``box`` delivers (see module)."""
    if not any(w.requires_grad for w in weights) or not torch.is_grad_enabled():
        return weights
    return _WeightEntry.apply(box, *weights)


def no_weight_grad(spec: WeightSpec) -> Tensor:
    """The placeholder an FP8 node returns for a weight, whose real gradient comes from the entry node:
    a broadcast zero of the weight's shape, dtype and device (nothing of its size is allocated)."""
    return torch.zeros((), dtype=spec.dtype, device=spec.device).expand(spec.shape)
