"""FP8 GEMM backends behind one interface (report sec 3.3.1-3.3.2).

Every GEMM of the FP8 framework is ``A @ B.T`` with both operands quantized in tiles of 128 along the
reduction dim K (``fp8.quant.Quantized``): a [M, K] in 1x128 tiles (activations, gradients) and b [N, K]
in 128x128 blocks (weights) or 1x128 tiles (the token-tiled operands of Wgrad). A backend turns such a
pair into an fp32 [M, N] product; ``fp8/linear.py`` decides what is quantized how.

Backends (``get_backend(name, device)``):

* ``reference``: ``fp8.gemm.gemm_reference``: exact products, per-128-group promotion into fp32 (the
  numbers a fused kernel must reproduce). Slow: for tests.
* ``emulate``: dequantize both operands to fp32 and ``torch.matmul``. Same products and scales as the
  reference, only the fp32 rounding and summation order differ (see ``EmulateBackend``). Runs anywhere
  torch does; fast enough to train small models on CPU.
* ``triton``: ``fp8.triton_gemm.TritonBackend`` (fused CUDA kernel; needs the ``gpu`` extra).
* ``torch``: ``torch._scaled_mm`` (cuBLAS) with blockwise 1x128 / 128x128 fp32 scales where the installed
  torch supports it on the device, for the dense GEMMs; probed once at construction against ``emulate``.
  CPU builds reject blockwise scales. The experts' grouped GEMMs go through Triton where it imports.
* ``te``: TransformerEngine. Its FP8 is a module-level recipe (``te.Linear`` under ``fp8_autocast``
  with a block-scaling recipe) that owns quantization and activation caching; it is not a GEMM and is
  not wired into ``fp8_linear`` (out of scope): asking for it says so (``BackendUnavailable``).
* ``auto``: ``triton`` on CUDA when it imports, else ``emulate``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from fp8.gemm import (check_counts, expert_offsets, expert_width, gemm_reference, grouped_gemm_reference, host_counts,
                      k_grouped_gemm_reference, k_grouped_loop)
from fp8.quant import BLOCK, Quantized, dequantize_2d

BACKEND_NAMES = ("auto", "emulate", "reference", "triton", "torch", "te")


class BackendUnavailable(RuntimeError):
    """The fp8 backend asked for cannot run here; the message is one line: what is missing, what to use."""
GPU_EXTRA_HINT = "install the GPU extra on a CUDA machine (pip install -e '.[gpu]'), or use backend 'emulate'"


@runtime_checkable
class GemmBackend(Protocol):
    """fp32 GEMMs on operands quantized in tiles of 128 along K.

    ``gemm(a, b, out_dtype)``: a [M, K], b [N, K] (group_rows 1 or 128 each) -> ``A @ B.T`` [M, N], accumulated
    in fp32 and returned in ``out_dtype`` (fp32 by default; bf16 rounds the fp32 result to nearest even, as
    ``.to(torch.bfloat16)`` would, without the fp32 tensor).
    ``grouped_gemm(a, b, counts, out_dtype)``: rows of a [T, K] sorted by expert, ``counts[e]`` rows for expert e;
    b the stacked expert weights [E * N, K] in 128x128 blocks, N a multiple of 128 (``fp8.linear.
    quantize_experts`` pads each expert with zero rows) -> [T, N] in ``out_dtype``, expert e's rows times ``W_e.T``.
    ``counts`` may be a tensor (the router's, on the device): a backend that needs them on the host reads
    them; the Triton one builds its tile table on the device (no host sync).
    ``k_grouped_gemm(a, b, offsets)``: the experts' Wgrad in one call (K-grouped, K = tokens): a [M, Kp],
    b [N, Kp] in 1x128 tiles along K, expert e's tokens in columns ``offsets[e]:offsets[e + 1]`` (multiples
    of 128, so no tile straddles two experts) -> fp32 [E, M, N] (zeros for an expert without tokens).
    Operands are E4M3, except the cached attention-output activation (E5M6, power-of-two scales) that
    enters the Wgrad of MLA's ``wo`` (sec 3.3.3); a backend without an E5M6 path dequantizes it.
    """

    name: str

    def gemm(self, a: Quantized, b: Quantized, out_dtype: torch.dtype = torch.float32) -> Tensor: ...

    def grouped_gemm(self, a: Quantized, b: Quantized, counts: list[int] | Tensor,
                     out_dtype: torch.dtype = torch.float32) -> Tensor: ...

    def k_grouped_gemm(self, a: Quantized, b: Quantized, offsets: list[int] | Tensor) -> Tensor: ...


def _check_pair(a: Quantized, b: Quantized) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"gemm K mismatch: a is {tuple(a.shape)}, b is {tuple(b.shape)} (computes a @ b.T)")


def _check_counts(a: Quantized, b: Quantized, counts: list[int]) -> int:
    """Validate a grouped GEMM and return N (rows per expert of the stacked b)."""
    check_counts(counts, a.shape[0])
    return expert_width(b, len(counts))


def _expert_loop(gemm, a: Quantized, b: Quantized, counts: list[int] | Tensor,
                 out_dtype: torch.dtype = torch.float32) -> Tensor:
    """Grouped GEMM as one ``gemm`` per expert with rows (1x128 activation tiles: any cut is allowed)."""
    counts = host_counts(counts)
    n = _check_counts(a, b, counts)
    if a.group_rows != 1:
        raise ValueError("grouped gemm expects 1x128 activation tiles (group_rows 1)")
    outputs, start = [], 0
    for expert, count in enumerate(counts):
        if count:
            outputs.append(gemm(a.row_slice(start, start + count), b.row_slice(expert * n, (expert + 1) * n),
                                out_dtype))
        start += count
    return torch.cat(outputs) if outputs else torch.zeros(0, n, device=a.data.device, dtype=out_dtype)


@dataclass
class ReferenceBackend:
    """``gemm_reference``: exact FP8 products, fp32 accumulator, promotion every 128 (sec 3.3.2)."""

    name: str = "reference"

    def gemm(self, a: Quantized, b: Quantized, out_dtype: torch.dtype = torch.float32) -> Tensor:
        return gemm_reference(a, b).to(out_dtype)

    def grouped_gemm(self, a: Quantized, b: Quantized, counts: list[int] | Tensor,
                     out_dtype: torch.dtype = torch.float32) -> Tensor:
        return grouped_gemm_reference(a, b, host_counts(counts)).to(out_dtype)

    def k_grouped_gemm(self, a: Quantized, b: Quantized, offsets: list[int] | Tensor) -> Tensor:
        return k_grouped_gemm_reference(a, b, offsets)


@dataclass
class EmulateBackend:
    """Dequantize both operands to fp32, then ``torch.matmul``.

    Versus ``ReferenceBackend``: the same decoded payloads and the same per-tile scales, so the same
    real-valued product; the differences are fp32 roundings only. Each dequantized element and each
    product is rounded once (2 x 2^-24 relative) and the K-sum is done in the matmul's own order
    (at most (K-1) 2^-24 of sum |a_k b_k|, whatever the order); the reference adds at most
    (4 + 3G) 2^-24 of the same for G groups. Hence |emulate - reference| <= (K + 3G + 6) 2^-24
    sum_k |a_k b_k| (tested), typically ~sqrt(K) 2^-24: far below FP8's own ~2^-4.
    """

    name: str = "emulate"

    def gemm(self, a: Quantized, b: Quantized, out_dtype: torch.dtype = torch.float32) -> Tensor:
        _check_pair(a, b)
        return (dequantize_2d(a) @ dequantize_2d(b).t()).to(out_dtype)

    def grouped_gemm(self, a: Quantized, b: Quantized, counts: list[int] | Tensor,
                     out_dtype: torch.dtype = torch.float32) -> Tensor:
        counts = host_counts(counts)
        _check_pair(a, b)
        n = _check_counts(a, b, counts)
        x, w = dequantize_2d(a), dequantize_2d(b).view(len(counts), n, -1)
        outputs = [rows @ w[e].t() for e, rows in enumerate(x.split(counts)) if rows.shape[0]]
        return (torch.cat(outputs) if outputs else x.new_zeros(0, n)).to(out_dtype)

    def k_grouped_gemm(self, a: Quantized, b: Quantized, offsets: list[int] | Tensor) -> Tensor:
        # Dequantize once (the columns up to the last offset); a column slice of the dequantized operand is
        # the dequantized column slice.
        _check_pair(a, b)
        offsets = expert_offsets(offsets, a.shape[1])
        x, y = dequantize_2d(a.col_slice(0, offsets[-1])), dequantize_2d(b.col_slice(0, offsets[-1]))
        out = x.new_zeros(len(offsets) - 1, x.shape[0], y.shape[0])
        for e, (start, stop) in enumerate(zip(offsets, offsets[1:])):
            if stop > start:
                torch.matmul(x[:, start:stop], y[:, start:stop].t(), out=out[e])
        return out


# --------------------------------------------------------------------------------------------------
# torch._scaled_mm with blockwise scales


def _pad_rows(q: Quantized, rows: int) -> tuple[Tensor, Tensor]:
    """Payload and scale of q with zero rows appended up to ``rows`` (padding scale 1)."""
    data, scale = q.data, q.scale
    extra = rows - data.shape[0]
    if extra:
        data = torch.cat([data, torch.zeros(extra, data.shape[1], dtype=data.dtype, device=data.device)])
        extra_tiles = -(-rows // q.group_rows) - scale.shape[0]
        if extra_tiles:
            scale = torch.cat([scale, torch.ones(extra_tiles, scale.shape[1], dtype=scale.dtype, device=scale.device)])
    return data, scale


def _pad_cols(data: Tensor, cols: int, value: float = 0.0) -> Tensor:
    extra = cols - data.shape[1]
    if not extra:
        return data
    return torch.cat([data, torch.full((data.shape[0], extra), value, dtype=data.dtype, device=data.device)], dim=1)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def scaled_mm_operands(a: Quantized, b: Quantized) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The four tensors ``torch._scaled_mm(da, db_t, scale_a=sa, scale_b=sb)`` takes for ``A @ B.T`` with
    blockwise fp32 scales (E4M3 operands; a 1x128, b 1x128 or 128x128).

    ATen's layout checks (ScaledBlas.cpp): a row-major [M, K] with 1x128 scales [M, K/128] outer-dim-major
    (stride (1, M)); b passed as [K, N] column-major whose transpose [N, K] carries b's scales the same
    way, so ``scale_b`` is b's scales transposed. cuBLAS reads 128x128 scales with a leading dimension of
    round_up(K/128, 4) (NVIDIA's cuBLAS docs, "128x128 2D block scaling"), which ATen's stride check (==
    K/128) cannot express: K is padded to a multiple of 512 when b is 128x128-scaled, so that K/128 is a
    multiple of 4 and both agree. M and N are padded to multiples of 16 and K to a multiple of 128 with
    zero payloads (padding tiles get scale 1; partial tiles keep their scales; exact).
    """
    _check_pair(a, b)
    m, n, k = a.shape[0], b.shape[0], a.shape[1]
    k_multiple = 4 * BLOCK if BLOCK in (a.group_rows, b.group_rows) else BLOCK
    mp, np_, kp = _round_up(max(m, 1), 16), _round_up(max(n, 1), 16), _round_up(max(k, 1), k_multiple)
    da, sa = _pad_rows(a, mp)
    db, sb = _pad_rows(b, np_)
    da, db = _pad_cols(da, kp), _pad_cols(db, kp)
    sa, sb = _pad_cols(sa, kp // BLOCK, 1.0), _pad_cols(sb, kp // BLOCK, 1.0)
    sa = sa.contiguous() if a.group_rows == BLOCK else sa.t().contiguous().t()
    sb = sb.t() if b.group_rows == BLOCK else sb.t().contiguous()
    return da, db.t(), sa, sb


def scaled_mm_blockwise(a: Quantized, b: Quantized, out_dtype: torch.dtype = torch.float32) -> Tensor:
    """``A @ B.T`` in ``out_dtype`` through ``torch._scaled_mm`` with blockwise fp32 scales (layouts:
    ``scaled_mm_operands``)."""
    da, db_t, sa, sb = scaled_mm_operands(a, b)
    out = torch._scaled_mm(da, db_t, scale_a=sa, scale_b=sb, out_dtype=out_dtype)
    return out[:a.shape[0], :b.shape[0]]


@dataclass
class TorchScaledMMBackend:
    """``torch._scaled_mm`` with blockwise scales (probe with ``probe_scaled_mm`` before use).

    E5M6 operands (wo's Wgrad) have no ``_scaled_mm`` path: those GEMMs fall back to ``EmulateBackend``.
    torch has no grouped GEMM with blockwise scales: the experts' grouped GEMMs go to ``grouped`` (the
    Triton backend where it imports, ``get_backend``), else loop over experts.
    """

    name: str = "torch"
    grouped: GemmBackend | None = None

    def gemm(self, a: Quantized, b: Quantized, out_dtype: torch.dtype = torch.float32) -> Tensor:
        if a.fmt != "e4m3" or b.fmt != "e4m3":
            return EmulateBackend().gemm(a, b, out_dtype)
        return scaled_mm_blockwise(a, b, out_dtype)

    def grouped_gemm(self, a: Quantized, b: Quantized, counts: list[int] | Tensor,
                     out_dtype: torch.dtype = torch.float32) -> Tensor:
        if self.grouped is not None:
            return self.grouped.grouped_gemm(a, b, counts, out_dtype)
        return _expert_loop(self.gemm, a, b, counts, out_dtype)

    def k_grouped_gemm(self, a: Quantized, b: Quantized, offsets: list[int] | Tensor) -> Tensor:
        if self.grouped is not None:
            return self.grouped.k_grouped_gemm(a, b, offsets)
        return k_grouped_loop(self.gemm, a, b, offsets)


def probe_scaled_mm(device: torch.device) -> None:
    """Run the two scale layouts fp8_linear needs (1x128 x 128x128, 1x128 x 1x128) on ``device`` and
    compare with ``EmulateBackend``; BackendUnavailable with the reason if either is rejected or wrong."""
    from fp8.quant import quantize

    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 256, generator=g) * torch.exp2(torch.randint(-3, 4, (48, 1), generator=g).float())
    w = torch.randn(136, 256, generator=g)
    emulate = EmulateBackend()
    for rows_b in (BLOCK, 1):
        a, b = quantize(x.to(device), 1), quantize(w.to(device), rows_b)
        layout = f"1x128 x {'128x128' if rows_b == BLOCK else '1x128'}"
        try:
            out = scaled_mm_blockwise(a, b)
        except Exception as exc:  # torch raises RuntimeError/ValueError/NotImplementedError by build
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BackendUnavailable(f"fp8 backend 'torch': torch._scaled_mm (torch {torch.__version__}) on "
                               f"{device.type} rejects blockwise {layout} scales ({reason}); use backend "
                               "'emulate' or 'triton'") from None
        expected = emulate.gemm(a, b)
        magnitude = dequantize_2d(a).abs() @ dequantize_2d(b).abs().t()
        if not bool(((out.float() - expected).abs() <= 1e-3 * magnitude + 1e-30).all()):
            raise BackendUnavailable(f"fp8 backend 'torch': torch._scaled_mm (torch {torch.__version__}) on "
                               f"{device.type} gave wrong results for blockwise {layout} scales (scale layout "
                               "not as expected); use backend 'emulate' or 'triton'")


