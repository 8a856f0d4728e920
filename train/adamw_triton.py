"""One-pass AdamW for CUDA (Triton): FP32 master, BF16 or FP32 moments, optional low-precision parameter.

``train.optim.AdamW``'s ``update="triton"`` (the default on CUDA where Triton imports). Each tensor is read
and written once: master, gradient and both moments in, master, moments and the rounded working weight
out, about 22 bytes per parameter with BF16 moments and weights against about 130 for the foreach
reference, whose BF16 moments are widened into FP32 temporaries and rounded back (sec 3.3.3 keeps the
moments in BF16). The arithmetic is the reference's (``AdamW._update``) operation for operation in FP32,
with IEEE-rounded square root and divisions (``sqrt_rn``, ``div_rn``); FMA contraction may differ, so the
two agree to FP32 rounding (tests/unit/test_optim_triton.py, under ``TRITON_INTERPRET=1`` on the CPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fp8.triton_gemm import jitted

BLOCK = 1024


def _adamw_kernel(master_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, param_ptr, n,
                  decay, one_minus_beta1, beta2, one_minus_beta2, bias_correction2_sqrt, eps, step_size,
                  HAS_PARAM: tl.constexpr, BLOCK: tl.constexpr):
    """A plain function: ``fp8.triton_gemm.jitted`` wraps it with triton.jit once per mode (compiled or
    interpreted); it calls no other jitted function, so both modes can run in one process."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    master = tl.load(master_ptr + offs, mask=mask)
    grad = tl.load(grad_ptr + offs, mask=mask).to(tl.float32)
    m = tl.load(exp_avg_ptr + offs, mask=mask).to(tl.float32)
    v = tl.load(exp_avg_sq_ptr + offs, mask=mask).to(tl.float32)
    master = master * decay  # decoupled weight decay, before the moments (as torch.optim.AdamW)
    m = m + one_minus_beta1 * (grad - m)  # lerp(m, g, 1 - beta1), weight < 0.5
    v = v * beta2
    v = v + one_minus_beta2 * grad * grad  # addcmul's order: (value * g) * g
    denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    master = master + step_size * tl.div_rn(m, denom)
    tl.store(master_ptr + offs, master, mask=mask)
    # BF16 stores round to nearest even on the bits: what .to(tl.bfloat16) does compiled, and what Triton's
    # interpreter does not (it truncates); the low 16 bits of the result are zero, so the cast is exact
    if exp_avg_ptr.dtype.element_ty == tl.bfloat16:
        bits = m.to(tl.uint32, bitcast=True)
        m = tl.where(m != m, m, ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True))
    tl.store(exp_avg_ptr + offs, m.to(exp_avg_ptr.dtype.element_ty), mask=mask)
    if exp_avg_sq_ptr.dtype.element_ty == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        v = tl.where(v != v, v, ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True))
    tl.store(exp_avg_sq_ptr + offs, v.to(exp_avg_sq_ptr.dtype.element_ty), mask=mask)
    if HAS_PARAM:
        if param_ptr.dtype.element_ty == tl.bfloat16:
            bits = master.to(tl.uint32, bitcast=True)
            master = tl.where(master != master, master,
                              ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True))
        tl.store(param_ptr + offs, master.to(param_ptr.dtype.element_ty), mask=mask)


def adamw_update(master: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, param: Tensor | None, *,
                 lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: float) -> None:
    """One AdamW step of one tensor in place (``step``: the update's number, from 1). ``param``: the
    low-precision parameter that receives the master rounded, or None when the master is the parameter.
    All contiguous and of one shape; the gradient in any float dtype."""
    tensors = [master, grad, exp_avg, exp_avg_sq] + ([param] if param is not None else [])
    if any(not t.is_contiguous() or t.shape != master.shape for t in tensors):
        raise ValueError("adamw_update: master, grad, moments and param must be contiguous and of one shape")
    if master.dtype != torch.float32:
        raise ValueError(f"adamw_update: the master must be FP32, got {master.dtype}")
    n = master.numel()
    if n == 0:
        return
    scalars = [1 - lr * weight_decay, 1 - beta1, beta2, 1 - beta2, (1 - beta2 ** step) ** 0.5, eps,
               -(lr / (1 - beta1 ** step))]
    # rounded to FP32 here, as torch's foreach ops round a Python scalar (Triton's interpreter would keep FP64)
    scalars = torch.tensor(scalars, dtype=torch.float32).tolist()
    jitted(_adamw_kernel)[(triton.cdiv(n, BLOCK),)](
        master, grad, exp_avg, exp_avg_sq, param if param is not None else master, n, *scalars,
        HAS_PARAM=param is not None, BLOCK=BLOCK)
