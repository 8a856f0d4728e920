"""FP8 GEMM throughput (report sec 3.3.2): blockwise-scaled FP8 backends against BF16 ``torch.matmul``.

Shapes of the report's model (hidden 7168, MoE expert projections 2048):

* dense: tokens T in {4096, 8192, 16384} x K 7168 x N in {2048, 1536, 7168};
* grouped (MoE experts): 256 experts, top-8 routing of T tokens (random scores, so each expert gets
  ~T * 8 / 256 rows, some more, some fewer), expert projection N 2048 x K 7168, stacked weights
  [256 * 2048, 7168]; one grouped GEMM over all 8T rows. At the first T also N 4096: gate and up
  stacked as one operand, as the FP8 experts run them.

* wgrad (the experts' weight gradients, ``dW_e = dY_e^T X_e``): 8 local experts, top-2 routing of T
  tokens among them, dW [2048, 7168] each; one K-grouped GEMM (``k_grouped_gemm``) over the experts'
  128-aligned token tiles, against the per-expert loop of dense GEMMs it replaced (``[loop]``) and BF16
  (``torch._grouped_mm`` with K offsets where it runs, else a loop of matmuls). First T only.

Backends (each skipped with its reason when it cannot run here):

* ``bf16``: ``torch.matmul`` on bf16 operands (grouped: ``torch._grouped_mm`` in bf16, else a loop of
  matmuls); the baseline, measured in the same process; every ratio is against it;
* ``triton``: ``fp8.triton_gemm.TritonBackend`` (fp8 Tensor Cores, promotion to fp32 every 128 along K);
* ``torch``: ``torch._scaled_mm`` with blockwise 1x128 / 128x128 scales (``fp8.backend``), where the
  installed torch supports it on the device (grouped: a loop over experts);
* ``emulate``: dequantize to fp32, ``torch.matmul`` in fp32 (``fp8.backend.EmulateBackend``).

FLOPs are 2 M N K (grouped: 2 (sum of rows) N K). Timing: CUDA events on GPU (wall clock on CPU), the
median of ``--repeats`` runs after ``--warmup`` runs; quantization of the operands is not timed (the
kernels consume already-quantized operands, as in training where the quantization is fused upstream).

Correctness, in the same run, on the first ``--check-rows`` rows: ``err_ref`` is
``||out - ref|| / ||ref||`` (Frobenius) against ``fp8.gemm.gemm_reference`` / ``grouped_gemm_reference``
(wgrad: ``gemm_reference`` of two experts' token columns) on the same quantized operands (for bf16: against the fp64 product of its bf16 operands); ``err_fp32``
is the same against the fp64 product of the unquantized operands (FP8's quantization error; fp32
operands for dense, fp32 activations and the bf16 copy of the weights for grouped).

    python bench/fp8_gemm.py                  # GPU: all shapes, all backends
    python bench/fp8_gemm.py --quick          # tiny shapes (runs on CPU: emulate + bf16 only)
    python bench/fp8_gemm.py --tokens 4096 --sweep   # also time several Triton tile configs
    TRITON_INTERPRET=1 python bench/fp8_gemm.py --quick   # CPU smoke test of the Triton path
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from fp8.gemm import gemm_reference, grouped_gemm_reference
from fp8.quant import BLOCK, Quantized, dequantize_2d, quantize

EXPERTS, TOP_K = 256, 8
DENSE_K, DENSE_N = 7168, (2048, 1536, 7168)
EXPERT_N, EXPERT_K = 2048, 7168
QUICK = dict(tokens=[256], dense_k=512, dense_n=[256, 384], experts=8, top_k=2, expert_n=256, expert_k=512)


# --------------------------------------------------------------------------------------------------
# Backends


@dataclass
class Backend:
    name: str
    dense: Callable[[Quantized, Quantized], Tensor]
    grouped: Callable[[Quantized, Quantized, list[int]], Tensor]
    k_grouped: Callable[[Quantized, Quantized, Tensor], Tensor] | None = None


def available_backends(device: torch.device, wanted: list[str], sweep: bool,
                       quick: bool) -> tuple[list[Backend], list[str]]:
    """FP8 backends that run on ``device`` and one line per backend that does not (with the reason)."""
    backends, missing = [], []
    try:
        import fp8.backend as fb
    except ImportError as exc:  # fp8/backend.py not present in this checkout
        fb = None
        fb_reason = f"fp8.backend does not import ({exc})"

    if "triton" in wanted:
        try:
            from fp8.triton_gemm import GROUPED_CONFIG, DENSE_CONFIG, KernelConfig, TritonBackend, interpret_mode
        except ImportError as exc:
            missing.append(f"triton: {exc}")
        else:
            if interpret_mode() and device.type == "cuda":
                missing.append("triton: TRITON_INTERPRET=1 is set (interpreter, not worth timing); unset it")
            elif device.type != "cuda" and not (interpret_mode() and quick):
                missing.append("triton: no CUDA device (Triton kernels need a GPU; with --quick and TRITON_INTERPRET=1 "
                               "they run in Triton's CPU interpreter, as a smoke test: timings meaningless)")
            else:
                configs = [("triton", DENSE_CONFIG, GROUPED_CONFIG)]
                if sweep:
                    # tile configs that compile for sm_90 without register spills (checked offline)
                    for bm, bn, warps, stages in [(128, 128, 8, 3), (64, 128, 4, 4), (64, 128, 4, 3),
                                                  (128, 64, 4, 4), (64, 64, 4, 4), (64, 64, 4, 6)]:
                        cfg = KernelConfig(block_m=bm, block_n=bn, num_warps=warps, num_stages=stages)
                        configs.append((f"triton[{bm}x{bn},w{warps},s{stages}]", cfg, cfg))
                if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
                    missing.append("triton: runs with exact fp16 payloads (fp8 tl.dot needs sm_89+)")
                for name, dense_cfg, grouped_cfg in configs:
                    be = TritonBackend(dense_config=dense_cfg, grouped_config=grouped_cfg)
                    backends.append(Backend(name, be.gemm, be.grouped_gemm, be.k_grouped_gemm))
                d, gr = DENSE_CONFIG, GROUPED_CONFIG
                print(f"triton tiles: dense {d.block_m}x{d.block_n}x{BLOCK} (warps {d.num_warps}, stages "
                      f"{d.num_stages}), grouped {gr.block_m}x{gr.block_n}x{BLOCK} (warps {gr.num_warps}, "
                      f"stages {gr.num_stages})")
    if "torch" in wanted:
        if fb is None:
            missing.append(f"torch: {fb_reason}")
        else:
            try:
                be = fb.get_backend("torch", device)
            except RuntimeError as exc:
                missing.append(f"torch: {exc}")
            else:
                backends.append(Backend("torch", be.gemm, be.grouped_gemm, be.k_grouped_gemm))
    if "emulate" in wanted:
        if fb is not None:
            be = fb.EmulateBackend()
            backends.append(Backend("emulate", be.gemm, be.grouped_gemm, be.k_grouped_gemm))
        else:
            backends.append(Backend("emulate", _emulate_gemm, _emulate_grouped))
    return backends, missing


def _emulate_gemm(a: Quantized, b: Quantized) -> Tensor:
    return dequantize_2d(a) @ dequantize_2d(b).t()


def _emulate_grouped(a: Quantized, b: Quantized, counts: list[int]) -> Tensor:
    n = b.shape[0] // len(counts)
    x, w = dequantize_2d(a), dequantize_2d(b).view(len(counts), n, -1)
    return torch.cat([rows @ w[e].t() for e, rows in enumerate(x.split(counts)) if rows.shape[0]])


def bf16_grouped(x: Tensor, w: Tensor, counts: list[int]) -> tuple[Callable[[], Tensor], str]:
    """BF16 baseline for the grouped GEMM: ``torch._grouped_mm`` if it runs here, else a loop."""
    experts, n = len(counts), w.shape[0] // len(counts)
    w3 = w.view(experts, n, -1)
    offs = torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32)

    def grouped() -> Tensor:
        return torch._grouped_mm(x, w3.transpose(-2, -1), offs=offs)

    def loop() -> Tensor:
        return torch.cat([rows @ w3[e].t() for e, rows in enumerate(x.split(counts)) if rows.shape[0]])

    try:
        probe_counts = [min(c, 16) for c in counts[:4]]
        if sum(probe_counts) and hasattr(torch, "_grouped_mm"):
            rows = torch.cat([r[:c] for r, c in zip(x.split(counts)[:4], probe_counts)])
            got = torch._grouped_mm(rows, w3[:4].transpose(-2, -1),
                                    offs=torch.tensor(probe_counts, device=x.device).cumsum(0).to(torch.int32))
            want = torch.cat([r @ w3[e].t() for e, r in enumerate(rows.split(probe_counts)) if r.shape[0]])
            if torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2):
                return grouped, "torch._grouped_mm"
    except Exception:  # not supported on this device / build
        pass
    return loop, "loop of torch.matmul"


# --------------------------------------------------------------------------------------------------
# Timing and errors


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def rel_err(out: Tensor, ref: Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    return float((out - ref).norm() / ref.norm().clamp(min=1e-300))


def to_cpu(q: Quantized) -> Quantized:
    return Quantized(q.data.cpu(), q.scale.cpu(), q.group_rows, q.fmt, q.pow2)


def row_slice(q: Quantized, rows: int) -> Quantized:
    """The first ``rows`` rows of q (rounded up to its tile height so no tile is split)."""
    rows = min(q.shape[0], -(-rows // q.group_rows) * q.group_rows)
    return to_cpu(q.row_slice(0, rows))


def print_table(title: str, flops: float, rows: list[tuple[str, float | None, float, float, str]]) -> None:
    print(f"\n{title}  ({flops / 1e9:.1f} GFLOP)")
    print(f"  {'backend':<28}{'ms':>10}{'TFLOPS':>10}{'x bf16':>9}{'err_ref':>11}{'err_fp32':>11}")
    base = next((ms for name, ms, *_ in rows if name.startswith("bf16") and ms is not None), None)
    for name, ms, e_ref, e_fp32, note in rows:
        if ms is None:
            print(f"  {name:<28}{'-':>10}{'':>10}{'':>9}{'':>11}{'':>11}  {note}")
            continue
        tflops = flops / (ms * 1e-3) / 1e12
        ratio = f"{base / ms:.2f}" if base else "-"
        tf = f"{tflops:.1f}" if tflops >= 10 else f"{tflops:.3f}"
        print(f"  {name:<28}{ms:>10.3f}{tf:>10}{ratio:>9}{e_ref:>11.2e}{e_fp32:>11.2e}  {note}")


def run_case(fn: Callable[[], Tensor], device: torch.device, args) -> tuple[float | None, Tensor | None, str]:
    """(median ms, output, note); on out-of-memory (None, None, reason)."""
    try:
        out = fn()
        ms = median_ms(fn, device, args.warmup, args.repeats)
        return ms, out, ""
    except torch.cuda.OutOfMemoryError as exc:
        torch.cuda.empty_cache()
        return None, None, f"out of memory ({str(exc).splitlines()[0][:60]})"


# --------------------------------------------------------------------------------------------------
# Cases


def bench_dense(m: int, n: int, k: int, backends: list[Backend], device: torch.device, args) -> list[tuple[str, float | None, float, float, str]]:
    """Time and check one dense shape; print its table and return its rows (name, ms, err_ref, err_fp32, note),
    the bf16 baseline first."""
    g = torch.Generator(device=device).manual_seed(m + n + k)
    x = torch.randn(m, k, generator=g, device=device)
    w = torch.randn(n, k, generator=g, device=device) / k**0.5
    a, b = quantize(x, 1), quantize(w, BLOCK)  # activations 1x128, weights 128x128
    check = min(args.check_rows, m)
    a_cpu, b_cpu = row_slice(a, check), to_cpu(b)
    ref = gemm_reference(a_cpu, b_cpu)
    exact = x[: a_cpu.shape[0]].double().cpu() @ w.double().cpu().T
    rows = []
    xb, wb = x.bfloat16(), w.bfloat16()
    ms, out, note = run_case(lambda xb=xb, wb=wb: xb @ wb.T, device, args)  # defaults: xb, wb are deleted below
    bf16_ref = xb[:check].double().cpu() @ wb.double().cpu().T
    rows.append(("bf16 torch.matmul", ms, rel_err(out[:check], bf16_ref) if out is not None else 0.0,
                 rel_err(out[:check], exact[:check]) if out is not None else 0.0, note))
    del xb, wb, out
    for be in backends:
        ms, out, note = run_case(lambda: be.dense(a, b), device, args)
        if out is None:
            rows.append((be.name, None, 0.0, 0.0, note))
            continue
        got = out[: ref.shape[0]]
        rows.append((be.name, ms, rel_err(got, ref), rel_err(got, exact), note))
        del out
    print_table(f"dense  M={m} N={n} K={k}", 2.0 * m * n * k, rows)
    return rows


def routed_counts(tokens: int, experts: int, top_k: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    choice = torch.rand(tokens, experts, generator=g).topk(top_k, dim=1).indices
    return torch.bincount(choice.flatten(), minlength=experts).tolist()


def bench_grouped(tokens: int, experts: int, top_k: int, n: int, k: int, backends: list[Backend],
                  device: torch.device, args) -> list[tuple[str, float | None, float, float, str]]:
    """Time and check one grouped (MoE) shape; print its table and return its rows as ``bench_dense``."""
    counts = routed_counts(tokens, experts, top_k)
    rows_total = sum(counts)
    g = torch.Generator(device=device).manual_seed(tokens)
    x = torch.randn(rows_total, k, generator=g, device=device)
    a = quantize(x, 1)
    # weights expert by expert (fp32 temporaries of one expert only); 128x128 blocks never straddle experts
    datas, scales, w_bf16 = [], [], torch.empty(experts * n, k, dtype=torch.bfloat16, device=device)
    for e in range(experts):
        w = torch.randn(n, k, generator=g, device=device) / k**0.5
        q = quantize(w, BLOCK)
        datas.append(q.data)
        scales.append(q.scale)
        w_bf16[e * n:(e + 1) * n] = w.bfloat16()
    b = Quantized(torch.cat(datas), torch.cat(scales), BLOCK, "e4m3")
    del datas, scales

    # correctness on the rows of the first experts (up to --check-rows rows)
    n_check, rows_check = 0, 0
    while n_check < experts and rows_check + counts[n_check] <= max(args.check_rows, counts[0]):
        rows_check += counts[n_check]
        n_check += 1
    sub_counts = counts[:n_check]
    a_cpu, b_cpu = to_cpu(a.row_slice(0, rows_check)), to_cpu(b.row_slice(0, n_check * n))
    ref = grouped_gemm_reference(a_cpu, b_cpu, sub_counts)
    w_cpu = w_bf16[: n_check * n].double().cpu()  # the bf16 weights: "unquantized" up to bf16 rounding
    x_cpu = x[:rows_check].double().cpu()
    exact = torch.cat([r @ w_cpu[e * n:(e + 1) * n].T for e, r in enumerate(x_cpu.split(sub_counts)) if r.shape[0]])

    xb = x.bfloat16()
    fn, how = bf16_grouped(xb, w_bf16, counts)
    ms, out, note = run_case(fn, device, args)
    rows = []
    if out is not None:
        xb_cpu = xb[:rows_check].double().cpu()
        bf16_ref = torch.cat([r @ w_cpu[e * n:(e + 1) * n].T for e, r in enumerate(xb_cpu.split(sub_counts))
                              if r.shape[0]])
        rows.append((f"bf16 ({how})", ms, rel_err(out[:rows_check], bf16_ref), rel_err(out[:rows_check], exact), ""))
    else:
        rows.append((f"bf16 ({how})", None, 0.0, 0.0, note))
    del xb, out, fn
    del w_bf16
    for be in backends:
        ms, out, note = run_case(lambda: be.grouped(a, b, counts), device, args)
        if out is None:
            rows.append((be.name, None, 0.0, 0.0, note))
            continue
        got = out[:rows_check]
        rows.append((be.name, ms, rel_err(got, ref), rel_err(got, exact), note))
        del out
    zero = sum(1 for c in counts if c == 0)
    print_table(f"grouped  {experts} experts, top-{top_k} of T={tokens}: {rows_total} rows "
                f"(per expert {min(counts)}..{max(counts)}, {zero} empty), N={n} K={k}",
                2.0 * rows_total * n * k, rows)
    return rows


def bf16_k_grouped(dy: Tensor, x: Tensor, offsets: Tensor) -> tuple[Callable[[], Tensor], str]:
    """BF16 baseline of the experts' Wgrad: ``torch._grouped_mm`` of dY^T [N, Kp] and X [Kp, K] with offsets
    along K where it runs here, else a loop of matmuls."""
    bounds = offsets.tolist()

    def loop() -> Tensor:
        return torch.stack([dy[:, s:e] @ x[s:e] for s, e in zip(bounds, bounds[1:])])

    def grouped() -> Tensor:
        return torch._grouped_mm(dy, x, offs=offsets[1:].to(torch.int32))

    try:
        if hasattr(torch, "_grouped_mm") and rel_err(grouped(), loop()) < 1e-2:
            return grouped, "torch._grouped_mm"
    except Exception:  # not supported on this device / build
        pass
    return loop, "loop of torch.matmul"


def bench_wgrad(tokens: int, experts: int, n: int, k: int, backends: list[Backend], device: torch.device,
                args) -> list[tuple[str, float | None, float, float, str]]:
    """Time and check the experts' Wgrad: one K-grouped GEMM against the per-expert loop and BF16."""
    counts = routed_counts(tokens, experts, 2, seed=1)
    offsets = torch.tensor([0, *[-(-c // BLOCK) * BLOCK for c in counts]]).cumsum(0)
    padded = int(offsets[-1])
    g = torch.Generator(device=device).manual_seed(tokens + 1)
    # dY^T [N, Kp] and X^T [K, Kp], zero in the padding between experts (fp8/experts.py's layout)
    live = torch.zeros(padded, dtype=torch.bool)
    for e, c in enumerate(counts):
        live[int(offsets[e]):int(offsets[e]) + c] = True
    live = live.to(device)
    dy = torch.randn(n, padded, generator=g, device=device) * live
    x = torch.randn(k, padded, generator=g, device=device) * live
    a, b = quantize(dy, 1), quantize(x, 1)
    check = [e for e in range(experts) if counts[e]][:2]
    a_cpu = to_cpu(a.row_slice(0, min(args.check_rows, n)))
    spans = [(int(offsets[e]), int(offsets[e + 1])) for e in check]
    b_cpu = to_cpu(b)
    ref = torch.stack([gemm_reference(a_cpu.col_slice(s, e), b_cpu.col_slice(s, e)) for s, e in spans])
    exact = torch.stack([dy[: a_cpu.shape[0], s:e].double().cpu() @ x[:, s:e].double().cpu().T for s, e in spans])
    rows = []
    dyb, xb = dy.bfloat16(), x.bfloat16().t().contiguous()
    fn, how = bf16_k_grouped(dyb, xb, offsets.to(device))
    ms, out, note = run_case(fn, device, args)
    e_bf16 = rel_err(out[check, : a_cpu.shape[0]], exact) if out is not None else 0.0
    rows.append((f"bf16 ({how})", ms, e_bf16, e_bf16, note))
    del dyb, xb, out, fn
    device_offsets = offsets.to(device)
    for be in backends:
        if be.k_grouped is None:
            continue
        cases = [(be.name, lambda: be.k_grouped(a, b, device_offsets))]
        if be.name == "triton":
            bounds = offsets.tolist()
            cases.append((f"{be.name} [loop]", lambda: torch.stack([
                be.dense(a.col_slice(s, e), b.col_slice(s, e)) for s, e in zip(bounds, bounds[1:])])))
        for name, fn in cases:
            ms, out, note = run_case(fn, device, args)
            if out is None:
                rows.append((name, None, 0.0, 0.0, note))
                continue
            got = out[check, : a_cpu.shape[0]]
            rows.append((name, ms, rel_err(got, ref), rel_err(got, exact), note))
            del out
    print_table(f"wgrad  {experts} experts, top-2 of T={tokens}: {sum(counts)} tokens ({padded} aligned), "
                f"dW [{n}, {k}] each", 2.0 * sum(counts) * n * k, rows)
    return rows


# --------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (runs on CPU)")
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--tokens", default="4096,8192,16384", help="comma-separated token counts T")
    parser.add_argument("--backends", default="triton,torch,emulate", help="FP8 backends to time")
    parser.add_argument("--only", choices=["dense", "grouped", "wgrad"], default=None)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--check-rows", type=int, default=128, help="rows compared with the CPU reference")
    parser.add_argument("--sweep", action="store_true", help="also time several Triton tile configurations")
    args = parser.parse_args()

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not args.quick:
        parser.error("the report's shapes need a GPU; on CPU run with --quick")
    wanted = [s for s in args.backends.split(",") if s]
    backends, missing = available_backends(device, wanted, args.sweep, args.quick)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__}", end="")
    try:
        import triton

        print(f"; triton {triton.__version__}")
    except ImportError:
        print("; triton not installed")
    print(f"timing: median of {args.repeats} after {args.warmup} warm-up runs "
          f"({'CUDA events' if device.type == 'cuda' else 'wall clock'})")
    for line in missing:
        print(f"unavailable: {line}")

    if args.quick:
        q = QUICK
        tokens, dense_k, dense_n = q["tokens"], q["dense_k"], q["dense_n"]
        experts, top_k, expert_n, expert_k = q["experts"], q["top_k"], q["expert_n"], q["expert_k"]
    else:
        tokens = [int(t) for t in args.tokens.split(",")]
        dense_k, dense_n = DENSE_K, DENSE_N
        experts, top_k, expert_n, expert_k = EXPERTS, TOP_K, EXPERT_N, EXPERT_K

    if args.only in (None, "dense"):
        for t in tokens:
            for n in dense_n:
                bench_dense(t, n, dense_k, backends, device, args)
    if args.only in (None, "wgrad"):  # before the grouped shapes, the largest (a time limit cuts the end)
        bench_wgrad(tokens[0], 8, expert_n, expert_k, backends, device, args)
    if args.only in (None, "grouped"):
        for i, t in enumerate(tokens):
            bench_grouped(t, experts, top_k, expert_n, expert_k, backends, device, args)
            if i == 0:  # the experts' gate and up stacked as one GEMM (fp8/experts.py StepGateUp)
                bench_grouped(t, experts, top_k, 2 * expert_n, expert_k, backends, device, args)


if __name__ == "__main__":
    main()
