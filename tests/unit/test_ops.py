"""train/ops.py's memory-lean functions against the plain expressions they replace.

Forward outputs must be bit-identical (same kernels on the same inputs). SwiGLU's backward runs the
same kernels as autograd on the reference, so its gradients are bit-identical too; RMSNorm's and the
weighted SwiGLU's backward are written out, so their gradients agree to FP32 rounding (rtol 1e-5 in
FP32; one BF16 ulp, 2^-8, where the gradient is returned in BF16), and gradcheck in float64 checks
each against finite differences. Each keeps only its inputs for backward (the combine and the gather of
rows only their index).
"""

from __future__ import annotations

import pytest
import torch

from train.memory import saved_activation_bytes
from train.ops import (combine_rows, combine_rows_reference, gather_rows, rms_norm, rms_norm_reference, swiglu,
                       swiglu_reference, to_compute_dtype)

pytestmark = pytest.mark.usefixtures("single_thread")


def grads(fn, *inputs, grad_out):
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out)
    return out, [t.grad for t in leaves if t.requires_grad]


def tolerance(dtype: torch.dtype) -> dict:
    return {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2**-8, "atol": 1e-5}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_the_reference(dtype):
    torch.manual_seed(0)
    x = (torch.randn(3, 17, 64) * 3).to(dtype)
    weight = torch.rand(64) + 0.5  # FP32, as the model's
    grad_out = torch.randn(3, 17, 64)
    ours, ours_grads = grads(lambda a, w: rms_norm(a, w, 1e-6), x, weight, grad_out=grad_out)
    ref, ref_grads = grads(lambda a, w: rms_norm_reference(a, w, 1e-6), x, weight, grad_out=grad_out)
    assert ours.dtype == ref.dtype and torch.equal(ours, ref)
    for g, r in zip(ours_grads, ref_grads):
        assert g.dtype == r.dtype
        torch.testing.assert_close(g, r, **tolerance(g.dtype))


