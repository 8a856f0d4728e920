"""Triton FP8 GEMM with fine-grained scales and FP32 promotion every 128 along K (report sec 3.3.2).

``TritonBackend().gemm(a, b)`` computes ``A @ B.T`` for a [M, K], b [N, K] quantized by ``fp8.quant``
(tiles of ``group_rows x 128`` along K, group_rows 1 or 128); ``grouped_gemm(a, b, counts)`` does the MoE
expert GEMM in one launch (b the stacked expert weights [E * N, K], rows of a sorted by expert), and
``k_grouped_gemm(a, b, offsets)`` every expert's weight gradient in one launch. The numbers are those
of ``fp8.gemm.gemm_reference`` / ``grouped_gemm_reference`` / ``k_grouped_gemm_reference``; it is the
same algorithm as DeepGEMM and Figure 7b of the report:

* each program owns a ``BLOCK_M x BLOCK_N`` output tile and walks K in blocks of ``BLOCK_K = 128``, the
  quantization tile width (N_C of the report);
* per K block, ``tl.dot`` of the fp8 tiles A [BLOCK_M, 128] and B [128, BLOCK_N] goes into a fresh
  temporary accumulator: on Hopper this is 4 FP8 WGMMAs (K = 32 each) that accumulate in the Tensor
  Cores' limited-precision accumulator (Triton's default ``max_num_imprecise_acc`` for fp8 on sm90 never
  splits a 128-wide dot);
* the temporary is then "promoted": multiplied by a's scale of each row (its 1x128 or 128x128 tile) and
  b's scale of each column (its 1x128 tile or 128x128 block) and added into the FP32 accumulator held
  in registers (the CUDA-core side). When the whole N-tile lies in one 128-row block of b (b in 128x128
  blocks, ``BLOCK_N`` <= 128: every weight operand) this is DeepGEMM's form, one fp32 scale per row
  ``scale_a * scale_b`` and one FFMA per element ``acc += partial * scale``; otherwise
  ``acc += (partial * scale_a) * scale_b`` (an FMUL and an FFMA). The reference rounds
  ``(partial * scale_a) * scale_b`` and the sum separately: with FP fusion on (set explicitly) the
  kernel's promotion differs by about one fp32 rounding per K block, far below the tests' tolerances,
  and not at all with power-of-two scales;
* out-of-range rows/columns and the partial last K block are masked (loaded as 0, which adds exact
  zeros; the last block's scale covers only the elements present, as ``fp8.quant`` defines it);
* the FP32 accumulator is stored as fp32 (default) or bf16 (rounded to nearest even; in interpret mode,
  whose fp32 -> bf16 cast truncates, the kernel stores fp32 and torch rounds).

Scales are loaded per row of the tile (index ``row // group_rows``), so one kernel serves 1x128 and
128x128 tiles on either side and any ``BLOCK_M`` / ``BLOCK_N``.

Grouped GEMM (M-grouped: Fprop and Dgrad of the experts): ``counts`` becomes a table of M-tiles
``(row_start, row_end, expert)``, each tile inside one expert (a tile never straddles two experts),
computed with tensor operations where ``counts`` lives: the router's counts stay on the GPU and no value
is read back. The table, and so the grid, is sized for the worst case, ``ceil(T / BLOCK_M) + E`` tiles;
the unused tail holds empty tiles, whose programs skip the K loop and store nothing. The 1-D grid covers
(M-tile, N-tile) with the N-tile fastest, so consecutive programs share the activation tile; a program
reads rows ``expert * N + n`` of the stacked weights and their 128x128-block scales.

K-grouped GEMM (the experts' Wgrad, ``dW_e = dY_e^T X_e``): both operands are token-major transposes
[M, Kp], [N, Kp] in 1x128 tiles along the tokens, each expert's tokens in columns ``offsets[e]`` to
``offsets[e + 1]`` (multiples of 128: ``fp8/experts.py`` lays them out so); program (e, M-tile, N-tile)
walks only its expert's K blocks into ``out[e]``, an expert without tokens storing zeros. The offsets are
read by the kernel, not the host. It uses the grouped launch parameters: compiled for sm_90 with
128 x 128 tiles and per-column scales on both sides the kernel spills registers, with 64 x 128 it does not.

Payloads: e4m3 (``torch.float8_e4m3fn``) goes to ``tl.dot`` as fp8. If either operand is E5M6
(``fmt="e5m6"``: the top 12 bits of an fp16), both payloads are decoded exactly to fp16 on the host
(every E5M6 and every e4m3 value is an fp16 value) and the kernel runs an fp16 ``tl.dot`` with the same
scaling; so does every operand on a GPU without fp8 ``tl.dot`` (before sm_89).

CPU: Triton kernels need a GPU. With ``TRITON_INTERPRET=1`` the same kernel runs in Triton's NumPy
interpreter on CPU tensors, slowly; its ``tl.dot`` decodes fp8 to fp16 exactly and sums in fp32, so it
matches the reference up to fp32 summation order. The variable is read when the kernel is launched, not
when this module or triton is imported: the ``triton.jit`` wrapper is created lazily, once per mode, and
the kernel calls none of Triton's own ``@triton.jit`` library functions (``tl.cdiv``, ``tl.zeros`` and the
rest of ``triton.language.standard`` are wrapped at ``import triton`` in the mode of that moment and fail
in the other one), hence the hand-written ceil-divisions and ``tl.full``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # pragma: no cover - exercised only without triton
    raise ImportError("fp8.triton_gemm needs Triton: pip install -e '.[gpu]' (or: pip install triton)",
                      name="triton") from exc

from fp8.gemm import check_counts, check_tile_boundaries, expert_offsets, expert_width, host_counts
from fp8.quant import BLOCK, Quantized, e5m6_decode

BLOCK_K = BLOCK  # one K block per promotion: N_C = 128 (4 WGMMAs of K = 32)
OUT_DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters: output tile ``block_m x block_n`` (K block fixed at 128), warps, pipeline stages,
    and ``group_m`` (dense only: M-tiles per L2 swizzle group). Block sizes must be powers of two >= 16."""

    block_m: int = 128
    block_n: int = 128
    num_warps: int = 8
    num_stages: int = 4
    group_m: int = 8

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"KernelConfig.{name} must be a power of two >= 16, got {v}")


