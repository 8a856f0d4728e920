"""Fine-grained FP8 quantization (report sec 3.3.2) and the E5M6 cache format (sec 3.3.3).

Every tensor is quantized in tiles of ``group_rows x 128`` along its last dim (the GEMM's reduction
dim): 1x128 tiles for activations (per token, per 128 channels), 128x128 blocks for weights. Scales are
computed online from each tile's max-abs (no delayed scaling): ``scale = amax / FORMAT_MAX``, optionally
rounded up to a power of two (ue8m0-style, sec 3.3.3). The real value of an element is
``decode(payload) * scale`` of its tile.

Formats:

* ``"e4m3"``: ``torch.float8_e4m3fn`` payload (max 448, 3 mantissa bits, no inf). Casting saturates on CPU
  but not necessarily on CUDA, so we clamp to +-448 explicitly before every cast.
* ``"e5m6"``: the report's custom format, 1 sign + 5 exponent + 6 mantissa bits, bias 15. Its layout is
  the top 12 bits of an IEEE fp16: exponent field 1..30 normal, 0 subnormal (step 2^-20), 31 reserved for
  inf (mantissa 0) / NaN (mantissa != 0). Finite max ``(2 - 2^-6) * 2^15 = 65024``. The encoder
  saturates finite overflow *and* +-inf to +-65024 (as the CPU e4m3fn cast does) and maps NaN to a NaN
  code, so ``quantize`` never produces a reserved code (it rejects non-finite input). The 12-bit code
  sits in the low bits of an ``int16`` container (sign at bit 11); codes are in ``[0, 4095]``.

FP8 arithmetic is not implemented on CPU: everything is computed in fp32 (fp64 where exactness needs
it) and only the payload is stored in the narrow format.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

BLOCK = 128  # N_C of sec 3.3.2: tile width along the reduction dim
E4M3_MAX = 448.0
E5M6_MAX = (2.0 - 2.0**-6) * 2.0**15  # 65024.0
FORMAT_MAX = {"e4m3": E4M3_MAX, "e5m6": E5M6_MAX}
FORMAT_BITS = {"e4m3": 8, "e5m6": 12}
# Scales are floored at the smallest normal fp32 so that a tiny-but-nonzero tile never gets a subnormal
# (or zero) scale; such a tile then uses less of the format's range but stays finite and correct.
MIN_SCALE = 2.0**-126

E5M6_MAX_CODE = 0x7BF  # exponent field 30, mantissa 63
E5M6_NAN_CODE = 0x7E0  # exponent field 31, mantissa MSB set (never produced by quantize)


# --------------------------------------------------------------------------------------------------
# E5M6 bit-level encode / decode


def _shift_right_rne(v: Tensor, shift: Tensor) -> Tensor:
    """``v / 2^shift`` rounded to nearest, ties to even (int64, v >= 0, 1 <= shift <= 62)."""
    one = torch.ones_like(v)
    q = v >> shift
    rem = v & ((one << shift) - 1)
    half = one << (shift - 1)
    round_up = (rem > half) | ((rem == half) & ((q & 1) == 1))
    return q + round_up.to(v.dtype)


def e5m6_encode(x: Tensor) -> Tensor:
    """fp32 -> E5M6 code (int16, low 12 bits), round-to-nearest-even, saturating at +-65024.

    Works on the fp32 bit pattern: the exponent is rebiased from 127 to 15 and the 23-bit mantissa is
    shifted right by 17 (normal results) or by more (subnormal results, step 2^-20) with one RNE
    rounding; a mantissa carry rolls into the exponent by construction. +-inf saturates like finite
    overflow, NaN maps to the NaN code, -0.0 keeps its sign (code 0x800). Other float dtypes are first
    cast to fp32.
    """
    bits = x.to(torch.float32).contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    sign = (bits >> 31) & 1
    mag = bits & 0x7FFFFFFF
    is_nan = mag > 0x7F800000
    exp = (mag >> 23) - 127  # unbiased fp32 exponent (-127 for fp32 zeros/subnormals: they round to 0)
    normal = exp >= -14
    # Normal result: rebias the exponent field in place, then drop 17 mantissa bits.
    # Subnormal result: the significand (with its implicit 1) in units of 2^-20 is sig * 2^(exp - 3).
    value = torch.where(normal, mag - ((127 - 15) << 23), (mag & 0x7FFFFF) | (1 << 23))
    shift = torch.where(normal, torch.full_like(exp, 17), (3 - exp).clamp(max=40))
    code = _shift_right_rne(value, shift).clamp(max=E5M6_MAX_CODE)
    code = torch.where(is_nan, torch.full_like(code, E5M6_NAN_CODE), code)
    return (code | (sign << 11)).to(torch.int16)


def e5m6_decode(bits: Tensor) -> Tensor:
    """E5M6 code (int16, low 12 bits) -> fp32, exact.

    An E5M6 code shifted left by 4 is the fp16 bit pattern of the same value (same bias, same subnormal
    rule, same inf/NaN codes), and fp16 -> fp32 is exact.
    """
    half_bits = (bits.to(torch.int32) & 0xFFF) << 4
    half_bits = torch.where(half_bits >= 0x8000, half_bits - 0x10000, half_bits).to(torch.int16)
    return half_bits.view(torch.float16).to(torch.float32)


def pack_12bit(codes: Tensor) -> Tensor:
    """E5M6 codes (int16 [..., K], low 12 bits) -> uint8 [..., 3 ceil(K / 2) ]: two codes in three bytes, as the
    cache is held (sec 3.3.3: 12 bits, not the 16 of the container the arithmetic uses). An odd K gets one
    zero code. Exact inverse: ``unpack_12bit``."""
    c = codes.to(torch.int32) & 0xFFF
    if c.shape[-1] % 2:
        c = torch.nn.functional.pad(c, (0, 1))
    a, b = c[..., 0::2], c[..., 1::2]
    packed = torch.stack([a & 0xFF, (a >> 8) | ((b & 0xF) << 4), b >> 4], dim=-1)
    return packed.to(torch.uint8).flatten(-2)


def unpack_12bit(packed: Tensor, k: int) -> Tensor:
    """uint8 [..., 3 ceil(k / 2)] from ``pack_12bit`` -> the int16 codes [..., k]."""
    t = packed.to(torch.int32).unflatten(-1, (-1, 3))
    a = t[..., 0] | ((t[..., 1] & 0xF) << 8)
    b = (t[..., 1] >> 4) | (t[..., 2] << 4)
    return torch.stack([a, b], dim=-1).flatten(-2)[..., :k].to(torch.int16)


# the 256 E4M3 codes as fp32 (both NaN codes included), decoded once by torch's own cast
_E4M3_VALUES = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)


def e4m3_decode(data: Tensor) -> Tensor:
    """float8_e4m3fn -> fp32, exact. On the CPU a lookup in the 256 decoded codes: torch's CPU cast
    converts one element at a time (9 ms for 2M elements on one core, the lookup 1.8 ms); elsewhere the
    cast."""
    if data.device.type != "cpu":
        return data.to(torch.float32)
    codes = data.reshape(-1).view(torch.uint8).to(torch.int32)
    return _E4M3_VALUES.index_select(0, codes).view(data.shape)


# --------------------------------------------------------------------------------------------------
# Quantized tensors


@dataclass
class Quantized:
    """A 2-D tensor quantized in ``group_rows x 128`` tiles along its last dim.

    ``data``: payload [R, K] (float8_e4m3fn for "e4m3", int16 codes for "e5m6"); ``scale``: fp32
    [ceil(R / group_rows), ceil(K / 128)], one per tile (partial last tiles cover only the elements
    present); real value = decode(data) * scale. ``pow2``: scales are powers of two. ``orig_shape``: the
    shape before leading dims were flattened (``quantize_act``); ``dequantize`` restores it.
    """

    data: Tensor
    scale: Tensor
    group_rows: int
    fmt: str
    pow2: bool = False
    orig_shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        _check_fmt(self.fmt)
        if self.data.dim() != 2:
            raise ValueError(f"Quantized.data must be 2-D [R, K], got shape {tuple(self.data.shape)}")
        expected = (_ceil_div(self.data.shape[0], self.group_rows), _ceil_div(self.data.shape[1], BLOCK))
        if tuple(self.scale.shape) != expected:
            raise ValueError(f"Quantized.scale shape {tuple(self.scale.shape)} != {expected} for data "
                             f"{tuple(self.data.shape)} and group_rows {self.group_rows}")

    @property
    def shape(self) -> torch.Size:
        """Shape of the 2-D payload [R, K]."""
        return self.data.shape

    @property
    def nbytes(self) -> int:
        """Bytes held: payload container plus fp32 scales (e5m6 sits in 2-byte int16 containers)."""
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()

    @property
    def packed_nbytes(self) -> int:
        """Bytes if payload codes were bit-packed (8 bits e4m3, 12 bits e5m6) plus fp32 scales."""
        return math.ceil(self.data.numel() * FORMAT_BITS[self.fmt] / 8) + 4 * self.scale.numel()

    def payload(self) -> Tensor:
        """Unscaled payload values as fp32 (exact)."""
        return e4m3_decode(self.data) if self.fmt == "e4m3" else e5m6_decode(self.data)

    def expanded_scale(self) -> Tensor:
        """Per-element scale [R, K] (fp32)."""
        rows, cols = self.data.shape
        return (self.scale.repeat_interleave(self.group_rows, 0)[:rows]
                .repeat_interleave(BLOCK, 1)[:, :cols])

    def row_slice(self, start: int, stop: int) -> Quantized:
        """Rows [start, stop) as a Quantized; the cut must not split a tile of group_rows rows."""
        rows = self.data.shape[0]
        if not 0 <= start <= stop <= rows:
            raise ValueError(f"row_slice({start}, {stop}) out of range for {rows} rows")
        if start % self.group_rows or (stop % self.group_rows and stop != rows):
            raise ValueError(f"row_slice({start}, {stop}) splits a tile of {self.group_rows} rows")
        g = self.group_rows
        return Quantized(self.data[start:stop], self.scale[start // g:_ceil_div(stop, g)], g, self.fmt, self.pow2)

    def col_slice(self, start: int, stop: int) -> Quantized:
        """Columns [start, stop) as a Quantized; the cut must fall on 128-column tile boundaries (or the end)."""
        cols = self.data.shape[1]
        if not 0 <= start <= stop <= cols:
            raise ValueError(f"col_slice({start}, {stop}) out of range for {cols} columns")
        if start % BLOCK or (stop % BLOCK and stop != cols):
            raise ValueError(f"col_slice({start}, {stop}) splits a tile of {BLOCK} columns")
        return Quantized(self.data[:, start:stop], self.scale[:, start // BLOCK:_ceil_div(stop, BLOCK)],
                         self.group_rows, self.fmt, self.pow2)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize(self, dtype)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _check_fmt(fmt: str) -> None:
    if fmt not in FORMAT_MAX:
        raise ValueError(f"unknown fp8 format {fmt!r}; expected one of {sorted(FORMAT_MAX)}")


def _pow2_ceil(x: Tensor) -> Tensor:
    """Smallest power of two >= x (x > 0), exactly, via frexp (x = m * 2^e with m in [0.5, 1)); inf and
    NaN are returned as they are (frexp would give 1)."""
    mantissa, exponent = torch.frexp(x)
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)
    return torch.where(torch.isfinite(x), torch.ldexp(torch.ones_like(x), exponent), x)  # inf, NaN stay


def quantize(x: Tensor, group_rows: int = 1, fmt: str = "e4m3", pow2: bool = False, *,
             check_finite: bool = True) -> Quantized:
    """Quantize a 2-D x [R, K] in ``group_rows x 128`` tiles along K (sec 3.3.2, online scaling).

    Per tile: ``scale = amax / FORMAT_MAX`` (fp32; floored at 2^-126; 1.0 for an all-zero tile, whose
    zeros come back exactly), rounded up to a power of two if ``pow2``; payload = x / scale clamped to
    +-FORMAT_MAX and rounded to nearest-even in the format. Partial tiles at the end of R or K are scaled
    by the elements present only; nothing is padded in the result. ``fmt="e5m6"`` requires ``pow2=True``
    (its only use, the cached attention-output activation, needs exact re-tiling, sec 3.3.3). fp64 input
    is divided in fp64 (so ``quantize(dequantize(q, float64).t())`` with power-of-two scales is exact);
    other dtypes in fp32. Raises ValueError on non-2-D or non-float input or an unknown format, and with
    ``check_finite`` on NaN/inf. The training path passes ``check_finite=False``: the check reads a
    value back from the device (a host sync per quantization), and a non-finite tile instead gets a
    non-finite scale, so the NaN reaches the loss and the trainer's guard skips the step. On that path
    a CUDA tensor in E4M3 goes through one fused Triton kernel (``fp8.triton_quant``, same numbers).
    """
    _check_fmt(fmt)
    if fmt == "e5m6" and not pow2:
        raise ValueError("fmt='e5m6' requires pow2=True (power-of-two scales, report sec 3.3.3)")
    if x.dim() != 2:
        raise ValueError(f"quantize expects a 2-D tensor [R, K], got shape {tuple(x.shape)}; "
                         "use quantize_act for [..., K]")
    if not x.is_floating_point():
        raise ValueError(f"quantize expects a floating-point tensor, got {x.dtype}")
    if not isinstance(group_rows, int) or group_rows < 1:
        raise ValueError(f"group_rows must be a positive int, got {group_rows!r}")
    layout = {1: "rows", BLOCK: "blocks"}.get(group_rows)
    fused = None if check_finite or layout is None else _quantize_fused(layout, x, fmt, pow2)
    return fused if fused is not None else quantize_with_torch_ops(x, group_rows, fmt, pow2, check_finite)


def quantize_with_torch_ops(x: Tensor, group_rows: int, fmt: str, pow2: bool, check_finite: bool) -> Quantized:
    """``quantize`` as PyTorch operations (any device, format and dtype; the reference of the fused
    kernel). Arguments as ``quantize``'s, already validated."""
    work = x.double() if x.dtype == torch.float64 else x.float()
    rows, cols = work.shape
    tiles = _tiles(work, group_rows)  # [row tiles, group_rows, col tiles, 128], zero-padded
    amax = tiles.abs().amax(dim=(1, 3))
    if check_finite and not bool(torch.isfinite(amax).all()):  # NaN and inf reach their tile's max
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"quantize: input has {bad} non-finite value(s) (NaN/inf); "
                         "fp8 scales are computed from the max-abs of each tile and would be meaningless")
    scale = tile_scales(amax, fmt, pow2)
    scaled = _untile(tiles / scale.to(work.dtype).view(scale.shape[0], 1, scale.shape[1], 1), rows, cols)
    scaled = scaled.float().clamp_(-FORMAT_MAX[fmt], FORMAT_MAX[fmt])
    data = scaled.to(torch.float8_e4m3fn) if fmt == "e4m3" else e5m6_encode(scaled)
    return Quantized(data, scale, group_rows, fmt, pow2)


