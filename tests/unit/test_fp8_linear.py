"""FP8 linear and grouped expert SwiGLU (report sec 3.3.1-3.3.3): backends, accuracy, caching, memory.

Error bounds. An E4M3 tile with scale s stores x / s rounded to 3 mantissa bits, so (test_fp8_quant)

    |x - x'| <= 2^-4 |x| + 2^-10 s        (half-ULP of normals, or half the subnormal step).

A product of two quantized operands then errs by |ab - a'b'| <= |a - a'| |b| + |a'| |b - b'|, i.e. at most
~2 x 2^-4 = 12.5% relative per product, and a K-sum by at most sum_k of that: the element-wise bound
checked below (plus the fp32 summation of the GEMM). Relative Frobenius error: rounding errors of random
data are unbiased and nearly independent, each operand's relative rms error is ~2.6% for E4M3 (a uniform
error of +-half an ULP, ULP = 2^-3 of the binade), so one GEMM's output errs by ~sqrt(2) x 2.6% = 3.7% in
norm whatever K (the errors of the K products add in quadrature like the products themselves). Hence the
< 5% checks for y, dx and dW. Chained GEMMs (the SwiGLU experts: gate/up -> down, and three GEMMs
deep in backward) add such errors in quadrature: ~6-7% measured, checked at < 10%.
"""

from __future__ import annotations

import contextlib
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fp8.backend import EmulateBackend, ReferenceBackend
from fp8.experts import expert_gemm, fp8_expert_ffn, quantize_experts, transpose_expert_blocks
from fp8.gemm import gemm_reference
from fp8.linear import Fp8Linear, fp8_linear, transpose_blocks
from fp8.quant import BLOCK, E4M3_MAX, Quantized, dequantize_2d, quantize, quantize_act_transposed, quantize_weight
from bench.host_syncs import HostReads
from train.model import expert_ffn_loop
from train.memory import saved_activation_bytes
from train.ops import shared_weight_casts

pytestmark = pytest.mark.usefixtures("single_thread")

