"""Routed experts: our ``RoutedExperts`` (tokens sorted by expert once, one slice per expert, or one grouped
GEMM per projection) against a plain loop over the experts (for each expert: find its tokens with a mask,
gather them, SwiGLU, scatter-add the weighted output), the way an eager MoE is usually first written.

Same weights and tokens. The check routes them alike for all (our gate on random hidden states); the timed
rounds give each implementation, in each round, the routing of other hidden states, so the experts' row
counts change as they do from step to step and no implementation meets shapes another has just met (on
the CPU, oneDNN's half-precision GEMMs build a kernel per new shape and cache it); the total of rows, and
so the FLOPs, are the same for all. Forward + backward of ``out.sum()``. Rounds alternate between the
implementations and the median is reported. Checked in the same run: outputs, input gradients and weight
gradients of each implementation against the loop's, relative (Frobenius) difference within 1e-5 in fp32
(only the summation order differs) and 2e-2 in bf16.

``model.expert_impl`` options timed: ``loop`` (the sorted slices; what ``auto`` runs on CPUs in fp32) and
``loop_padded`` (each expert's rows rounded up to a multiple of 32: what ``auto`` runs in half precision
on CPUs, where oneDNN builds a kernel per new GEMM shape) on every device, ``grouped_mm``
(``torch._grouped_mm``: what ``auto`` runs for bf16 on GPUs) on CUDA only (its CPU backward is not
implemented in torch 2.13).

    python bench/moe_experts.py                        # CPU fp32: 64 experts top-6, 4096 tokens
    python bench/moe_experts.py --dtype bfloat16       # CPU bf16
    python bench/moe_experts.py --device cuda          # bf16, loop, loop_padded and grouped_mm
    python bench/moe_experts.py --tokens 512 --dim 128 --inter 64 --experts 16 --topk 4
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from train.config import ModelConfig
from train.model import Gate, RoutedExperts, Routing

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def plain_loop(x: Tensor, routing: Routing, w1: Tensor, w2: Tensor, w3: Tensor) -> Tensor:
    """The baseline: one pass over every expert, masking the tokens routed to it (no sort)."""
    out = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        token, slot = (routing.indices == e).nonzero(as_tuple=True)
        if token.numel() == 0:
            continue
        xs = x[token]
        y = (F.silu(xs @ w1[e].t()) * (xs @ w3[e].t())) @ w2[e].t()
        out = out.index_add(0, token, (y.float() * routing.weights[token, slot, None]).to(x.dtype))
    return out


@dataclass
class ExpertsResult:
    """Median forward + backward seconds per implementation ("baseline" = ``plain_loop``), and each
    implementation's largest relative difference from the baseline over output and gradients."""

    tokens: int
    dtype: torch.dtype
    seconds: dict[str, float]
    rel_err: dict[str, float]
    tolerance: float


def impls_for(device: torch.device) -> list[str]:
    grouped = device.type == "cuda" and hasattr(torch, "_grouped_mm")
    return ["loop", "loop_padded", *(["grouped_mm"] if grouped else [])]


def rel_diff(a: Tensor, b: Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def compare(tokens: int = 4096, dim: int = 512, inter: int = 128, experts: int = 64, topk: int = 6,
            device: str = "cpu", rounds: int = 5, seed: int = 0,
            perturb: float = 0.0, dtype: torch.dtype | None = None) -> ExpertsResult:
    """Time and check each ``impls_for(device)`` against ``plain_loop``. ``perturb`` scales our outputs by
    (1 + perturb) before the check (to see the check fail; 0 in a real run). ``dtype``: None for bf16 on
    CUDA and fp32 elsewhere."""
    dev = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    cfg = ModelConfig(dim=dim, moe_inter_dim=inter, n_routed_experts=experts, n_activated_experts=topk,
                      n_expert_groups=1, topk_groups=1)
    g = torch.Generator().manual_seed(seed)
    gate = Gate(cfg)
    torch.nn.init.normal_(gate.weight, std=dim**-0.5, generator=g)
    x0 = torch.randn(tokens, dim, generator=g)
    def route(x: Tensor) -> Routing:
        with torch.no_grad():
            r = gate(x)
        return Routing(*(t.to(dev) for t in (r.weights, r.indices, r.scores)))

    check_routing = route(x0)
    weights = [(torch.randn(experts, *shape, generator=g) * shape[-1] ** -0.5).to(dev, dtype)
               for shape in ((inter, dim), (dim, inter), (inter, dim))]
    x0 = x0.to(dev, dtype)

    modules = {}
    for impl in impls_for(dev):
        module = RoutedExperts(ModelConfig(**{**cfg.__dict__, "expert_impl": impl})).to(dev)
        with torch.no_grad():
            for p, w in zip((module.w1, module.w2, module.w3), weights):
                p.copy_(w)
        modules[impl] = module.to(dtype)
    baseline_w = [w.clone().requires_grad_(True) for w in weights]

    def run(impl: str, routing: Routing = check_routing) -> tuple[Tensor, list[Tensor]]:
        x = x0.detach().requires_grad_(True)
        if impl == "baseline":
            params = baseline_w
            out = plain_loop(x, routing, *params)
        else:
            module = modules[impl]
            params = [module.w1, module.w2, module.w3]
            out = module(x, routing)
        for p in params:
            p.grad = None
        out.float().sum().backward()
        return out.detach(), [x.grad, *(p.grad for p in params)]

    def timed(impl: str, routing: Routing) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        run(impl, routing)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t0

    names = ["baseline", *modules]
    routings = [{name: route(torch.randn(tokens, dim, generator=g)) for name in names} for _ in range(rounds)]
    ref_out, ref_grads = run("baseline")
    rel_err = {}
    for impl in modules:
        out, grads = run(impl)
        out = out * (1 + perturb)
        rel_err[impl] = max(rel_diff(a, b) for a, b in zip([out, *grads], [ref_out, *ref_grads]))
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):  # alternate, starting with a different implementation each round
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(timed(name, routings[r][name]))
    return ExpertsResult(tokens=tokens, dtype=dtype, seconds={k: statistics.median(v) for k, v in times.items()},
                         rel_err=rel_err, tolerance=TOLERANCE[dtype])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--inter", type=int, default=128, help="moe_inter_dim")
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--topk", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                    help="auto: bf16 on CUDA, fp32 elsewhere")
    args = ap.parse_args(argv)
    r = compare(args.tokens, args.dim, args.inter, args.experts, args.topk, args.device, args.rounds,
                dtype=None if args.dtype == "auto" else getattr(torch, args.dtype))
    print(f"{args.tokens} tokens, dim {args.dim}, {args.experts} experts x {args.inter} top-{args.topk}, {r.dtype}, "
          f"{args.device}, {torch.get_num_threads()} threads; forward + backward, median of {args.rounds} "
          "alternating rounds")
    base = r.seconds["baseline"]
    print(f"  {'plain loop (baseline)':<22} {base * 1e3:8.1f} ms  {args.tokens / base:>10,.0f} tokens/s")
    failed = False
    for impl, err in r.rel_err.items():
        s = r.seconds[impl]
        ok = err <= r.tolerance
        failed |= not ok
        print(f"  {f'ours expert_impl={impl}':<22} {s * 1e3:8.1f} ms  {args.tokens / s:>10,.0f} tokens/s  "
              f"{base / s:.2f}x  max rel. diff {err:.1e} ({'ok' if ok else 'FAILED'}, tolerance {r.tolerance:g})")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
