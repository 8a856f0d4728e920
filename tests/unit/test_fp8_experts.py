"""The routed experts' FP8 layout (fp8/experts.py): each expert's tokens start on a 128-token tile, so one
quantization and one K-grouped GEMM per weight give every expert's Wgrad (report sec 3.3.1-3.3.3).

The property everything rests on: zero rows change no tile's max-abs, so the aligned layout's tiles are
exactly those of quantizing each expert alone; the reference backend then gives bit-identical weight
gradients to the per-expert loop, and every other backend is compared with the reference.
"""

from __future__ import annotations

import functools

import pytest
import torch

from fp8.backend import EmulateBackend, ReferenceBackend
from fp8.experts import ExpertRows, StepGateUp, expert_wgrad, fp8_expert_ffn, quantize_experts
from fp8.gemm import gemm_reference, k_grouped_gemm_reference
from fp8.quant import BLOCK, dequantize_2d, quantize, quantize_act_transposed

pytestmark = pytest.mark.usefixtures("single_thread")

EMULATE, REFERENCE = EmulateBackend(), ReferenceBackend()
COUNTS = [5, 0, 130, 1, 256]


def sorted_rows(counts: list[int], cols: int, seed: int) -> torch.Tensor:
    """Rows of very different magnitudes per expert (so a tile straddling two experts would show)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.cat([torch.full((c,), 4.0 ** (e - 2)) for e, c in enumerate(counts)])
    return torch.randn(sum(counts), cols, generator=g) * scale[:, None]


def test_expert_rows_layout():
    rows = ExpertRows.of(torch.tensor(COUNTS), sum(COUNTS))
    assert rows.offsets.tolist() == [0, 128, 128, 384, 512, 768]
    assert rows.padded_rows == 128 * (-(-392 // 128) + 5)  # the worst case: 4 tiles of rows + one per expert
    expected = [*range(0, 5), *range(128, 258), 384, *range(512, 768)]
    assert rows.destinations().tolist() == expected


def test_quantize_tokens_are_each_experts_own_tiles():
    x = sorted_rows(COUNTS, 200, seed=0)
    rows = ExpertRows.of(torch.tensor(COUNTS), x.shape[0])
    (q,) = rows.quantize_tokens(x)
    assert q.shape == (200, rows.padded_rows) and q.group_rows == 1
    start = 0
    for e, count in enumerate(COUNTS):
        first, last = rows.offsets[e].item(), rows.offsets[e + 1].item()
        part = q.col_slice(first, last)
        if count:
            alone = quantize_act_transposed(x[start:start + count])
            assert torch.equal(part.scale, alone.scale)
            assert torch.equal(part.data[:, :count].view(torch.uint8), alone.data.view(torch.uint8))
        assert not part.data[:, count:].float().any()  # the padding is zeros
        start += count
    assert not q.data[:, 768:].float().any()  # and so is the unused tail of the worst-case layout


def test_both_layouts_of_the_expert_rows_from_one_call():
    """``ExpertRows.quantize``: the grouped GEMMs' 1x128 tiles of the sorted rows and the 128x1 tiles of the
    aligned layout, the same bits as the two separate quantizations (on a GPU one kernel builds the layout
    as it reads x: tests/unit/test_fp8_triton_quant.py checks that kernel against these)."""
    x = sorted_rows(COUNTS, 200, seed=2).to(torch.bfloat16)
    rows = ExpertRows.of(torch.tensor(COUNTS), x.shape[0])
    sources = rows.sources()
    assert sources.shape == (rows.padded_rows,) and (sources >= 0).sum() == x.shape[0]
    assert torch.equal(sources[rows.destinations()], torch.arange(x.shape[0]))
    tiles, tokens = rows.quantize(x)
    (expected_tokens,) = rows.quantize_tokens(x)
    for got, expected in ((tiles, quantize(x, 1)), (tokens, expected_tokens)):
        assert torch.equal(got.scale, expected.scale) and got.group_rows == expected.group_rows
        assert torch.equal(got.data.view(torch.uint8), expected.data.view(torch.uint8))
    assert rows.quantize(x, tiles=False)[0] is None and rows.quantize(x, tokens=False)[1] is None


def test_expert_wgrad_equals_the_per_expert_loop_bit_for_bit():
    """Reference backend: the K-grouped Wgrad on the aligned layout is the per-expert GEMM of each
    expert's own 128x1 tiles, bit for bit; an expert without rows gets zeros."""
    dy, x = sorted_rows(COUNTS, 96, seed=1), sorted_rows(COUNTS, 160, seed=2)
    rows = ExpertRows.of(torch.tensor(COUNTS), x.shape[0])
    weight = torch.empty(len(COUNTS), 96, 160)
    dw = expert_wgrad(REFERENCE, *rows.quantize_tokens(dy, x), rows, weight)
    start = 0
    for e, count in enumerate(COUNTS):
        if count:
            expected = gemm_reference(quantize_act_transposed(dy[start:start + count]),
                                      quantize_act_transposed(x[start:start + count]))
        else:
            expected = torch.zeros(96, 160)
        assert torch.equal(dw[e], expected)
        start += count