DENSE_CONFIG = KernelConfig()
# Experts get ~T * top_k / E rows each (128 at T = 4096 with 256 experts, top-8): smaller M-tiles waste
# less on each expert's last, partial tile. Also the K-grouped Wgrad's (no spills there, unlike 128 x 128).
GROUPED_CONFIG = KernelConfig(block_m=64, block_n=128, num_warps=4, num_stages=4)


# --------------------------------------------------------------------------------------------------
# Kernel (plain function; ``jitted`` wraps it with triton.jit lazily, once per interpret mode)


def _fp8_gemm_kernel(
    a_ptr, b_ptr, out_ptr, sa_ptr, sb_ptr, tiles_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bn, stride_bk, stride_oe, stride_om, stride_on,
    stride_sam, stride_sak, stride_sbn, stride_sbk,
    GROUP_A: tl.constexpr, GROUP_B: tl.constexpr,
    GROUPED: tl.constexpr, K_GROUPED: tl.constexpr, EVEN_K: tl.constexpr, B_SCALAR: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N  # not tl.cdiv: see the module docstring
    kb_start = 0
    kb_end = (K + BLOCK_K - 1) // BLOCK_K
    out_ptr0 = out_ptr
    if GROUPED:
        # tiles_ptr: int32 [n_tiles, 3] = (row_start, row_end, expert); N is the per-expert N. The table
        # is sized for the worst case; its unused tail is empty tiles (row_start == row_end): no K loop.
        tile = pid // num_pid_n
        pid_n = pid % num_pid_n
        row_start = tl.load(tiles_ptr + tile * 3)
        row_end = tl.load(tiles_ptr + tile * 3 + 1)
        expert = tl.load(tiles_ptr + tile * 3 + 2)
        offs_m = row_start + tl.arange(0, BLOCK_M)
        mask_m = offs_m < row_end
        b_row0 = expert * N  # first row of this expert in the stacked weights
        kb_end = tl.where(row_start < row_end, kb_end, 0)
    elif K_GROUPED:
        # tiles_ptr: int32 [E + 1] column offsets (multiples of 128): expert e reduces over its own tokens,
        # K blocks offsets[e] / 128 .. offsets[e + 1] / 128, into its own [M, N] slice of the output.
        num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
        expert = pid // (num_pid_m * num_pid_n)
        pid_mn = pid % (num_pid_m * num_pid_n)
        pid_m = pid_mn // num_pid_n
        pid_n = pid_mn % num_pid_n
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        b_row0 = 0
        kb_start = tl.load(tiles_ptr + expert) // BLOCK_K
        kb_end = tl.load(tiles_ptr + expert + 1) // BLOCK_K
        out_ptr0 = out_ptr + expert.to(tl.int64) * stride_oe
    else:
        # L2-friendly order: GROUP_M M-tiles share the N-tiles they sweep (Triton matmul tutorial).
        num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
        num_pid_in_group = GROUP_M * num_pid_n
        group_id = pid // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
        pid_n = (pid % num_pid_in_group) // group_size_m
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        b_row0 = 0
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows_b = b_row0 + offs_n
    offs_k = tl.arange(0, BLOCK_K)

    # Row offsets in 64 bits: the stacked weights of 256 experts x 2048 x 7168 span 3.8e9 elements.
    a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak  # [BLOCK_M, BLOCK_K]
    b_ptrs = b_ptr + rows_b.to(tl.int64)[None, :] * stride_bn + offs_k[:, None] * stride_bk  # [BLOCK_K, BLOCK_N]
    sa_ptrs = sa_ptr + (offs_m // GROUP_A) * stride_sam  # per row: scale of its tile
    if B_SCALAR:  # the whole N-tile lies in one 128x128 block of b: one scale per K block
        sb_ptrs = sb_ptr + ((b_row0 + pid_n * BLOCK_N) // GROUP_B) * stride_sbn
    else:  # per column of B^T: scale of its tile
        sb_ptrs = sb_ptr + (rows_b // GROUP_B) * stride_sbn

    a_ptrs += kb_start * BLOCK_K * stride_ak
    b_ptrs += kb_start * BLOCK_K * stride_bk
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)  # not tl.zeros (a @triton.jit library function)
    for kb in range(kb_start, kb_end):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=mask_n[None, :], other=0.0)
        else:
            k_left = K - kb * BLOCK_K
            a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
            b = tl.load(b_ptrs, mask=mask_n[None, :] & (offs_k[:, None] < k_left), other=0.0)
        # 128 wide along K: on sm90, 4 WGMMAs into a fresh (limited-precision) Tensor Core accumulator.
        partial = tl.dot(a, b, out_dtype=tl.float32)
        # Promotion: dequantize with the two groups' scales and add into the FP32 accumulator.
        scale_a = tl.load(sa_ptrs + kb * stride_sak, mask=mask_m, other=0.0)
        if B_SCALAR:  # DeepGEMM's form: one per-row scale, one FFMA per element
            scale = scale_a * tl.load(sb_ptrs + kb * stride_sbk)
            acc += partial * scale[:, None]
        else:
            scale_b = tl.load(sb_ptrs + kb * stride_sbk, mask=mask_n, other=0.0)
            acc += partial * scale_a[:, None] * scale_b[None, :]
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    out_ptrs = out_ptr0 + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def interpret_mode() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``), read now."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def runs_on(device: torch.device) -> bool:
    """Whether Triton kernels can run on tensors of ``device``: CUDA, or anything under the interpreter."""
    return device.type == "cuda" or interpret_mode()


@functools.cache
def _jit(kernel: Callable, interpreted: bool) -> object:
    return triton.jit(kernel)


def jitted(kernel: Callable) -> object:
    """``triton.jit(kernel)`` for the current mode (compiled or ``TRITON_INTERPRET=1``), made once per kernel
    and mode: the project's kernels are plain functions calling no other jitted function, so both modes can
    run in one process (the tests interpret them and compile them for sm_90)."""
    return _jit(kernel, interpret_mode())


# --------------------------------------------------------------------------------------------------
# Host side


def _needs_fp16(device: torch.device) -> bool:
    """fp8 ``tl.dot`` needs sm_89+ (Ada, Hopper); older GPUs get exact fp16 payloads instead."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9)


def _payloads(a: Quantized, b: Quantized) -> tuple[Tensor, Tensor]:
    """Kernel operands: the fp8 payloads, or both as exact fp16 if either is E5M6 (or the GPU lacks fp8)."""
    if a.fmt == "e4m3" and b.fmt == "e4m3" and not _needs_fp16(a.data.device):
        return a.data, b.data

    def as_fp16(q: Quantized) -> Tensor:
        # exact: e4m3 and E5M6 values are fp16 values
        return q.data.to(torch.float16) if q.fmt == "e4m3" else e5m6_decode(q.data).to(torch.float16)

    return as_fp16(a), as_fp16(b)


def _check_pair(a: Quantized, b: Quantized, out_dtype: torch.dtype) -> None:
    if not isinstance(a, Quantized) or not isinstance(b, Quantized):
        raise ValueError("TritonBackend operands must be fp8.quant.Quantized")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"gemm K mismatch: a is {tuple(a.shape)}, b is {tuple(b.shape)} (computes a @ b.T)")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    for name, q in (("a", a), ("b", b)):
        if q.group_rows not in (1, BLOCK):
            raise ValueError(f"{name}.group_rows must be 1 or {BLOCK}, got {q.group_rows}")
        if q.scale.dtype != torch.float32:
            raise ValueError(f"{name}.scale must be fp32, got {q.scale.dtype}")
    devices = {a.data.device, b.data.device, a.scale.device, b.scale.device}
    if len(devices) != 1:
        raise ValueError(f"TritonBackend operands are on several devices: {sorted(map(str, devices))}")


@dataclass
class Launch:
    """One kernel launch: 1-D grid size, runtime arguments in kernel order, constexprs, compile options."""

    grid: int
    args: tuple
    constexprs: dict
    options: dict

    def run(self) -> None:
        device = self.args[0].device
        if not runs_on(device):
            raise RuntimeError(f"TritonBackend needs CUDA tensors, got {device} (Triton kernels run on a GPU); "
                               "set TRITON_INTERPRET=1 to run them slowly on CPU in Triton's interpreter")
        jitted(_fp8_gemm_kernel)[(self.grid,)](*self.args, **self.constexprs, **self.options)


def _plan(a: Quantized, b: Quantized, out: Tensor, tiles: Tensor | None, m: int, n: int,
          cfg: KernelConfig, k_grouped: bool = False) -> Launch:
    """The launch for out = a @ b.T: dense (``tiles`` None), M-grouped (``tiles`` the M-tile table), or
    K-grouped (``k_grouped``: ``tiles`` the experts' column offsets, out [E, M, N])."""
    pa, pb = _payloads(a, b)
    sa, sb = a.scale, b.scale
    k = a.shape[1]
    if k_grouped:
        programs = (tiles.shape[0] - 1) * triton.cdiv(m, cfg.block_m)
    else:
        programs = tiles.shape[0] if tiles is not None else triton.cdiv(m, cfg.block_m)
    stride_oe, stride_om, stride_on = out.stride() if out.dim() == 3 else (0, *out.stride())
    args = (pa, pb, out, sa, sb, tiles if tiles is not None else sa,
            m, n, k,
            pa.stride(0), pa.stride(1), pb.stride(0), pb.stride(1), stride_oe, stride_om, stride_on,
            sa.stride(0), sa.stride(1), sb.stride(0), sb.stride(1))
    constexprs = dict(GROUP_A=a.group_rows, GROUP_B=b.group_rows, GROUPED=tiles is not None and not k_grouped,
                      K_GROUPED=k_grouped, EVEN_K=k % BLOCK_K == 0, B_SCALAR=b.group_rows % cfg.block_n == 0,
                      BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=BLOCK_K, GROUP_M=cfg.group_m)
    # FP fusion on: the promotion ``acc += partial * scale`` is one FFMA per element (as in DeepGEMM).
    options = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=True)
    return Launch(programs * triton.cdiv(n, cfg.block_n), args, constexprs, options)


def _kernel_out_dtype(out_dtype: torch.dtype) -> torch.dtype:
    """Triton's interpreter casts fp32 -> bf16 by truncation (the GPU rounds to nearest even): in
    interpret mode the kernel stores fp32 and torch rounds to bf16 afterwards."""
    return torch.float32 if out_dtype == torch.bfloat16 and interpret_mode() else out_dtype


def expert_tiles(counts: list[int] | Tensor, block_m: int, rows: int, device: torch.device | None = None) -> Tensor:
    """int32 [ceil(rows / block_m) + E, 3] rows ``(row_start, row_end, expert)``: each expert's rows (a's
    ``rows`` rows sorted by expert, ``counts[e]`` of expert e) cut into tiles of at most ``block_m`` rows,
    then empty tiles (``row_start == row_end == rows``) up to that worst-case length. Computed where
    ``counts`` lives (a tensor on the GPU stays there: the table needs no host sync); experts with 0 rows
    get no tile."""
    c = torch.as_tensor(counts, dtype=torch.int64, device=device if not isinstance(counts, Tensor) else None)
    if c.dim() != 1 or c.numel() == 0:
        raise ValueError(f"counts must list the rows of at least one expert, got shape {tuple(c.shape)}")
    n_tiles = -(-rows // block_m) + c.shape[0]
    per_expert = (c + block_m - 1) // block_m
    tile_end = torch.cumsum(per_expert, 0)  # one past each expert's last tile
    tile = torch.arange(n_tiles, device=c.device)
    expert = torch.searchsorted(tile_end, tile, right=True).clamp_(max=c.shape[0] - 1)
    row0 = torch.cumsum(c, 0) - c
    row_start = row0[expert] + (tile - (tile_end - per_expert)[expert]) * block_m
    row_end = torch.minimum(row_start + block_m, row0[expert] + c[expert])
    used = tile < tile_end[-1:]
    row_start = torch.where(used, row_start, rows)
    row_end = torch.where(used, row_end, rows)
    return torch.stack([row_start, row_end, torch.where(used, expert, 0)], 1).to(torch.int32)


def _run(out: Tensor, launch: Launch | None, out_dtype: torch.dtype) -> Tensor:
    """Fill ``out`` by its launch (None: nothing to compute) and return it in ``out_dtype``."""
    if launch is not None:
        launch.run()
    return out.to(out_dtype)


class TritonBackend:
    """Blockwise-scaled FP8 GEMMs in Triton (``GemmBackend``: ``name``, ``gemm``, ``grouped_gemm``).

    ``dense_config`` / ``grouped_config``: launch parameters (``KernelConfig``). A dense GEMM whose b is in
    1x128 tiles (Wgrad: per-column scales on both sides, more registers) runs with at most 3 pipeline
    stages: compiled for sm_90, the default 128 x 128 tile spills 8 bytes per thread with 4 and none with 3.
    ``out_dtype`` of each call: fp32 (default) or bf16. Operands must be CUDA tensors (or CPU tensors
    with ``TRITON_INTERPRET=1``). Fast path: K a multiple of 16 (16-byte aligned fp8 rows; other K work
    through unvectorized loads).
    """

    name = "triton"

    def __init__(self, dense_config: KernelConfig = DENSE_CONFIG, grouped_config: KernelConfig = GROUPED_CONFIG):
        self.dense_config = dense_config
        self.grouped_config = grouped_config

    def gemm(self, a: Quantized, b: Quantized, out_dtype: torch.dtype = torch.float32) -> Tensor:
        """``A @ B.T`` [M, N] for a [M, K], b [N, K] (tiles of 128 along K, group_rows 1 or 128)."""
        return _run(*self.plan_gemm(a, b, _kernel_out_dtype(out_dtype)), out_dtype)

    def grouped_gemm(self, a: Quantized, b: Quantized, counts: list[int] | Tensor,
                     out_dtype: torch.dtype = torch.float32) -> Tensor:
        """MoE grouped GEMM in one launch: rows of a [T, K] sorted by expert (``counts[e]`` rows for
        expert e), b the stacked expert weights [E * N, K] (tiles of 128 along K, group_rows 1 or 128, no
        block straddling two experts); returns [T, N] with expert e's rows multiplied by its weight.
        ``counts`` as a tensor on the GPU is not read by the host (no sync): it must then hold E
        non-negative counts summing to T, which only a host list is checked for."""
        return _run(*self.plan_grouped_gemm(a, b, counts, _kernel_out_dtype(out_dtype)), out_dtype)

    def k_grouped_gemm(self, a: Quantized, b: Quantized, offsets: list[int] | Tensor,
                       out_dtype: torch.dtype = torch.float32) -> Tensor:
        """The experts' Wgrad in one launch (``GemmBackend.k_grouped_gemm``): [E, M, N] with out[e] the
        product of a's and b's columns ``offsets[e]:offsets[e + 1]`` (their tokens, 128-aligned). A tensor
        of offsets on the GPU is not read by the host (no sync) and must satisfy ``fp8.gemm.expert_offsets``."""
        return _run(*self.plan_k_grouped_gemm(a, b, offsets, _kernel_out_dtype(out_dtype)), out_dtype)

    def plan_gemm(self, a: Quantized, b: Quantized,
                  out_dtype: torch.dtype = torch.float32) -> tuple[Tensor, Launch | None]:
        """The output buffer and the launch that fills it (None when there is nothing to compute)."""
        _check_pair(a, b, out_dtype)
        (m, k), n = a.shape, b.shape[0]
        out = torch.empty(m, n, dtype=out_dtype, device=a.data.device)
        if m == 0 or n == 0 or k == 0:
            return out.zero_(), None
        cfg = self.dense_config
        if b.group_rows == 1 and cfg.num_stages > 3:
            cfg = dataclasses.replace(cfg, num_stages=3)
        return out, _plan(a, b, out, None, m, n, cfg)

    def plan_grouped_gemm(self, a: Quantized, b: Quantized, counts: list[int] | Tensor,
                          out_dtype: torch.dtype = torch.float32) -> tuple[Tensor, Launch | None]:
        _check_pair(a, b, out_dtype)
        if not (isinstance(counts, Tensor) and counts.device.type != "cpu"):
            counts = host_counts(counts)
            check_counts(counts, a.shape[0])
            check_tile_boundaries(a, counts)
        elif a.group_rows > 1:
            raise ValueError("grouped gemm with counts on the device needs 1x128 activation tiles (group_rows 1)")
        n, k = expert_width(b, len(counts)), a.shape[1]
        t = a.shape[0]
        out = torch.empty(t, n, dtype=out_dtype, device=a.data.device)
        if t == 0 or n == 0 or k == 0:
            return out.zero_(), None
        cfg = self.grouped_config
        tiles = expert_tiles(counts, cfg.block_m, t, a.data.device)
        return out, _plan(a, b, out, tiles, t, n, cfg)

    def plan_k_grouped_gemm(self, a: Quantized, b: Quantized, offsets: list[int] | Tensor,
                            out_dtype: torch.dtype = torch.float32) -> tuple[Tensor, Launch | None]:
        _check_pair(a, b, out_dtype)
        if a.group_rows != 1 or b.group_rows != 1:
            raise ValueError("k-grouped gemm needs both operands in 1x128 tiles along K (group_rows 1)")
        if a.shape[1] % BLOCK_K:
            raise ValueError(f"k-grouped gemm needs K padded to a multiple of {BLOCK_K}, got {a.shape[1]}")
        if not (isinstance(offsets, Tensor) and offsets.device.type != "cpu"):
            offsets = torch.tensor(expert_offsets(offsets, a.shape[1]))
        (m, k), n = a.shape, b.shape[0]
        out = torch.empty(offsets.shape[0] - 1, m, n, dtype=out_dtype, device=a.data.device)
        if out.numel() == 0:
            return out, None
        if k == 0:
            return out.zero_(), None
        offsets = offsets.to(device=a.data.device, dtype=torch.int32)
        return out, _plan(a, b, out, offsets, m, n, self.grouped_config, k_grouped=True)
