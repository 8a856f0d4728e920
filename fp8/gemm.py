"""Reference FP8 GEMM with per-group scales and promoted accumulation (report sec 3.3.2, Figure 7b).

Pure PyTorch, runs on CPU; it defines the numbers a fused kernel must reproduce. Both operands are
quantized along the reduction dim K in tiles of 128 (``fp8.quant``); ``gemm_reference(a, b)`` returns
``A @ B.T`` in fp32.

Accumulation model. K is cut into slices of ``slice_k = 32`` (the K of one FP8 WGMMA; 4 slices = one
128-group = N_C). The products of one slice are summed exactly: products of E4M3 values are multiples
of 2^-18 below 2^18, so a sum of 32 of them fits in 53 bits and is computed exactly in fp64 (for E5M6
it is exact up to ~2^-53 relative). The slice sum is added into the MMA accumulator and the sum is
rounded to the accumulator format:

* ``accumulator="fp32"``: round to fp32 (nearest-even), i.e. an ideal FP32 MMA accumulator;
* ``accumulator="tensor_core"``: round to ``tc_bits = 13`` explicit mantissa bits (14 significant bits,
  unbounded exponent) with round-toward-zero (``tc_rounding="rtz"``; ``"rne"`` for comparison). This
  models the ~14-bit accumulation the report measured on H800, which has been described as an e8m13
  accumulator that truncates. Truncation errors all point toward zero, so they add up linearly in the
  number of accumulator updates instead of cancelling.

Promotion (the report's fix): every ``promote_every`` elements of K (128 = 4 WGMMAs) the accumulator is
multiplied by the two groups' scales in fp32 (``(acc * scale_a) * scale_b``), added into an FP32 output
accumulator ("CUDA-core registers") and reset. ``promote_every=None`` (or 0) never promotes: the whole K
sum stays in the MMA accumulator. Real hardware cannot apply per-group scales inside the MMA, so for
intervals that span several 128-groups (None, or a multiple of 128 above 128) the model applies each
slice's scales to the slice sum before adding it (an idealization: with a single per-tensor scale it is
exactly TransformerEngine-style FP8 GEMM without promotion).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fp8.quant import BLOCK, Quantized, quantize_act, quantize_weight

WGMMA_K = 32  # K of one FP8 WGMMA instruction on Hopper
TC_MANTISSA_BITS = 13  # explicit mantissa bits of the modelled Tensor-Core accumulator (14 significant)
ACCUMULATORS = ("fp32", "tensor_core")


def round_mantissa(x: Tensor, bits: int, rounding: str = "rtz") -> Tensor:
    """Round fp64 x to ``bits`` explicit mantissa bits (bits + 1 significant), exponent unbounded.

    ``"rtz"``: toward zero (truncation); ``"rne"``: to nearest, ties to even. Zero stays zero.
    """
    mantissa, exponent = torch.frexp(x)  # x = m * 2^e, |m| in [0.5, 1)
    scaled = mantissa * 2.0 ** (bits + 1)  # integer part has bits + 1 significant bits
    scaled = scaled.trunc() if rounding == "rtz" else torch.round(scaled)
    return torch.ldexp(scaled, exponent - (bits + 1))


def _check_operands(a: Quantized, b: Quantized) -> None:
    if not isinstance(a, Quantized) or not isinstance(b, Quantized):
        raise ValueError("gemm operands must be fp8.quant.Quantized")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"gemm K mismatch: a is {tuple(a.shape)}, b is {tuple(b.shape)} (computes a @ b.T)")


def gemm_reference(a: Quantized, b: Quantized, promote_every: int | None = 128, accumulator: str = "fp32", *,
                   slice_k: int = WGMMA_K, tc_bits: int = TC_MANTISSA_BITS, tc_rounding: str = "rtz") -> Tensor:
    """fp32 ``A @ B.T`` for a [M, K], b [N, K], both quantized in tiles of 128 along K (any group_rows).

    See the module docstring for the accumulation model. ``promote_every``: None/0 (never), a multiple of
    ``slice_k`` dividing 128, or a multiple of 128. ``slice_k`` must divide 128. Loops over K-slices only;
    every slice is one batched [M, N] product.
    """
    _check_operands(a, b)
    if accumulator not in ACCUMULATORS:
        raise ValueError(f"unknown accumulator {accumulator!r}; expected one of {ACCUMULATORS}")
    if tc_rounding not in ("rtz", "rne"):
        raise ValueError(f"unknown tc_rounding {tc_rounding!r}; expected 'rtz' or 'rne'")
    if slice_k < 1 or BLOCK % slice_k:
        raise ValueError(f"slice_k must divide {BLOCK}, got {slice_k}")
    interval = promote_every or None
    valid = interval is None or (interval > 0 and interval % slice_k == 0
                                 and (BLOCK % interval == 0 if interval <= BLOCK else interval % BLOCK == 0))
    if not valid:
        raise ValueError(f"promote_every must be None/0, a multiple of slice_k={slice_k} dividing {BLOCK}, "
                         f"or a multiple of {BLOCK}; got {promote_every}")

    if accumulator == "fp32":
        def round_acc(x: Tensor) -> Tensor:
            return x.float().double()
    else:
        def round_acc(x: Tensor) -> Tensor:
            return round_mantissa(x, tc_bits, tc_rounding)

    (m, k), n = a.shape, b.shape[0]
    groups = -(-k // BLOCK)
    per_group = BLOCK // slice_k
    pad = groups * BLOCK - k  # zero payloads add exact zeros
    pa = F.pad(a.payload(), (0, pad)).double().view(m, groups, per_group, slice_k)
    pb = F.pad(b.payload(), (0, pad)).double().view(n, groups, per_group, slice_k)
    sa = a.scale.repeat_interleave(a.group_rows, 0)[:m]  # [M, G] fp32
    sb = b.scale.repeat_interleave(b.group_rows, 0)[:n]  # [N, G] fp32
    scales_inside = interval is None or interval > BLOCK  # idealized: scale each slice before accumulating

    out = torch.zeros(m, n, dtype=torch.float32)
    acc = torch.zeros(m, n, dtype=torch.float64)
    for g in range(groups):
        # [S, M, slice_k] @ [S, slice_k, N] -> exact per-slice sums [S, M, N] (fp64)
        slice_sums = torch.bmm(pa[:, g].transpose(0, 1), pb[:, g].permute(1, 2, 0))
        sa_g, sb_g = sa[:, g, None], sb[None, :, g]
        if scales_inside:
            slice_sums = slice_sums * (sa_g.double() * sb_g.double())  # exact product of two fp32 scales
        for s in range(per_group):
            acc = round_acc(acc + slice_sums[s])
            k_done = g * BLOCK + (s + 1) * slice_k
            if interval is not None and k_done % interval == 0:
                promoted = acc.float() if scales_inside else acc.float() * sa_g * sb_g
                out = out + promoted
                acc = torch.zeros_like(acc)
    if interval is None or groups * BLOCK % interval:
        out = out + acc.float()  # never promoted, or the last interval ends inside the zero padding
    return out


def fp8_matmul_emulated(x: Tensor, w: Tensor, promote_every: int | None = 128, accumulator: str = "fp32",
                        fmt: str = "e4m3", pow2: bool = False, **kwargs) -> Tensor:
    """``x @ w.T`` (fp32 [..., N]) through FP8: x [..., K] in 1x128 tiles, w [N, K] in 128x128 blocks."""
    out = gemm_reference(quantize_act(x, fmt, pow2), quantize_weight(w, fmt, pow2), promote_every, accumulator,
                         **kwargs)
    return out.reshape(*x.shape[:-1], w.shape[0])


def host_counts(counts: list[int] | torch.Tensor) -> list[int]:
    """A grouped GEMM's rows per expert as a list of ints (a tensor is read back)."""
    return [int(c) for c in (counts.tolist() if isinstance(counts, torch.Tensor) else counts)]


