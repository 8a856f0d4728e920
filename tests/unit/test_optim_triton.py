"""The one-pass Triton AdamW (train/adamw_triton.py, ``AdamW(update="triton")``) against the foreach reference,
run by Triton's interpreter on the CPU (``TRITON_INTERPRET=1``; the compiled kernel on a GPU through the
same tests where CUDA is present)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from tests.unit.test_optim import BETAS, LR, groups, make_grads, make_params, run
from train.errors import UserError
from train.optim import AdamW

pytest.importorskip("triton", reason="Triton is not installed (the gpu extra)")


@pytest.fixture
def device(monkeypatch) -> str:
    """CUDA where present (the compiled kernel), else the CPU with Triton's interpreter."""
    if torch.cuda.is_available():
        return "cuda"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return "cpu"


def on(params: list[nn.Parameter], device: str) -> list[nn.Parameter]:
    return [nn.Parameter(p.detach().to(device)) for p in params]


@pytest.mark.parametrize("moment_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_triton_agrees_with_foreach(device, moment_dtype, param_dtype):
    """20 steps with weight decay and a changing lr, FP32 or BF16 parameters (the latter with FP32 masters in
    the state), BF16 or FP32 moments. The kernel runs the reference's FP32 operations with IEEE-rounded
    square root and divisions, but torch's kernels associate some of them differently (CPU addcdiv:
    (value * m) / denom; lerp fused into an FMA) and the GPU compiler may contract others, so results
    differ by FP32 rounding, bounded per element:
    - masters: a few ulps of the master (2^-21 relative: the last addition's rounding, repeated) plus, of
      the element's movement, 1e-5 with FP32 moments (a few ulps of the update, each step) or 2^-8 with
      BF16 moments (a moment one FP32 ulp apart can round to the neighbouring BF16 value, one BF16 ulp);
    - BF16 moments: within one BF16 ulp (2^-8 relative), and nearly all bitwise equal;
    - FP32 moments: within 2^-18 of the tensor's largest (a few ulps accumulated over the steps)."""
    grads = [[g.to(device) for g in step] for step in make_grads(dtype=param_dtype)]
    a, b = on(make_params(param_dtype), device), on(make_params(param_dtype), device)
    start = [p.detach().float().clone() for p in a]
    reference = AdamW(groups(a), lr=LR, betas=BETAS, moment_dtype=moment_dtype, update="foreach")
    fast = AdamW(groups(b), lr=LR, betas=BETAS, moment_dtype=moment_dtype, update="triton")
    run(reference, a, grads)
    run(fast, b, grads)
    of_movement = 2.0**-8 if moment_dtype == torch.bfloat16 else 1e-5
    equal = total = 0
    for p, q, p0 in zip(a, b, start):
        x, y = reference.state[p], fast.state[q]
        mp, mq = x.get("master", p).detach(), y.get("master", q).detach()
        assert mq.dtype == torch.float32 and ("master" in y) == (param_dtype != torch.float32)
        moved = (mp - p0).abs()
        assert moved.max() > 0 and ((mq - mp).abs() <= 2.0**-21 * mp.abs() + of_movement * moved).all()
        assert q.dtype == param_dtype and torch.equal(q.detach(), mq.to(param_dtype))  # the master, rounded
        assert y["step"].item() == x["step"].item() == len(grads)
        for key in ("exp_avg", "exp_avg_sq"):
            assert y[key].dtype == moment_dtype
            if moment_dtype == torch.bfloat16:
                torch.testing.assert_close(y[key].float(), x[key].float(), rtol=2.0**-8, atol=0)
                equal += int((y[key] == x[key]).sum())
                total += y[key].numel()
            else:
                assert ((y[key] - x[key]).abs() <= 2.0**-18 * x[key].abs().max()).all()
    assert equal >= 0.99 * total


def test_non_contiguous_tensors_and_missing_gradients(device):
    """A transposed parameter goes through the reference path; a parameter without a gradient is skipped
    (its step does not advance); an empty one is harmless."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(40, 30), (7,), (0, 5)]
    base = [torch.randn(s, generator=gen) for s in shapes]
    a = [nn.Parameter(base[0].t().contiguous().t().to(device)), nn.Parameter(base[1].to(device)),
         nn.Parameter(base[2].to(device))]
    b = [nn.Parameter(t.detach().clone()) for t in a]
    assert not a[0].is_contiguous() and not b[0].is_contiguous()
    reference = AdamW([{"params": a}], lr=LR, update="foreach")
    fast = AdamW([{"params": b}], lr=LR, update="triton")
    for opt, params in ((reference, a), (fast, b)):
        for step in range(3):
            params[0].grad = torch.full_like(params[0], 0.1 * (step + 1))
            params[2].grad = torch.zeros_like(params[2])
            opt.step()
    assert torch.equal(a[0], b[0]) and torch.equal(b[1], base[1].to(device))
    assert len(fast.state[b[1]]) == 0 and fast.state[b[0]]["step"].item() == 3


def test_auto_picks_triton_on_cuda_only():
    opt = AdamW([nn.Parameter(torch.ones(2))])
    assert opt.update_on(torch.device("cpu")) == "fused"
    assert opt.update_on(torch.device("cuda")) == "triton"
    assert AdamW([nn.Parameter(torch.ones(2))], update="foreach").update_on(torch.device("cuda")) == "foreach"
    with pytest.raises(ValueError, match="update"):
        AdamW([nn.Parameter(torch.ones(2))], update="fast")
    p = nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    with pytest.raises(UserError, match="optim.update=triton runs on CUDA .* not on cpu"):
        AdamW([p], update="triton").step()  # without TRITON_INTERPRET


@pytest.mark.usefixtures("compiled_mode")
@pytest.mark.parametrize("moments", ["bf16", "fp32"])
def test_compiles_for_hopper_with_ieee_roots_and_divisions_and_vector_accesses(moments):
    """The kernel as a launch on an H100/H200 compiles it (no GPU needed to compile): square root and
    divisions IEEE-rounded (``sqrt.rn``, ``div.rn``; the approximate ones would break the agreement
    above), and 16-byte loads and stores where the size is a multiple of 16 (Triton's specialization)."""
    import triton
    from triton.backends.compiler import GPUTarget

    from train.adamw_triton import BLOCK, _adamw_kernel

    signature = {"master_ptr": "*fp32", "grad_ptr": "*fp32", "exp_avg_ptr": f"*{moments}", "exp_avg_sq_ptr": f"*{moments}",
                 "param_ptr": "*bf16", "n": "i32", "HAS_PARAM": "constexpr", "BLOCK": "constexpr"}
    for name in ("decay", "one_minus_beta1", "beta2", "one_minus_beta2", "bias_correction2_sqrt", "eps", "step_size"):
        signature[name] = "fp32"
    signature = {name: signature[name] for name in triton.jit(_adamw_kernel).arg_names}
    attrs = {(index,): [["tt.divisibility", 16]] for index in range(6)}  # pointers and n
    try:
        src = triton.compiler.ASTSource(fn=triton.jit(_adamw_kernel), signature=signature,
                                        constexprs={"HAS_PARAM": True, "BLOCK": BLOCK}, attrs=attrs)
    except TypeError as exc:  # written against Triton 3.9's compiler API
        pytest.skip(f"Triton {triton.__version__}'s ASTSource differs ({exc})")
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]
    assert "sqrt.rn.f32" in ptx and "div.rn.f32" in ptx
    assert "sqrt.approx" not in ptx and "div.full" not in ptx and "div.approx" not in ptx
    assert "ld.global.v4" in ptx and "st.global.v4" in ptx


def test_a_kernel_that_cannot_build_falls_back_to_foreach_once(device, monkeypatch):
    """With update="auto", a Triton kernel that fails (to compile, on some GPU) costs one warning: this and
    every later update run the foreach reference, nothing half-updated (the step counts advance once). Asked
    for by name (update="triton"), the failure is raised."""
    import train.adamw_triton as at

    def broken(*args, **kwargs):
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(at, "adamw_update", broken)
    grads = [[g.to(device) for g in step] for step in make_grads()[:2]]
    a, b = on(make_params(), device), on(make_params(), device)
    reference = AdamW(groups(a), lr=LR, betas=BETAS, update="foreach")
    fallback = AdamW(groups(b), lr=LR, betas=BETAS, update="auto")
    for step_grads in grads:
        for params, opt in ((a, reference), (b, fallback)):
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            if opt is reference:
                opt.step()
                continue
            for p in params:  # what step() does before choosing the update
                if not opt.state[p]:
                    opt.init_state(p)
            with pytest.warns(RuntimeWarning, match="Triton update failed") if opt.triton_failure is None \
                    else contextlib.nullcontext(), torch.no_grad():
                for group in opt.param_groups:
                    opt._update_triton([p for p in group["params"] if p.grad is not None], group)
    assert fallback.triton_failure.startswith("RuntimeError: PassManager::run failed")
    assert fallback.update_on(torch.device("cuda")) == "foreach"
    for p, q in zip(a, b):
        assert torch.equal(p, q) and fallback.state[q]["step"].item() == 2
    explicit = AdamW(groups(b), lr=LR, update="triton")
    for p, g in zip(b, grads[0]):
        p.grad = g.clone()
        explicit.init_state(p)
    with pytest.raises(RuntimeError, match="PassManager"), torch.no_grad():
        explicit._update_triton([p for p in explicit.param_groups[0]["params"]], explicit.param_groups[0])
