"""Fine-grained FP8 quantization and the E5M6 format (report sec 3.3.2, 3.3.3).

Error bounds. A tile with scale s stores y = x / s with |y| <= FORMAT_MAX. A format with m explicit
mantissa bits spaces its normal numbers in [2^e, 2^(e+1)) by 2^(e-m), so round-to-nearest errs by at most
2^(e-m-1) <= 2^-(m+1) |y|; below the smallest normal 2^e_min the spacing is the subnormal step
2^(e_min-m), error at most half of it. Multiplying back by s:

    |x - deq(x)| <= 2^-(m+1) |x|  +  2^(e_min-m-1) s        (one of the two terms is active)

E4M3 (m=3, e_min=-6): 2^-4 |x| + 2^-10 s.  E5M6 (m=6, e_min=-14): 2^-7 |x| + 2^-21 s. The division x / s
and the product payload * s are rounded to fp32 (relative 2^-24 each), covered by a 2^-20 |x| slack.
Power-of-two scales are at most 2x larger than amax / FORMAT_MAX, which only moves more elements
towards the subnormal term; the bound's form is unchanged.
"""

from __future__ import annotations

import math

import pytest
import torch

from fp8.quant import (BLOCK, E4M3_MAX, E5M6_MAX, FORMAT_MAX, MIN_SCALE, Quantized, convert_tiles, dequantize,
                       e4m3_decode, e5m6_decode, e5m6_encode, quantize, quantize_act, quantize_act_transposed,
                       pack_12bit, quantize_weight, tile_scales, unpack_12bit)
from bench.host_syncs import HostReads

pytestmark = pytest.mark.usefixtures("single_thread")

# (relative half-ULP for normals, half subnormal step in units of the tile scale)
BOUNDS = {"e4m3": (2.0**-4, 2.0**-10), "e5m6": (2.0**-7, 2.0**-21)}
SLACK = 2.0**-20


def error_bound(x: torch.Tensor, q: Quantized) -> torch.Tensor:
    rel, sub = BOUNDS[q.fmt]
    return (rel + SLACK) * x.abs().double() + sub * q.expanded_scale().double()


