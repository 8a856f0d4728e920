"""Memory-lean autograd functions for the block's elementwise pieces (report sec 3.2.3).

Each computes what the plain PyTorch expression ``*_reference`` computes, but keeps only its inputs
for backward and rebuilds the cheap rest there. Autograd on the plain expressions keeps intermediates
besides: RMSNorm an FP32 copy of its input and its normalised output, the router an FP32 copy of its
input, SwiGLU silu(gate), the weighted SwiGLU FP32 copies of gate and up, the routed combine
(``index_add_``) every expert output row.
tests/unit/test_ops.py compares each with its reference; tests/unit/test_plan_memory.py checks that
the planner's activation bytes are what autograd keeps.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary


# The casts of weights made inside ``shared_weight_casts`` (one training step): weight -> its cast.
_STEP_CASTS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("step_weight_casts", default=None)


@contextlib.contextmanager
def shared_weight_casts() -> Iterator[None]:
    """Inside: ``cast_weight`` casts each weight once and hands every caller the same copy (as autocast
    does for the weights it casts itself; train/runtime.py ``one_weight_cast_per_step``)."""
    token = _STEP_CASTS.set({})
    try:
        yield
    finally:
        _STEP_CASTS.reset(token)


def step_memo(name: str) -> WeakIdKeyDictionary | None:
    """Inside ``shared_weight_casts`` (one training step), the memo ``name``: tensor -> what was derived
    from it, dropped with the tensor (None outside). fp8/linear.py keeps there the FP8 quantization of
    an input that two linears read (the MLA down-projections, SwiGLU's w1 and w3): one copy, not two."""
    cache = _STEP_CASTS.get()
    return None if cache is None else cache.setdefault(name, WeakIdKeyDictionary())


def cast_weight(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """``weight.to(dtype)``; inside ``shared_weight_casts`` one cast per weight, shared by the forwards of
    all micro-batches (each keeps it for its backward: one copy instead of one per micro-batch)."""
    cache = _STEP_CASTS.get()
    if weight.dtype == dtype or cache is None or not torch.is_grad_enabled():
        return weight.to(dtype)
    key = (id(weight), dtype)
    if key not in cache or cache[key][0] is not weight:
        cache[key] = (weight, weight.to(dtype))
    return cache[key][1]


class _EmbeddingFp32Grad(torch.autograd.Function):
    """weight[tokens] for a lower-precision table, whose gradient is summed in FP32."""

    @staticmethod
    def forward(ctx, tokens: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(tokens)
        ctx.rows = weight.shape[0]
        return F.embedding(tokens, weight)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor]:
        (tokens,) = ctx.saved_tensors
        return None, torch.ops.aten.embedding_dense_backward(grad.float(), tokens, ctx.rows, -1, False)


def embedding(tokens: Tensor, weight: Tensor) -> Tensor:
    """``F.embedding(tokens, weight)``; for a BF16 table (train/precision.py) the gradient rows of a token that
    occurs many times are summed in FP32, as for an FP32 table (a BF16 sum of thousands of rows loses the
    small ones); the parameter's ``grad_dtype`` (FP32) keeps that sum unrounded."""
    wide = torch.promote_types(weight.dtype, torch.float32) == weight.dtype  # FP32 or FP64: the plain op
    if wide or not (weight.requires_grad and torch.is_grad_enabled()):
        return F.embedding(tokens, weight)
    return _EmbeddingFp32Grad.apply(tokens, weight)


def _wide(x: Tensor) -> Tensor:
    """x in FP32, or wider if it already is (float64 in gradcheck)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def to_compute_dtype(x: Tensor) -> Tensor:
    """x in the autocast dtype when autocast is on (else x): cast once for two GEMMs that share an input
    (autocast would cast, and autograd keep, a copy for each)."""
    device = x.device.type
    return x.to(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else x


def _inverse_rms(x32: Tensor, eps: float) -> Tensor:
    """1 / sqrt(mean(x^2) + eps) per row, in x32's (FP32 or wider) dtype."""
    return torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps)


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm and its weight in FP32, the result in x's dtype (the residual stream's)."""
    x32 = _wide(x)
    return (weight * (x32 * _inverse_rms(x32, eps))).to(x.dtype)


class _RMSNorm(torch.autograd.Function):
    """``rms_norm_reference`` keeping x and the per-row FP32 1/rms (what fused RMSNorm kernels keep)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        x32 = _wide(x)
        rstd = _inverse_rms(x32, eps)
        ctx.save_for_backward(x, weight, rstd)
        return (weight * (x32 * rstd)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, rstd = ctx.saved_tensors
        normed = _wide(x) * rstd
        grad32 = _wide(grad)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad32 * normed).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        g = grad32 * weight  # the gradient of the normalised rows
        grad_x = rstd * (g - normed * (g * normed).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_weight, None


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm as ``rms_norm_reference``, keeping only x and 1/rms for backward (the norm's output is
    rebuilt there: sec 3.2.3, "recomputation of RMSNorm")."""
    if not torch.is_grad_enabled() or not (x.requires_grad or weight.requires_grad):
        return rms_norm_reference(x, weight, eps)
    return _RMSNorm.apply(x, weight, eps)


def gate_scores_reference(x: Tensor, weight: Tensor) -> Tensor:
    """The router's affinities sigmoid(x W^T) (eq. 15), in FP32 whatever x's dtype."""
    return F.linear(_wide(x), _wide(weight)).sigmoid()


class _GateScores(torch.autograd.Function):
    """``gate_scores_reference`` keeping x in its own dtype (autograd keeps its FP32 copy) and the scores."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:
        scores = F.linear(_wide(x), _wide(weight)).sigmoid()
        ctx.save_for_backward(x, weight, scores)
        return scores

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, scores = ctx.saved_tensors
        grad_logits = torch.ops.aten.sigmoid_backward(grad, scores)
        grad_x = (grad_logits @ _wide(weight)).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_weight = (grad_logits.t() @ _wide(x)).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_weight


def gate_scores(x: Tensor, weight: Tensor) -> Tensor:
    """Router affinities s = sigmoid(u W^T) of tokens x [N, D] in FP32 (sec 2.1.2), keeping x as it is."""
    if not torch.is_grad_enabled() or not (x.requires_grad or weight.requires_grad):
        return gate_scores_reference(x, weight)
    return _GateScores.apply(x, weight)


def swiglu_reference(gate: Tensor, up: Tensor, weights: Tensor | None = None) -> Tensor:
    """silu(gate) * up; with per-row ``weights`` (the routed experts' gate weights), times them, in FP32."""
    if weights is None:
        return F.silu(gate) * up
    return (F.silu(_wide(gate)) * _wide(up) * weights[:, None]).to(gate.dtype)


class _SwiGLU(torch.autograd.Function):
    """``swiglu_reference`` keeping gate and up only (silu(gate) is rebuilt in backward)."""

    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: Tensor):
        gate, up = ctx.saved_tensors
        # the same kernels, in the same order, as autograd on the reference
        grad_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        return grad_gate, grad_up