def _fused_kernels(x: Tensor, fmt: str):
    """``fp8.triton_quant`` where it takes x (E4M3 from fp32/bf16/fp16 on a GPU, Triton installed, no
    earlier failure), else None. Its results are this module's, bit for bit (tests/unit/test_fp8_triton_quant.py)."""
    if not x.is_cuda or fmt != "e4m3" or _FUSED_FAILURES:
        return None
    try:
        from fp8 import triton_quant
    except ImportError:
        return None
    return triton_quant if triton_quant.supports(x) else None


def _quantize_fused(layout: str, x: Tensor, fmt: str, pow2: bool, **options) -> Quantized | None:
    """The fused kernel's ``quantize_<layout>`` of x where it takes x, else None (the caller then uses the
    PyTorch operations; so does every later call once the kernel failed to build or run)."""
    kernels = _fused_kernels(x, fmt)
    if kernels is None:
        return None
    try:
        return getattr(kernels, f"quantize_{layout}")(x, pow2, **options)
    except Exception as exc:  # a kernel that cannot build or run on this GPU
        _fused_failed(exc)
        return None


_FUSED_FAILURES: list[str] = []  # the fused kernel's first failure in this process, if any: not tried again


def _fused_failed(exc: Exception) -> None:
    _FUSED_FAILURES.append(f"{type(exc).__name__}: {exc}")
    warnings.warn(f"fp8: the fused Triton quantization failed ({_FUSED_FAILURES[0][:300]}); quantizing with "
                  "PyTorch operations from now on (slower, same numbers)", RuntimeWarning, stacklevel=3)