def wide_range(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Normal values whose rows span 2^-20 .. 2^20 in magnitude, so subnormal payloads occur too."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * torch.exp2(torch.randint(-20, 21, (rows, 1), generator=g).float())


# --------------------------------------------------------------------------------------------------
# E5M6, exactly


def e5m6_table() -> list[float]:
    """Value of every 12-bit code from the format's definition (Python floats, no bit tricks)."""
    values = []
    for code in range(4096):
        sign = -1.0 if code >> 11 else 1.0
        exp, man = (code >> 6) & 31, code & 63
        if exp == 31:
            values.append(sign * math.inf if man == 0 else math.nan)
        elif exp == 0:
            values.append(sign * man * 2.0**-20)
        else:
            values.append(sign * (1 + man / 64) * 2.0 ** (exp - 15))
    return values


def test_e5m6_decode_matches_table_and_encode_round_trips_every_code():
    table = torch.tensor(e5m6_table(), dtype=torch.float64)
    codes = torch.arange(4096, dtype=torch.int16)
    decoded = e5m6_decode(codes).double()
    finite = torch.isfinite(table)
    assert torch.equal(decoded[finite], table[finite])
    assert torch.equal(torch.signbit(decoded[finite]), torch.signbit(table[finite]))  # incl. -0.0
    assert torch.equal(torch.isnan(decoded), torch.isnan(table))
    assert torch.equal(torch.isinf(decoded), torch.isinf(table))
    assert int(finite.sum()) == 4096 - 2 * 64
    assert torch.equal(e5m6_encode(decoded[finite].float()), codes[finite])
    assert table[finite].abs().max().item() == E5M6_MAX == 65024.0


@pytest.mark.parametrize("k", [2, 256, 7, 1])
def test_12bit_packing_round_trips_every_code(k):
    """The E5M6 cache's packing (two 12-bit codes in three bytes): every code comes back exactly (k = 2 puts
    every code in both slots of a pair, next to a different one); an odd width gets one zero code; 1.5
    bytes per code."""
    codes = torch.arange(4096, dtype=torch.int16)
    both_slots = torch.stack([codes, codes.roll(1)], dim=1).flatten()  # slot 0: i, slot 1: i - 1
    rows = torch.cat([both_slots, codes.flip(0)])[: (12288 // k) * k].view(-1, k)
    packed = pack_12bit(rows)
    assert packed.dtype == torch.uint8 and packed.shape == (rows.shape[0], 3 * ((k + 1) // 2))
    assert torch.equal(unpack_12bit(packed, k), rows)


def positive_finite_values() -> torch.Tensor:
    return e5m6_decode(torch.arange(0, 0x7C0, dtype=torch.int16)).double()  # codes 0 .. 0x7BF, increasing


def test_e5m6_ties_round_to_even_and_neighbours_round_to_nearest():
    values = positive_finite_values()
    lo, hi = values[:-1], values[1:]
    mid = (lo + hi) / 2  # 8 significant bits: exact in fp32
    assert torch.equal(mid.float().double(), mid)
    codes = torch.arange(0, 0x7BF, dtype=torch.int64)
    even = torch.where(codes % 2 == 0, codes, codes + 1)
    for sign in (1.0, -1.0):
        sign_bit = 0x800 if sign < 0 else 0
        m32 = (sign * mid).float()
        assert torch.equal(e5m6_encode(m32).long(), even | sign_bit)
        above = torch.nextafter(m32, torch.full_like(m32, sign * math.inf))
        below = torch.nextafter(m32, torch.zeros_like(m32))
        assert torch.equal(e5m6_encode(above).long(), (codes + 1) | sign_bit)
        assert torch.equal(e5m6_encode(below).long(), codes | sign_bit)


def brute_force_encode(x: torch.Tensor) -> torch.Tensor:
    """Nearest representable value by search over the table; ties to the even code; saturating."""
    values = positive_finite_values()
    mag = x.double().abs().clamp(max=E5M6_MAX)
    hi = torch.searchsorted(values, mag, right=False).clamp(max=len(values) - 1)  # first value >= mag
    lo = (hi - 1).clamp(min=0)
    d_lo, d_hi = mag - values[lo], values[hi] - mag  # exact in fp64 (see the module's derivation)
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))
    code = torch.where(pick_hi, hi, lo)
    return code | (torch.signbit(x).long() << 11)


def test_e5m6_encode_matches_brute_force_on_random_floats():
    g = torch.Generator().manual_seed(1)
    logs = torch.rand(200_000, generator=g) * 52 - 30  # magnitudes 2^-30 .. 2^22: underflow .. saturation
    x = torch.exp2(logs) * torch.where(torch.rand(200_000, generator=g) < 0.5, -1.0, 1.0)
    bits = torch.randint(-2**31, 2**31 - 1, (100_000,), generator=g, dtype=torch.int64).to(torch.int32)
    random_bits = bits.view(torch.float32)
    x = torch.cat([x, random_bits[torch.isfinite(random_bits)]])
    assert torch.equal(e5m6_encode(x).long(), brute_force_encode(x))


def test_e5m6_saturation_subnormals_and_signed_zero():
    enc = lambda vals: e5m6_encode(torch.tensor(vals, dtype=torch.float32)).tolist()  # noqa: E731
    assert enc([65024.0, 65279.0, 65280.0, 1e30, math.inf]) == [0x7BF] * 5  # no overflow to the inf code
    assert enc([-70000.0, -math.inf]) == [0xFBF] * 2
    assert math.isnan(e5m6_decode(e5m6_encode(torch.tensor([math.nan])))[0].item())
    step = 2.0**-20  # subnormal step
    assert enc([step, 0.5 * step, 0.75 * step, 1.5 * step, 2.5 * step]) == [1, 0, 1, 2, 2]
    assert enc([63.5 * step, 2.0**-14, 1e-40]) == [64, 64, 0]  # rounds up into the first normal; fp32 subnormal
    assert enc([-0.0, -1e-40, -0.25 * step]) == [0x800] * 3
    neg_zero = e5m6_decode(torch.tensor([0x800], dtype=torch.int16))
    assert neg_zero.item() == 0.0 and torch.signbit(neg_zero).item()


# --------------------------------------------------------------------------------------------------
# quantize / dequantize


@pytest.mark.parametrize("fmt,pow2", [("e4m3", False), ("e4m3", True), ("e5m6", True)])
@pytest.mark.parametrize("group_rows", [1, BLOCK])
def test_quantize_error_within_half_ulp_bound(fmt, pow2, group_rows):
    x = wide_range(300, 200)
    q = quantize(x, group_rows, fmt, pow2)
    assert q.data.shape == (300, 200)
    assert q.data.dtype == (torch.float8_e4m3fn if fmt == "e4m3" else torch.int16)
    assert q.scale.shape == (math.ceil(300 / group_rows), 2) and q.scale.dtype == torch.float32
    err = (dequantize(q, torch.float64) - x.double()).abs()
    assert (err <= error_bound(x, q)).all()
    # the bound is attained up to a few percent (not vacuous): relative error of normal payloads
    rel, _ = BOUNDS[fmt]
    normal = x.abs() > 2.0 * q.expanded_scale() * (2.0**-6 if fmt == "e4m3" else 2.0**-14)
    assert (err[normal] / x.abs().double()[normal]).max() > 0.9 * rel
    if pow2:
        mantissa, _ = torch.frexp(q.scale)
        assert (mantissa == 0.5).all()


def tile_amax(x: torch.Tensor, group_rows: int) -> torch.Tensor:
    rows, cols = x.shape
    out = torch.zeros(math.ceil(rows / group_rows), math.ceil(cols / BLOCK))
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = x[i * group_rows:(i + 1) * group_rows, j * BLOCK:(j + 1) * BLOCK].abs().max()
    return out


@pytest.mark.parametrize("group_rows", [1, BLOCK])
def test_partial_tiles_are_scaled_by_the_elements_present(group_rows):
    x = wide_range(300, 200, seed=3)
    amax = tile_amax(x, group_rows)
    q = quantize(x, group_rows)
    assert torch.equal(q.scale, (amax.double() / E4M3_MAX).float())
    # the max element of every tile, partial tiles included, lands on the format max (up to fp32 rounding)
    payload_max = tile_amax(q.payload(), group_rows)
    assert torch.allclose(payload_max, torch.full_like(payload_max, E4M3_MAX), rtol=0, atol=0)
    qp = quantize(x, group_rows, pow2=True)
    ratio = amax.double() / qp.scale.double()
    assert ((ratio > E4M3_MAX / 2) & (ratio <= E4M3_MAX)).all()  # smallest power of two >= amax / 448


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                              reason="needs a CUDA GPU"))]


