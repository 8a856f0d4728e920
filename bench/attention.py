"""MLA's attention operator (report sec 2.1.1): SDPA with query/key head dim d_qk = d_nope + d_rope and value
head dim d_v < d_qk (192 and 128 in V3), forward + backward, causal.

``train/model.py`` pads v with zeros to d_qk so that the fused kernels that want one head dim take it (the
baseline here: the padding costs a third more P·V work and memory in v and the output). This times, on the
same inputs: the padded call and the native (unpadded) one, each with PyTorch's own choice of backend and
under each backend forced (flash, memory-efficient, cuDNN, math), where it runs; and checks every output and
input gradient against FP32 math attention on the same inputs (tolerance: BF16 2e-2 relative, Frobenius,
for bf16 outputs and gradients after a softmax; FP32 1e-5).

    python bench/attention.py                      # CPU, the small preset's dims
    python bench/attention.py --device cuda        # small's and V3's dims (d_qk 192, d_v 128, T 4096)
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    seq: int
    heads: int
    d_qk: int
    d_v: int


SMALL = Shape("small", 8, 1024, 8, 96, 64)  # +conf=small: nope 64 + rope 32, v 64
V3 = Shape("V3", 1, 4096, 16, 192, 128)  # +conf=16b/1gpu/671b head dims (16 heads: 16b and 1gpu)
QUICK = Shape("quick", 1, 128, 2, 96, 64)

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
BASELINE = "padded, default"


@dataclass
class AttentionResult:
    shape: Shape
    dtype: torch.dtype
    seconds: dict[str, float] = field(default_factory=dict)  # median fwd+bwd per variant that runs
    rel_err: dict[str, float] = field(default_factory=dict)  # worst of output and gradients vs FP32 math
    refused: dict[str, str] = field(default_factory=dict)  # variant -> why it does not run
    tolerance: float = 0.0


def attend(q: Tensor, k: Tensor, v: Tensor, pad: bool) -> Tensor:
    """[B, H, T, d] inputs; v padded to q's head dim and the padding dropped after (the model's call), or not."""
    d_v = v.shape[-1]
    if pad and q.shape[-1] > d_v:
        v = F.pad(v, (0, q.shape[-1] - d_v))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)[..., :d_v]


def inputs(shape: Shape, device: torch.device, dtype: torch.dtype, seed: int = 0) -> list[Tensor]:
    gen = torch.Generator(device=device).manual_seed(seed)
    dims = [shape.d_qk, shape.d_qk, shape.d_v]
    return [torch.randn(shape.batch, shape.heads, shape.seq, d, generator=gen, device=device, dtype=dtype)
            for d in dims]


def fwd_bwd(qkv: list[Tensor], pad: bool, backend: SDPBackend | None, grad_out: Tensor) -> list[Tensor]:
    leaves = [t.detach().requires_grad_() for t in qkv]
    context = sdpa_kernel([backend]) if backend is not None else torch.enable_grad()
    with context, warnings.catch_warnings():  # a refusing backend warns why, then raises: the reason is kept
        warnings.simplefilter("ignore", UserWarning)
        out = attend(*leaves, pad=pad)
        out.backward(grad_out)
    return [out.detach()] + [t.grad for t in leaves]


def compare(shape: Shape, device: str = "cpu", rounds: int = 5, perturb: float = 0.0) -> AttentionResult:
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    result = AttentionResult(shape, dtype, tolerance=2e-2 if dtype == torch.bfloat16 else 1e-5)
    qkv = inputs(shape, dev, dtype)
    grad_out = inputs(shape, dev, dtype, seed=1)[2]
    want = fwd_bwd([t.float() for t in qkv], False, SDPBackend.MATH, grad_out.float())
    variants = {BASELINE: (True, None), "native, default": (False, None)}
    for name, backend in BACKENDS.items():
        variants[f"padded, {name}"] = (True, backend)
        variants[f"native, {name}"] = (False, backend)

    def run(name: str) -> float:
        pad, backend = variants[name]
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        fwd_bwd(qkv, pad, backend, grad_out)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t0

    for name, (pad, backend) in list(variants.items()):
        try:
            got = fwd_bwd(qkv, pad, backend, grad_out)
        except RuntimeError as exc:  # "No available kernel" and the like: this backend refuses the call
            result.refused[name] = str(exc).strip().splitlines()[0][:100]
            del variants[name]
            continue
        scale = 1 + perturb
        result.rel_err[name] = max(float((g.double() * scale - w.double()).norm() / w.double().norm())
                                   for g, w in zip(got, want))
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):  # alternate, starting with another variant each round
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(run(name))
    result.seconds = {name: statistics.median(t) for name, t in times.items()}
    return result


def report(r: AttentionResult) -> None:
    s = r.shape
    print(f"{s.name}: batch {s.batch} x seq {s.seq}, {s.heads} heads, d_qk {s.d_qk}, d_v {s.d_v}, "
          f"{str(r.dtype).removeprefix('torch.')}; fwd+bwd, median")
    base = r.seconds[BASELINE]
    for name, seconds in sorted(r.seconds.items(), key=lambda item: item[1]):
        ok = "ok" if r.rel_err[name] <= r.tolerance else "WRONG"
        print(f"  {name:<20} {seconds * 1e3:9.2f} ms  {base / seconds:5.2f}x the model's call  "
              f"rel err {r.rel_err[name]:.1e} ({ok})")
    for name, why in r.refused.items():
        print(f"  {name:<20} does not run: {why}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/attention.py --device cuda needs a CUDA GPU; nothing measured")
        return 0
    shapes = [SMALL, V3] if args.device == "cuda" else [Shape("small (batch 2, seq 512)", 2, 512, 8, 96, 64)]
    failed = False
    for shape in shapes:
        r = compare(shape, args.device, args.rounds)
        report(r)
        failed |= any(err > r.tolerance for err in r.rel_err.values())
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
