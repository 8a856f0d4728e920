"""Fused FP8 quantization (fp8/triton_quant.py) against the PyTorch operations it replaces, at the report's
shapes, with the payload bits and scales compared in the same run.

Every FP8 linear quantizes x and dy per micro-batch, each in 1x128 and 128x1 tiles (its weight once per step,
in 128x128 blocks); as PyTorch operations each is about ten kernels and an FP32 copy for the transposed
layout, fused one kernel per layout or one for both layouts of a tensor ("both from one read"). The table gives milliseconds, the bytes moved per second (input read once, FP8
payload and scales written once) and the speed-up.

    python bench/fp8_quant.py --device cuda            # in bash bench/gpu_check.sh fp8
    python bench/fp8_quant.py --device cpu --quick     # the PyTorch operations only (the kernel needs a GPU)
    TRITON_INTERPRET=1 python bench/fp8_quant.py --device cpu --quick   # the kernels in Triton's interpreter:
                                                       # their bits checked, timings meaningless
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.fp8_gemm import median_ms  # noqa: E402
from fp8.experts import ExpertRows  # noqa: E402
from fp8.quant import BLOCK, Quantized, quantize_with_torch_ops  # noqa: E402


def cases(tokens: list[int], dim: int, inter: int) -> list[tuple[str, tuple[int, int], str]]:
    """(name, shape, layout): activations in rows and columns, the report's weight shapes in blocks."""
    out = []
    for t in tokens:
        out.append((f"activation {t} x {dim}, 1x128", (t, dim), "rows"))
        out.append((f"activation {t} x {dim}, 128x1 (transposed)", (t, dim), "columns"))
        out.append((f"activation {t} x {dim}, both from one read", (t, dim), "both"))
        out.append((f"expert rows {t} x {dim}, both, aligned layout", (t, dim), "experts"))
    out.append((f"weight {inter} x {dim}, 128x128", (inter, dim), "blocks"))
    out.append((f"weight {dim} x {inter}, 128x128", (dim, inter), "blocks"))
    return out


def expert_rows(tokens: int, device: torch.device, experts: int = 32) -> ExpertRows:
    """The routed experts' rows of ``tokens`` rows (already top-k), spread unevenly over ``experts`` (a
    rank's share: V3's 256 over EP 8)."""
    weights = torch.rand(experts, generator=torch.Generator().manual_seed(0)) + 0.5
    counts = torch.bincount(torch.multinomial(weights, tokens, replacement=True, generator=torch.Generator().manual_seed(1)),
                            minlength=experts)
    return ExpertRows.of(counts.to(device), tokens)


def torch_ops(x: torch.Tensor, layout: str, rows: ExpertRows | None = None) -> tuple[Quantized, ...]:
    if layout == "experts":  # the 1x128 tiles and the aligned layout's 128x1 tiles, as the experts made them
        aligned = x.new_zeros(rows.padded_rows, x.shape[1]).index_copy_(0, rows.destinations(), x)
        return torch_ops(x, "rows") + torch_ops(aligned, "columns")
    if layout == "both":
        return torch_ops(x, "rows") + torch_ops(x, "columns")
    if layout == "columns":
        return (quantize_with_torch_ops(x.t().contiguous(), 1, "e4m3", False, False),)
    return (quantize_with_torch_ops(x, 1 if layout == "rows" else BLOCK, "e4m3", False, False),)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="small shapes")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="input dtype")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench/fp8_quant.py --device cuda needs a CUDA GPU; nothing measured")
        return 0
    fused = None
    if device.type == "cuda":
        from fp8 import triton_quant as fused
    elif args.quick and os.environ.get("TRITON_INTERPRET") == "1":  # a smoke test of the GPU path: bits only
        from fp8 import triton_quant as fused
    dtype = getattr(torch, args.dtype)
    shapes = cases([256] if args.quick else [4096, 16384], 512 if args.quick else 7168, 256 if args.quick else 2048)
    name = (torch.cuda.get_device_name(device) if device.type == "cuda" else
            "cpu (PyTorch operations only)" if fused is None else "cpu, kernels in Triton's interpreter")
    print(f"FP8 E4M3 quantization on {name}, {args.dtype} input, median of {args.repeats}")
    print(f"{'case':<44} {'torch ops ms':>12} {'fused ms':>9} {'fused GB/s':>10} {'speed-up':>8}  bits")
    failures = 0
    for label, shape, layout in shapes:
        x = torch.randn(*shape, device=device, dtype=dtype)
        rows = expert_rows(x.shape[0], device) if layout == "experts" else None
        reference = torch_ops(x, layout, rows)
        base = median_ms(lambda: torch_ops(x, layout, rows), device, args.warmup, args.repeats)
        if fused is None:
            print(f"{label:<44} {base:>12.3f} {'-':>9} {'-':>10} {'-':>8}  -")
            continue
        def separate_kernels(x):  # what the experts did before the row index: rows, scatter, columns
            aligned = x.new_zeros(rows.padded_rows, x.shape[1]).index_copy_(0, rows.destinations(), x)
            return fused.quantize_rows(x), fused.quantize_columns(aligned)

        run = {"rows": lambda x: (fused.quantize_rows(x),), "blocks": lambda x: (fused.quantize_blocks(x),),
               "columns": lambda x: (fused.quantize_columns(x),), "both": fused.quantize_rows_and_columns,
               "experts": lambda x: fused.quantize_rows_and_columns(x, row_index=rows.sources())}[layout]
        outs = run(x)
        same = all(torch.equal(out.scale, ref.scale) and torch.equal(out.data.view(torch.uint8), ref.data.view(torch.uint8))
                   for out, ref in zip(outs, reference))
        failures += not same
        ms = median_ms(lambda: run(x), device, args.warmup, args.repeats)
        moved = x.numel() * x.element_size() + sum(out.data.numel() + out.scale.numel() * 4 for out in outs)
        note = ""
        if layout in ("both", "experts"):  # against the kernels it replaces
            before = separate_kernels if layout == "experts" else lambda x: (fused.quantize_rows(x),
                                                                             fused.quantize_columns(x))
            two = median_ms(lambda: before(x), device, args.warmup, args.repeats)
            note = f"  (separate kernels: {two:.3f} ms, {two / ms:.2f}x)"
        print(f"{label:<44} {base:>12.3f} {ms:>9.3f} {moved / ms / 1e6:>10.0f} {base / ms:>7.2f}x  "
              f"{'same' if same else 'DIFFER'}{note}")
    if failures:
        print(f"{failures} case(s) where the fused kernel's bits differ from the PyTorch operations")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
