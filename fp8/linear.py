"""FP8 linear layers and the routed experts' SwiGLU as autograd functions (report sec 3.3.1-3.3.3).

All three GEMMs of a linear layer run on FP8 operands (Figure 6), each quantized in tiles of 128 along
*its own* reduction dim, with fp32 outputs (``fp8.backend``):

* Fprop  ``y = x W^T``:   x [T, K] in 1x128 tiles (per token, per 128 channels), W [N, K] in 128x128 blocks.
* Dgrad  ``dx = dy W``:   dy [T, N] in 1x128 tiles along N; W^T [K, N] in 128x128 blocks, which are W's
  blocks transposed (``transpose_blocks``: same payloads and scales, no re-quantization).
* Wgrad  ``dW = dy^T x``: reduction over tokens, so dy and x are both tiled 128x1 (per channel, per 128
  tokens), i.e. the 1x128 tiles of dy^T [N, T] and x^T [K, T].

x and dy are each quantized in both of their layouts at once (``quantize_both_layouts``: one read on a GPU).

Storage (sec 3.3.3): the weight stays the FP32 master (or its BF16 working copy), quantized online; within
a training step its FP8 blocks are made once and shared by every micro-batch (``StepWeight``), gradients
to it are fp32, and the activation is cached for Wgrad in FP8: x already
quantized 128x1, not x. ``cache="e5m6"`` (the linear after attention, MLA's ``wo``) caches x in E5M6 with
power-of-two scales in 1x128 tiles, its 12-bit codes packed two per three bytes (``pack_12bit``), and
re-tiles it to 128x1 in backward (``convert_tiles``, exact); that Wgrad then multiplies an E4M3 dy by the
E5M6 x.

The routed experts' SwiGLU, as grouped FP8 GEMMs, is ``fp8/experts.py``.

Not modelled here: the power-of-two FP8 dispatch / combine of sec 3.3.3 (``parallel/expert.py``), and
the bf16 rounding of GEMM outputs inside fused kernels (outputs here are fp32, then cast).
"""

from __future__ import annotations

import functools
from contextlib import nullcontext

import torch
from torch import Tensor, nn

from fp8.backend import GemmBackend
from fp8.quant import (BLOCK, Quantized, convert_tiles, pack_12bit, quantize, quantize_both_layouts,
                       quantize_layouts, quantize_weight, unpack_12bit)
from fp8.wgrad import WeightGradBox, WeightSpec, no_weight_grad, weight_entry
from train.ops import step_memo

CACHE_FORMATS = ("e4m3", "e5m6")

# The training path quantizes without checking for NaN/inf, which would wait for the GPU at every call: a
# non-finite value gives its tile a non-finite scale, reaches the loss, and the trainer's guard skips the
# step (fp8/quant.py, ``check_finite``).
_quantize = functools.partial(quantize, check_finite=False)
_quantize_both = functools.partial(quantize_both_layouts, check_finite=False)
_quantize_layouts = functools.partial(quantize_layouts, check_finite=False)
_quantize_weight = functools.partial(quantize_weight, check_finite=False)