# --------------------------------------------------------------------------------------------------
# TransformerEngine (not a GEMM backend)

TE_MESSAGE = ("fp8 backend 'te': TransformerEngine's FP8 is a module-level recipe (te.Linear / te.GroupedLinear "
              "under te.fp8_autocast with a block-scaling recipe) that owns quantization and activation "
              "caching; it is not a GEMM and is not integrated with fp8_linear / convert_to_fp8; use backend "
              "'triton' (or 'auto')")


# --------------------------------------------------------------------------------------------------
# Selection


def _import_triton_backend() -> type:
    """``fp8.triton_gemm.TritonBackend``; BackendUnavailable naming what is missing and how to install."""
    try:
        module = importlib.import_module("fp8.triton_gemm")
    except ImportError as exc:
        missing = getattr(exc, "name", None) or str(exc)
        raise BackendUnavailable(f"fp8 backend 'triton' is not available: cannot import fp8.triton_gemm "
                           f"(missing {missing}); {GPU_EXTRA_HINT}") from None
    backend_cls = getattr(module, "TritonBackend", None)
    if backend_cls is None:
        raise BackendUnavailable("fp8 backend 'triton' is not available: fp8.triton_gemm has no TritonBackend")
    return backend_cls


def get_backend(name: str, device: torch.device | str | None = None) -> GemmBackend:
    """The GEMM backend called ``name`` for tensors on ``device`` (default cpu).

    Raises ValueError for an unknown name and ``BackendUnavailable`` (a RuntimeError; one line: what is
    missing, what to use instead) for a backend that cannot run here.
    """
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown fp8 backend {name!r}; expected one of {', '.join(BACKEND_NAMES)}")
    device = torch.device(device if device is not None else "cpu")
    if name == "auto":
        if device.type == "cuda":
            try:
                return _import_triton_backend()()
            except RuntimeError:
                pass
        return EmulateBackend()
    if name == "emulate":
        return EmulateBackend()
    if name == "reference":
        if device.type != "cpu":
            raise BackendUnavailable(f"fp8 backend 'reference' runs on cpu only (got {device.type}); use 'emulate'")
        return ReferenceBackend()
    if name == "triton":
        backend = _import_triton_backend()()
        from fp8.triton_gemm import runs_on

        if not runs_on(device):
            raise BackendUnavailable(f"fp8 backend 'triton' runs on CUDA (or under TRITON_INTERPRET=1, slowly), "
                                     f"not on {device.type}; use backend 'auto' or 'emulate'")
        return backend
    if name == "torch":
        probe_scaled_mm(device)
        grouped = None
        if device.type == "cuda":
            try:
                grouped = _import_triton_backend()()
            except RuntimeError:
                pass
        return TorchScaledMMBackend(grouped=grouped)
    # name == "te"
    try:
        importlib.import_module("transformer_engine.pytorch")
    except Exception as exc:  # ImportError, or TE's own errors when CUDA is missing
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BackendUnavailable(f"fp8 backend 'te' is not available: transformer_engine.pytorch does not import "
                                 f"({reason}); {GPU_EXTRA_HINT}") from None
    raise BackendUnavailable(TE_MESSAGE)
