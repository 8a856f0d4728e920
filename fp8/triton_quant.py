"""Fused E4M3 quantization in Triton: one kernel per tensor instead of about ten PyTorch operations (report
sec 3.3.2; DeepSeek's own ``act_quant`` kernel is the model).

Each program loads a tile, takes its max-abs, computes the scale, divides, clamps and stores the FP8
payload and the scale: the numbers of ``fp8.quant.quantize`` (tested equal bit for bit), in one read and
one write of the tensor. The layouts:

* 1x128 tiles of x [R, K] (activations, gradients): ``quantize_rows``;
* 128x128 blocks of W [N, K] (weights): ``quantize_blocks``;
* 128x1 tiles of x [T, K], written as the 1x128 tiles of x^T [K, T] (the Wgrad operands):
  ``quantize_columns``; the transposition happens inside the kernel (no FP32 copy of x^T);
* both of x's layouts at once (``quantize_rows_and_columns``): the linear's input and its output gradient
  are each read by a GEMM in 1x128 tiles and by Wgrad in 128x1 tiles, so one read of x serves both;
  with a row index, the 128x1 tiles are those of a matrix built from x's rows and zero rows (the routed
  experts' 128-aligned token layout, fp8/experts.py), which is never written.

Only E4M3, from fp32/bf16/fp16, without the NaN check (the training path's ``check_finite=False``); E5M6
and fp64 stay in ``fp8.quant``. ``fp8.quant.quantize`` calls these kernels itself for CUDA tensors on
that path. Divisions are ``div_rn`` (IEEE, as torch's; Triton's ``/`` on fp32 is approximate).
Power-of-two scales: the fp32 quotient ``amax / 448`` is rounded up to a power of two; for an fp32 amax
that quotient cannot sit within rounding of a power of two without being one (448 = 7 x 64; tested next
to every power of two), so this equals ``fp8.quant``'s fp64 rule. NaN: the tile's max ignores it (the
GPU's ``max``), the element itself stays NaN through the clamp and the cast, so it still reaches the GEMM
output and the loss.

CPU: with ``TRITON_INTERPRET=1`` set before ``triton`` is imported (the kernel uses ``tl.max``, a Triton
library function bound to the mode of that import), the kernel runs in Triton's interpreter on CPU
tensors; it then stores fp32 and torch casts to E4M3 (the interpreter's cast rounds differently).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

try:
    import triton.language as tl
except ImportError as exc:  # pragma: no cover - exercised only without triton
    raise ImportError("fp8.triton_quant needs Triton: pip install -e '.[gpu]' (or: pip install triton)",
                      name="triton") from exc

from fp8.quant import BLOCK, E4M3_MAX, MIN_SCALE, Quantized
from fp8.triton_gemm import jitted

INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ROWS_PER_PROGRAM = 32  # 1x128 tiles: 32 rows x 128 columns per program


def _quantize_kernel(
    x_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, index_ptr, rows, cols,
    stride_xr, stride_xc, stride_qr, stride_qc, stride_sr, stride_sc,
    stride_qtr, stride_qtc, stride_str, stride_stc,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, PER_ROW: tl.constexpr, COLUMNS_TOO: tl.constexpr,
    ROW_INDEX: tl.constexpr, POW2: tl.constexpr, FORMAT_MAX: tl.constexpr, SMALLEST_SCALE: tl.constexpr,
):
    """Tiles of ``BLOCK_R x BLOCK_C`` of the matrix seen through (stride_xr, stride_xc), reduced along
    its columns: one scale per row of the tile (PER_ROW, 1x128 tiles) or one per tile (128x128 blocks).
    Payload q [rows, cols] and scales s [row tiles or rows, col tiles] are written through their strides.
    COLUMNS_TOO (PER_ROW with 128-row tiles): the same tile also reduced along its rows, the 128x1 tiles,
    written as x^T's 1x128 tiles to qt [cols, rows] and st [cols, row tiles]: both layouts from one read.
    ROW_INDEX (with COLUMNS_TOO): the matrix's row i is x's row index[i], or zeros where that is -1, and
    the 1x128 tiles are written at x's rows (the experts' 128-aligned token layout, built on the fly)."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    in_rows = offs_r < rows
    mask_c = offs_c < cols
    if ROW_INDEX:  # the row of x (and of q) behind each row of the matrix; -1: a zero row
        x_rows = tl.load(index_ptr + offs_r, mask=in_rows, other=-1).to(tl.int64)
        present = in_rows & (x_rows >= 0)
    else:
        x_rows = offs_r.to(tl.int64)
        present = in_rows
    mask = present[:, None] & mask_c[None, :]
    x_ptrs = x_ptr + x_rows[:, None] * stride_xr + offs_c.to(tl.int64)[None, :] * stride_xc
    x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    if PER_ROW:
        amax = tl.max(tl.abs(x), axis=1)  # [BLOCK_R]
        if COLUMNS_TOO:  # and each column's: [BLOCK_R, 2], one scale rule for both
            amax = tl.join(amax, tl.max(tl.abs(x), axis=0))
    else:
        amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)  # one 128x128 block
    scale = tl.maximum(tl.math.div_rn(amax, FORMAT_MAX), SMALLEST_SCALE)  # IEEE division, as torch's (`/` is not)
    if POW2:  # up to a power of two: a normal fp32 with mantissa bits set moves to the next exponent
        bits = scale.to(tl.int32, bitcast=True)
        bits = (bits & 0x7F800000) + tl.where((bits & 0x7FFFFF) != 0, 0x800000, 0)
        scale = tl.where(scale == scale, bits.to(tl.float32, bitcast=True), scale)  # NaN stays NaN
    scale = tl.where(amax == 0, 1.0, scale)
    if COLUMNS_TOO:  # every row of the matrix, zero rows included
        scale, col_scale = tl.split(scale)
        yt = tl.math.div_rn(x, col_scale[None, :])
        yt = tl.clamp(yt, -FORMAT_MAX, FORMAT_MAX, propagate_nan=tl.PropagateNan.ALL)
        tl.store(st_ptr + offs_c * stride_str + pid_r * stride_stc, col_scale, mask=mask_c)
        qt_ptrs = qt_ptr + offs_c.to(tl.int64)[None, :] * stride_qtr + offs_r.to(tl.int64)[:, None] * stride_qtc
        tl.store(qt_ptrs, yt.to(qt_ptr.dtype.element_ty), mask=in_rows[:, None] & mask_c[None, :])
    if PER_ROW:
        y = tl.math.div_rn(x, scale[:, None])
        tl.store(s_ptr + x_rows * stride_sr + pid_c * stride_sc, scale, mask=present)
    else:
        y = tl.math.div_rn(x, scale)
        tl.store(s_ptr + pid_r * stride_sr + pid_c * stride_sc, scale)
    y = tl.clamp(y, -FORMAT_MAX, FORMAT_MAX, propagate_nan=tl.PropagateNan.ALL)  # a NaN stays NaN
    q_ptrs = q_ptr + x_rows[:, None] * stride_qr + offs_c.to(tl.int64)[None, :] * stride_qc
    tl.store(q_ptrs, y.to(q_ptr.dtype.element_ty), mask=mask)