def test_rms_norm_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w: rms_norm(a, w, 1e-6), (x, weight))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_matches_the_reference_bit_for_bit(dtype):
    torch.manual_seed(0)
    gate, up = torch.randn(33, 48).to(dtype), torch.randn(33, 48).to(dtype)
    grad_out = torch.randn(33, 48).to(dtype)
    ours, ours_grads = grads(swiglu, gate, up, grad_out=grad_out)
    ref, ref_grads = grads(swiglu_reference, gate, up, grad_out=grad_out)
    assert torch.equal(ours, ref)
    for g, r in zip(ours_grads, ref_grads):
        assert torch.equal(g, r)
    assert torch.autograd.gradcheck(swiglu, (torch.randn(5, 6, dtype=torch.float64, requires_grad=True),
                                             torch.randn(5, 6, dtype=torch.float64, requires_grad=True)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weighted_swiglu_matches_the_reference(dtype):
    """The routed experts' SwiGLU times the rows' FP32 gate weights: forward bit-identical; gradients
    of gate, up and weights to FP32 rounding (one BF16 ulp where returned in BF16)."""
    torch.manual_seed(0)
    gate, up = torch.randn(33, 48).to(dtype), torch.randn(33, 48).to(dtype)
    weights = torch.rand(33) + 0.25
    grad_out = torch.randn(33, 48).to(dtype)
    ours, ours_grads = grads(swiglu, gate, up, weights, grad_out=grad_out)
    ref, ref_grads = grads(swiglu_reference, gate, up, weights, grad_out=grad_out)
    assert ours.dtype == dtype and torch.equal(ours, ref)
    for g, r in zip(ours_grads, ref_grads):
        assert g.dtype == r.dtype
        torch.testing.assert_close(g, r, **tolerance(g.dtype))
    inputs = (torch.randn(5, 6, dtype=torch.float64, requires_grad=True),
              torch.randn(5, 6, dtype=torch.float64, requires_grad=True),
              torch.rand(5, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(swiglu, inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_combine_rows_matches_the_reference_bit_for_bit(dtype):
    torch.manual_seed(0)
    rows = torch.randn(40, 16).to(dtype)
    index = torch.randint(0, 12, (40,))
    grad_out = torch.randn(12, 16).to(dtype)
    ours, (ours_grad,) = grads(lambda r: combine_rows(r, index, 12), rows, grad_out=grad_out)
    ref, (ref_grad,) = grads(lambda r: combine_rows_reference(r, index, r.new_zeros(12, 16)), rows, grad_out=grad_out)
    assert torch.equal(ours, ref) and torch.equal(ours_grad, ref_grad)


def routing_like_index(tokens: int, topk: int, experts: int) -> torch.Tensor:
    """Each token topk times, in expert order (as RoutedExperts gathers them): repeated, unsorted rows."""
    order = torch.randint(0, experts, (tokens * topk,)).argsort(stable=True)
    return order // topk


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_rows_is_indexing_with_an_index_add_backward(dtype):
    torch.manual_seed(0)
    x = torch.randn(24, 16).to(dtype)
    index = routing_like_index(24, 4, 6)
    grad_out = torch.randn(96, 16).to(dtype)
    ours, (ours_grad,) = grads(lambda a: gather_rows(a, index), x, grad_out=grad_out)
    ref, (ref_grad,) = grads(lambda a: a[index], x, grad_out=grad_out)
    assert torch.equal(ours, ref)
    assert torch.equal(ours_grad, torch.zeros_like(x).index_add_(0, index, grad_out))
    # each row's 4 gradients summed: to rounding of the exact sum, at least as close as autograd's scatter
    # (which in BF16 rounds after each addition; index_add_ adds in FP32 and rounds once)
    exact = torch.zeros(24, 16, dtype=torch.float64).index_add_(0, index, grad_out.double())
    torch.testing.assert_close(ours_grad.double(), exact, **tolerance(dtype))
    assert (ours_grad.double() - exact).abs().max() <= (ref_grad.double() - exact).abs().max()


def test_gather_rows_backward_is_the_same_every_run_with_threads():
    """With 2 threads autograd's scatter for x[index] adds a row's gradients in a varying order (the bits of
    the model's gradients then differ from run to run); gather_rows' backward gives the same bits each time."""
    torch.manual_seed(0)
    index = routing_like_index(2048, 4, 32)
    grad_out = torch.randn(8192, 256)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runs = [grads(lambda a: gather_rows(a, index), torch.randn(2048, 256), grad_out=grad_out)[1][0]
                for _ in range(5)]
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(runs[0], r) for r in runs[1:])


def test_each_keeps_only_its_inputs():
    """Saved bytes: RMSNorm x and one FP32 1/rms per row; SwiGLU gate and up (and the weights); the
    combine its index. The references keep FP32 copies and outputs besides."""
    torch.manual_seed(0)
    holder = torch.nn.Module()
    x = torch.randn(64, 32, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.ones(32, requires_grad=True)
    holder.weight = torch.nn.Parameter(weight)
    kept, _ = saved_activation_bytes(holder, lambda: rms_norm(x, holder.weight, 1e-6))
    assert kept == 64 * 32 * 2 + 64 * 4
    reference, _ = saved_activation_bytes(holder, lambda: rms_norm_reference(x, holder.weight, 1e-6))
    assert reference > kept
    gate, up = torch.randn(64, 32, requires_grad=True), torch.randn(64, 32, requires_grad=True)
    assert saved_activation_bytes(holder, lambda: swiglu(gate, up))[0] == 2 * 64 * 32 * 4
    weights = torch.rand(64, requires_grad=True)
    kept, _ = saved_activation_bytes(holder, lambda: swiglu(gate, up, weights))
    assert kept == 2 * 64 * 32 * 4 + 64 * 4
    index = torch.randint(0, 8, (64,))
    assert saved_activation_bytes(holder, lambda: combine_rows(x, index, 8))[0] == 64 * 8
    assert saved_activation_bytes(holder, lambda: combine_rows_reference(x, index, x.new_zeros(8, 32)))[0] > 64 * 8
    assert saved_activation_bytes(holder, lambda: gather_rows(x, index))[0] == 64 * 8  # the gather: its index


def test_to_compute_dtype_follows_autocast():
    x = torch.randn(2, 3)
    assert to_compute_dtype(x) is x
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert to_compute_dtype(x).dtype == torch.bfloat16
