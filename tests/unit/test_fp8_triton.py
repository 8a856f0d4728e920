"""Triton FP8 GEMM (fp8/triton_gemm.py) against the reference GEMM (report sec 3.3.2).

Three groups of checks:

* ``TestInterpreted`` (CPU): the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``, set by a
  fixture for each test; fp8.triton_gemm wraps the kernel with ``triton.jit`` lazily, once per mode, so
  the variable only has to be set before the launch, whatever ran or was imported before). The kernel
  is fed the already-quantized fp8 payloads, so nothing is rounded to fp8 inside it (Triton's
  interpreter rounds fp32 -> fp8 differently from torch in a few values; decoding fp8, which is all the
  kernel does, is exact for every finite code: tested below; its fp32 -> bf16 cast truncates, so in
  interpret mode the backend stores fp32 and torch rounds). The interpreter's ``tl.dot`` decodes fp8 to
  fp16 (exact) and sums the 128
  products of a K block in fp32, so the only difference from ``gemm_reference`` (which sums each slice
  of 32 exactly) is fp32 rounding order: we allow ``1e-5 * sum_k |a_k b_k|`` per element (the worst
  case for 128 fp32 additions is ~128 * 2^-24 = 7.6e-6; seen: ~1e-7). With power-of-two scales and
  small integers every sum is exact in fp32 and the kernel must match bit for bit.
* ``TestCompiledForHopper`` (CPU): the kernel compiled (not run) for sm_90 with the arguments a launch
  at the report's shapes would pass: 4 FP8 WGMMAs (K = 32 each) per 128-wide K block, then promotion,
  and no register spills.
* ``TestCuda`` (needs a GPU): the same checks at the report's shapes (M 4096, K 7168, N 2048).
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is not installed (pip install -e '.[gpu]' or pip install triton)")
tl = pytest.importorskip("triton.language")

from fp8 import triton_gemm as tg  # noqa: E402
from fp8.gemm import gemm_reference, grouped_gemm_reference, k_grouped_gemm_reference  # noqa: E402
from fp8.quant import BLOCK, Quantized, dequantize, quantize  # noqa: E402
from fp8.triton_gemm import KernelConfig, TritonBackend, expert_tiles  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

INTERPRET_RTOL = 1e-5  # of sum_k |a_k b_k|, against gemm_reference (fp32 summation order only)
# On the GPU the 4 WGMMAs of a K block accumulate in the Tensor Cores' ~14-bit accumulator; the
# reference's model of it bounds the error by 4 * 2^-13 of sum |a b| (see tests/unit/test_fp8_gemm.py).
# The hardware's exact truncation rule is not documented: allow 2^-8, still far below a wrong scale.
CUDA_RTOL = 2.0**-8


def magnitude(a: Quantized, b: Quantized) -> torch.Tensor:
    """sum_k |a_k b_k| (fp64) of the dequantized operands: the scale of any summation error."""
    return dequantize(a, torch.float64).abs() @ dequantize(b, torch.float64).abs().T


def operands(m: int, n: int, k: int, seed: int, device: str = "cpu"):
    """x [m, k], w [n, k] with rows/columns of different magnitudes (so the tile scales differ)."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(m, k, generator=g, device=device)
    x = x * torch.exp2(torch.randint(-4, 5, (m, 1), generator=g, device=device).float())
    w = torch.randn(n, k, generator=g, device=device)
    w = w * torch.exp2(torch.randint(-4, 5, (1, k), generator=g, device=device).float())
    return x, w