def supports(x: Tensor) -> bool:
    """Whether the kernel takes this input: a 2-D fp32/bf16/fp16 tensor (the caller, ``fp8.quant``, has
    already chosen E4M3 on a GPU)."""
    return x.dtype in INPUT_DTYPES and x.dim() == 2


@dataclass
class Plan:
    """One launch: the output buffers, the grid, the kernel's arguments, constexprs and options."""

    payload: Tensor
    scale: Tensor
    payload_t: Tensor  # x^T's payload and scales with ``columns_too``, else the same tensors as above
    scale_t: Tensor
    grid: tuple[int, int]
    args: tuple
    constexprs: dict
    options: dict


def plan(view: Tensor, rows: int, cols: int, per_row: bool, pow2: bool, block_r: int,
         payload_dtype: torch.dtype = torch.float8_e4m3fn, columns_too: bool = False,
         row_index: Tensor | None = None) -> Plan:
    """The launch that quantizes the matrix ``view`` [rows, cols] (any strides) in tiles of (1 or 128) x 128
    along cols; ``columns_too`` (1x128 tiles, ``block_r`` 128) also in 128x1 tiles, written transposed;
    ``row_index`` [rows] (with ``columns_too``): the matrix is built from view's rows (-1: a zero row), and
    the 1x128 tiles come out at view's rows (``view.shape[0]`` of them)."""
    out_rows = rows if row_index is None else view.shape[0]
    payload = torch.empty(out_rows, cols, device=view.device, dtype=payload_dtype)
    row_tiles, col_tiles = -(-rows // block_r), -(-cols // BLOCK)
    scale = torch.empty(out_rows if per_row else row_tiles, col_tiles, device=view.device, dtype=torch.float32)
    if columns_too:
        if not per_row or block_r != BLOCK:
            raise ValueError("columns_too needs 1x128 tiles in programs of 128 rows")
        payload_t = torch.empty(cols, rows, device=view.device, dtype=payload_dtype)
        scale_t = torch.empty(cols, row_tiles, device=view.device, dtype=torch.float32)
    else:  # not written: the kernel's COLUMNS_TOO branch is compiled out
        payload_t, scale_t = payload, scale
    if row_index is not None and (not columns_too or row_index.shape != (rows,)):
        raise ValueError(f"row_index needs columns_too and one entry per row ({rows}), got {tuple(row_index.shape)}")
    args = (view, payload, scale, payload_t, scale_t, row_index if row_index is not None else scale, rows, cols,
            view.stride(0), view.stride(1), payload.stride(0), payload.stride(1), scale.stride(0), scale.stride(1),
            payload_t.stride(0), payload_t.stride(1), scale_t.stride(0), scale_t.stride(1))
    constexprs = dict(BLOCK_R=block_r, BLOCK_C=BLOCK, PER_ROW=per_row, COLUMNS_TOO=columns_too,
                      ROW_INDEX=row_index is not None, POW2=pow2, FORMAT_MAX=E4M3_MAX, SMALLEST_SCALE=MIN_SCALE)
    # a 128x128 tile reduced both ways: 16 warps hold it in 103 registers a thread (8: 192, 4: spills), sm_90
    warps = 16 if columns_too else 4 if per_row else 8
    return Plan(payload, scale, payload_t, scale_t, (row_tiles, col_tiles), args, constexprs,
                dict(num_warps=warps))


def _launch(view: Tensor, rows: int, cols: int, per_row: bool, pow2: bool, block_r: int,
            columns_too: bool = False, row_index: Tensor | None = None) -> tuple[Quantized, Quantized | None]:
    interpreted = view.device.type == "cpu"  # the interpreter: store fp32, let torch round to E4M3
    p = plan(view, rows, cols, per_row, pow2, block_r, torch.float32 if interpreted else torch.float8_e4m3fn,
             columns_too, row_index)
    if rows and cols:
        jitted(_quantize_kernel)[p.grid](*p.args, **p.constexprs, **p.options)

    def result(payload: Tensor, scale: Tensor, group_rows: int) -> Quantized:
        return Quantized(payload.to(torch.float8_e4m3fn) if interpreted else payload, scale, group_rows, "e4m3", pow2)

    transposed = result(p.payload_t, p.scale_t, 1) if columns_too else None
    return result(p.payload, p.scale, 1 if per_row else BLOCK), transposed


def quantize_rows(x: Tensor, pow2: bool = False) -> Quantized:
    """x [R, K] in 1x128 tiles: ``fp8.quant.quantize(x, 1, "e4m3", pow2, check_finite=False)``."""
    return _launch(x, x.shape[0], x.shape[1], True, pow2, ROWS_PER_PROGRAM)[0]


def quantize_blocks(w: Tensor, pow2: bool = False) -> Quantized:
    """w [N, K] in 128x128 blocks: ``fp8.quant.quantize(w, 128, "e4m3", pow2, check_finite=False)``."""
    return _launch(w, w.shape[0], w.shape[1], False, pow2, BLOCK)[0]


def quantize_columns(x: Tensor, pow2: bool = False) -> Quantized:
    """x [T, K] in 128x1 tiles, as the Quantized of x^T [K, T] in 1x128 tiles:
    ``fp8.quant.quantize_act_transposed(x, "e4m3", pow2, check_finite=False)``."""
    return _launch(x.t(), x.shape[1], x.shape[0], True, pow2, ROWS_PER_PROGRAM)[0]


def quantize_rows_and_columns(x: Tensor, pow2: bool = False, row_index: Tensor | None = None
                              ) -> tuple[Quantized, Quantized]:
    """x [T, K] in 1x128 tiles and in 128x1 tiles (as x^T [K, T] in 1x128 tiles) from one read of x:
    ``(quantize_rows(x), quantize_columns(x))``, the Fprop/Dgrad and the Wgrad operand of one tensor.
    ``row_index`` [R] (int64, -1 for a zero row): the 128x1 tiles are those of the [R, K] matrix whose row
    i is ``x[row_index[i]]`` (written as its transpose [K, R]); the 1x128 tiles stay x's (each row of x
    must appear in row_index exactly once: a row that does not is not written)."""
    rows = x.shape[0] if row_index is None else row_index.shape[0]
    return _launch(x, rows, x.shape[1], True, pow2, BLOCK, columns_too=True, row_index=row_index)