def test_all_zero_tile_and_tiny_tile():
    x = torch.randn(256, 384)
    x[:128, 128:256] = 0.0  # one all-zero 128x128 block, and 128 all-zero 1x128 tiles
    x[128:, 256:] = 1e-39  # fp32 subnormal but nonzero tiles
    for group_rows in (1, BLOCK):
        for fmt, pow2 in (("e4m3", False), ("e4m3", True), ("e5m6", True)):
            q = quantize(x, group_rows, fmt, pow2)
            zero_tiles = q.scale[: 128 // group_rows, 1]
            assert torch.equal(zero_tiles, torch.ones_like(zero_tiles))
            out = dequantize(q)
            assert torch.isfinite(q.scale).all() and (q.scale > 0).all() and torch.isfinite(out).all()
            assert torch.equal(out[:128, 128:256], torch.zeros(128, 128))
            assert torch.equal(torch.signbit(out[:128, 128:256]), torch.zeros(128, 128, dtype=torch.bool))
            assert (out - x).abs().max() <= 2**-4 * x.abs().max()


def test_outlier_changes_only_its_own_tile_and_per_tensor_scaling_breaks():
    """Figure 7a: one activation outlier. Per-tile scaling confines it to its tile; a per-tensor scale
    (amax / 448 over the whole tensor) pushes the ordinary values into E4M3's subnormal range."""
    x = torch.randn(64, 1024, generator=torch.Generator().manual_seed(4))
    spiked = x.clone()
    spiked[10, 300] = 3e5  # |x| ~ 1 then maps to ~1.5e-3 < 2^-9, E4M3's smallest subnormal, under one scale
    for group_rows in (1, BLOCK):
        clean, q = quantize(x, group_rows), quantize(spiked, group_rows)
        tile = (10 // group_rows, 300 // BLOCK)
        changed = q.scale != clean.scale
        assert changed.sum() == 1 and changed[tile]
        same = torch.ones(64, 1024, dtype=torch.bool)
        r0 = tile[0] * group_rows
        same[r0:r0 + group_rows, 256:384] = False
        assert torch.equal(q.data.view(torch.uint8)[same], clean.data.view(torch.uint8)[same])

    others = torch.ones_like(x, dtype=torch.bool)
    others[10, 256:384] = False  # leave out the outlier's own tile

    def rel_error(approx: torch.Tensor) -> float:
        return ((approx - spiked)[others].norm() / spiked[others].norm()).item()

    tile_err = rel_error(dequantize(quantize(spiked)))
    scale = spiked.abs().max() / E4M3_MAX
    per_tensor = (spiked / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float() * scale
    tensor_err = rel_error(per_tensor)
    print(f"\nrelative error outside the outlier's tile: 1x128 tiles {tile_err:.4f}, per-tensor {tensor_err:.4f}")
    assert tile_err < 2**-4 and tensor_err > 10 * tile_err


def test_quantize_act_flattens_and_restores_leading_dims():
    x = torch.randn(2, 3, 256)
    q = quantize_act(x)
    assert q.data.shape == (6, 256) and q.group_rows == 1 and q.scale.shape == (6, 2)
    assert dequantize(q).shape == (2, 3, 256)
    assert torch.equal(dequantize(q).reshape(6, 256), dequantize(quantize(x.reshape(6, 256))))
    assert q.nbytes == 6 * 256 + 6 * 2 * 4


def test_quantize_weight_blocks():
    w = torch.randn(300, 260)
    q = quantize_weight(w)
    assert q.group_rows == BLOCK and q.scale.shape == (3, 3)
    assert torch.equal(q.scale, (tile_amax(w, BLOCK).double() / E4M3_MAX).float())
    with pytest.raises(ValueError, match="2-D"):
        quantize_weight(torch.randn(2, 3, 4))


def test_quantize_act_transposed_is_128x1_tiling():
    x = torch.randn(4, 75, 96)  # 300 tokens, 96 channels
    flat = x.reshape(300, 96)
    q = quantize_act_transposed(x)
    assert q.data.shape == (96, 300) and q.group_rows == 1 and q.scale.shape == (96, 3)
    for j in (0, 50, 95):
        for t in range(3):
            amax = flat[t * BLOCK:(t + 1) * BLOCK, j].abs().max()
            assert q.scale[j, t] == (amax.double() / E4M3_MAX).float()
    assert torch.equal(dequantize(q).t(), dequantize(quantize(flat.t().contiguous())).t())


# --------------------------------------------------------------------------------------------------
# convert_tiles (1x128 -> 128x1), sec 3.3.3


def bounded_range(rows: int, cols: int, seed: int = 5, spread: int = 8) -> torch.Tensor:
    """|x| = U(0.5, 1) * 2^k, k in [-spread, spread]: any two elements within 2^(2 spread + 1)."""
    g = torch.Generator().manual_seed(seed)
    mag = (torch.rand(rows, cols, generator=g) * 0.5 + 0.5) * torch.exp2(
        torch.randint(-spread, spread + 1, (rows, cols), generator=g).float())
    x = mag * torch.where(torch.rand(rows, cols, generator=g) < 0.5, -1.0, 1.0)
    x[7, :] = 0.0  # exact zeros survive too
    return x


@pytest.mark.parametrize("fmt,spread", [("e5m6", 8), ("e4m3", 5)])
def test_convert_tiles_is_exact_with_pow2_scales(fmt, spread):
    # e4m3: spread 5 keeps every element within 2^11 of its new tile's max, above the subnormal range
    x = bounded_range(300, 200, spread=spread)
    q = quantize(x, 1, fmt, pow2=True)
    c = convert_tiles(q)
    assert c.data.shape == (200, 300) and c.scale.shape == (200, 3) and c.group_rows == 1
    assert c.fmt == fmt and c.pow2
    assert torch.equal(dequantize(c, torch.float64), dequantize(q, torch.float64).t())
    # and it is the same as quantizing the decoded values in the transposed layout directly
    direct = quantize_act_transposed(dequantize(q, torch.float64), fmt, pow2=True)
    assert torch.equal(c.scale, direct.scale) and torch.equal(c.payload(), direct.payload())


def test_convert_tiles_limits_of_exactness():
    # pow2 e5m6: an element below 2^-14 * new scale becomes subnormal in its new 128x1 tile and loses bits.
    # Row 1 is tiny (its own 1x128 tile encodes it with 7 significant bits). Columns 1.. have max 1 (new
    # scale 2^-15: row 1 stays normal); column 0 has max 1000 (new scale 2^-6: 2^-25 < 2^-20 is subnormal).
    x = torch.ones(128, 128)
    x[0, 0] = 1000.0
    x[1, :] = 1.234567 * 2.0**-25
    q = quantize(x, 1, "e5m6", pow2=True)
    c = convert_tiles(q)
    before, after = dequantize(q, torch.float64).t(), dequantize(c, torch.float64)
    assert not torch.equal(after, before)
    assert ((after - before).abs() <= 2.0**-21 * c.expanded_scale().double()).all()
    diff = (after - before) != 0
    assert diff.sum() == 1 and diff[0, 1]  # only the element sharing a tile with the 1000
    # non-pow2 e4m3 scales re-round: not exact, but within the half-ULP bound of the new tiling
    y = torch.randn(256, 256, generator=torch.Generator().manual_seed(6))
    q = quantize(y, 1)
    c = convert_tiles(q)
    before, after = dequantize(q, torch.float64).t(), dequantize(c, torch.float64)
    assert not torch.equal(after, before)
    assert ((after - before).abs() <= error_bound(before.float(), c)).all()


# --------------------------------------------------------------------------------------------------
# bad inputs


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="2-D"):
        quantize(torch.randn(128))
    with pytest.raises(ValueError, match="2-D"):
        quantize(torch.randn(2, 4, 128))
    with pytest.raises(ValueError, match="unknown fp8 format"):
        quantize(torch.randn(4, 128), fmt="e5m2")
    with pytest.raises(ValueError, match="pow2"):
        quantize(torch.randn(4, 128), fmt="e5m6")
    with pytest.raises(ValueError, match="group_rows"):
        quantize(torch.randn(4, 128), group_rows=0)
    with pytest.raises(ValueError, match="floating-point"):
        quantize(torch.ones(4, 128, dtype=torch.int32))
    for bad in (math.nan, math.inf, -math.inf):
        x = torch.randn(4, 128)
        x[2, 5] = bad
        with pytest.raises(ValueError, match="non-finite"):
            quantize(x)
        with pytest.raises(ValueError, match="non-finite"):
            quantize_act(x.reshape(2, 2, 128))
    with pytest.raises(ValueError, match="scale shape"):
        Quantized(torch.zeros(4, 128, dtype=torch.float8_e4m3fn), torch.ones(4, 2), 1, "e4m3")


def test_e4m3_decode_is_torch_cast():
    """The CPU's lookup decode gives what torch's cast gives, for every code (signed zeros and the two NaN
    codes included) and for a non-contiguous payload."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
    decoded, cast = e4m3_decode(codes), codes.to(torch.float32)
    assert torch.equal(decoded.isnan(), cast.isnan()) and cast.isnan().sum() == 2
    assert torch.equal(decoded.nan_to_num(), cast.nan_to_num())
    assert torch.equal(decoded.signbit(), cast.signbit())
    data = quantize(torch.randn(300, 256) * 100).data.t()
    assert not data.is_contiguous()
    assert torch.equal(e4m3_decode(data), data.to(torch.float32)) and e4m3_decode(data).shape == (256, 300)


@pytest.mark.parametrize("fmt,pow2", [("e4m3", False), ("e4m3", True), ("e5m6", True)])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_unchecked_quantize_keeps_a_non_finite_value_in_its_tile(fmt, pow2, bad):
    """``check_finite=False`` (the training path): no error and no read back to the host; the tile holding
    the bad value gets a non-finite scale and dequantizes to NaN throughout, so the NaN reaches the loss;
    every other tile is exactly what it is without the bad value."""
    x = torch.randn(4, 256)
    clean = quantize(x, 1, fmt, pow2)
    x[2, 5] = bad
    with HostReads() as reads:
        q = quantize(x, 1, fmt, pow2, check_finite=False)
    assert reads.count == 0
    assert not torch.isfinite(q.scale[2, 0])
    out, expected = dequantize(q), dequantize(clean)
    assert out[2, :BLOCK].isnan().all()
    others = torch.ones_like(out, dtype=torch.bool)
    others[2, :BLOCK] = False
    assert torch.equal(out[others], expected[others])
    with pytest.raises(ValueError, match="non-finite"):
        quantize(x, 1, fmt, pow2)  # the default still checks


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", ["e4m3", "e5m6"])
def test_fp32_scales_equal_the_fp64_quotient_rounded_once(fmt, device):
    """tile_scales divides an fp32 amax in fp32: the same scales as the quotient in fp64 rounded to fp32,
    over the whole fp32 range (subnormal amax, the floor, the largest float, zeros), on the CPU and on
    CUDA, where torch divides by a Python number as a product with its reciprocal (one rounding more:
    the last bit differed in some tiles from the CPU's and the fused kernel's on an H200)."""
    g = torch.Generator().manual_seed(0)
    exponents = torch.randint(-150, 120, (1 << 18,), generator=g).float()
    amax = torch.randn(1 << 18, generator=g).abs() * torch.exp2(exponents)
    amax = torch.cat([amax, torch.tensor([0.0, E4M3_MAX, E5M6_MAX, 448 * 2.0**-126, 448 * 2.0**-127, 3.4e38, 1e-45])])
    amax = amax[torch.isfinite(amax)]
    expected = (amax.double() / FORMAT_MAX[fmt]).clamp(min=MIN_SCALE).float().masked_fill(amax == 0, 1.0)
    assert torch.equal(tile_scales(amax.to(device), fmt, False).cpu(), expected)


def test_a_failing_fused_kernel_warns_once_and_falls_back(monkeypatch):
    """Where the fused Triton kernel cannot build or run (a GPU or Triton it was not made for), the training
    path warns and quantizes with the PyTorch operations: the same numbers, and the kernel is not tried
    again in the process."""
    from fp8 import quant

    calls = []

    class Broken:
        def quantize_rows(self, x, pow2):
            calls.append("rows")
            raise RuntimeError("PTX for sm_42 not supported")

        quantize_blocks = quantize_columns = quantize_rows

    monkeypatch.setattr(quant, "_FUSED_FAILURES", [])
    monkeypatch.setattr(quant, "_fused_kernels", lambda x, fmt: None if quant._FUSED_FAILURES else Broken())
    x = torch.randn(40, 300)
    with pytest.warns(RuntimeWarning, match="fused Triton quantization failed.*sm_42"):
        q = quantize(x, 1, check_finite=False)
    expected = quantize(x, 1)
    assert torch.equal(q.scale, expected.scale)
    assert torch.equal(q.data.view(torch.uint8), expected.data.view(torch.uint8))
    q_t = quantize_act_transposed(x, check_finite=False)
    assert torch.equal(q_t.data.view(torch.uint8), quantize_act_transposed(x).data.view(torch.uint8))
    assert calls == ["rows"] and len(quant._FUSED_FAILURES) == 1
