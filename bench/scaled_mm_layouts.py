"""Whether ``torch._scaled_mm`` computes the right blockwise FP8 product (1x128 activations x 128x128 or
1x128 weights) with the operands fp8/backend.py's ``torch`` backend passes, and how fast it runs against BF16.

On an H200 with torch 2.11 the backend's probe (K = 256, so K/128 = 2 scale columns) found the product
wrong: cuBLAS reads 128x128 scales with a leading dimension of round_up(K/128, 4), which the backend now
meets by padding K to a multiple of 512 (``scaled_mm_operands``). This checks the padded layout at K/128
= 2, 3, 4, 7; where a case is still wrong it tries every orientation of the two scale tensors to find the
one cuBLAS reads; then it times the backend at the report's shapes:

    python bench/scaled_mm_layouts.py          # needs a CUDA GPU (sm_90)
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fp8.backend import EmulateBackend, scaled_mm_blockwise, scaled_mm_operands  # noqa: E402
from fp8.quant import quantize  # noqa: E402


def orientations(s: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"s": s.contiguous(), "s.outer": s.t().contiguous().t(), "s.t": s.t(), "s.t.contig": s.t().contiguous()}


def try_layouts(m: int, n: int, k: int, rows_b: int, dev: torch.device) -> list[tuple[str, str]]:
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(m, k, device=dev, generator=g) * torch.exp2(torch.randint(-3, 4, (m, 1), device=dev, generator=g).float())
    w = torch.randn(n, k, device=dev, generator=g) * 0.05
    a, b = quantize(x, 1), quantize(w, rows_b)
    ref = EmulateBackend().gemm(a, b)
    found = []
    for na, sa in orientations(a.scale).items():
        for nb, sb in orientations(b.scale).items():
            name = f"a:{na} {tuple(sa.shape)}{sa.stride()} b:{nb} {tuple(sb.shape)}{sb.stride()}"
            try:
                out = torch._scaled_mm(a.data, b.data.t(), scale_a=sa, scale_b=sb, out_dtype=torch.float32)
                torch.cuda.synchronize()
                err = float((out - ref).norm() / ref.norm())
                status = f"rel err {err:.1e}" + ("  MATCH" if err < 1e-5 else "")
                if err < 1e-5:
                    found.append((na, nb))
            except Exception as exc:  # noqa: BLE001 - report every rejection
                status = f"{type(exc).__name__}: {str(exc).splitlines()[0][:110]}"
            print(f"  1x128 x {'128x128' if rows_b == 128 else '1x128'}  {name}: {status}")
    return found


def time_ms(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def check_backend_layout(m: int, n: int, k: int, rows_b: int, dev: torch.device) -> float:
    """Relative error of ``scaled_mm_blockwise`` against the emulation."""
    g = torch.Generator(device=dev).manual_seed(k)
    x = torch.randn(m, k, device=dev, generator=g) * torch.exp2(torch.randint(-3, 4, (m, 1), device=dev, generator=g).float())
    w = torch.randn(n, k, device=dev, generator=g) * 0.05
    a, b = quantize(x, 1), quantize(w, rows_b)
    ref = EmulateBackend().gemm(a, b)
    return float((scaled_mm_blockwise(a, b) - ref).norm() / ref.norm())


def main() -> int:
    if not torch.cuda.is_available():
        print("bench/scaled_mm_layouts.py needs a CUDA GPU")
        return 0
    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}")
    f = getattr(torch.nn.functional, "scaled_mm", None)
    print(f"torch.nn.functional.scaled_mm: {inspect.signature(f) if f else 'absent'}")
    wrong = set()
    for rows_b in (128, 1):
        for k in (256, 384, 512, 896):
            label = f"1x128 x {'128x128' if rows_b == 128 else '1x128'} K={k}"
            try:
                err = check_backend_layout(48, 136, k, rows_b, dev)
                print(f"  backend layout {label}: rel err {err:.1e}" + ("  MATCH" if err < 1e-5 else "  WRONG"))
                if err >= 1e-5:
                    wrong.add(rows_b)
            except Exception as exc:  # noqa: BLE001 - report every rejection
                print(f"  backend layout {label}: {type(exc).__name__}: {str(exc).splitlines()[0][:110]}")
                wrong.add(rows_b)
    for rows_b in sorted(wrong):
        try_layouts(256, 384, 512, rows_b, dev)
    for rows_b in (128, 1):
        if rows_b in wrong:
            continue
        for m, n, k in [(4096, 7168, 7168), (16384, 7168, 7168), (16384, 2048, 7168), (16384, 7168, 2048)]:
            x = torch.randn(m, k, device=dev)
            w = torch.randn(n, k, device=dev) * 0.05
            da, db_t, sa, sb = scaled_mm_operands(quantize(x, 1), quantize(w, rows_b))
            xb, wb = x.bfloat16(), w.bfloat16()
            t_fp8 = time_ms(lambda: torch._scaled_mm(da, db_t, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16))
            t_bf16 = time_ms(lambda: xb @ wb.t())
            flops = 2 * m * n * k
            print(f"  {m}x{n}x{k} 1x128 x {'128x128' if rows_b == 128 else '1x128'}: scaled_mm {t_fp8:.3f} ms "
                  f"({flops / t_fp8 / 1e9:.0f} TFLOPS), bf16 {t_bf16:.3f} ms ({flops / t_bf16 / 1e9:.0f}), "
                  f"{t_bf16 / t_fp8:.2f}x bf16")
    return 0


if __name__ == "__main__":
    sys.exit(main())
