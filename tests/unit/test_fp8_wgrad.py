"""FP8 layers under a split backward (fp8/wgrad.py): B computes input gradients only, W weight gradients
only, each FP8 GEMM runs once, and the gradients are bit-identical to one plain backward.

The split is driven by ``parallel.pipeline.overlap.backward_piece``, i.e. torch's
``stage_backward_input`` / ``stage_backward_weight``: the functions DualPipe and ZB1P run for B and W.
Without ``fp8.wgrad`` the custom functions' backward ran whole in both passes: Dgrad and Wgrad in B,
both again in W (the GEMM counts below fail that way).
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from fp8.backend import EmulateBackend
from fp8.experts import fp8_expert_ffn
from fp8.linear import fp8_linear
from fp8.quant import Quantized
from parallel.pipeline.overlap import backward_piece, split_backward

pytestmark = pytest.mark.usefixtures("single_thread")


class CountingBackend(EmulateBackend):
    """The emulated backend, counting GEMM calls by the operands' tiling: Fprop and Dgrad multiply 1x128
    activation tiles by 128x128 weight blocks, Wgrad two 128x1 token-tiled operands."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    def _kind(self, b: Quantized) -> str:
        return "block" if b.group_rows == 128 else "wgrad"

    def gemm(self, a: Quantized, b: Quantized, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        self.calls[self._kind(b)] += 1
        return super().gemm(a, b, out_dtype)

    def grouped_gemm(self, a: Quantized, b: Quantized, counts, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        self.calls["grouped"] += 1
        return super().grouped_gemm(a, b, counts, out_dtype)

    def k_grouped_gemm(self, a: Quantized, b: Quantized, offsets) -> torch.Tensor:
        self.calls["k_grouped"] += 1
        return super().k_grouped_gemm(a, b, offsets)

    def take(self) -> Counter[str]:
        calls, self.calls = self.calls, Counter()
        return calls


def linear_stack(backend, recompute: bool):
    """x -> fp8 linear (E4M3 cache) -> tanh -> fp8 linear (E5M6 cache): two weights, one stage input."""
    g = torch.Generator().manual_seed(0)
    w1 = nn.Parameter(torch.randn(192, 160, generator=g) * 0.1)
    w2 = nn.Parameter(torch.randn(96, 192, generator=g) * 0.1)

    def body(x):
        return fp8_linear(torch.tanh(fp8_linear(x, w1, backend)), w2, backend, cache="e5m6")

    def fn(x):
        return checkpoint(body, x, use_reentrant=False) if recompute else body(x)
    x = torch.randn(2, 70, 160, generator=g)
    return fn, x, [w1, w2], torch.randn(2, 70, 96, generator=g)


def expert_stack(backend, recompute: bool):
    """Sorted rows -> grouped FP8 SwiGLU experts (one expert without rows) -> tanh."""
    g = torch.Generator().manual_seed(1)
    counts, dim, inter = [40, 0, 130, 3], 64, 160
    ws = [nn.Parameter(torch.randn(4, *shape, generator=g) * shape[1] ** -0.5)
          for shape in ((inter, dim), (dim, inter), (inter, dim))]

    def body(x):
        return torch.tanh(fp8_expert_ffn(x, counts, *ws, backend=backend))

    def fn(x):
        return checkpoint(body, x, use_reentrant=False) if recompute else body(x)
    return fn, torch.randn(sum(counts), dim, generator=g), ws, torch.randn(sum(counts), dim, generator=g)


def run(make, split: bool, recompute: bool, copied_grads: bool = False):
    """Forward, then backward plain or split; the GEMM calls of each phase and the gradients.
    ``copied_grads``: the W pass gets copies of the gradients B captured, as torch 2.11's
    ``stage_backward_weight`` passes them (a sum of the captured ones: a new tensor), not the objects."""
    backend = CountingBackend()
    fn, x, weights, grad = make(backend, recompute)
    x = x.clone().requires_grad_()
    out = fn(x)
    phases = {"forward": backend.take()}
    weight_grads: list = []
    if copied_grads:
        stage_input, stage_weight = split_backward()
        _, groups = stage_input([(out * grad).sum()], None, [x], weights)
        for group in groups:
            group["grads"] = [tuple(None if g is None else g + 0 for g in grads) for grads in group["grads"]]
        weight_grads.append(lambda: stage_weight(weights, groups))
    else:
        backward_piece([out], [grad], [x], weights, split, weight_grads)
    phases["B"] = backend.take()
    if split:
        assert all(w.grad is None for w in weights), "B must not produce weight gradients"
        assert x.grad is not None
        for closure in weight_grads:
            closure()
        phases["W"] = backend.take()
    return phases, x.grad, [w.grad for w in weights]


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("make", [linear_stack, expert_stack])
def test_split_backward_runs_each_gemm_once_with_identical_grads(make, recompute):
    """Plain vs split: bit-identical dx and dW (same GEMMs on the same operands, in another order), and
    the split's B has only Dgrad GEMMs, its W only Wgrad GEMMs. Under recompute (non-reentrant
    checkpoint) B re-runs the forward once; W must not re-run it again."""
    plain, dx, dws = run(make, split=False, recompute=recompute)
    split, dx_split, dws_split = run(make, split=True, recompute=recompute)
    assert torch.equal(dx, dx_split)
    for a, b in zip(dws, dws_split):
        assert a is not None and torch.equal(a, b)
    if make is linear_stack:  # two linears: Fprop 2, Dgrad 2, Wgrad 2 (and Fprop 2 again if recomputed)
        assert plain["forward"] == Counter(block=2)
        assert plain["B"] == Counter(block=2 + 2 * recompute, wgrad=2)
        assert split["B"] == Counter(block=2 + 2 * recompute), split
        assert split["W"] == Counter(wgrad=2), split
    else:  # grouped, gate and up stacked as one (fp8/experts.py StepGateUp): Fprop gate-up and down 2, Dgrad
        # down and gate-up 2; Wgrad one K-grouped GEMM for down, one for gate-up
        assert plain["forward"] == Counter(grouped=2)
        assert plain["B"] == Counter(grouped=2 + 2 * recompute, k_grouped=2)
        assert split["B"] == Counter(grouped=2 + 2 * recompute), split
        assert split["W"] == Counter(k_grouped=2), split


@pytest.mark.parametrize("make", [linear_stack, expert_stack])
def test_w_pass_with_copies_of_the_captured_gradients(make):
    """torch 2.11's W pass hands the FP8 node a new tensor equal to the gradient B captured (2.13 the
    object itself): still each GEMM once, the Wgrad ones in W, and the plain backward's gradients. Failed
    on torch 2.11 (an H200) while the node recognised the W pass by the gradient object."""
    plain, dx, dws = run(make, split=False, recompute=False)
    split, dx_split, dws_split = run(make, split=True, recompute=False, copied_grads=True)
    assert torch.equal(dx, dx_split)
    for a, b in zip(dws, dws_split):
        assert a is not None and torch.equal(a, b)
    only_b, only_w = ("block", "wgrad") if make is linear_stack else ("grouped", "k_grouped")
    assert split["B"] == Counter({only_b: plain["B"][only_b]}), split
    assert split["W"] == Counter({only_w: plain["B"][only_w]}), split


def test_retained_graph_backward_twice_accumulates():
    """Backward twice through one retained graph with the *same* gradient object: the second pass is a
    new backward, not a W replay (the first one's weight gradient was taken), so dx and dW double."""
    backend = CountingBackend()
    fn, x, weights, grad = linear_stack(backend, recompute=False)
    x = x.clone().requires_grad_()
    out = fn(x)
    out.backward(grad, retain_graph=True)
    once = [x.grad.clone(), *[w.grad.clone() for w in weights]]
    out.backward(grad)
    for first, total in zip(once, [x.grad, *[w.grad for w in weights]]):
        torch.testing.assert_close(total, 2 * first, rtol=0, atol=0)


def test_frozen_weight_and_no_grad():
    """A frozen weight gets no gradient and no deferred work; under no_grad nothing is recorded."""
    backend = CountingBackend()
    w = torch.randn(128, 128)
    x = torch.randn(4, 128, requires_grad=True)
    fp8_linear(x, w, backend).sum().backward()
    assert backend.take() == Counter(block=2)  # Fprop and Dgrad, no Wgrad
    with torch.no_grad():
        assert fp8_linear(x, nn.Parameter(w), backend).grad_fn is None