def integer_operand(rows: int, cols: int, seed: int, device: str = "cpu") -> torch.Tensor:
    """Integers |v| <= 4 times 2^e per 128-column block, e in [-2, 1]. With pow2 scales the payloads are
    v * 2^j (exact in e4m3); a block's products share one power of two and sum to at most 128 * 16 = 2^11
    of it (exact in a 14-bit accumulator); every partial sum over K <= 7168 is a multiple of 2^-4 below
    56 * 2^11 * 2^2 < 2^19 (exact in fp32). So all kernels agree bit for bit with the exact product."""
    g = torch.Generator(device=device).manual_seed(seed)
    v = torch.randint(-4, 5, (rows, cols), generator=g, device=device).float()
    blocks = -(-cols // BLOCK)
    exp = torch.randint(-2, 2, (1, blocks), generator=g, device=device).float()
    return v * torch.exp2(exp).repeat_interleave(BLOCK, 1)[:, :cols]


def to_cpu(q: Quantized) -> Quantized:
    return Quantized(q.data.cpu(), q.scale.cpu(), q.group_rows, q.fmt, q.pow2)


def stacked_weights(experts: int, n: int, k: int, seed: int, device: str, integer: bool = False) -> Quantized:
    """Stacked expert weights [experts * n, k] in 128x128 blocks, quantized expert by expert (same result
    as quantizing the stack: no block straddles two experts) to keep the fp32 temporaries small."""
    parts = []
    for e in range(experts):
        w = integer_operand(n, k, seed + e, device) if integer else operands(1, n, k, seed + e, device)[1]
        parts.append(quantize(w, BLOCK, pow2=integer))
    return Quantized(torch.cat([q.data for q in parts]), torch.cat([q.scale for q in parts]), BLOCK, "e4m3",
                     integer)


def assert_close(out: torch.Tensor, ref: torch.Tensor, mag: torch.Tensor, rtol: float) -> float:
    """Element-wise |out - ref| <= rtol * mag; returns the largest error / mag."""
    err = (out.double() - ref.double()).abs()
    worst = float((err / mag.clamp(min=1e-30)).max()) if err.numel() else 0.0
    assert out.shape == ref.shape
    assert (err <= rtol * mag).all(), f"max error {worst:.3g} of sum|ab| > {rtol:.3g}"
    return worst


def routed_counts(tokens: int, experts: int, top_k: int, seed: int) -> list[int]:
    """Rows per expert of a random top-k routing of ``tokens`` tokens (some experts may get none)."""
    g = torch.Generator().manual_seed(seed)
    choice = torch.rand(tokens, experts, generator=g).topk(top_k, dim=1).indices
    return torch.bincount(choice.flatten(), minlength=experts).tolist()


# --------------------------------------------------------------------------------------------------
# Interpreter (CPU)


@pytest.fixture
def interpret(triton_interpreter):
    """Triton's interpreter (conftest.py's ``triton_interpreter``: skips where it cannot run our loops)."""


SMALL = KernelConfig(block_m=32, block_n=64, num_warps=4, num_stages=2, group_m=2)  # several tiles per dim


def _dot_kernel(x_ptr, y_ptr, out_ptr, SIZE: tl.constexpr):
    r = tl.arange(0, SIZE)
    x = tl.load(x_ptr + r[:, None] * SIZE + r[None, :])
    y = tl.load(y_ptr + r[:, None] * SIZE + r[None, :])
    tl.store(out_ptr + r[:, None] * SIZE + r[None, :], tl.dot(x, y, out_dtype=tl.float32))


@pytest.mark.usefixtures("interpret")
class TestInterpreted:
    def test_interpreter_dot_decodes_every_finite_e4m3_code_exactly(self):
        codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
        finite = torch.where(codes.float().isfinite(), codes.float(), 0.0).to(torch.float8_e4m3fn).view(16, 16)
        out = torch.empty(16, 16)
        triton.jit(_dot_kernel)[(1,)](finite, torch.eye(16).to(torch.float8_e4m3fn), out, SIZE=16)
        assert torch.equal(out, finite.float())

    @pytest.mark.parametrize("m,n,k,rows_a,rows_b", [
        (1, 1, 1, 1, 128),
        (100, 200, 300, 1, 128),  # activations x weights, all dims ragged
        (160, 256, 384, 128, 128),  # 128x128 on both sides (M ragged)
        (33, 130, 129, 1, 1),  # Wgrad-like: 1x128 on both sides, K ragged by one
        (128, 128, 256, 128, 1),
    ])
    def test_dense_matches_reference(self, m, n, k, rows_a, rows_b):
        x, w = operands(m, n, k, seed=m + n + k)
        a, b = quantize(x, rows_a), quantize(w, rows_b)
        out = TritonBackend().gemm(a, b)
        assert out.dtype == torch.float32
        assert_close(out, gemm_reference(a, b), magnitude(a, b), INTERPRET_RTOL)

    @pytest.mark.parametrize("rows_b", [1, 128])
    def test_dense_small_tiles_and_swizzle(self, rows_b):
        """32x64 tiles, L2-swizzle groups of 2 M-tiles: 4 x 4 tiles with ragged last ones; a
        128-row scale block of b spans two N-tiles."""
        x, w = operands(100, 200, 300, seed=5)
        a, b = quantize(x, 1), quantize(w, rows_b)
        out = TritonBackend(dense_config=SMALL).gemm(a, b)
        assert_close(out, gemm_reference(a, b), magnitude(a, b), INTERPRET_RTOL)

    @pytest.mark.parametrize("rows_a,rows_b", [(1, 128), (128, 128), (1, 1)])
    def test_dense_exact_with_pow2_scales(self, rows_a, rows_b):
        a = quantize(integer_operand(70, 300, seed=1), rows_a, pow2=True)
        b = quantize(integer_operand(90, 300, seed=2), rows_b, pow2=True)
        out = TritonBackend(dense_config=SMALL).gemm(a, b)
        assert torch.equal(out, gemm_reference(a, b))
        assert torch.equal(out.double(), dequantize(a, torch.float64) @ dequantize(b, torch.float64).T)

    def test_bf16_output(self):
        x, w = operands(64, 96, 256, seed=3)
        a, b = quantize(x, 1), quantize(w, 128)
        out = TritonBackend().gemm(a, b, out_dtype=torch.bfloat16)
        assert out.dtype == torch.bfloat16
        ref = gemm_reference(a, b)
        # one bf16 rounding of (almost) the reference value
        assert ((out.double() - ref.double()).abs() <= 2.0**-8 * ref.abs().double()
                + INTERPRET_RTOL * magnitude(a, b)).all()

    def test_e5m6_operand(self):
        """An E5M6 operand (sec 3.3.3's cached activation) runs as exact fp16 payloads."""
        x, w = operands(40, 130, 260, seed=4)
        a, b = quantize(x, 1, "e5m6", pow2=True), quantize(w, 128)
        out = TritonBackend().gemm(a, b)
        assert_close(out, gemm_reference(a, b), magnitude(a, b), INTERPRET_RTOL)

    def test_row_slice_operand(self):
        """A row slice (storage offset) of a quantized activation."""
        x, w = operands(96, 64, 256, seed=6)
        a, b = quantize(x, 1).row_slice(17, 90), quantize(w, 128)
        assert_close(TritonBackend().gemm(a, b), gemm_reference(a, b), magnitude(a, b), INTERPRET_RTOL)

    @pytest.mark.parametrize("counts,n,rows_a,rows_b", [
        ([40, 0, 70, 18], 128, 1, 128),  # an expert with no rows, ragged expert sizes, K = 300
        ([0, 5, 0, 33, 1], 96, 1, 1),  # N not a multiple of the tile; 1x128 weight tiles
        ([128, 0, 32], 128, 128, 128),  # 128x128 activation tiles (boundaries on tile boundaries)
    ])
    def test_grouped_matches_reference(self, counts, n, rows_a, rows_b):
        t, k = sum(counts), 300
        x, w = operands(t, len(counts) * n, k, seed=sum(counts))
        a, b = quantize(x, rows_a), quantize(w, rows_b)
        backend = TritonBackend(grouped_config=KernelConfig(block_m=32, block_n=64, num_warps=4))
        out = backend.grouped_gemm(a, b, counts)
        ref = grouped_gemm_reference(a, b, counts)
        mag = torch.cat([magnitude(a.row_slice(s, s + c), b.row_slice(e * n, (e + 1) * n))
                         for e, (s, c) in enumerate(zip(_starts(counts), counts))])
        assert_close(out, ref, mag, INTERPRET_RTOL)

    def test_grouped_tiles_stay_inside_their_expert(self):
        """The interpreter runs programs in order, so a tile writing past its expert's last row would be
        overwritten by the next expert's tiles: run the tile table backwards to catch that."""
        counts = [37, 0, 70, 21]
        a = quantize(integer_operand(sum(counts), 256, seed=9), 1, pow2=True)
        b = quantize(integer_operand(len(counts) * 64, 256, seed=10), 1, pow2=True)
        backend = TritonBackend(grouped_config=KernelConfig(block_m=32, block_n=32))
        out, launch = backend.plan_grouped_gemm(a, b, counts)
        launch.args = launch.args[:5] + (launch.args[5].flip(0).contiguous(),) + launch.args[6:]
        launch.run()
        assert torch.equal(out, grouped_gemm_reference(a, b, counts))

    def test_grouped_default_config_exact(self):
        counts = [70, 0, 3, 64, 1]
        a = quantize(integer_operand(sum(counts), 256, seed=7), 1, pow2=True)
        b = quantize(integer_operand(len(counts) * 128, 256, seed=8), 128, pow2=True)
        out = TritonBackend().grouped_gemm(a, b, counts)
        assert torch.equal(out, grouped_gemm_reference(a, b, counts))

    @pytest.mark.parametrize("offsets", [[0, 128, 128, 384, 512], [0, 0, 256], [0, 640]])
    def test_k_grouped_matches_reference(self, offsets):
        """The experts' Wgrad in one launch: expert e reduces over its own 128-aligned token columns (an
        expert without tokens gets zeros, columns past the last offset are not read); M and N ragged
        against 32x16 tiles."""
        x, w = operands(40, 24, 640, seed=11)
        a, b = quantize(x, 1), quantize(w, 1)
        backend = TritonBackend(grouped_config=KernelConfig(block_m=32, block_n=16, num_warps=4))
        out = backend.k_grouped_gemm(a, b, offsets)
        ref = k_grouped_gemm_reference(a, b, offsets)
        assert out.shape == (len(offsets) - 1, 40, 24)
        for e, (start, stop) in enumerate(zip(offsets, offsets[1:])):
            if stop == start:
                assert torch.equal(out[e], torch.zeros(40, 24))
            else:
                mag = magnitude(a.col_slice(start, stop), b.col_slice(start, stop))
                assert_close(out[e], ref[e], mag, INTERPRET_RTOL)

    def test_k_grouped_exact_with_pow2_scales_and_tensor_offsets(self):
        a = quantize(integer_operand(70, 768, seed=12), 1, pow2=True)
        b = quantize(integer_operand(90, 768, seed=13), 1, pow2=True)
        offsets = torch.tensor([0, 256, 256, 384, 768])
        out = TritonBackend().k_grouped_gemm(a, b, offsets)
        assert torch.equal(out, k_grouped_gemm_reference(a, b, offsets))
        out16 = TritonBackend().k_grouped_gemm(a, b, offsets, out_dtype=torch.bfloat16)
        assert torch.equal(out16, out.to(torch.bfloat16))

    def test_empty_operands(self):
        backend = TritonBackend()
        a, b = quantize(torch.randn(0, 64)), quantize(torch.randn(8, 64), 128)
        assert backend.gemm(a, b).shape == (0, 8)
        a = quantize(torch.randn(4, 0))
        assert torch.equal(backend.gemm(a, quantize(torch.randn(8, 0))), torch.zeros(4, 8))
        a = quantize(torch.randn(0, 64))
        assert backend.grouped_gemm(a, quantize(torch.randn(16, 64)), [0, 0]).shape == (0, 8)
        a, b = quantize(torch.randn(8, 0)), quantize(torch.randn(4, 0))
        assert torch.equal(backend.k_grouped_gemm(a, b, [0, 0, 0]), torch.zeros(2, 8, 4))


def _starts(counts: list[int]) -> list[int]:
    return [sum(counts[:e]) for e in range(len(counts))]


# --------------------------------------------------------------------------------------------------
# Host-side logic (no kernel launch)


def test_expert_tiles():
    """Each expert's rows in tiles of at most block_m rows, then empty tiles up to the worst case
    ceil(T / block_m) + E, computed the same from a list or a tensor (a device tensor stays on the device:
    the table needs no host read)."""
    tiles = expert_tiles([5, 0, 9, 4], 4, 18).tolist()
    used = [[0, 4, 0], [4, 5, 0], [5, 9, 2], [9, 13, 2], [13, 14, 2], [14, 18, 3]]
    assert tiles == used + [[18, 18, 0]] * 3
    assert torch.equal(expert_tiles(torch.tensor([5, 0, 9, 4]), 4, 18), expert_tiles([5, 0, 9, 4], 4, 18))
    assert expert_tiles([0, 0], 64, 0).tolist() == [[0, 0, 0]] * 2
    for seed in range(20):  # the worst case bounds every routing
        counts = routed_counts(50, 8, 3, seed)
        table = expert_tiles(counts, 16, 150)
        assert sum(-(-c // 16) for c in counts) <= table.shape[0] == 10 + 8
        assert (table[:, 1] - table[:, 0]).sum() == 150
    with pytest.raises(ValueError, match="at least one expert"):
        expert_tiles([], 64, 0)


def test_validation_errors(monkeypatch):
    backend = TritonBackend()
    a, b = quantize(torch.randn(8, 256)), quantize(torch.randn(256, 256), 128)
    with pytest.raises(ValueError, match="K mismatch"):
        backend.gemm(a, quantize(torch.randn(16, 128)))
    with pytest.raises(ValueError, match="out_dtype"):
        backend.gemm(a, b, out_dtype=torch.float16)
    with pytest.raises(ValueError, match="group_rows"):
        backend.gemm(a, quantize(torch.randn(64, 256), 64))
    with pytest.raises(ValueError, match="sum to"):
        backend.grouped_gemm(a, b, [4, 3])
    with pytest.raises(ValueError, match="do not split"):
        backend.grouped_gemm(a, b, [4, 2, 2])
    with pytest.raises(ValueError, match="straddle experts of"):
        backend.grouped_gemm(a, quantize(torch.randn(192, 256), 128), [4, 4, 0])
    with pytest.raises(ValueError, match="activation tiles"):
        backend.grouped_gemm(quantize(torch.randn(200, 256), 128), b, [100, 100])
    wgrad_a, wgrad_b = quantize(torch.randn(8, 256)), quantize(torch.randn(4, 256))
    for offsets in ([0, 100, 256], [0, 256, 128], [128, 256], [0, 384], [0]):
        with pytest.raises(ValueError, match="multiples of 128"):
            backend.k_grouped_gemm(wgrad_a, wgrad_b, offsets)
    with pytest.raises(ValueError, match="group_rows 1"):
        backend.k_grouped_gemm(wgrad_a, quantize(torch.randn(4, 256), 128), [0, 256])
    with pytest.raises(ValueError, match="multiple of 128"):
        backend.k_grouped_gemm(quantize(torch.randn(8, 200)), quantize(torch.randn(4, 200)), [0, 128])
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if not tg.interpret_mode():
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            backend.gemm(a, b)


def test_import_without_triton_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    monkeypatch.delitem(sys.modules, "fp8.triton_gemm")
    with pytest.raises(ImportError, match=r"pip install -e '\.\[gpu\]'.*pip install triton"):
        importlib.import_module("fp8.triton_gemm")


# --------------------------------------------------------------------------------------------------
# Compiled for Hopper (CPU: compile only)

REPORT_DENSE = (4096, 2048, 7168)  # tokens x N x K (N 2048: an expert-sized projection, K 7168: hidden)


def _fp8_zeros(rows: int, cols: int, group_rows: int) -> Quantized:
    scale = torch.ones(-(-rows // group_rows), -(-cols // BLOCK))
    return Quantized(torch.zeros(rows, cols, dtype=torch.float8_e4m3fn), scale, group_rows, "e4m3")


_TYPES = {torch.float8_e4m3fn: "fp8e4nv", torch.float16: "fp16", torch.float32: "fp32",
          torch.bfloat16: "bf16", torch.int32: "i32", torch.int64: "i64"}


def _compile_for_sm90(launch: tg.Launch):
    return compile_for_sm90(tg._fp8_gemm_kernel, launch.args, launch.constexprs, launch.options)


def compile_for_sm90(kernel, args: tuple, constexprs: dict, options: dict):
    """Compile ``kernel`` (a plain function) as a launch with these arguments would on an H100/H800,
    following Triton's specialization rules: ints equal to 1 become constants, pointers and ints
    divisible by 16 get a divisibility hint."""
    from triton.backends.compiler import GPUTarget

    fn = triton.jit(kernel)
    signature, constants, attrs = {}, dict(constexprs), {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        value = args[index]
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + _TYPES[value.dtype]
            aligned = value.data_ptr() % 16 == 0
        elif value == 1:
            signature[name], constants[name] = "constexpr", 1
            continue
        else:
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            aligned = value % 16 == 0
        if aligned:
            attrs[(index,)] = [["tt.divisibility", 16]]
    try:
        src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs)
    except TypeError as exc:  # written against Triton 3.9's compiler API
        pytest.skip(f"Triton {triton.__version__}'s ASTSource differs ({exc})")
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def stack_bytes(cubin: bytes, tmp_path) -> int | None:
    """Per-thread stack (register spills) from cuobjdump, or None if the tool is not available."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None
    path = tmp_path / "kernel.cubin"
    path.write_bytes(cubin)
    usage = subprocess.run([tool, "--dump-resource-usage", str(path)], capture_output=True, text=True).stdout
    match = re.search(r"STACK:(\d+)", usage)
    return int(match.group(1)) if match else None


@pytest.mark.usefixtures("compiled_mode")
class TestCompiledForHopper:
    @pytest.mark.parametrize("grouped", ["dense", "dense_wgrad", "grouped", "k_grouped"])
    def test_four_fp8_wgmmas_per_k_block_then_promotion(self, grouped, tmp_path):
        m, n, k = REPORT_DENSE
        a = _fp8_zeros(m, k, 1)
        backend = TritonBackend()
        if grouped == "dense_wgrad":  # dW [N, K] over the 4096 tokens: both operands in 1x128 tiles
            _, launch = backend.plan_gemm(_fp8_zeros(n, m, 1), _fp8_zeros(k, m, 1))
            cfg = backend.dense_config
        elif grouped == "k_grouped":  # Wgrad of 16 experts: dW [N, K] per expert over its 4096 / 16 tokens
            a, b = _fp8_zeros(n, m, 1), _fp8_zeros(k, m, 1)
            _, launch = backend.plan_k_grouped_gemm(a, b, torch.arange(0, m + 1, m // 16))
            cfg = backend.grouped_config
        elif grouped == "grouped":
            experts = 16
            b = _fp8_zeros(experts * n, k, BLOCK)
            _, launch = backend.plan_grouped_gemm(a, b, routed_counts(m // 8, experts, 8, seed=0))
            cfg = backend.grouped_config
        else:
            b = _fp8_zeros(n, k, BLOCK)
            _, launch = backend.plan_gemm(a, b)
            cfg = backend.dense_config
        kernel = _compile_for_sm90(launch)
        ptx = kernel.asm["ptx"]
        # The loop body (not unrolled) holds one 128-wide K block: 4 WGMMAs of K = 32 on e4m3 operands
        # with an f32 (Tensor Core) accumulator, each warpgroup (4 warps) owning 64 rows of the tile.
        assert cfg.block_m == 64 * (cfg.num_warps // 4)
        wgmmas = re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n(\d+)k32\.f32\.e4m3\.e4m3", ptx)
        assert [int(width) for width in wgmmas] == [cfg.block_n] * (BLOCK // 32)
        assert len(re.findall(r"wgmma\.mma_async", ptx)) == BLOCK // 32
        # Promotion: one FMA per accumulator element per K block (acc += partial * (scale_a * scale_b)).
        assert ptx.count("fma.rn.f32") >= cfg.block_m * cfg.block_n // (32 * cfg.num_warps)
        stack = stack_bytes(kernel.asm["cubin"], tmp_path)
        if stack is not None:
            assert stack == 0, f"register spills: {stack} bytes of stack per thread"


# --------------------------------------------------------------------------------------------------
# GPU


@pytest.fixture
def cuda_compiled(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (sm_89+ for fp8 tl.dot)")
@pytest.mark.usefixtures("cuda_compiled")
class TestCuda:
    @pytest.mark.parametrize("m,n,k,rows_a,rows_b", [
        (4096, 2048, 7168, 1, 128),  # report shape: tokens x N x hidden
        (4096, 7168, 2048, 1, 128),  # down-projection-like (K 2048)
        (4000, 1536, 7168, 1, 128),  # ragged M, N 1536
        (1000, 2000, 3000, 1, 1),  # ragged everything, K % 128 != 0 (still % 8)
        (2048, 2048, 4096, 128, 128),
    ])
    def test_dense_vs_exact(self, m, n, k, rows_a, rows_b):
        x, w = operands(m, n, k, seed=m + n + k, device="cuda")
        a, b = quantize(x, rows_a), quantize(w, rows_b)
        out = TritonBackend().gemm(a, b)
        da, db = dequantize(a, torch.float64), dequantize(b, torch.float64)
        worst = assert_close(out, da @ db.T, da.abs() @ db.abs().T, CUDA_RTOL)
        # the CPU reference (fp32 accumulator model) on the first rows
        rows, wb = to_cpu(a.row_slice(0, min(m, 128 if rows_a == 128 else 64))), to_cpu(b)
        ref = gemm_reference(rows, wb)
        assert_close(out[: ref.shape[0]].cpu(), ref, magnitude(rows, wb), CUDA_RTOL)
        print(f"dense {m}x{n}x{k}: max |err| / sum|ab| = {worst:.3g}")

    def test_dense_exact_with_pow2_scales(self):
        m, n, k = REPORT_DENSE
        a = quantize(integer_operand(m, k, seed=1, device="cuda"), 1, pow2=True)
        b = quantize(integer_operand(n, k, seed=2, device="cuda"), 128, pow2=True)
        out = TritonBackend().gemm(a, b)
        assert torch.equal(out.double(), dequantize(a, torch.float64) @ dequantize(b, torch.float64).T)
        out16 = TritonBackend().gemm(a, b, out_dtype=torch.bfloat16)
        assert torch.equal(out16, out.to(torch.bfloat16))

    @pytest.mark.parametrize("experts,n,k", [(256, 2048, 7168), (64, 7168, 2048)])
    def test_grouped_vs_exact(self, experts, n, k):
        """Top-8 routing of 1024 tokens over the experts (some get no rows); checks about 12 experts."""
        counts = routed_counts(1024, experts, 8, seed=experts)
        x, _ = operands(sum(counts), 1, k, seed=1, device="cuda")
        a, b = quantize(x, 1), stacked_weights(experts, n, k, seed=2, device="cuda")
        out = TritonBackend().grouped_gemm(a, b, counts)
        starts = _starts(counts)
        check = sorted(set([counts.index(0)] if 0 in counts else []) | set(range(0, experts, max(1, experts // 11))))
        worst = 0.0
        for e in check:
            s, c = starts[e], counts[e]
            da = dequantize(a.row_slice(s, s + c), torch.float64)
            db = dequantize(b.row_slice(e * n, (e + 1) * n), torch.float64)
            worst = max(worst, assert_close(out[s:s + c], da @ db.T, da.abs() @ db.abs().T, CUDA_RTOL))
        print(f"grouped {experts} experts x {n} x {k}: max |err| / sum|ab| = {worst:.3g}")

    def test_grouped_exact_with_pow2_scales(self):
        experts, n, k = 32, 2048, 7168
        counts = routed_counts(512, experts, 8, seed=3)
        a = quantize(integer_operand(sum(counts), k, seed=4, device="cuda"), 1, pow2=True)
        b = stacked_weights(experts, n, k, seed=5, device="cuda", integer=True)
        out = TritonBackend().grouped_gemm(a, b, counts)
        ref = torch.cat([dequantize(a.row_slice(s, s + c), torch.float64)
                         @ dequantize(b.row_slice(e * n, (e + 1) * n), torch.float64).T
                         for e, (s, c) in enumerate(zip(_starts(counts), counts))])
        assert torch.equal(out.double(), ref)

    def test_k_grouped_exact_with_pow2_scales(self):
        """The experts' Wgrad in one launch at an expert's shape: dW [2048, 7168] of 8 experts over their
        routed tokens (1024 tokens, top-2), each expert's tokens starting on a 128-column tile."""
        counts = routed_counts(1024, 8, 2, seed=6)
        offsets = torch.tensor([0, *[-(-c // BLOCK) * BLOCK for c in counts]]).cumsum(0)
        tokens = int(offsets[-1])
        a = quantize(integer_operand(2048, tokens, seed=7, device="cuda"), 1, pow2=True)  # dY^T
        b = quantize(integer_operand(7168, tokens, seed=8, device="cuda"), 1, pow2=True)  # X^T
        out = TritonBackend().k_grouped_gemm(a, b, offsets.cuda())
        assert out.shape == (8, 2048, 7168)
        da, db = dequantize(a, torch.float64), dequantize(b, torch.float64)
        for e in (0, 3, 7):
            start, stop = int(offsets[e]), int(offsets[e + 1])
            assert torch.equal(out[e].double(), da[:, start:stop] @ db[:, start:stop].T)