def _output_dtype(x: Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on for x's device, else x's dtype."""
    device = x.device.type
    if device in ("cpu", "cuda", "xpu") and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def wgrad_dtype(weight: Tensor) -> torch.dtype:
    """The Wgrad GEMMs' output: FP32 (report Figure 6), or the weight's dtype if wider. A BF16 working weight
    (train/precision.py) has FP32 gradients (``grad_dtype``), which receive it unrounded."""
    return torch.promote_types(weight.dtype, torch.float32)


def _no_autocast(x: Tensor):
    """Disable autocast around the quantization and GEMM code (it must not re-cast fp32 math)."""
    device = x.device.type
    return torch.autocast(device_type=device, enabled=False) if device in ("cpu", "cuda", "xpu") else nullcontext()


def transpose_blocks(q: Quantized) -> Quantized:
    """The Quantized of W^T from that of W in 128x128 blocks: payload and scales transposed (exact, equal
    to ``quantize_weight(W.t())``)."""
    if q.group_rows != BLOCK:
        raise ValueError(f"transpose_blocks needs 128x128 blocks, got group_rows {q.group_rows}")
    return Quantized(q.data.t().contiguous(), q.scale.t().contiguous(), BLOCK, q.fmt, q.pow2)


def _rebuild(data: Tensor, scale: Tensor, group_rows: int, fmt: str, pow2: bool) -> Quantized:
    return Quantized(data, scale, group_rows, fmt, pow2)


# --------------------------------------------------------------------------------------------------
# Linear


def _quantized_input(x: Tensor, x2d: Tensor) -> tuple[Quantized, Quantized]:
    """x's 1x128 (Fprop) and 128x1 (Wgrad, cached for backward) E4M3 tiles. Within a training step
    (``train.ops.step_memo``) two linears reading the same x share them: one FP8 copy kept, not two."""
    memo = step_memo("fp8_linear_input")
    hit = memo.get(x) if memo is not None else None
    if hit is not None and hit[0] == x._version and hit[1].data.shape[0] == x2d.shape[0]:
        return hit[1], hit[2]
    quantized = _quantize_both(x2d)  # one read of x on a GPU
    if memo is not None:
        memo[x] = (x._version, *quantized)
    return quantized


class StepWeight:
    """A weight's FP8 blocks for one training step: W's (Fprop) and W^T's (Dgrad), each made at its first use.

    The weights do not change inside a step, so within ``train.ops.step_memo`` (the trainer's step) every
    micro-batch's forward and backward share one quantization of each (as Transformer Engine's FP8 weight
    caching across micro-batches), instead of two quantizations and a transposed copy per micro-batch: the
    same numbers (a quantization is deterministic), fewer launches, 2 bytes per FP8-linear parameter held
    for the step (the planner's ``casts`` term). Outside a step nothing is kept (``keep`` False): Fprop
    and Dgrad quantize afresh, as the report's online quantization. The entry travels in the autograd
    context, so backward finds it on any thread (CUDA runs backward on its own, where the step's
    context variable is not set). Subclasses change the layout (``fp8.experts.StepExpertWeights``)."""

    memo_name = "fp8_linear_weight"
    keep_transposed = True  # False: W^T's blocks are made from W's at each use (1 byte per parameter kept, not 2)

    def __init__(self, weight: Tensor, keep: bool, *partners: Tensor):
        self.weight, self.partners, self.keep = weight, partners, keep  # partners: quantized with it (subclasses)
        self.versions = self._versions(weight, partners)
        self._blocks: Quantized | None = None
        self._transposed: Quantized | None = None

    @staticmethod
    def _versions(weight: Tensor, partners: tuple[Tensor, ...]) -> tuple[int, ...]:
        return (weight._version, *(p._version for p in partners))

    def quantize(self) -> Quantized:
        """W's blocks, made from the weight."""
        return _quantize_weight(self.weight)

    def transpose(self, blocks: Quantized) -> Quantized:
        """W^T's blocks, made from W's (exact)."""
        return transpose_blocks(blocks)

    def blocks(self) -> Quantized:
        if self._blocks is not None:
            return self._blocks
        blocks = self.quantize()
        if self.keep:
            self._blocks = blocks
        return blocks

    def transposed(self) -> Quantized:
        if self._transposed is not None:
            return self._transposed
        transposed = self.transpose(self.blocks())
        if self.keep and self.keep_transposed:
            self._transposed = transposed
        return transposed

    @classmethod
    def of(cls, weight: Tensor, *partners: Tensor, share: bool = True) -> StepWeight:
        """The step's entry for ``weight`` (and the ``partners`` a subclass quantizes with it): a fresh one
        outside a step (or with ``share`` False: nothing kept), or once one of them was changed or replaced."""
        memo = step_memo(cls.memo_name) if share else None
        entry = memo.get(weight) if memo is not None else None
        if (entry is None or entry.versions != cls._versions(weight, partners)
                or any(a is not b for a, b in zip(entry.partners, partners, strict=True))):
            entry = cls(weight, memo is not None, *partners)
            if memo is not None:
                memo[weight] = entry
        return entry


class _Fp8Linear(torch.autograd.Function):
    """y = x W^T with FP8 Fprop, Dgrad and Wgrad (sec 3.3.1); x cached in FP8 (or E5M6) for Wgrad.
    W enters through ``fp8.wgrad.weight_entry``, which runs the Wgrad GEMM (deferrable to a W pass)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, backend: GemmBackend, cache: str, box: WeightGradBox,
                step_weight: StepWeight) -> Tensor:
        out_dtype = _output_dtype(x)
        n, k = weight.shape
        with _no_autocast(x):
            x2d = x.reshape(-1, k)
            if cache == "e4m3":  # Fprop operand (1x128 tiles) and Wgrad operand x^T [K, T] (128x1 tiles of x)
                q_rows, saved = _quantized_input(x, x2d)
            else:
                q_rows = _quantize(x2d, 1)
                saved = _quantize(x2d, 1, "e5m6", pow2=True)  # 1x128 tiles, re-tiled in backward
            y = backend.gemm(q_rows, step_weight.blocks(), out_dtype)  # fp32 sums, rounded once
        # E5M6 codes are held in 12 bits (two per three bytes), not in their 16-bit container
        ctx.save_for_backward(saved.data if cache == "e4m3" else pack_12bit(saved.data), saved.scale, weight)
        ctx.x_shape, ctx.x_dtype, ctx.cache, ctx.backend, ctx.box = x.shape, x.dtype, cache, backend, box
        ctx.step_weight = step_weight
        ctx.weight_spec = WeightSpec.of(weight)
        return y.reshape(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx, dy: Tensor):
        box: WeightGradBox = ctx.box
        if box.is_replay():  # the W pass of a split backward: only the entry node's Wgrad is left
            return None, no_weight_grad(ctx.weight_spec), None, None, None, None
        data, scale, weight = ctx.saved_tensors
        n, k = weight.shape
        backend: GemmBackend = ctx.backend
        dx = dy_t = None
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with _no_autocast(dy):
            dy2d = dy.reshape(-1, n)
            # dy in 1x128 tiles for Dgrad (K of that GEMM is N) and 128x1 tiles for Wgrad (K = tokens), made
            # now from one read of dy: a split backward keeps the FP8 Wgrad operand for its W pass, not dy
            q_dy, dy_t = _quantize_layouts(dy2d, rows=need_dx, columns=need_dw)
            if need_dx:
                wt = ctx.step_weight.transposed()  # [K, N]: W's blocks transposed
                dx = backend.gemm(q_dy, wt, ctx.x_dtype).reshape(ctx.x_shape)
        if not need_dw:
            return dx, None, None, None, None, None
        cache = ctx.cache

        def wgrad() -> tuple[Tensor]:
            with _no_autocast(data):
                if cache == "e4m3":
                    x_t = _rebuild(data, scale, 1, "e4m3", False)
                else:
                    codes = unpack_12bit(data, k)
                    x_t = convert_tiles(_rebuild(codes, scale, 1, "e5m6", True))  # 1x128 -> 128x1, exact
                return (backend.gemm(dy_t, x_t).to(wgrad_dtype(weight)),)

        box.defer(wgrad)
        return dx, no_weight_grad(ctx.weight_spec), None, None, None, None


@torch.compiler.disable  # train.compile: the graph breaks here, the FP8 GEMMs and quantizations run eagerly
def fp8_linear(x: Tensor, weight: Tensor, backend: GemmBackend, cache: str = "e4m3") -> Tensor:
    """``x @ weight.T`` through FP8 GEMMs (sec 3.3.1-3.3.3). x [..., K], weight the FP32 master [N, K].

    Output in the autocast dtype (else x's dtype); grads: dx in x's dtype, dW in the weight's dtype.
    ``cache``: "e4m3" (x cached as FP8 128x1 tiles) or "e5m6" (x cached in E5M6 with power-of-two
    scales, re-tiled for Wgrad: the linear after the attention operator).
    """
    if cache not in CACHE_FORMATS:
        raise ValueError(f"cache must be one of {CACHE_FORMATS}, got {cache!r}")
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"fp8_linear: x {tuple(x.shape)} does not match weight {tuple(weight.shape)}")
    box = WeightGradBox()
    step_weight = StepWeight.of(weight)
    (weight,) = weight_entry(box, weight)
    return _Fp8Linear.apply(x, weight, backend, cache, box, step_weight)


class Fp8Linear(nn.Linear):
    """nn.Linear whose forward is ``fp8_linear``: same ``weight`` (and ``bias``) parameters, so names,
    checkpoints and optimizer state are unchanged; the weight is the FP32 master or its BF16 working copy
    (train/precision.py), quantized per 128x128 block in forward; Wgrad comes out in FP32 either way."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, dtype=None, *,
                 backend: GemmBackend, cache: str = "e4m3"):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if cache not in CACHE_FORMATS:
            raise ValueError(f"cache must be one of {CACHE_FORMATS}, got {cache!r}")
        self.backend = backend
        self.cache = cache

    @classmethod
    def from_linear(cls, linear: nn.Linear, backend: GemmBackend, cache: str = "e4m3") -> Fp8Linear:
        """Wrap ``linear``'s own Parameter objects (built on meta: nothing is allocated or copied)."""
        new = cls(linear.in_features, linear.out_features, bias=False, device="meta", backend=backend, cache=cache)
        new.weight = linear.weight
        new.bias = linear.bias  # None or the same Parameter
        new.train(linear.training)
        return new

    @torch.compiler.disable  # as fp8_linear; here too, or the frame around it compiles once per weight shape
    def forward(self, x: Tensor) -> Tensor:
        y = fp8_linear(x, self.weight, self.backend, self.cache)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend.name}, cache={self.cache}"