def test_k_grouped_emulate_against_reference():
    """Same payloads and scales, fp32 roundings only: within (K + 3G + 6) 2^-24 sum|ab| (EmulateBackend)."""
    a = quantize(sorted_rows([70, 40], 512, seed=3), 1)
    b = quantize(sorted_rows([60, 30], 512, seed=4), 1)
    offsets = [0, 128, 128, 512]
    emulated, reference = EMULATE.k_grouped_gemm(a, b, offsets), k_grouped_gemm_reference(a, b, offsets)
    for e, (start, stop) in enumerate(zip(offsets, offsets[1:])):
        k = stop - start
        mag = dequantize_2d(a)[:, start:stop].abs() @ dequantize_2d(b)[:, start:stop].abs().T
        assert ((emulated[e] - reference[e]).abs() <= (k + 3 * k / BLOCK + 6) * 2.0**-24 * mag).all()
    assert not emulated[1].any()


def expert_problem(counts: list[int], dim: int, inter: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    e = len(counts)
    x = torch.randn(sum(counts), dim, generator=g)
    ws = [torch.randn(e, inter, dim, generator=g) * dim**-0.5, torch.randn(e, dim, inter, generator=g) * inter**-0.5,
          torch.randn(e, inter, dim, generator=g) * dim**-0.5]
    weights = torch.rand(sum(counts), generator=g) + 0.25
    return [x, *ws, weights], torch.randn(sum(counts), dim, generator=g)


@pytest.mark.parametrize("inter", [96, 128])
def test_stacked_gate_up_gives_each_projections_own_numbers(inter):
    """``StepGateUp``: one GEMM on the stacked gate/up blocks gives, column for column, the reference
    backend's products of each projection alone (exact per-group promotion: the same numbers whatever N),
    zeros in the padding columns (I = 96 pads to 128); its Dgrad operand is the stack of the W^T blocks."""
    counts = [40, 0, 150]
    (x, w1, _, w3, _), _ = expert_problem(counts, dim=256, inter=inter, seed=4)
    qx, stack = quantize(x, 1), StepGateUp(w1, False, w3)
    padded = -(-inter // BLOCK) * BLOCK
    both = REFERENCE.grouped_gemm(qx, stack.blocks(), counts)
    assert both.shape == (sum(counts), 2 * padded)
    assert torch.equal(both[:, :inter], REFERENCE.grouped_gemm(qx, quantize_experts(w1), counts)[:, :inter])
    assert torch.equal(both[:, padded:padded + inter], REFERENCE.grouped_gemm(qx, quantize_experts(w3), counts)[:, :inter])
    assert not both[:, inter:padded].any() and not both[:, padded + inter:].any()
    pad = torch.zeros(len(counts), padded - inter, 256)
    direct = quantize_experts(torch.cat([w1, pad, w3, pad], dim=1).transpose(1, 2))
    made = stack.transposed()
    assert torch.equal(made.scale, direct.scale) and torch.equal(made.data.view(torch.uint8), direct.data.view(torch.uint8))


def run_ffn(backend, leaves: list[torch.Tensor], counts, dout: torch.Tensor):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    x, w1, w2, w3, weights = leaves
    out = fp8_expert_ffn(x, counts, w1, w2, w3, weights, backend=backend)
    out.backward(dout)
    return [out.detach(), *[t.grad for t in leaves]]


@pytest.fixture
def interpret(triton_interpreter):
    """``fp8.triton_gemm`` in Triton's interpreter (conftest.py: skips where it cannot run our loops)."""
    return triton_interpreter


def test_expert_ffn_triton_interpreted_matches_emulate(interpret):
    """The whole expert SwiGLU, forward and backward, through the Triton kernels (M-grouped Fprop and
    Dgrad from the device-side tile table, K-grouped Wgrad) in Triton's interpreter, against the emulated
    backend: the same payloads and scales, so the two differ by fp32 summation order, except where a
    re-quantized GEMM output (the SwiGLU output, dgate, dup) lands on the other side of an E4M3 rounding
    boundary (one ULP, 2^-3, on a few elements): < 1% relative, as test_fp8_linear's reference vs emulate."""
    counts = [40, 0, 170, 18]
    leaves, dout = expert_problem(counts, dim=64, inter=96, seed=5)
    small = interpret.KernelConfig(block_m=32, block_n=32, num_warps=4, num_stages=2)
    triton_backend = interpret.TritonBackend(dense_config=small, grouped_config=small)
    got = run_ffn(triton_backend, leaves, torch.tensor(counts), dout)
    expected = run_ffn(EMULATE, leaves, torch.tensor(counts), dout)
    for a, b in zip(got, expected):
        assert (a - b).norm() <= 1e-2 * b.norm()
    for grad in got[2:5]:
        assert not grad[1].any()  # expert 1 has no rows


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (sm_89+ for fp8 tl.dot)")
def test_expert_ffn_on_gpu_never_waits_for_the_host(monkeypatch):
    """Issue 9: the FP8 experts' forward and backward on a GPU with the Triton backend run with the
    router's counts as a device tensor, and nothing synchronises (CUDA's sync debug mode raises on any
    synchronising call); the result matches the emulated backend on the same GPU."""
    triton_gemm = pytest.importorskip("fp8.triton_gemm", reason="Triton is not installed (the gpu extra)")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    counts = [300, 0, 700, 18, 1000, 5, 0, 2000]
    leaves, dout = expert_problem(counts, dim=256, inter=384, seed=6)
    leaves, dout = [t.cuda() for t in leaves], dout.cuda()
    device_counts = torch.tensor(counts, device="cuda")
    backend = triton_gemm.TritonBackend()
    run = functools.partial(run_ffn, backend, leaves, device_counts, dout)
    run()  # compile the kernels first (compilation may synchronise)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = run()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    expected = run_ffn(EMULATE, leaves, device_counts, dout)
    for a, b in zip(got, expected):
        assert (a - b).norm() <= 1e-2 * b.norm()
