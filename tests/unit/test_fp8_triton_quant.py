"""fp8/triton_quant.py, the fused E4M3 quantization kernel, against fp8.quant's PyTorch operations: the same
payload bits and scales, for 1x128 tiles, 128x128 blocks, 128x1 tiles written transposed, and the first and
the last from one read.

* Interpreted (CPU): Triton's interpreter binds ``tl.max`` to the mode ``triton`` was imported in, so
  these checks run in a subprocess started with ``TRITON_INTERPRET=1``.
* Compiled for Hopper (CPU, no GPU needed): the kernel compiles for sm_90; its divisions are IEEE
  (``div.rn``: the same quotients as torch), its cast saturates to E4M3, no register spills.
* CUDA: the same bit-for-bit checks on a GPU (skipped without one), where ``fp8.quant`` uses the kernel.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fp8.quant import BLOCK, quantize, quantize_act_transposed, quantize_both_layouts

triton = pytest.importorskip("triton", reason="Triton is not installed (the gpu extra)")

REPO = Path(__file__).resolve().parents[2]

# (rows, cols): whole tiles, partial tiles in both dims, fewer rows than a program's 32, one column
SHAPES = [(256, 512), (300, 200), (7, 130), (129, 1)]


def inputs(rows: int, cols: int, dtype: torch.dtype, device: str, seed: int = 0) -> torch.Tensor:
    """Normal values spread over 2^-30 .. 2^30 by row and by column (so scales differ per tile and some
    payloads are subnormal), one all-zero 128-column tile, one row of exact 448s."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * torch.exp2(torch.randint(-30, 30, (rows, 1), generator=g).float())
    x = x * torch.exp2(torch.randint(-4, 4, (1, cols), generator=g).float())
    x[: min(rows, 3), :BLOCK] = 0.0
    x[-1] = 448.0
    return x.to(dtype).to(device)


def same(a, b) -> None:
    assert a.data.shape == b.data.shape and a.scale.shape == b.scale.shape, (a.data.shape, b.data.shape)
    assert (a.group_rows, a.fmt, a.pow2) == (b.group_rows, b.fmt, b.pow2)
    assert torch.equal(a.scale, b.scale)
    assert torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8))


def check_against_reference(device: str = "cpu") -> int:
    """Every layout, shape, input dtype and scale rule: the kernel's Quantized equals fp8.quant's (which
    checks its input and so never takes the kernel). Returns how many cases were compared."""
    from fp8 import triton_quant as tq

    cases = 0
    for rows, cols in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            for pow2 in (False, True):
                x = inputs(rows, cols, dtype, device)
                same(tq.quantize_rows(x, pow2), quantize(x, 1, "e4m3", pow2))
                same(tq.quantize_blocks(x, pow2), quantize(x, BLOCK, "e4m3", pow2))
                same(tq.quantize_columns(x, pow2), quantize_act_transposed(x, "e4m3", pow2))
                rows_q, columns_q = tq.quantize_rows_and_columns(x, pow2)  # both layouts from one read
                same(rows_q, quantize(x, 1, "e4m3", pow2))
                same(columns_q, quantize_act_transposed(x, "e4m3", pow2))
                cases += 4
    # power-of-two scales where amax / 448 lies next to a power of two: 448 * 2^e times 1 + k ulp, k in
    # -4..4, e over the normal range; the kernel rounds the fp32 quotient up, fp8.quant the fp64 one
    k = torch.arange(-4, 5, dtype=torch.float32)
    e = torch.arange(-120, 118, 7, dtype=torch.float32)
    amax = (448.0 * torch.exp2(e))[:, None] * (1 + k * 2.0**-23)[None, :]
    x = torch.full((amax.numel(), 256), 2.0**-140).to(device)  # subnormal filler below every amax
    x[:, 3] = amax.flatten().to(device)
    x[:, 200] = -amax.flatten().to(device) / 3
    same(tq.quantize_rows(x, True), quantize(x, 1, "e4m3", True))
    same(tq.quantize_columns(x.t(), True), quantize_act_transposed(x.t(), "e4m3", True))
    for got, expected in zip(tq.quantize_rows_and_columns(x, True),
                             (quantize(x, 1, "e4m3", True), quantize_act_transposed(x, "e4m3", True))):
        same(got, expected)
    cases += 3
    # the experts' aligned token layout built inside the kernel from a row index (-1: a zero row)
    from fp8.experts import ExpertRows

    for counts in ([5, 0, 130, 1, 256], [0, 0], [300]):
        x = inputs(sum(counts), 200, torch.bfloat16, device, seed=1) if sum(counts) else torch.zeros(0, 200, device=device)
        rows = ExpertRows.of(torch.tensor(counts, device=device), x.shape[0])
        got = tq.quantize_rows_and_columns(x, False, rows.sources())
        same(got[0], quantize(x, 1, "e4m3"))
        same(got[1], rows.quantize_tokens(x)[0])
        cases += 1
    empty = torch.zeros(0, 256, device=device)
    assert tq.quantize_rows(empty).data.shape == (0, 256)
    return cases