EMULATE, REFERENCE = EmulateBackend(), ReferenceBackend()
U = 2.0**-24  # fp32 unit roundoff


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error of a against ref."""
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


def quant_error(x: torch.Tensor, q: Quantized) -> torch.Tensor:
    """Element-wise bound on |x - deq(x)| for the E4M3 quantization q of the 2-D x (+ fp32 slack)."""
    return (2.0**-4 + 2.0**-20) * x.abs().double() + 2.0**-10 * q.expanded_scale().double()


def gemm_bound(a: torch.Tensor, qa: Quantized, b: torch.Tensor, qb: Quantized) -> torch.Tensor:
    """Bound on |A B^T - GEMM(qa, qb)|: quantization of both operands plus the fp32 summation."""
    da, db = dequantize_2d(qa).double(), dequantize_2d(qb).double()
    groups = -(-a.shape[1] // BLOCK)
    summation = (a.shape[1] + 3 * groups + 6) * U * (da.abs() @ db.abs().T)
    return quant_error(a, qa) @ b.abs().double().T + da.abs() @ quant_error(b, qb).T + summation


def operands(m: int, n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and columns of different magnitudes, so tiles get different scales."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.exp2(torch.randint(-4, 5, (m, 1), generator=g).float())
    w = torch.randn(n, k, generator=g) * torch.exp2(torch.randint(-4, 5, (1, k), generator=g).float())
    return x, w


# --------------------------------------------------------------------------------------------------
# Backends


@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (5, 7, 130), (64, 136, 256), (130, 129, 300)])
@pytest.mark.parametrize("rows_b", [BLOCK, 1])
def test_emulate_matches_reference(m, n, k, rows_b):
    """Same payloads and scales, different fp32 rounding: |emulate - reference| <= (K + 3G + 6) 2^-24
    sum_k |a_k b_k| (EmulateBackend's docstring derives it; G = ceil(K / 128) groups)."""
    x, w = operands(m, n, k, seed=m + n + k)
    a, b = quantize(x, 1), quantize(w, rows_b)
    emulated, reference = EMULATE.gemm(a, b), REFERENCE.gemm(a, b)
    assert emulated.dtype == torch.float32 and emulated.shape == (m, n)
    magnitude = dequantize_2d(a).double().abs() @ dequantize_2d(b).double().abs().T
    budget = (k + 3 * -(-k // BLOCK) + 6) * U * magnitude
    assert ((emulated.double() - reference.double()).abs() <= budget).all()


def test_emulate_grouped_matches_reference():
    counts = [5, 0, 130, 1, 64]
    n, k = 48, 200
    x = torch.randn(sum(counts), k)
    w = torch.randn(len(counts), n, k) * torch.arange(1, 6).view(-1, 1, 1)
    a, b = quantize(x, 1), quantize_experts(w)
    reference = REFERENCE.grouped_gemm(a, b, counts)
    emulated = EMULATE.grouped_gemm(a, b, counts)
    assert emulated.shape == (sum(counts), 128)  # each expert padded to 128 rows
    assert torch.allclose(emulated, reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())
    assert torch.equal(expert_gemm(EMULATE, a, b, n, counts), emulated[:, :n])
    empty = expert_gemm(EMULATE, quantize(torch.zeros(0, k), 1), b, n, [0] * 5)
    assert empty.shape == (0, n)
    with pytest.raises(ValueError, match="sum"):
        EMULATE.grouped_gemm(a, b, [5, 0, 130, 1, 63])


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def fake_scaled_mm(a, b, scale_a, scale_b, out_dtype):
    """CPU stand-in for CUDA ``torch._scaled_mm`` with blockwise scales: the size, layout and scale
    checks of ATen's CUDA implementation (get_joint_scaling, is_blockwise_1x128 / 128x128_scaling: b's
    scales are checked as ``scale_b.t()`` against ``b.t()``), then real = payload * scale."""

    def size_stride(s, dim, size, stride):
        return s.shape[dim] == size and (size <= 1 or s.stride(dim) == stride)

    def is_1x128(t, s):
        return (s.dim() == 2 and size_stride(s, 0, t.shape[0], 1)
                and size_stride(s, 1, _ceil(t.shape[1], 128), t.shape[0]))

    def is_128x128(t, s):
        return (s.dim() == 2 and size_stride(s, 0, _ceil(t.shape[0], 128), _ceil(t.shape[1], 128))
                and size_stride(s, 1, _ceil(t.shape[1], 128), 1))

    def as_cublas_reads(s, rows):
        """cuBLAS reads 128x128 scales [R/128, L] with a leading dimension of round_up(L, 4), whatever
        the tensor's stride says (NVIDIA's cuBLAS docs; the torch 2.11 H200 probe saw the wrong product
        that reading gives when L % 4 != 0): read the memory that way, NaN past the storage's end."""
        if rows == 1:
            return s
        n_rows, blocks = s.shape
        lead = _ceil(blocks, 4) * 4
        memory = torch.as_strided(s, (s.untyped_storage().nbytes() // 4 - s.storage_offset(),), (1,))
        memory = torch.cat([memory, torch.full((n_rows * lead,), float("nan"))])
        index = torch.arange(n_rows)[:, None] * lead + torch.arange(blocks)[None, :]
        return memory[index]

    def expand(t, s, rows):
        s = as_cublas_reads(s, rows)
        return s.repeat_interleave(rows, 0)[:t.shape[0]].repeat_interleave(128, 1)[:, :t.shape[1]]

    assert a.dtype == b.dtype == torch.float8_e4m3fn and a.shape[1] == b.shape[0]
    assert a.shape[1] % 16 == 0 and b.shape[0] % 16 == 0 and b.shape[1] % 16 == 0
    assert a.stride(1) == 1 and b.stride(0) == 1  # row-major x column-major
    bt, sbt = b.t(), scale_b.t()
    checks = {(128, 1): (is_128x128, is_1x128), (1, 128): (is_1x128, is_128x128), (1, 1): (is_1x128, is_1x128)}
    for (rows_a, rows_b), (check_a, check_b) in checks.items():
        if check_a(a, scale_a) and check_b(bt, sbt):
            break
    else:
        raise RuntimeError("Invalid scaling configuration.")
    deq_a = a.float() * expand(a, scale_a, rows_a)
    deq_bt = bt.float() * expand(bt, sbt, rows_b)
    return (deq_a.double() @ deq_bt.double().t()).to(out_dtype)


def test_torch_backend_scale_layouts(monkeypatch):
    """The 'torch' backend's operand padding and scale layouts, against a stand-in that enforces the CUDA
    layout contract and reads 128x128 scales as cuBLAS does (no CUDA here: the real probe on CPU is
    rejected, see test_fp8_convert). K/128 = 2, 3, 7 need the padding to a multiple of 4."""
    from fp8.backend import TorchScaledMMBackend, get_backend

    monkeypatch.setattr(torch, "_scaled_mm", fake_scaled_mm)
    backend = get_backend("torch", "cpu")  # the probe passes
    assert isinstance(backend, TorchScaledMMBackend)
    for m, n, k in [(5, 7, 130), (64, 136, 256), (130, 129, 300), (16, 300, 512), (40, 260, 896)]:
        x, w = operands(m, n, k, seed=k)
        for rows_b in (BLOCK, 1):
            a, b = quantize(x, 1), quantize(w, rows_b)
            magnitude = dequantize_2d(a).abs() @ dequantize_2d(b).abs().T  # fp32 roundings: ~K 2^-24 of this
            assert ((backend.gemm(a, b) - EMULATE.gemm(a, b)).abs() <= 1e-4 * magnitude).all()
    # E5M6 operands (wo's Wgrad) fall back to the emulated GEMM
    a, b = quantize(x, 1), quantize(w, 1, "e5m6", pow2=True)
    assert torch.equal(backend.gemm(a, b), EMULATE.gemm(a, b))
    counts = [3, 0, 9]
    xs, ws = torch.randn(12, 256), torch.randn(3, 32, 256)
    grouped = expert_gemm(backend, quantize(xs, 1), quantize_experts(ws), 32, counts)
    expected = expert_gemm(EMULATE, quantize(xs, 1), quantize_experts(ws), 32, counts)
    assert grouped.shape == (12, 32) and (grouped - expected).abs().max() <= 1e-4 * expected.abs().max()
    a, b = quantize(torch.randn(40, 384), 1), quantize(torch.randn(24, 384), 1)  # the experts' Wgrad
    offsets = [0, 256, 256, 384]
    wgrads, expected = backend.k_grouped_gemm(a, b, offsets), EMULATE.k_grouped_gemm(a, b, offsets)
    assert wgrads.shape == (3, 40, 24) and (wgrads - expected).abs().max() <= 1e-4 * expected.abs().max()
    # with a grouped backend (Triton on a GPU) the experts' GEMMs go there, the dense ones stay on _scaled_mm
    hybrid = TorchScaledMMBackend(grouped=EMULATE)
    xq = quantize(xs, 1)
    assert torch.equal(hybrid.grouped_gemm(xq, quantize_experts(ws), counts),
                       EMULATE.grouped_gemm(xq, quantize_experts(ws), counts))
    assert torch.equal(hybrid.k_grouped_gemm(a, b, offsets), expected)


def test_transpose_blocks_and_expert_blocks():
    """W^T's 128x128 blocks are W's blocks transposed: Dgrad reuses them without re-quantizing."""
    w = torch.randn(300, 200) * torch.exp2(torch.randint(-4, 5, (300, 1)).float())
    qt, direct = transpose_blocks(quantize_weight(w)), quantize_weight(w.t())
    assert torch.equal(qt.data.float(), direct.data.float()) and torch.equal(qt.scale, direct.scale)
    for rows in (32, 200, 256):  # stacked experts, zero-padded to 128-row multiples: each expert's own blocks
        experts = torch.randn(3, rows, 200) * torch.exp2(torch.randint(-4, 5, (3, rows, 1)).float())
        stacked, padded = quantize_experts(experts), -(-rows // 128) * 128
        assert stacked.group_rows == 128 and stacked.shape == (3 * padded, 200)
        for e in range(3):
            alone, part = quantize_weight(experts[e]), stacked.row_slice(e * padded, (e + 1) * padded)
            assert torch.equal(part.scale, alone.scale)
            assert torch.equal(part.data[:rows].float(), alone.data.float()) and not part.data[rows:].float().any()
        # and the stack of the W_e^T (Dgrad's operand) from it, without re-quantizing: the same bits
        for cols in (200, 256):
            w = experts[..., :cols]
            made, direct = transpose_expert_blocks(quantize_experts(w), tuple(w.shape)), quantize_experts(w.transpose(1, 2))
            assert made.data.shape == direct.data.shape and torch.equal(made.scale, direct.scale)
            assert torch.equal(made.data.float(), direct.data.float())


# --------------------------------------------------------------------------------------------------
# fp8_linear vs an fp64 linear


@pytest.mark.parametrize("backend", [EMULATE, REFERENCE], ids=lambda b: b.name)
def test_fp8_linear_forward_and_grads_within_bounds(backend):
    """y, dx and dW against fp64 on the same inputs: element-wise within the E4M3 bound of each GEMM's
    own tiling (Fprop 1x128 x 128x128; Dgrad dy 1x128 along N x W^T blocks; Wgrad dy and x 128x1), and
    ~3.7% in relative Frobenius norm (< 5%)."""
    g = torch.Generator().manual_seed(1)
    batch, seq, k, n = 2, 80, 300, 200  # 160 tokens (partial token tiles), K and N not multiples of 128
    x = torch.randn(batch, seq, k, generator=g) * torch.exp2(torch.randint(-3, 4, (batch, seq, 1), generator=g).float())
    w = torch.randn(n, k, generator=g) / k**0.5
    dy = torch.randn(batch, seq, n, generator=g)
    xf, wf = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fp8_linear(xf, wf, backend)
    y.backward(dy)
    assert y.dtype == xf.grad.dtype == wf.grad.dtype == torch.float32 and y.shape == (batch, seq, n)

    x2, dy2 = x.reshape(-1, k), dy.reshape(-1, n)
    xd, wd, dyd = x2.double(), w.double(), dy2.double()
    y_ref, dx_ref, dw_ref = xd @ wd.T, dyd @ wd, dyd.T @ xd

    checks = {
        "y": (y.reshape(-1, n), y_ref, gemm_bound(x2, quantize(x2, 1), w, quantize_weight(w))),
        "dx": (xf.grad.reshape(-1, k), dx_ref, gemm_bound(dy2, quantize(dy2, 1), w.t(), quantize_weight(w.t()))),
        "dW": (wf.grad, dw_ref, gemm_bound(dy2.t(), quantize_act_transposed(dy2), x2.t(), quantize_act_transposed(x2))),
    }
    errors = {}
    for name, (out, ref, bound) in checks.items():
        err = (out.double() - ref).abs()
        assert (err <= bound).all(), name
        assert err.max() > 0.01 * bound.max(), name  # the bound is not vacuous
        errors[name] = rel(out, ref)
        assert errors[name] < 0.05, (name, errors[name])
    print(f"\n{backend.name}: relative Frobenius error y {errors['y']:.4f}, dx {errors['dx']:.4f}, "
          f"dW {errors['dW']:.4f}")


def per_tensor(x: torch.Tensor) -> torch.Tensor:
    """Per-tensor E4M3 quantization (one scale amax / 448), dequantized (fp64)."""
    scale = x.abs().max() / E4M3_MAX
    return (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).double() * scale


def test_fine_grained_beats_per_tensor_with_outlier_channel():
    """Sec 3.3.2. E4M3 has the same relative precision over its whole normal range (2^-6 .. 448), so a
    per-tensor scale only hurts once an outlier pushes the rest of the tensor below it: an outlier channel
    2^16 times the typical value leaves typical values at ~2^-16 x 448 ~ 2^-7.2 after scaling,
    i.e. subnormal, with a step of 2^-9 (~28% error in norm). 1x128 tiles confine that to the tile
    holding the outlier channel (1 of the 8 tiles of K = 1024) for Fprop; Wgrad's 128x1 tiles (per
    channel) isolate the outlier channel entirely."""
    g = torch.Generator().manual_seed(0)
    tokens, k, n, channel = 256, 1024, 256, 5
    x = torch.randn(tokens, k, generator=g)
    x[:, channel] *= 2.0**16
    w = torch.randn(n, k, generator=g) / k**0.5
    w[:, channel] /= 2.0**16  # the outlier does not swamp the output either
    dy = torch.randn(tokens, n, generator=g)
    xf, wf = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fp8_linear(xf, wf, EMULATE)
    y.backward(dy)
    xd, wd, dyd = x.double(), w.double(), dy.double()
    others = torch.arange(k) != channel
    y_fine, y_tensor = rel(y, xd @ wd.T), rel(per_tensor(x) @ per_tensor(w).T, xd @ wd.T)
    dw_ref = (dyd.T @ xd)[:, others]
    dw_fine, dw_tensor = rel(wf.grad[:, others], dw_ref), rel((per_tensor(dy).T @ per_tensor(x))[:, others], dw_ref)
    print(f"\noutlier channel x2^16: y error fine-grained {y_fine:.4f} vs per-tensor {y_tensor:.4f}; "
          f"dW (other channels) {dw_fine:.4f} vs {dw_tensor:.4f}")
    assert y_fine < 0.06 and y_tensor > 4 * y_fine
    assert dw_fine < 0.05 and dw_tensor > 4 * dw_fine


def test_e5m6_cache_improves_wgrad_only():
    """cache='e5m6' (MLA's wo): Fprop and Dgrad do not read the cache, so they are bit-identical; Wgrad
    multiplies E4M3 dy by the E5M6 x (6 mantissa bits, exact 1x128 -> 128x1 re-tiling with power-of-two
    scales), so only dy's rounding is left: ~2.6% instead of ~3.7%, closer to the BF16 result."""
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(256, 256, generator=g), torch.randn(192, 256, generator=g) / 16
    dy = torch.randn(256, 192, generator=g)
    results = {}
    for cache in ("e4m3", "e5m6"):
        xf, wf = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fp8_linear(xf, wf, EMULATE, cache=cache)
        y.backward(dy)
        results[cache] = (y, xf.grad, wf.grad)
    assert torch.equal(results["e4m3"][0], results["e5m6"][0]) and torch.equal(results["e4m3"][1], results["e5m6"][1])
    bf16 = nn.Linear(256, 192, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        bf16.weight.copy_(w)
    xb = x.to(torch.bfloat16).requires_grad_()
    bf16(xb).backward(dy.to(torch.bfloat16))
    dw_bf16, dw_exact = bf16.weight.grad, dy.double().T @ x.double()
    e4m3_vs_bf16, e5m6_vs_bf16 = rel(results["e4m3"][2], dw_bf16), rel(results["e5m6"][2], dw_bf16)
    print(f"\ndW vs BF16: E4M3 cache {e4m3_vs_bf16:.4f}, E5M6 cache {e5m6_vs_bf16:.4f}; vs fp64: "
          f"{rel(results['e4m3'][2], dw_exact):.4f}, {rel(results['e5m6'][2], dw_exact):.4f}")
    assert e5m6_vs_bf16 < 0.85 * e4m3_vs_bf16
    assert rel(results["e5m6"][2], dw_exact) < 0.85 * rel(results["e4m3"][2], dw_exact)


def saved_bytes(fn, params: list[torch.Tensor]) -> int:
    """Bytes of the tensors autograd saves for backward while running fn(), parameters excluded
    (they exist anyway; a module's saved activations are what caching in FP8 shrinks)."""
    param_storages = {p.untyped_storage().data_ptr() for p in params}
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if t.untyped_storage().data_ptr() not in param_storages:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_saved_activation_bytes():
    """The activation is cached as FP8 (1 byte per element) plus one fp32 scale per 128 elements:
    (1 + 4/128) / 2 = 0.516 of a bf16 cache, 0.258 of an fp32 one. The E5M6 cache holds its 12-bit codes
    packed two per three bytes (1.5 bytes, + scales: 0.766 of bf16)."""
    tokens, k, n = 512, 1024, 256
    x = torch.randn(tokens, k, requires_grad=True)
    fp8 = Fp8Linear(k, n, backend=EMULATE)
    fp8_e5m6 = Fp8Linear(k, n, backend=EMULATE, cache="e5m6")
    fp32 = nn.Linear(k, n, bias=False)
    bf16 = nn.Linear(k, n, bias=False).to(torch.bfloat16)
    xb = x.detach().to(torch.bfloat16).requires_grad_()
    measured = {
        "fp8": saved_bytes(lambda: fp8(x), [fp8.weight]),
        "e5m6": saved_bytes(lambda: fp8_e5m6(x), [fp8_e5m6.weight]),
        "fp32": saved_bytes(lambda: fp32(x), [fp32.weight]),
        "bf16": saved_bytes(lambda: bf16(xb), [bf16.weight]),
    }
    print(f"\nsaved bytes for x [{tokens}, {k}]: {measured}; fp8/bf16 {measured['fp8'] / measured['bf16']:.4f}, "
          f"fp8/fp32 {measured['fp8'] / measured['fp32']:.4f}, e5m6/bf16 {measured['e5m6'] / measured['bf16']:.4f}")
    assert measured["fp32"] == 4 * tokens * k and measured["bf16"] == 2 * tokens * k
    assert measured["fp8"] == tokens * k + 4 * k * (tokens // BLOCK)  # 128x1: a scale per channel per 128 tokens
    assert measured["e5m6"] == 3 * tokens * k // 2 + 4 * tokens * (k // BLOCK)  # 12 bits, 1x128 tiles
    assert measured["e5m6"] / measured["bf16"] == pytest.approx(0.75 + 2 / BLOCK)
    assert measured["fp8"] / measured["bf16"] == pytest.approx(0.5 + 2 / BLOCK)
    assert measured["fp8"] / measured["fp32"] == pytest.approx(0.25 + 1 / BLOCK)


# --------------------------------------------------------------------------------------------------
# Fp8Linear module


def test_fp8_linear_module_and_autocast():
    torch.manual_seed(0)
    linear = nn.Linear(200, 72, bias=True)
    module = Fp8Linear.from_linear(linear, EMULATE)
    assert module.weight is linear.weight and module.bias is linear.bias
    assert [name for name, _ in module.named_parameters()] == ["weight", "bias"]
    assert module.state_dict().keys() == linear.state_dict().keys()
    x = torch.randn(3, 5, 200)
    assert rel(module(x), linear(x).detach()) < 0.05
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = module(x)
        reference = linear(x)
    assert y.dtype == reference.dtype == torch.bfloat16
    # the GEMM returns bf16 itself (out_dtype): its fp32 sums rounded once, as casting the fp32 product would
    fp32_product = EMULATE.gemm(quantize(x.reshape(-1, 200), 1), quantize_weight(linear.weight.detach()))
    assert torch.equal(y, (fp32_product.to(torch.bfloat16) + linear.bias.to(torch.bfloat16)).reshape(3, 5, 72))
    y.float().square().sum().backward()
    assert module.weight.grad.dtype == torch.float32 and module.weight.dtype == torch.float32
    assert module.bias.grad is not None and torch.isfinite(module.weight.grad).all()
    assert "cache=e4m3" in repr(module) and "backend=emulate" in repr(module)
    with pytest.raises(ValueError, match="cache"):
        Fp8Linear(8, 8, backend=EMULATE, cache="e5m2")


def test_two_linears_on_one_input_share_its_fp8_copy_within_a_step():
    """Inside a training step (train.ops.shared_weight_casts) w1 and w3 of a SwiGLU, or the MLA
    down-projections, quantize their common input once and keep one FP8 copy for backward; outside, each
    keeps its own. Outputs and gradients are bit-identical (the same quantization of the same x); an
    input modified in place is quantized again."""
    torch.manual_seed(0)
    holder = nn.ParameterList([torch.randn(96, 256), torch.randn(96, 256)])  # saved bytes leave parameters out
    w1, w3 = holder
    x0 = torch.randn(8, 256)

    def run(context):
        x = x0.clone().requires_grad_()
        w1.grad = w3.grad = None
        with context:
            saved, _ = saved_activation_bytes(holder, lambda: fp8_linear(x, w1, EMULATE) * fp8_linear(x, w3, EMULATE))
            y = fp8_linear(x, w1, EMULATE) * fp8_linear(x, w3, EMULATE)
        y.sum().backward()
        return saved, y.detach(), x.grad, w1.grad.clone(), w3.grad.clone()

    alone, *results = run(contextlib.nullcontext())
    shared, *results_shared = run(shared_weight_casts())
    one_copy = 256 * 8 + 4 * 256  # x^T in 128x1 tiles: 1 byte per element, one FP32 scale per 128 tokens x 1
    assert alone - shared == one_copy
    for a, b in zip(results, results_shared):
        assert torch.equal(a, b)
    with shared_weight_casts():
        x = x0.clone()
        first = fp8_linear(x, w1.detach(), EMULATE)
        x.mul_(2)  # in place: the memo must not hand back the old quantization
        assert torch.equal(fp8_linear(x, w1.detach(), EMULATE), fp8_linear(x0 * 2, w1.detach(), EMULATE))
        assert not torch.equal(first, fp8_linear(x, w1.detach(), EMULATE))


def count_calls(monkeypatch, module, **functions: str) -> dict[str, int]:
    """From now on, count the calls of each ``module.<function>``, under its label: {label: calls}."""
    calls = dict.fromkeys(functions, 0)
    for label, name in functions.items():
        def counted(*args, _label=label, _fn=getattr(module, name), **kwargs):
            calls[_label] += 1
            return _fn(*args, **kwargs)
        monkeypatch.setattr(module, name, counted)
    return calls


def test_micro_batches_of_a_step_share_one_quantization_of_each_weight(monkeypatch):
    """Inside a step (``shared_weight_casts``) every micro-batch's Fprop and Dgrad use one quantization of W
    and one transposed copy of its blocks, made at first use; outside, each call makes its own. Outputs and
    gradients are bit-identical; a weight changed in place (as the optimizer does between steps) is
    quantized again."""
    import fp8.linear as fl

    calls = count_calls(monkeypatch, fl, quantize="_quantize_weight", transpose="transpose_blocks")
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(160, 256))
    xs = [torch.randn(8, 256) for _ in range(3)]

    def run(context):
        weight.grad = None
        calls.update(quantize=0, transpose=0)
        outs, dxs = [], []
        with context:
            for x0 in xs:  # micro-batches: forward and backward each
                x = x0.clone().requires_grad_()
                y = fp8_linear(x, weight, EMULATE)
                y.square().sum().backward()
                outs.append(y.detach())
                dxs.append(x.grad)
        return dict(calls), outs, dxs, weight.grad.clone()

    alone, *plain = run(contextlib.nullcontext())
    shared, *step = run(shared_weight_casts())
    assert alone == {"quantize": 6, "transpose": 3} and shared == {"quantize": 1, "transpose": 1}
    for a, b in zip(plain, step):
        assert all(torch.equal(u, v) for u, v in zip(a, b)) if isinstance(a, list) else torch.equal(a, b)
    with shared_weight_casts():
        first = fp8_linear(xs[0], weight.detach(), EMULATE)
        with torch.no_grad():
            weight.mul_(2)
        assert torch.equal(fp8_linear(xs[0], weight.detach(), EMULATE), 2 * first)  # powers of two scale exactly


def test_fp8_linear_input_grad_dtype_and_no_weight_grad():
    x = torch.randn(4, 130, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(20, 130)  # frozen weight: only Dgrad runs
    y = fp8_linear(x, w, EMULATE)
    assert y.dtype == torch.bfloat16
    y.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and w.grad is None


# --------------------------------------------------------------------------------------------------
# Routed experts


def expert_inputs(counts: list[int], dim: int, inter: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    e = len(counts)
    x = torch.randn(sum(counts), dim, generator=g, dtype=torch.float64)
    w1 = torch.randn(e, inter, dim, generator=g, dtype=torch.float64) * dim**-0.5
    w2 = torch.randn(e, dim, inter, generator=g, dtype=torch.float64) * inter**-0.5
    w3 = torch.randn(e, inter, dim, generator=g, dtype=torch.float64) * dim**-0.5
    dout = torch.randn(sum(counts), dim, generator=g, dtype=torch.float64)
    return x, w1, w2, w3, dout


def gate_weights(counts: list[int], seed: int = 1) -> torch.Tensor:
    """Per-row gate weights as the router gives them (positive, around route_scale / K)."""
    return torch.rand(sum(counts), generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.25


def run_experts(fn, tensors, dout):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward(dout.to(out.dtype))
    return out, [t.grad for t in leaves]


@pytest.mark.parametrize("dim,inter", [(192, 160), (64, 32)])
def test_fp8_expert_ffn_matches_loop(dim, inter):
    """Against ``expert_ffn_loop`` in fp64: forward and the grads of x, w1, w2, w3 and the rows' gate
    weights (< 10%: two chained
    GEMMs forward, three in backward, each ~3.7%, see the module docstring); an expert with 0 rows gets
    exactly zero weight grads. Reference and emulate backends: their first GEMMs agree to fp32 rounding,
    but a GEMM output that is re-quantized (the SwiGLU output, dgate, dup) can land on the other side of
    an E4M3 rounding boundary now and then (one ULP, 2^-3 relative, on a few elements), so the chained
    results agree to < 1% rather than to 1e-5; a layout or scale bug would differ by O(1)."""
    counts = [50, 0, 130, 3]
    x, w1, w2, w3, dout = expert_inputs(counts, dim, inter)
    weights = gate_weights(counts)
    ref_out, ref_grads = run_experts(lambda x, a, b, c, w: expert_ffn_loop(x, counts, a, b, c, w),
                                     (x, w1, w2, w3, weights), dout)
    results = {}
    for backend in (EMULATE, REFERENCE):
        fn = functools.partial(fp8_expert_ffn, backend=backend)
        out, grads = run_experts(lambda x, a, b, c, w: fn(x, torch.tensor(counts), a, b, c, w),
                                 [t.float() for t in (x, w1, w2, w3, weights)], dout)
        assert out.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
        errors = [rel(out, ref_out)] + [rel(g, r) for g, r in zip(grads, ref_grads)]
        assert max(errors) < 0.10, errors
        for g in grads[1:4]:
            assert torch.equal(g[1], torch.zeros_like(g[1]))  # expert 1 has no rows
        results[backend.name] = (out, grads)
    print(f"\nexperts D={dim} I={inter}: relative error out, dx, dw1, dw2, dw3, dweights: "
          + ", ".join(f"{e:.4f}" for e in errors))
    (out_e, grads_e), (out_r, grads_r) = results["emulate"], results["reference"]
    for a, b in zip([out_e, *grads_e], [out_r, *grads_r]):
        assert rel(a, b) < 1e-2


def test_fp8_expert_ffn_no_rows_and_autocast():
    """No rows at all: empty output, zero (not missing) weight grads. Under CPU autocast bf16 (the
    dtype RoutedExperts casts its rows to) the output and dx are bf16, the weight grads fp32."""
    dim, inter, e = 64, 32, 3
    x, w1, w2, w3, _ = expert_inputs([0, 0, 0], dim, inter)
    leaves = [t.float().requires_grad_() for t in (x, w1, w2, w3)]
    out = fp8_expert_ffn(leaves[0], torch.zeros(e, dtype=torch.long), *leaves[1:], backend=EMULATE)
    assert out.shape == (0, dim)
    out.sum().backward()
    assert all(torch.equal(t.grad, torch.zeros_like(t)) for t in leaves[1:])

    counts = [7, 0, 9]
    x, w1, w2, w3, dout = expert_inputs(counts, dim, inter, seed=3)
    xb = x.to(torch.bfloat16).requires_grad_()
    ws = [t.float().requires_grad_() for t in (w1, w2, w3)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fp8_expert_ffn(xb, torch.tensor(counts), *ws, backend=EMULATE)
    assert out.dtype == torch.bfloat16
    out.backward(dout.to(torch.bfloat16))
    assert xb.grad.dtype == torch.bfloat16 and all(w.grad.dtype == torch.float32 for w in ws)
    reference = expert_ffn_loop(x, counts, w1, w2, w3, torch.ones(sum(counts), dtype=torch.float64))
    assert rel(out, reference) < 0.10
    with pytest.raises(ValueError, match="counts"):
        fp8_expert_ffn(xb, torch.tensor([7, 0, 8]), *ws, backend=EMULATE)


def test_micro_batches_of_a_step_share_one_quantization_of_the_expert_weights(monkeypatch):
    """Inside a step the routed experts' weights are quantized once (``StepExpertWeights``) for every
    micro-batch's Fprop; each Dgrad transposes those blocks (1 byte kept per parameter, not 2) instead of
    quantizing W^T from the master. Outside a step, or with ``cache_weights`` off (``fp8.expert_weight_cache``),
    every use quantizes. Outputs and all gradients are bit-identical either way; a weight changed in place is
    quantized again."""
    import fp8.experts as fe

    calls = count_calls(monkeypatch, fe, quantize="quantize_experts", transpose="transpose_expert_blocks")
    counts = [40, 0, 90]
    micro_batches = [expert_inputs(counts, 192, 160, seed=s) for s in range(3)]
    weights = [nn.Parameter(t.float()) for t in micro_batches[0][1:4]]

    def run(context):
        calls.update(quantize=0, transpose=0)
        for w in weights:
            w.grad = None
        outs, dxs = [], []
        with context:
            for x0, *_, dout in micro_batches:
                x = x0.float().requires_grad_()
                out = fp8_expert_ffn(x, torch.tensor(counts), *weights, gate_weights(counts).float(), backend=EMULATE,
                                     cache_weights=cache_weights)
                out.backward(dout.float())
                outs.append(out.detach())
                dxs.append(x.grad)
        return dict(calls), outs, dxs, [w.grad.clone() for w in weights]

    cache_weights = True
    alone, *plain = run(contextlib.nullcontext())
    shared, *step = run(shared_weight_casts())
    cache_weights = False  # fp8.expert_weight_cache=false: inside a step too, each use quantizes
    unshared, *uncached = run(shared_weight_casts())
    assert unshared == alone and all(torch.equal(u, v) for a, b in zip(plain, uncached) for u, v in zip(a, b))
    # per micro-batch two Dgrad operands: the gate/up stack's blocks transposed, and the down projection's
    assert alone == {"quantize": 18, "transpose": 6} and shared == {"quantize": 3, "transpose": 6}
    for a, b in zip(plain, step):
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    x0 = micro_batches[0][0].float()
    calls.update(quantize=0, transpose=0)
    with shared_weight_casts(), torch.no_grad():  # the same Parameter objects: the memo's keys
        first = fp8_expert_ffn(x0, counts, *weights, backend=EMULATE)
        weights[1].mul_(2)  # w2 (down): the output is linear in it
        again = fp8_expert_ffn(x0, counts, *weights, backend=EMULATE)
    assert calls["quantize"] == 4 and torch.equal(again, 2 * first)  # powers of two scale exactly


def test_fp8_training_path_reads_nothing_back_and_carries_nan():
    """Forward and backward of the FP8 linear (E4M3 and E5M6 caches) and the experts' SwiGLU read no value
    back to the host (no .item() or bool(): each would make a GPU step wait, issue 9); a NaN in the input
    comes out as NaN in the output and the gradients instead of raising, so the trainer's guard skips the
    step as it does without FP8."""
    torch.manual_seed(0)
    w = torch.randn(96, 200, requires_grad=True)
    counts = [5, 0, 11]
    x_e, w1, w2, w3, dout = expert_inputs(counts, 64, 32)
    ws = [t.float().requires_grad_() for t in (w1, w2, w3)]
    for bad in (False, True):
        x = torch.randn(6, 200)
        xs = x_e.float()
        if bad:
            x[3, 7] = xs[2, 1] = math.nan
        x.requires_grad_()
        with HostReads() as reads:
            y = sum(fp8_linear(x, w, EMULATE, cache) for cache in ("e4m3", "e5m6"))
            y.square().sum().backward()
            out = fp8_expert_ffn(xs, counts, *ws, backend=EMULATE)
            out.backward(dout.float())
        assert reads.count == 0
        grads = [x.grad, w.grad, *(t.grad for t in ws)]
        assert all(t.isnan().any() == bad for t in (y, out, *grads))
        for t in (x, w, *ws):
            t.grad = None


def test_expert_swiglu_output_not_cached():
    """Sec 3.3.3: what the expert FFN saves for backward is x (FP8, 128x1 per expert), the SwiGLU inputs
    gate and up (FP8), scales and the rows' FP32 gate weights: T (2 I + 4) + T_aligned D bytes + scales,
    no [T, I] or [T, D] tensor in a wider dtype. x's layout starts each expert on a 128-token tile, sized
    for the worst case (fp8/experts.py): 128 (ceil(T / 128) + E) rows, here 128 (1 + 2)."""
    counts = [100, 28]
    dim, inter = 128, 256
    x, w1, w2, w3, _ = expert_inputs(counts, dim, inter)
    leaves = [t.float().requires_grad_() for t in (x, w1, w2, w3, gate_weights(counts))]
    total = saved_bytes(lambda: fp8_expert_ffn(leaves[0], counts, *leaves[1:], backend=EMULATE), leaves[1:4])
    tokens, aligned = sum(counts), 384
    scales = 4 * (2 * tokens * (inter // BLOCK) + dim * aligned // BLOCK)  # gate/up 1x128; x 128x1
    assert total == tokens * (2 * inter + 4) + aligned * dim + scales


def test_linear_rejects_bad_shapes():
    with pytest.raises(ValueError, match="does not match"):
        fp8_linear(torch.randn(3, 10), torch.randn(4, 11), EMULATE)
    with pytest.raises(ValueError, match="cache"):
        fp8_linear(torch.randn(3, 10), torch.randn(4, 10), EMULATE, cache="bf16")


def test_gemm_reference_agrees_with_backend_on_linear_operands():
    """The Fprop operands fp8_linear builds are exactly what gemm_reference is tested on."""
    x, w = operands(33, 40, 260, seed=4)
    y = fp8_linear(x, w, REFERENCE)
    assert torch.equal(y, gemm_reference(quantize(x, 1), quantize_weight(w)))
    assert F.mse_loss(y, x @ w.T) > 0  # quantized, not the fp32 product