def tile_scales(amax: Tensor, fmt: str, pow2: bool) -> Tensor:
    """fp32 scales from the tiles' max-abs: ``amax / FORMAT_MAX`` floored at 2^-126, 1.0 where amax is 0.

    For an fp32 amax the fp32 quotient is the quotient rounded once (a quotient of two floats rounds the
    same directly and through fp64: 53 >= 2 x 24 + 2 bits). Power-of-two scales (and fp64 input) are
    computed in fp64 and rounded at the end: an fp32 quotient rounded first could fall onto the power of
    two below, and the tile would then clip. A NaN or inf amax gives a NaN or inf scale. The divisor is a
    tensor on amax's device: on CUDA, torch divides by a Python number as a product with its reciprocal
    (one rounding more: in some tiles the last bit differed from the CPU's and the fused kernel's quotient,
    seen on an H200).
    """
    if amax.dtype == torch.float32 and not pow2:
        return (amax / amax.new_full((), FORMAT_MAX[fmt])).clamp_(min=MIN_SCALE).masked_fill_(amax == 0, 1.0)
    amax = amax.double()
    scale = (amax / amax.new_full((), FORMAT_MAX[fmt])).clamp_(min=MIN_SCALE)
    if pow2:
        scale = _pow2_ceil(scale)
    return scale.float().masked_fill_(amax == 0, 1.0)


