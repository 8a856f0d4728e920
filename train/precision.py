"""BF16 working weights, FP32 masters (report sec 3.3, Figure 6; sec 3.3.3).

With ``train.param_dtype`` BF16 (``auto`` under BF16 compute) the model holds BF16 weights and computes with
them; the FP32 masters live in the optimizer, each data-parallel rank keeping the slice it updates
(parallel/zero.py), which all-gathers the new weights rounded to BF16. Weight gradients stay FP32: each BF16
parameter's ``grad_dtype`` is FP32, so autograd casts every incoming gradient up before it accumulates it
over the micro-batches, and keeps an FP32 gradient that a custom backward returns (FP8 Wgrad) unrounded.
Checkpoints hold the FP32 masters (``train.checkpoint.model_state(..., masters=...)``).

The report keeps "the MoE gating modules and normalization operators" in their original precision: the
RMSNorm weights and the gate weight stay FP32 parameters (a few per mille of the model; they feed FP32
arithmetic). The embedding's gradient is summed in FP32 (``train.ops.embedding``).

Under BF16 autocast this computes what FP32 parameters compute, bit for bit (tests/integration/
test_working_weights.py): every GEMM read the BF16 rounding of its FP32 weight already, made once per step;
now that rounding is the parameter. Per parameter a rank holds 2 bytes of weight and 4/dp of master
instead of 4 bytes of weight (and the step's 2-byte casts): docs/memory.md.
"""

from __future__ import annotations

import torch
from torch import nn

from train.errors import UserError
from train.model import Gate, RMSNorm

KEEP_FP32 = (RMSNorm, Gate)  # modules whose parameters stay FP32 (report sec 3.3.1)


def fp32_parameter_ids(model: nn.Module) -> set[int]:
    """ids of the parameters that stay FP32 whatever ``train.param_dtype`` says."""
    return {id(p) for module in model.modules() if isinstance(module, KEEP_FP32) for p in module.parameters()}


def cast_working_weights(model: nn.Module, dtype: torch.dtype) -> int:
    """Make ``model``'s parameters (except ``KEEP_FP32``'s) ``dtype`` in place, keeping each Parameter object,
    with FP32 gradients; returns how many elements were cast. ``ZeroAdamW(..., working_dtype=...)`` calls it
    once the weights are initialised (or loaded) in FP32, after keeping its slices' FP32 values as the masters."""
    if dtype == torch.float32:
        return 0
    if not hasattr(torch.Tensor, "grad_dtype"):
        raise UserError(f"train.param_dtype={dtype} needs torch >= 2.10 (Tensor.grad_dtype keeps the gradients "
                        f"FP32); this is torch {torch.__version__}: set train.param_dtype=float32 or upgrade torch")
    keep = fp32_parameter_ids(model)
    cast = 0
    for param in model.parameters():
        if id(param) in keep or param.dtype == dtype:
            continue
        with torch.no_grad():
            param.data = param.data.to(dtype)
        param.grad_dtype = torch.float32
        cast += param.numel()
    return cast