def check_counts(counts: list[int], rows: int) -> None:
    """Rows per expert: non-negative, summing to the ``rows`` of a."""
    if any(c < 0 for c in counts) or sum(counts) != rows:
        raise ValueError(f"counts {counts} must be non-negative and sum to the {rows} rows of a")


def expert_width(b: Quantized, n_experts: int) -> int:
    """N, the rows of each expert in the stacked weights b [E * N, K] (whose blocks must not straddle two)."""
    if n_experts == 0 or b.shape[0] % n_experts:
        raise ValueError(f"stacked weights of {b.shape[0]} rows do not split into {n_experts} experts")
    n = b.shape[0] // n_experts
    if n % b.group_rows:
        raise ValueError(f"stacked weight blocks of {b.group_rows} rows straddle experts of {n} rows")
    return n


def check_tile_boundaries(a: Quantized, counts: list[int]) -> None:
    """With a.group_rows > 1 every expert's rows must start (and end, but for the last) on a tile boundary."""
    start = 0
    for count in counts:
        end = start + count
        if count and (start % a.group_rows or (end % a.group_rows and end != a.shape[0])):
            raise ValueError(f"activation tiles of {a.group_rows} rows straddle experts (counts {counts})")
        start = end


def grouped_gemm_reference(a: Quantized, b: list[Quantized] | Quantized, counts: list[int],
                           promote_every: int | None = 128, accumulator: str = "fp32", **kwargs) -> Tensor:
    """MoE grouped GEMM: rows of a [T, K] are sorted by expert, ``counts[e]`` rows for expert e; returns
    fp32 [T, N] where expert e's rows are multiplied by its weight (``rows_e @ W_e.T``).

    ``b``: a list of E Quantized [N, K], or one Quantized of the stacked weights [E * N, K] (its blocks
    must not straddle two experts: N % b.group_rows == 0). With a.group_rows > 1 every expert boundary
    must fall on a tile boundary of a (1x128 activation tiles never straddle experts).
    """
    counts = host_counts(counts)
    check_counts(counts, a.shape[0])
    check_tile_boundaries(a, counts)
    n_experts = len(counts)
    if isinstance(b, Quantized):
        n = expert_width(b, n_experts)
        weights = [b.row_slice(e * n, (e + 1) * n) for e in range(n_experts)]
    else:
        weights = list(b)
        if len(weights) != n_experts:
            raise ValueError(f"{len(weights)} expert weights for {n_experts} counts")
        if not weights:
            raise ValueError("grouped gemm needs at least one expert")
        n = weights[0].shape[0]
        if any(w.shape[0] != n for w in weights):
            raise ValueError("all expert weights must have the same number of output rows")
    outputs = [torch.zeros(0, n)]
    start = 0
    for expert, count in enumerate(counts):
        if count:
            rows = a.row_slice(start, start + count)
            outputs.append(gemm_reference(rows, weights[expert], promote_every, accumulator, **kwargs))
        start += count
    return torch.cat(outputs)