def _tiles(x: Tensor, group_rows: int) -> Tensor:
    """x [R, K] as [ceil(R/g), g, ceil(K/128), 128] tiles (zero-padded at the ends, a view when no
    padding is needed): per-tile scales then broadcast as scale[:, None, :, None]."""
    rows, cols = x.shape
    row_tiles, col_tiles = _ceil_div(rows, group_rows), _ceil_div(cols, BLOCK)
    pad_rows, pad_cols = row_tiles * group_rows - rows, col_tiles * BLOCK - cols
    if pad_rows or pad_cols:
        x = torch.nn.functional.pad(x, (0, pad_cols, 0, pad_rows))
    return x.reshape(row_tiles, group_rows, col_tiles, BLOCK)


def _untile(tiles: Tensor, rows: int, cols: int) -> Tensor:
    """Inverse of ``_tiles``: [R, K] without the padding."""
    row_tiles, group_rows, col_tiles, _ = tiles.shape
    full = tiles.reshape(row_tiles * group_rows, col_tiles * BLOCK)
    return full if full.shape == (rows, cols) else full[:rows, :cols]


def dequantize(q: Quantized, dtype: torch.dtype = torch.float32) -> Tensor:
    """Real values decode(data) * scale in ``dtype`` (fp64: exact; else one fp32 rounding of the product).

    Returns ``q.orig_shape`` if set (``quantize_act``), else [R, K].
    """
    out = dequantize_2d(q, torch.float64 if dtype == torch.float64 else torch.float32).to(dtype)
    return out.reshape(q.orig_shape) if q.orig_shape is not None else out


