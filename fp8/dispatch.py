"""FP8 dispatch (report sec 3.3.3, "Low-Precision Communication"): the activations sent to the experts
are quantized to E4M3 in 1x128 tiles with power-of-two scales before the all-to-all; the combine stays
in BF16 (or the compute dtype).

Plugs into ``parallel.expert.ExpertParallelExperts`` as its ``DispatchQuantizer``: ``encode`` runs once
per token at the source, the payload (one fp8 byte per channel plus one fp32 scale per 128 channels)
travels as bytes, ``decode`` runs where the experts compute. Power-of-two scales make the decoded value
exactly representable again when the FP8 experts re-quantize it with the same tiles, so the dispatch
adds no second rounding to an FP8 expert GEMM. The gradient is straight-through (the protocol's rule).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fp8.quant import BLOCK, Quantized, quantize_act


class Fp8DispatchQuantizer:
    """E4M3 payload with power-of-two 1x128 scales; decodes to ``dtype`` (default: the compute dtype the
    dispatch casts to afterwards, so float32 here loses nothing)."""

    def __init__(self, dtype: torch.dtype = torch.float32):
        self.dtype = dtype

    def encode(self, x: Tensor) -> tuple[Tensor, ...]:
        q = quantize_act(x.float(), pow2=True, check_finite=False)  # no host sync; NaN reaches the loss
        return q.data, q.scale

    def decode(self, payload: tuple[Tensor, ...]) -> Tensor:
        data, scale = payload
        return Quantized(data, scale, group_rows=1, fmt="e4m3", pow2=True).dequantize(self.dtype)


def dispatch_row_bytes(dim: int, topk: int, fp8: bool, activation_bytes: int = 2) -> int:
    """Bytes of one dispatched row: the activations (fp8: dim + 4 per 128-channel scale; else
    ``activation_bytes`` x dim) plus the routing metadata (K int32 expert ids and K fp32 weights)."""
    payload = dim + 4 * math.ceil(dim / BLOCK) if fp8 else activation_bytes * dim
    return payload + 8 * topk