def expert_offsets(offsets, cols: int) -> list[int]:
    """Check the K-grouped GEMM's ``offsets`` (E + 1 non-decreasing column offsets from 0, each a
    multiple of 128, the last <= cols) and return them as a list of ints."""
    offsets = [int(o) for o in (offsets.tolist() if isinstance(offsets, torch.Tensor) else offsets)]
    if (len(offsets) < 2 or offsets[0] != 0 or offsets[-1] > cols or any(o % BLOCK for o in offsets)
            or any(b < a for a, b in zip(offsets, offsets[1:]))):
        raise ValueError(f"offsets {offsets[:8]}{'...' if len(offsets) > 8 else ''} must run from 0 up to at "
                         f"most {cols} in non-decreasing multiples of {BLOCK}, one more than the experts")
    return offsets


def k_grouped_loop(gemm, a: Quantized, b: Quantized, offsets) -> Tensor:
    """The experts' weight gradients as one ``gemm(a_e, b_e)`` per expert with tokens: fp32 [E, M, N] with
    ``out[e] = A[:, o[e]:o[e+1]] @ B[:, o[e]:o[e+1]].T`` for a [M, Kp], b [N, Kp] in 1x128 tiles along K,
    the tokens, each expert's tokens starting on a tile (``offsets``, see ``expert_offsets``); an expert
    without tokens gets zeros."""
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"gemm K mismatch: a is {tuple(a.shape)}, b is {tuple(b.shape)} (computes a @ b.T)")
    offsets = expert_offsets(offsets, a.shape[1])
    out = torch.zeros(len(offsets) - 1, a.shape[0], b.shape[0], device=a.data.device)
    for e, (start, stop) in enumerate(zip(offsets, offsets[1:])):
        if stop > start:
            out[e] = gemm(a.col_slice(start, stop), b.col_slice(start, stop))
    return out


def k_grouped_gemm_reference(a: Quantized, b: Quantized, offsets, promote_every: int | None = 128,
                             accumulator: str = "fp32", **kwargs) -> Tensor:
    """``k_grouped_loop`` of ``gemm_reference`` (the K-grouped GEMM's numbers)."""
    return k_grouped_loop(lambda x, y: gemm_reference(x, y, promote_every, accumulator, **kwargs), a, b, offsets)
