"""The routed experts' SwiGLU through grouped FP8 GEMMs (report sec 3.3.1, 3.3.3).

The rows reach the experts sorted by expert (``counts[e]`` rows for expert e, ``train/model.py``). Per
projection (gate ``w1`` and up ``w3`` stacked as one, ``StepGateUp``; down ``w2``):

* Fprop and Dgrad are M-grouped GEMMs (``GemmBackend.grouped_gemm``): each expert's rows times its own
  weight, in one launch on the Triton backend. Activations in 1x128 tiles, weights in 128x128 blocks.
* Wgrad reduces over each expert's tokens (``dW_e = dY_e^T X_e``), so its operands are tiled 128x1 per
  expert: a tile must not straddle two experts. The operands are laid out with each expert's tokens
  starting on a multiple of 128 (``ExpertRows``: zero rows in between, which change no tile's max-abs,
  so every tile is the one quantizing that expert alone would give), quantized in one call, and
  multiplied in one K-grouped GEMM per weight (``GemmBackend.k_grouped_gemm``). DeepGEMM's grouped
  layouts pad each expert the same way. The layout is sized for the worst case, ``128 (ceil(T / 128) +
  E)`` rows, on every device: its exact size would have to be read back from a GPU, and one size
  everywhere makes the memory a CPU run measures the GPU's (``ceil(T / 128)`` whole tiles per token
  row, as the planner counts them, plus ``128 E`` rows per layer).

With the fused quantization (a GPU), the aligned layout is not written: one kernel reads each sorted row
once and writes its 1x128 tiles and the layout's 128x1 tiles (``ExpertRows.quantize``).

No value goes to the host on a GPU with the Triton backend: ``counts`` stays a device tensor, turned
into tile tables and offsets on the device (the other backends read it; on the CPU that costs nothing).

Caching (sec 3.3.3): x in FP8 (128x1, the layout above) for Wgrad, the SwiGLU inputs (gate and up) in
FP8 1x128 tiles; the SwiGLU output is recomputed in backward instead of stored. Inside a training step
the weights' FP8 blocks are made once and shared by every micro-batch (``StepExpertWeights``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fp8.backend import GemmBackend
from fp8.linear import (StepWeight, _no_autocast, _output_dtype, _quantize, _quantize_layouts, _rebuild,
                        wgrad_dtype)
from fp8.quant import BLOCK, Quantized, dequantize
from fp8.wgrad import WeightGradBox, WeightSpec, no_weight_grad, weight_entry
from train.ops import rows_in_padded_layout


@dataclass(frozen=True)
class ExpertRows:
    """Where each expert's rows are: ``counts`` [E] (int64, on the rows' device) of the ``rows`` expert-sorted
    rows, and in the 128-aligned layout of the Wgrad operands: expert e's tokens at rows ``offsets[e]`` on
    (``offsets`` [E + 1], multiples of 128), ``padded_rows`` rows in all. Only E-sized tensors are kept
    (it lives until backward); each row's place in the layout is recomputed when needed."""

    counts: Tensor
    offsets: Tensor
    rows: int
    padded_rows: int

    @classmethod
    def of(cls, counts: Tensor, rows: int) -> ExpertRows:
        c = counts.to(torch.int64)
        aligned = (c + BLOCK - 1) // BLOCK * BLOCK
        offsets = torch.cat([c.new_zeros(1), torch.cumsum(aligned, 0)])
        # the worst case, on every device: the exact size would have to be read back from a GPU
        padded_rows = BLOCK * (-(-rows // BLOCK) + c.shape[0])
        return cls(c, offsets, rows, padded_rows)

    def destinations(self) -> Tensor:
        """int64 [rows]: the row of the aligned layout that each expert-sorted row goes to."""
        return rows_in_padded_layout(self.counts, self.offsets, self.rows)

    def sources(self) -> Tensor:
        """int64 [padded_rows]: the expert-sorted row at each row of the aligned layout, -1 for padding."""
        c = self.counts
        where = self.destinations()
        return torch.full((self.padded_rows,), -1, dtype=torch.int64, device=c.device).index_copy_(
            0, where, torch.arange(self.rows, device=c.device))

    def quantize(self, x: Tensor, tiles: bool = True, tokens: bool = True) -> tuple[Quantized | None, Quantized | None]:
        """x [T, K] (rows sorted by expert) in 1x128 tiles (a grouped GEMM's operand) if ``tiles``, and in
        128x1 tiles per expert (``quantize_tokens``) if ``tokens``, else None in its place. Both: one read of
        x on a GPU, the aligned layout built inside the kernel (``fp8.quant.quantize_both_layouts``)."""
        return _quantize_layouts(x, rows=tiles, columns=tokens, row_index=self.sources() if tokens else None)

    def quantize_tokens(self, *xs: Tensor) -> list[Quantized]:
        """Each x [T, K] (rows sorted by expert) in 128x1 tiles per expert: the Quantized of the aligned
        layout transposed, [K, padded_rows], with 1x128 tiles along the tokens."""
        return [self.quantize(x, tiles=False)[1] for x in xs]


def _padded(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def quantize_experts(w: Tensor) -> Quantized:
    """Expert weights [E, N, K] -> the Quantized of the stacked [E * N_pad, K] in 128x128 blocks, where
    each expert is padded with zero rows to N_pad = N rounded up to 128. Zero rows change no block's
    max-abs, so every expert's payloads and scales are those of ``quantize_weight(w[e])`` and no block
    straddles two experts (any N; real configs have N % 128 == 0 and need no padding)."""
    e, n, k = w.shape
    padded = _padded(n)
    if padded != n:
        w = torch.cat([w, w.new_zeros(e, padded - n, k)], dim=1)
    return _quantize(w.reshape(e * padded, k), BLOCK)


def transpose_expert_blocks(q: Quantized, shape: tuple[int, int, int]) -> Quantized:
    """``quantize_experts(w.transpose(1, 2))`` from ``q = quantize_experts(w)`` for w of ``shape`` [E, N, K],
    without re-quantizing: each expert's 128x128 blocks transposed (the same elements share a block in W_e
    and W_e^T, and padding rows are zeros), each W_e^T zero-padded to K rounded up to 128 rows. Exact."""
    e, n, k = shape
    n_pad, k_pad = _padded(n), _padded(k)
    data = q.data.view(e, n_pad, k)[:, :n].transpose(1, 2)  # [E, K, N]
    if k_pad == k:
        data = data.contiguous()
    else:
        data = torch.cat([data, data.new_zeros(e, k_pad - k, n)], dim=1)
    scale = q.scale.view(e, n_pad // BLOCK, k_pad // BLOCK).transpose(1, 2).reshape(e * k_pad // BLOCK, -1)
    return Quantized(data.reshape(e * k_pad, n), scale, BLOCK, q.fmt, q.pow2)


class StepExpertWeights(StepWeight):
    """The routed experts' weight [E, N, K] as FP8 blocks for one training step (``fp8.linear.StepWeight``):
    the padded stack of ``quantize_experts``, made once and shared by every micro-batch's Fprop; Dgrad's
    W^T blocks are transposed from it at each use (``transpose_expert_blocks``: 2 bytes moved per
    parameter instead of a quantization reading the FP32 master), so a step keeps 1 byte per expert
    parameter (the planner's ``casts`` term under FP8), less than the BF16 copy a BF16 step keeps."""

    memo_name = "fp8_expert_weight"
    keep_transposed = False

    def quantize(self) -> Quantized:
        return quantize_experts(self.weight)

    def transpose(self, blocks: Quantized) -> Quantized:
        return transpose_expert_blocks(blocks, tuple(self.weight.shape))


def stack_gate_up(gate: Quantized, up: Quantized, experts: int) -> Quantized:
    """The stacks of ``quantize_experts(w1)`` and ``quantize_experts(w3)`` ([E * I_pad, D] each) as one
    [E * 2 I_pad, D]: expert e's gate rows, then its up rows. Each keeps its own blocks (I_pad is a multiple
    of 128, so no block holds both), so one GEMM gives [gate | up] with the numbers of two."""
    def per_expert(t: Tensor) -> Tensor:
        return t.view(experts, -1, t.shape[1])

    data = torch.cat([per_expert(gate.data), per_expert(up.data)], dim=1)
    scale = torch.cat([per_expert(gate.scale), per_expert(up.scale)], dim=1)
    return Quantized(data.view(-1, data.shape[2]), scale.view(-1, scale.shape[2]), BLOCK, gate.fmt, gate.pow2)


class StepGateUp(StepExpertWeights):
    """The experts' gate ``w1`` and up ``w3`` [E, I, D] as one stack of FP8 blocks [E, 2 I_pad, D] for the
    step (``stack_gate_up``): one grouped GEMM instead of two in Fprop (x times both), in Dgrad ([dgate |
    dup] times both, K = 2 I_pad: no sum of two FP32 outputs) and in Wgrad (one K-grouped GEMM). The entry
    is kept under w1 with w3 as its partner."""

    memo_name = "fp8_expert_gate_up"

    def quantize(self) -> Quantized:
        (up,) = self.partners
        return stack_gate_up(quantize_experts(self.weight), quantize_experts(up), self.weight.shape[0])

    def transpose(self, blocks: Quantized) -> Quantized:
        experts, inter, dim = self.weight.shape
        return transpose_expert_blocks(blocks, (experts, 2 * _padded(inter), dim))


def expert_gemm(backend: GemmBackend, a: Quantized, w: Quantized, n: int, counts: Tensor | list[int],
                out_dtype: torch.dtype = torch.float32) -> Tensor:
    """[T, N] in ``out_dtype`` (fp32 sums): the rows of a [T, K] (1x128 tiles, sorted by expert) times their
    expert's ``W_e^T``, for ``w`` the padded stack of ``quantize_experts`` of weights [E, N, K], as one
    grouped GEMM."""
    out = backend.grouped_gemm(a, w, counts, out_dtype)
    return out if out.shape[1] == n else out[:, :n]


def expert_wgrad(backend: GemmBackend, dy_t: Quantized, x_t: Quantized, rows: ExpertRows, weight: Tensor) -> Tensor:
    """[E, N, K] ``dW_e = dY_e^T X_e`` of every expert from the 128x1 token tiles of dY [T, N] and X [T, K]
    (``ExpertRows.quantize_tokens``), in the weight's gradient dtype; zeros for an expert without rows."""
    return backend.k_grouped_gemm(dy_t, x_t, rows.offsets).to(wgrad_dtype(weight))


def _swiglu_parts(gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """silu(gate), sigmoid(gate) and the SwiGLU output silu(gate) * up (fp32)."""
    sig = torch.sigmoid(gate)
    act = gate * sig
    return act, sig, act * up


class _Fp8ExpertFFN(torch.autograd.Function):
    """Grouped SwiGLU experts: gate/up/down as grouped FP8 GEMMs (sec 3.3.3 for the caching).

    Forward computes the SwiGLU from the fp32 GEMM outputs, times the rows' gate weights (fp32; W2 is
    linear, so this is the weighted expert output without keeping that output for the weights' gradient);
    backward recomputes it from their FP8 cache (so the local derivative is taken at the cached point, as
    recomputation does). Wgrad is one K-grouped GEMM per weight over the experts' 128x1 token tiles, in
    the weights' entry node (``fp8.wgrad``: deferrable to a W pass).
    """

    @staticmethod
    def forward(ctx, x: Tensor, w1: Tensor, w2: Tensor, w3: Tensor, rows: ExpertRows, backend: GemmBackend,
                box: WeightGradBox, weights: Tensor, step_weights: tuple[StepGateUp, StepExpertWeights]) -> Tensor:
        out_dtype = _output_dtype(x)
        counts = rows.counts
        inter, dim = w1.shape[1], w2.shape[1]
        padded = _padded(inter)  # gate at columns [0, I), up at [I_pad, I_pad + I) of the stacked output
        gate_up_weights, down_weights = step_weights
        with _no_autocast(x):
            qx, x_t = rows.quantize(x)  # x in 128x1 tiles per expert: cached for Wgrad
            gate_up = expert_gemm(backend, qx, gate_up_weights.blocks(), 2 * padded, counts)  # [T, 2 I_pad] fp32
            gate, up = gate_up[:, :inter], gate_up[:, padded:padded + inter]
            hidden = _swiglu_parts(gate, up)[2] * weights.float()[:, None]
            out = expert_gemm(backend, _quantize(hidden, 1), down_weights.blocks(), dim, counts, out_dtype)  # [T, D]
            # Cache: the SwiGLU inputs in FP8 1x128 tiles (one tensor; padding columns are zeros, which change
            # no tile), and x in 128x1 tiles per expert for Wgrad; the SwiGLU output is recomputed in backward.
            q_gate_up = _quantize(gate_up, 1)
        ctx.save_for_backward(q_gate_up.data, q_gate_up.scale, w1, w2, w3, weights, x_t.data, x_t.scale)
        ctx.rows, ctx.backend, ctx.x_dtype, ctx.box, ctx.step_weights = rows, backend, x.dtype, box, step_weights
        ctx.weight_specs = [WeightSpec.of(w) for w in (w1, w2, w3)]
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        box: WeightGradBox = ctx.box
        no_weight_grads = [no_weight_grad(spec) for spec in ctx.weight_specs]
        if box.is_replay():  # the W pass of a split backward: only the entry node's Wgrad is left
            return None, *no_weight_grads, None, None, None, None, None
        gate_up_data, gate_up_scale, w1, w2, w3, weights, x_data, x_scale = ctx.saved_tensors
        rows: ExpertRows = ctx.rows
        backend = ctx.backend
        gate_up_weights, down_weights = ctx.step_weights
        inter, dim = w1.shape[1], w2.shape[1]
        padded = _padded(inter)
        x_t = _rebuild(x_data, x_scale, 1, "e4m3", False)
        need_dx, need_w = ctx.needs_input_grad[0], any(ctx.needs_input_grad[1:4])
        with _no_autocast(dout):
            gate_up = dequantize(_rebuild(gate_up_data, gate_up_scale, 1, "e4m3", False))
            gate, up = gate_up[:, :inter], gate_up[:, padded:padded + inter]
            act, sig, unweighted = _swiglu_parts(gate, up)  # recomputed from the FP8 cache
            row_weights = weights.float()[:, None]
            hidden = unweighted * row_weights

            # The Wgrad operands (K = the experts' tokens) are quantized with the Dgrad ones, from one read: a
            # split backward keeps them, in FP8, until its W pass instead of dout, h, dgate and dup.
            # Down projection: Dgrad dh = dout W2 (K = D); then through the gate weights.
            q_dout, dout_t = rows.quantize(dout, tokens=need_w)
            dweighted = expert_gemm(backend, q_dout, down_weights.transposed(), inter, rows.counts)
            dweights = (dweighted * unweighted).sum(-1).to(weights.dtype) if ctx.needs_input_grad[7] else None
            dhidden = dweighted * row_weights
            # [dgate | dup] laid out as the stacked gate/up output, for one Dgrad and one Wgrad GEMM
            make = torch.empty if padded == inter else torch.zeros
            dgate_up = make(dout.shape[0], 2 * padded, dtype=torch.float32, device=dout.device)
            torch.mul(dhidden * up * sig, 1 + gate * (1 - sig), out=dgate_up[:, :inter])  # dgate
            torch.mul(dhidden, act, out=dgate_up[:, padded:padded + inter])  # dup
            q_dgate_up, dgate_up_t = rows.quantize(dgate_up, tiles=need_dx, tokens=need_w)
            dx = None
            if need_dx:  # Dgrad of gate and up together: K = 2 I_pad
                dx = expert_gemm(backend, q_dgate_up, gate_up_weights.transposed(), dim, rows.counts, ctx.x_dtype)
            if not need_w:
                return dx, None, None, None, None, None, None, dweights, None
            (h_t,) = rows.quantize_tokens(hidden)

        def wgrad() -> tuple[Tensor, Tensor, Tensor]:  # dW2 = dout^T h; [dW1 | dW3] = [dgate | dup]^T x
            dw13 = expert_wgrad(backend, dgate_up_t, x_t, rows, w1)  # [E, 2 I_pad, D]
            return (dw13[:, :inter], expert_wgrad(backend, dout_t, h_t, rows, w2), dw13[:, padded:padded + inter])

        box.defer(wgrad)
        return dx, *no_weight_grads, None, None, None, dweights, None


def fp8_expert_ffn(x_sorted: Tensor, counts: Tensor | list[int], w1: Tensor, w2: Tensor, w3: Tensor,
                   weights: Tensor | None = None, *, backend: GemmBackend, cache_weights: bool = True) -> Tensor:
    """SwiGLU of each routed expert on its rows through grouped FP8 GEMMs (sec 3.3.1, 3.3.3), times the
    rows' gate ``weights`` [T] (fp32; None: ones).

    x_sorted [T, D] sorted by expert, ``counts`` [E] rows per expert (a tensor on x's device: on a GPU it
    is not read back, and must sum to T); w1 (gate) [E, I, D], w3 (up) [E, I, D], w2 (down) [E, D, I]:
    FP32 masters or BF16 working copies, with FP32 gradients (zero for experts without rows).
    Returns [T, D] in the autocast dtype (else x's). The signature of ``RoutedExperts.fp8_ffn`` after
    ``functools.partial(fp8_expert_ffn, backend=...)``.
    """
    counts = torch.as_tensor(counts, device=x_sorted.device)
    if counts.dim() != 1 or counts.shape[0] != w1.shape[0]:
        raise ValueError(f"counts of shape {tuple(counts.shape)} do not match the {w1.shape[0]} experts of "
                         f"w1 {tuple(w1.shape)}")
    if not counts.is_cuda and sum(counts.tolist()) != x_sorted.shape[0]:
        raise ValueError(f"counts ({sum(counts.tolist())} rows) do not match x_sorted {tuple(x_sorted.shape)}")
    box = WeightGradBox()
    step_weights = StepGateUp.of(w1, w3, share=cache_weights), StepExpertWeights.of(w2, share=cache_weights)
    w1, w2, w3 = weight_entry(box, w1, w2, w3)
    if weights is None:
        weights = x_sorted.new_ones(x_sorted.shape[0], dtype=torch.float32)
    return _Fp8ExpertFFN.apply(x_sorted, w1, w2, w3, ExpertRows.of(counts, x_sorted.shape[0]), backend, box,
                               weights, step_weights)