def dequantize_2d(q: Quantized, work: torch.dtype = torch.float32) -> Tensor:
    """decode(data) * scale as [R, K] in ``work`` (fp32 or fp64), ignoring ``orig_shape``: each scale
    broadcast over its tile, one rounding per element in fp32, exact in fp64."""
    rows, cols = q.data.shape
    tiles = _tiles(q.payload().to(work), q.group_rows) * q.scale.to(work)[:, None, :, None]
    return _untile(tiles, rows, cols)


def quantize_act(x: Tensor, fmt: str = "e4m3", pow2: bool = False, *, check_finite: bool = True) -> Quantized:
    """Activation x [..., K] in 1x128 tiles (per token, per 128 channels). Leading dims are flattened in
    ``data`` [prod(...), K] and restored by ``dequantize``."""
    if x.dim() < 1:
        raise ValueError("quantize_act expects a tensor [..., K]")
    q = quantize(x.reshape(-1, x.shape[-1]), 1, fmt, pow2, check_finite=check_finite)
    q.orig_shape = tuple(x.shape)
    return q


def quantize_weight(w: Tensor, fmt: str = "e4m3", pow2: bool = False, *, check_finite: bool = True) -> Quantized:
    """Weight w [out, in] in 128x128 blocks (per 128 output channels, per 128 input channels)."""
    if w.dim() != 2:
        raise ValueError(f"quantize_weight expects a 2-D weight [out, in], got shape {tuple(w.shape)}")
    return quantize(w, BLOCK, fmt, pow2, check_finite=check_finite)