class _WeightedSwiGLU(torch.autograd.Function):
    """``swiglu_reference`` with weights, keeping gate, up and the weights (FP32 math rebuilt in backward).
    Applying the gate weight here rather than to the expert's output (the same product: W2 is linear)
    spares keeping every expert output row for the weights' gradient."""

    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor, weights: Tensor) -> Tensor:
        ctx.save_for_backward(gate, up, weights)
        return (F.silu(_wide(gate)) * _wide(up) * weights[:, None]).to(gate.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        gate, up, weights = ctx.saved_tensors
        gate32, up32, grad32 = _wide(gate), _wide(up), _wide(grad)
        act = F.silu(gate32)
        grad_weights = (grad32 * act * up32).sum(-1).to(weights.dtype) if ctx.needs_input_grad[2] else None
        grad_hidden = grad32 * weights[:, None]  # the gradient of silu(gate) * up
        grad_up = (grad_hidden * act).to(up.dtype) if ctx.needs_input_grad[1] else None
        grad_gate = torch.ops.aten.silu_backward(grad_hidden * up32, gate32).to(gate.dtype)
        return grad_gate, grad_up, grad_weights


def swiglu(gate: Tensor, up: Tensor, weights: Tensor | None = None) -> Tensor:
    """SwiGLU's gating, silu(gate) * up (report sec 2.1.2), for the routed experts times their rows'
    gate weights [N] (eq. 12's g_i,t), keeping only its inputs."""
    needs_grad = gate.requires_grad or up.requires_grad or (weights is not None and weights.requires_grad)
    if not torch.is_grad_enabled() or not needs_grad:
        return swiglu_reference(gate, up, weights)
    return _SwiGLU.apply(gate, up) if weights is None else _WeightedSwiGLU.apply(gate, up, weights)


def combine_rows_reference(rows: Tensor, index: Tensor, out: Tensor) -> Tensor:
    """Expert output rows summed into their tokens' rows ``index`` of ``out`` (zeros [T, D])."""
    return out.index_add_(0, index, rows)


class _CombineRows(torch.autograd.Function):
    """``combine_rows_reference`` keeping the index only (autograd keeps ``index_add_``'s source rows)."""

    @staticmethod
    def forward(ctx, rows: Tensor, index: Tensor, out: Tensor) -> Tensor:
        ctx.save_for_backward(index)
        return out.index_add_(0, index, rows)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (index,) = ctx.saved_tensors
        return grad.index_select(0, index), None, None


def combine_rows(rows: Tensor, index: Tensor, n_tokens: int) -> Tensor:
    """sum_i g_i,t FFN_i(u_t) (eq. 12's routed term, the gate weights already applied): expert output
    rows [N, D] summed into their tokens' rows ``index`` [N] of a new [n_tokens, D]."""
    out = rows.new_zeros(n_tokens, rows.shape[1])
    if not torch.is_grad_enabled() or not rows.requires_grad:
        return combine_rows_reference(rows, index, out)
    return _CombineRows.apply(rows, index, out)


class _GatherRows(torch.autograd.Function):
    """``x[index]`` whose backward sums each row's gradients with ``index_add_``."""

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor) -> Tensor:
        ctx.save_for_backward(index)
        ctx.rows = x.shape[0]
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (index,) = ctx.saved_tensors
        return grad.new_zeros(ctx.rows, *grad.shape[1:]).index_add_(0, index, grad), None


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """``x[index]`` for an index that repeats rows (each token once per routed expert). Autograd's own backward
    scatters with ``index_put_(accumulate=True)``, whose CPU threads add a token's gradients in a varying order
    (gradients differing in the last bits from one run to the next with 2 threads), rounds after each addition
    in BF16, and takes 5x the time of ``index_add_`` (8.0 against 1.6 ms for 8,192 rows of 512 into 2,048). On
    the CPU ``index_add_`` adds in the index's order, the same every run, in FP32 for BF16 rows (one rounding).
    On CUDA plain indexing (its backward sorts the index; CUDA's ``index_add_`` adds with atomics, in a
    varying order)."""
    if x.is_cuda or not torch.is_grad_enabled() or not x.requires_grad:
        return x[index]
    return _GatherRows.apply(x, index)


def rows_in_padded_layout(counts: Tensor, offsets: Tensor, rows: int) -> Tensor:
    """int64 [rows]: where each of ``rows`` expert-sorted rows (``counts`` [E] per expert) goes in a layout
    where expert e's rows start at ``offsets[e]``."""
    expert = torch.repeat_interleave(torch.arange(counts.shape[0], device=counts.device), counts, output_size=rows)
    first_row = torch.cumsum(counts, 0) - counts
    return offsets[expert] + torch.arange(rows, device=counts.device) - first_row[expert]