def test_interpreted_kernel_equals_the_pytorch_operations():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    code = ("from tests.unit.test_fp8_triton_quant import check_against_reference; "
            "print('cases', check_against_reference())")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"cases {len(SHAPES) * 2 * 2 * 4 + 3 + 3}" in result.stdout


@pytest.mark.parametrize("layout", ["rows", "blocks", "columns", "both", "both-indexed"])
@pytest.mark.parametrize("pow2", [False, True], ids=["amax-scales", "pow2-scales"])
def test_compiles_for_hopper_with_ieee_division_and_a_saturating_cast(compiled_mode, layout, pow2, tmp_path):
    from fp8 import triton_quant as tq
    from tests.unit.test_fp8_triton import compile_for_sm90, stack_bytes

    x = torch.empty(4096, 7168, dtype=torch.bfloat16)
    if layout == "rows":
        p = tq.plan(x, 4096, 7168, True, pow2, tq.ROWS_PER_PROGRAM)
    elif layout == "blocks":
        p = tq.plan(x, 4096, 7168, False, pow2, BLOCK)
    elif layout == "columns":
        p = tq.plan(x.t(), 7168, 4096, True, pow2, tq.ROWS_PER_PROGRAM)
    elif layout == "both":
        p = tq.plan(x, 4096, 7168, True, pow2, BLOCK, columns_too=True)
    else:  # the experts' aligned layout, built from a row index
        p = tq.plan(x, 4096 + 8192, 7168, True, pow2, BLOCK, columns_too=True,
                    row_index=torch.empty(4096 + 8192, dtype=torch.int64))
    kernel = compile_for_sm90(tq._quantize_kernel, p.args, p.constexprs, p.options)
    ptx = kernel.asm["ptx"]
    assert "div.rn.f32" in ptx and "div.full" not in ptx and "div.approx" not in ptx  # torch's quotients
    assert "rcp.approx" not in ptx and ".ftz" not in ptx  # subnormal inputs and scales kept, as torch keeps them
    assert "min.NaN" in ptx or "max.NaN" in ptx  # the clamp lets a NaN through
    assert "cvt.rn.satfinite.e4m3x2.f32" in ptx  # round to nearest even, saturating (clamped before anyway)
    stack = stack_bytes(kernel.asm["cubin"], tmp_path)
    if stack is not None:
        assert stack == 0, f"register spills: {stack} bytes of stack per thread"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_kernel_equals_the_pytorch_operations(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert check_against_reference("cuda") == len(SHAPES) * 2 * 2 * 4 + 3 + 3
    # and fp8.quant takes it on the training path (check_finite=False), with the same numbers
    from fp8 import quant

    x = inputs(300, 200, torch.bfloat16, "cuda")
    assert quant._fused_kernels(x, "e4m3") is not None
    same(quantize(x, 1, check_finite=False), quantize(x, 1))
    for got, expected in zip(quantize_both_layouts(x, check_finite=False), (quantize(x, 1), quantize_act_transposed(x))):
        same(got, expected)
    x[5, 9] = float("nan")  # the training path's NaN reaches the GEMM output (then the loss)
    for q in (quantize(x, 1, check_finite=False), quantize(x, BLOCK, check_finite=False),
              quantize_act_transposed(x, check_finite=False)):
        assert q.dequantize().isnan().any()
    assert not quant._FUSED_FAILURES