def quantize_act_transposed(x: Tensor, fmt: str = "e4m3", pow2: bool = False, *,
                            check_finite: bool = True) -> Quantized:
    """x [..., K] (flattened to [T, K]) quantized in 128x1 tiles (per channel, per 128 tokens), returned
    as the Quantized of x.T [K, T] with 1x128 tiles: the token dim is the reduction dim of Wgrad
    (dW = dY^T X), so every GEMM operand is "tiles of 128 along the reduction dim"."""
    x2d = x.reshape(-1, x.shape[-1])
    fused = None if check_finite else _quantize_fused("columns", x2d, fmt, pow2)  # transposes in the kernel
    return fused if fused is not None else quantize(x2d.t().contiguous(), 1, fmt, pow2, check_finite=check_finite)


def quantize_both_layouts(x: Tensor, fmt: str = "e4m3", pow2: bool = False, *, check_finite: bool = True,
                          row_index: Tensor | None = None) -> tuple[Quantized, Quantized]:
    """``(quantize(x2d, 1), quantize_act_transposed(x))`` for x [..., K] flattened to x2d [T, K]: the 1x128
    tiles a GEMM reads along K and the 128x1 tiles Wgrad reads along T. ``row_index`` [R] (int64; each of
    x2d's rows once, -1 for a zero row): the 128x1 tiles are those of the [R, K] matrix whose row i is
    ``x2d[row_index[i]]`` (the experts' 128-aligned token layout, fp8/experts.py). On the training path a
    CUDA tensor in E4M3 is read once for both (``fp8.triton_quant.quantize_rows_and_columns``, which also
    builds that matrix on the fly; same numbers)."""
    x2d = x.reshape(-1, x.shape[-1])
    fused = None if check_finite else _quantize_fused("rows_and_columns", x2d, fmt, pow2, row_index=row_index)
    if fused is not None:
        return fused
    return (quantize(x2d, 1, fmt, pow2, check_finite=check_finite),
            quantize_act_transposed(_rows_at(x2d, row_index), fmt, pow2, check_finite=check_finite))


def quantize_layouts(x: Tensor, rows: bool = True, columns: bool = True, fmt: str = "e4m3", pow2: bool = False, *,
                     check_finite: bool = True, row_index: Tensor | None = None
                     ) -> tuple[Quantized | None, Quantized | None]:
    """``quantize_both_layouts`` for the layouts asked for, None in place of the other: the 1x128 tiles
    if ``rows``, the 128x1 tiles (of the rows ``row_index`` picks, if given) if ``columns``."""
    if rows and columns:
        return quantize_both_layouts(x, fmt, pow2, check_finite=check_finite, row_index=row_index)
    x2d = x.reshape(-1, x.shape[-1])
    return (quantize(x2d, 1, fmt, pow2, check_finite=check_finite) if rows else None,
            quantize_act_transposed(_rows_at(x2d, row_index), fmt, pow2, check_finite=check_finite)
            if columns else None)


def _rows_at(x2d: Tensor, row_index: Tensor | None) -> Tensor:
    """``x2d[row_index]`` with -1 giving a zero row (None: x2d itself)."""
    if row_index is None:
        return x2d
    return torch.cat([x2d, x2d.new_zeros(1, x2d.shape[1])])[row_index]


def convert_tiles(q: Quantized) -> Quantized:
    """Re-tile q (the Quantized of x [R, K], normally 1x128 tiles) into the Quantized of x.T [K, R] with
    1x128 tiles, i.e. 128x1 tiles of x (sec 3.3.3: the attention-output activation cached in E5M6 and
    converted for the backward pass). Same format and scale rule as q.

    Exactness: the real values are decoded exactly (fp64) and re-quantized. With power-of-two scales
    every new payload is an old payload times a power of two, and no new payload exceeds FORMAT_MAX, so
    the conversion is **exact** unless an element lands in the format's subnormal range in its new tile,
    i.e. ``|x| < 2^-14 * new_scale`` for E5M6 (about 2^-30 of the new tile's max) or ``2^-6 * new_scale``
    for E4M3 (about 2^-14.8 of the new tile's max), where low bits may be rounded off (absolute error at
    most half the subnormal step: 2^-21 resp. 2^-10 times the new scale). With non-power-of-two scales
    the conversion re-rounds, adding up to half an ULP of quantization error per element.
    """
    x = dequantize_2d(q, torch.float64)  # exact: <= 7 x 24 significant bits
    return quantize(x.t().contiguous(), 1, q.fmt, q.pow2, check_finite=False)  # non-finite q: see quantize
