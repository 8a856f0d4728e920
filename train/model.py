"""DeepSeek-V3 in plain PyTorch, single-device semantics (report sec 2).

Multi-head Latent Attention with decoupled RoPE and YaRN (sec 2.1.1, 4.3), DeepSeekMoE with sigmoid
gating, group-limited top-k and the auxiliary-loss-free bias (sec 2.1.2), and Multi-Token Prediction
sharing the embedding and output head (sec 2.2). The math is that of HF transformers'
``DeepseekV3ForCausalLM`` and DeepSeek's released inference code; ``train/hf.py`` maps the names.
Nothing here knows about ranks: parallelism is applied from outside (``parallel/``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from train.config import ModelConfig
from train.losses import head_cross_entropy
from train.ops import (cast_weight, combine_rows, embedding, gate_scores, gather_rows, rms_norm, rows_in_padded_layout,
                       swiglu, to_compute_dtype)


# --------------------------------------------------------------------------------------------------
# Rotary embedding with YaRN (sec 2.1.1 decoupled RoPE, sec 4.3 YaRN on the rope dims only)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature sqrt(1/t) = 0.1 * mscale * ln(s) + 1 (1 when s <= 1)."""
    return 1.0 if scale <= 1.0 else 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(cfg: ModelConfig) -> Tensor:
    """Per-pair inverse frequencies of the rope dims; YaRN's NTK-by-parts blend when rope_factor > 1."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if cfg.rope_factor <= 1.0:
        return inv_freq

    def correction_dim(rotations: float) -> float:
        return dim * math.log(cfg.original_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(cfg.beta_fast)), 0)
    high = min(math.ceil(correction_dim(cfg.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1.0 - ramp  # 1 for high-frequency pairs (kept), 0 for low-frequency ones (interpolated)
    return inv_freq / cfg.rope_factor * (1 - extrapolate) + inv_freq * extrapolate


def rope_tables(cfg: ModelConfig, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """cos/sin tables [max_seq_len, rope_dim/2] in fp32, scaled by YaRN's mscale ratio."""
    inv_freq = rope_inv_freq(cfg).to(device)
    angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float32, device=device), inv_freq)
    attention_factor = yarn_mscale(cfg.rope_factor, cfg.mscale) / yarn_mscale(cfg.rope_factor, cfg.mscale_all_dim)
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved pairs (x0, x1), (x2, x3), ... as DeepSeek's release does.

    x: [B, T, H, rope_dim]; cos, sin: [T, rope_dim/2]. Computed in fp32, returned in x's dtype.
    """
    pairs = x.float().unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, None, :], sin[:, None, :]
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)


def attention_softmax_scale(cfg: ModelConfig) -> float:
    """1/sqrt(d_h + d_h^R), times YaRN's mscale^2 when the context is extended."""
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    return scale * yarn_mscale(cfg.rope_factor, cfg.mscale_all_dim) ** 2


# --------------------------------------------------------------------------------------------------
# Building blocks


class Embedding(nn.Embedding):
    """The token embedding; a BF16 table's gradient is summed in FP32 (``train.ops.embedding``)."""

    def forward(self, tokens: Tensor) -> Tensor:
        return embedding(tokens, self.weight)


class RMSNorm(nn.Module):
    """RMSNorm and its weight computed in FP32, the output in the input's dtype (train/ops.py)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)  # keeps x and 1/rms for backward (train/ops.py)


class MLA(nn.Module):
    """Multi-head Latent Attention (sec 2.1.1, eqs. 1-11).

    Keys and values come from a compressed latent c_kv (kv_lora_rank) through up-projections; a single
    rotary key k_rope is shared by all heads; queries are optionally compressed (q_lora_rank > 0).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.q_lora_rank = cfg.q_lora_rank
        self.kv_lora_rank = cfg.kv_lora_rank
        self.qk_nope_head_dim = cfg.qk_nope_head_dim
        self.qk_rope_head_dim = cfg.qk_rope_head_dim
        self.v_head_dim = cfg.v_head_dim
        qk_head_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        if cfg.q_lora_rank == 0:
            self.wq = nn.Linear(cfg.dim, cfg.n_heads * qk_head_dim, bias=False)
        else:
            self.wq_a = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False)  # W^DQ
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
            self.wq_b = nn.Linear(cfg.q_lora_rank, cfg.n_heads * qk_head_dim, bias=False)  # W^UQ and W^QR
        self.wkv_a = nn.Linear(cfg.dim, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)  # W^DKV and W^KR
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, cfg.norm_eps)
        self.wkv_b = nn.Linear(cfg.kv_lora_rank, cfg.n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.v_head_dim, cfg.dim, bias=False)
        self.softmax_scale = attention_softmax_scale(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        return self.wo(self.core(*self.down(x), cos, sin))

    def down(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The down-projections of the (normalised) input: the query latent c_q (or, without query
        compression, the queries), the kv latent c_kv and the rotary key before rotation."""
        x = to_compute_dtype(x)
        q = self.wq(x) if self.q_lora_rank == 0 else self.wq_a(x)
        latent, k_rope = self.wkv_a(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        return q, latent, k_rope

    def up_q(self, q: Tensor) -> Tensor:
        """Queries from c_q: RMSNorm then W^UQ and W^QR (identity without query compression)."""
        return q if self.q_lora_rank == 0 else self.wq_b(self.q_norm(q))

    def up_kv(self, latent: Tensor) -> Tensor:
        """Keys (non-rotary part) and values from c_kv: RMSNorm then W^UK and W^UV."""
        return self.wkv_b(self.kv_norm(latent))

    def core(self, q_latent: Tensor, latent: Tensor, k_rope: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """From the latents to the attention output before W^O: the up-projections, the rotary
        embedding and the attention itself ([B, T, n_heads * v_head_dim])."""
        return self.attend(self.up_q(q_latent), self.up_kv(latent), k_rope, cos, sin)

    def attend(self, q: Tensor, kv: Tensor, k_rope: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Rotary embedding and attention, on the up-projected queries, keys and values."""
        batch, seqlen, _ = q.shape
        q = q.view(batch, seqlen, self.n_heads, -1)
        q_nope, q_rope = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_rope = apply_rope(q_rope, cos, sin)
        k_rope = apply_rope(k_rope.unsqueeze(2), cos, sin)  # one rotary key shared by all heads
        kv = kv.view(batch, seqlen, self.n_heads, -1)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)

        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(-1, -1, self.n_heads, -1)], dim=-1)
        # Fused (flash) SDPA kernels want one head dim for q, k and v: pad v with zeros, drop the padding after.
        v_padded = F.pad(v, (0, q.shape[-1] - self.v_head_dim)) if q.shape[-1] > self.v_head_dim else v
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v_padded.transpose(1, 2), is_causal=True, scale=self.softmax_scale
        )
        out = out[..., : self.v_head_dim]
        return out.transpose(1, 2).reshape(batch, seqlen, -1)


class MLP(nn.Module):
    """SwiGLU feed-forward: the dense FFN of the first layers and the shared experts."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)  # gate
        self.w2 = nn.Linear(inter_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, inter_dim, bias=False)  # up

    def forward(self, x: Tensor) -> Tensor:
        x = to_compute_dtype(x)
        return self.w2(swiglu(self.w1(x), self.w3(x)))


@dataclass
class Routing:
    """Result of the gate for N tokens: K experts each, and the affinities of all experts."""

    weights: Tensor  # [N, K] fp32, normalised unbiased affinities times route_scale
    indices: Tensor  # [N, K] selected expert ids
    scores: Tensor  # [N, E] fp32 sigmoid affinities s_i (unbiased)


class Gate(nn.Module):
    """Sigmoid gating with the aux-loss-free bias and group-limited top-k (sec 2.1.2, eqs. 12-16).

    The bias b_i (buffer ``bias``) shifts only the selection; the gate weights come from the unbiased
    affinities. All router arithmetic runs in fp32 whatever the autocast dtype.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.topk = cfg.n_activated_experts
        self.n_groups = cfg.n_expert_groups
        self.topk_groups = cfg.topk_groups
        self.route_scale = cfg.route_scale
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x: Tensor) -> Routing:
        with torch.autocast(device_type=x.device.type, enabled=False):
            scores = gate_scores(x, self.weight)
            biased = scores.detach() + self.bias
            if self.n_groups > 1:
                grouped = biased.unflatten(-1, (self.n_groups, -1))
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
                kept = group_scores.topk(self.topk_groups, dim=-1).indices
                keep_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
                biased = grouped.masked_fill(~keep_mask.unsqueeze(-1), float("-inf")).flatten(1)
            indices = biased.topk(self.topk, dim=-1).indices
            weights = scores.gather(1, indices)
            weights = weights / weights.sum(dim=-1, keepdim=True) * self.route_scale
        return Routing(weights=weights, indices=indices, scores=scores)


def expert_ffn_loop(x_sorted: Tensor, counts: list[int], w1: Tensor, w2: Tensor, w3: Tensor,
                    weights: Tensor) -> Tensor:
    """SwiGLU of each expert on its contiguous slice of the expert-sorted tokens, scaled by their gate
    ``weights`` (reference path)."""
    outputs = []
    # unbind once: indexing w1[e] per expert would make autograd add E full-size zero tensors per weight
    for xs, ws, gate, down, up in zip(x_sorted.split(counts), weights.split(counts), w1.unbind(0), w2.unbind(0),
                                      w3.unbind(0)):
        if xs.shape[0] == 0:
            continue
        outputs.append(swiglu(xs @ gate.t(), xs @ up.t(), ws) @ down.t())
    return torch.cat(outputs) if outputs else x_sorted.new_zeros(0, w2.shape[1])


PADDED_ROWS = 32  # expert_ffn_padded's row multiple: 16, 32 and 64 measured alike (docs/perf.md)


def expert_ffn_padded(x_sorted: Tensor, counts: Tensor, w1: Tensor, w2: Tensor, w3: Tensor, weights: Tensor,
                      multiple: int) -> Tensor:
    """``expert_ffn_loop`` with each expert's rows followed by zero rows up to a multiple of ``multiple``.

    For the CPU in BF16: oneDNN builds a kernel for each new GEMM shape (0.7-1.0 ms on 2 cores, ten times a
    256x256x128 product), and the experts' row counts change every step; rounded counts recur, so its
    kernel cache serves them. A zero row computes zeros and adds nothing to any weight's gradient."""
    padded = (counts + multiple - 1) // multiple * multiple
    where = rows_in_padded_layout(counts, torch.cat([padded.new_zeros(1), padded.cumsum(0)]), x_sorted.shape[0])
    sizes = padded.tolist()
    x_padded = x_sorted.new_zeros(sum(sizes), x_sorted.shape[1]).index_copy(0, where, x_sorted)
    weights_padded = weights.new_zeros(sum(sizes)).index_copy(0, where, weights)
    return expert_ffn_loop(x_padded, sizes, w1, w2, w3, weights_padded).index_select(0, where)


def expert_ffn_grouped(x_sorted: Tensor, counts: Tensor, w1: Tensor, w2: Tensor, w3: Tensor,
                       weights: Tensor) -> Tensor:
    """The same SwiGLU as one grouped GEMM per projection (``torch._grouped_mm``, CUDA)."""
    offsets = counts.cumsum(0).to(torch.int32)
    gate = torch._grouped_mm(x_sorted, w1.transpose(-2, -1), offs=offsets)
    up = torch._grouped_mm(x_sorted, w3.transpose(-2, -1), offs=offsets)
    return torch._grouped_mm(swiglu(gate, up, weights), w2.transpose(-2, -1), offs=offsets)


class RoutedExperts(nn.Module):
    """Fine-grained routed experts with weights stacked per layer ([E, ...]) for grouped GEMMs."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        n, dim, inter = cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim
        self.n_experts = n
        self.expert_offset = 0  # global id of local expert 0 (non-zero when experts are sharded, parallel/expert.py)
        self.impl = cfg.expert_impl
        self.w1 = nn.Parameter(torch.empty(n, inter, dim))  # gate projections
        self.w2 = nn.Parameter(torch.empty(n, dim, inter))  # down projections
        self.w3 = nn.Parameter(torch.empty(n, inter, dim))  # up projections
        # FP8 swaps in its grouped SwiGLU here (fp8/convert.py): fn(x_sorted, counts, w1, w2, w3, weights)
        self.fp8_ffn: Callable[..., Tensor] | None = None

    def ffn(self, x_sorted: Tensor, counts: Tensor, weights: Tensor) -> Tensor:
        """SwiGLU of each local expert on its contiguous slice of the expert-sorted rows (``counts`` per
        expert), scaled by the rows' gate ``weights`` [N] (fp32), in the dtype of ``x_sorted``: FP8 when
        converted, else a grouped GEMM or the loop (on padded rows for half precision on the CPU)."""
        if self.fp8_ffn is not None:
            return self.fp8_ffn(x_sorted, counts, self.w1, self.w2, self.w3, weights)
        w1, w2, w3 = (cast_weight(w, x_sorted.dtype) for w in (self.w1, self.w2, self.w3))
        if self.use_grouped_mm(x_sorted):
            return expert_ffn_grouped(x_sorted, counts, w1, w2, w3, weights)
        if self.use_padded_rows(x_sorted):
            return expert_ffn_padded(x_sorted, counts, w1, w2, w3, weights, PADDED_ROWS)
        return expert_ffn_loop(x_sorted, counts.tolist(), w1, w2, w3, weights)

    def use_grouped_mm(self, x: Tensor) -> bool:
        if self.impl == "auto":
            return x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
        return self.impl == "grouped_mm"

    def use_padded_rows(self, x: Tensor) -> bool:
        if self.impl == "auto":  # oneDNN's half-precision GEMMs on the CPU (expert_ffn_padded)
            return x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)
        return self.impl == "loop_padded"

    def forward(self, x: Tensor, routing: Routing) -> Tensor:
        """x: [N, dim]. Tokens are sorted by expert, computed per expert, weighted and summed back."""
        # the experts in the autocast dtype (bf16 on GPUs; the residual stream is in it already),
        # which grouped GEMMs need and which halves the bytes of the token shuffle
        x = to_compute_dtype(x)
        topk = routing.indices.shape[1]
        flat_experts = routing.indices.flatten()
        order = flat_experts.argsort(stable=True)
        token_of = order // topk
        counts = count_per_expert(flat_experts, self.n_experts)
        out = self.ffn(gather_rows(x, token_of), counts, routing.weights.flatten()[order])
        return combine_rows(out, token_of, x.shape[0])

    def forward_beside(self, x: Tensor, routing: Routing, beside: Callable[[], Tensor | None]
                       ) -> tuple[Tensor, Tensor | None]:
        """``(self(x, routing), beside())``: the routed experts' output and other work of the layer (the
        shared experts), which an expert-parallel subclass runs while its tokens travel."""
        return self(x, routing), beside()


def count_per_expert(indices: Tensor, n_experts: int) -> Tensor:
    """How many of ``indices`` (expert ids < n_experts, any shape) fall on each expert: int64 [n_experts],
    ``torch.bincount(indices.flatten(), minlength=n_experts)`` without its host read (on a GPU bincount reads
    the largest id back to size its output: a sync per MoE layer, twice). Integer sums: exact in any order."""
    flat = indices.flatten().long()
    return torch.zeros(n_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def sequence_balance_loss(scores: Tensor, indices: Tensor, batch: int, n_experts: int) -> Tensor:
    """Complementary sequence-wise balance loss without alpha (sec 2.1.2, eqs. 17-20), mean over sequences.

    f_i = N_r / (K_r T) * #{t : i in topk(t)};  P_i = mean_t s_i,t / sum_j s_j,t;  L = sum_i f_i P_i.
    topk(t) is the routing actually used (bias- and group-adjusted), so f_i is the load the loss
    balances; eq. 18 writes Top-k of the raw affinities, which differs only once biases are non-zero.
    """
    seqlen = scores.shape[0] // batch
    topk = indices.shape[1]
    normalised = (scores / scores.sum(dim=-1, keepdim=True)).view(batch, seqlen, n_experts)
    probability = normalised.mean(dim=1)
    hits = torch.zeros(batch, n_experts, device=scores.device, dtype=scores.dtype)
    hits.scatter_add_(1, indices.view(batch, seqlen * topk), torch.ones_like(indices, dtype=scores.dtype).view(batch, -1))
    fraction = hits * n_experts / (topk * seqlen)
    return (fraction * probability).sum(dim=-1).mean()


@dataclass
class MoEStats:
    """What one MoE layer reports per forward: its balance loss and how many tokens each expert got."""

    balance_loss: Tensor  # scalar, without alpha
    expert_load: Tensor  # [E] token counts


class MoE(nn.Module):
    """DeepSeekMoE: shared experts plus gated fine-grained routed experts, no token dropping (sec 2.1.2)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.gate = Gate(cfg)
        self.experts = RoutedExperts(cfg)
        self.shared_experts = MLP(cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim) if cfg.n_shared_experts else None

    def forward(self, x: Tensor) -> tuple[Tensor, MoEStats]:
        flat, routing, stats = self.route(x)
        routed, shared = self.experts.forward_beside(flat, routing, lambda: self.shared(flat))
        return self.mix(routed, shared, x.shape), stats

    def route(self, x: Tensor) -> tuple[Tensor, Routing, MoEStats]:
        """Tokens [B, T, D] -> flat tokens [B*T, D], their routing and the layer's statistics."""
        batch, seqlen, dim = x.shape
        flat = x.reshape(-1, dim)
        routing = self.gate(flat)
        stats = MoEStats(
            balance_loss=sequence_balance_loss(routing.scores, routing.indices, batch, self.n_experts),
            expert_load=count_per_expert(routing.indices, self.n_experts),
        )
        return flat, routing, stats

    def shared(self, flat: Tensor) -> Tensor | None:
        """The shared experts' output on the flat tokens (None without shared experts)."""
        return self.shared_experts(flat) if self.shared_experts is not None else None

    @staticmethod
    def mix(routed: Tensor, shared: Tensor | None, shape: torch.Size) -> Tensor:
        """The layer's output: routed experts' [B*T, D] plus the shared experts', as [B, T, D]."""
        return (routed if shared is None else routed + shared).view(shape)


class Block(nn.Module):
    """Pre-norm transformer block: MLA then a dense FFN or a DeepSeekMoE layer."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = MLA(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = MLP(cfg.dim, cfg.inter_dim) if layer_id < cfg.n_dense_layers else MoE(cfg)
        self.recompute = "none"  # none | selective | full: see set_recompute

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, MoEStats | None]:
        if self.recompute == "full" and torch.is_grad_enabled():  # the whole block again in backward
            return checkpoint(self._forward, x, cos, sin, use_reentrant=False)
        return self._forward(x, cos, sin)

    def _forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, MoEStats | None]:
        x = self.attention(x, cos, sin)
        if isinstance(self.ffn, MoE):
            out, stats = self.ffn(self.ffn_norm(x))
            return x + out, stats
        return x + self.ffn(self.ffn_norm(x)), None

    def attention(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """The attention half with its residual: x + MLA(RMSNorm(x)). With selective recompute (sec
        3.2.3) the RMSNorms and the MLA projections run again in backward instead of keeping their
        outputs: only x, the small latents and the attention output stay. The up-projected queries,
        keys and values are not kept either, so the attention's forward runs again with them (a
        fused attention kernel keeps its inputs: recomputing the projections alone would not free
        them)."""
        if self.recompute != "selective" or not torch.is_grad_enabled():
            return x + self.attn(self.attn_norm(x), cos, sin)
        mla = self.attn
        q_latent, latent, k_rope = checkpoint(lambda t: mla.down(self.attn_norm(t)), x, use_reentrant=False)
        out = checkpoint(mla.core, q_latent, latent, k_rope, cos, sin, use_reentrant=False)
        return x + mla.wo(out)


class MTPModule(nn.Module):
    """One Multi-Token Prediction depth (sec 2.2, eqs. 21-23).

    h'_i = M [RMSNorm(Emb(t_{i+k})); RMSNorm(h_i^{k-1})], then a transformer block; the output goes
    through this module's norm and the shared head. Order: embedding first, as the released weights
    (``eh_proj``) expect; the report writes the hidden state first, which is the same map with M's two
    column blocks swapped.
    """

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.dim, cfg.dim, bias=False)
        self.block = Block(cfg, layer_id)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, hidden: Tensor, next_embed: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, MoEStats | None]:
        x = self.eh_proj(torch.cat([self.enorm(next_embed), self.hnorm(hidden)], dim=-1))
        return self.block(x, cos, sin)


RECOMPUTE_MODES = ("none", "selective", "full")


def set_recompute(model: nn.Module, mode: str) -> None:
    """Activation recomputation of every block (report sec 3.2.3): ``selective`` recomputes the
    attention-side RMSNorms and the MLA down/up-projections in backward (``Block.attention``); ``full``
    recomputes whole blocks (only their inputs are kept); ``none`` keeps everything."""
    if mode not in RECOMPUTE_MODES:
        raise ValueError(f"recompute mode {mode!r}: choose one of {', '.join(RECOMPUTE_MODES)}")
    for module in model.modules():
        if isinstance(module, Block):
            module.recompute = mode


@dataclass
class ModelOutput:
    logits: Tensor  # [B, T, V]: position i predicts token i+1
    mtp_logits: list[Tensor]  # depth k: [B, T-k, V], position i predicts token i+k+1
    balance_loss: Tensor  # sum over MoE layers (main and MTP) of the sequence balance loss, without alpha
    expert_load: Tensor  # [n_moe_layers, E] tokens per expert, in the order of Transformer.moe_layers()
    # with the window passed to forward: the main head's and each depth's cross-entropy, made right after it
    cross_entropies: list[Tensor] = field(default_factory=list)


class Transformer(nn.Module):
    """DeepSeek-V3: embedding, blocks, final norm, output head, and D MTP modules sharing both ends."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPModule(cfg, cfg.n_layers + k) for k in range(cfg.mtp_depth))
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def moe_layers(self) -> list[MoE]:
        """The MoE layers in a fixed order (main blocks, then MTP blocks): the rows of expert_load."""
        return [m for m in self.modules() if isinstance(m, MoE)]

    @torch.no_grad()
    def init_weights(self, std: float | None = None, seed: int | None = None) -> None:
        """Normal(0, std) for every matrix (report: 0.006), ones for norms, zero gate biases, rope tables.
        seed=None takes one from torch's global generator (see ``init_parameters``)."""
        init_parameters(self, self.cfg.init_std if std is None else std,
                        int(torch.randint(0, 2**62, ()).item()) if seed is None else seed)
        cos, sin = rope_tables(self.cfg, device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def forward(self, tokens: Tensor, window: Tensor | None = None) -> ModelOutput:
        """tokens: [B, T] input ids. Returns main and MTP logits plus MoE statistics. ``window``: the
        micro-batch [B, T+1] (tokens = window[:, :T]): each head's cross-entropy is then computed right after
        the head, so that backward consumes each logits gradient before making the next (one alive at a
        time, not 1 + D: the planner's logits buffer)."""
        seqlen = tokens.shape[1]
        cos, sin = self.rope_cos[:seqlen], self.rope_sin[:seqlen]
        embed = to_compute_dtype(self.embed(tokens))  # the residual stream: BF16 under BF16 autocast (sec 3.3)
        h = embed
        stats: list[MoEStats] = []
        for layer in self.layers:
            h, layer_stats = layer(h, cos, sin)
            if layer_stats is not None:
                stats.append(layer_stats)
        h = self.norm(h)  # MTP depth 1 takes the normalised hidden state (as HF's MtpModel / the released weights)
        logits = self.head(h)
        cross_entropies = [] if window is None else [head_cross_entropy(logits, window)]

        mtp_logits = []
        for depth, module in enumerate(self.mtp, start=1):
            length = seqlen - depth
            h, layer_stats = module(h[:, :length], embed[:, depth:], cos[:length], sin[:length])
            if layer_stats is not None:
                stats.append(layer_stats)
            h = module.norm(h)  # and depth k+1 takes depth k's normalised output
            mtp_logits.append(self.head(h))
            if window is not None:
                cross_entropies.append(head_cross_entropy(mtp_logits[-1], window, depth))

        if stats:
            balance_loss = torch.stack([s.balance_loss for s in stats]).sum()
            expert_load = torch.stack([s.expert_load for s in stats])
        else:
            balance_loss = logits.new_zeros((), dtype=torch.float32)
            expert_load = torch.zeros(0, self.cfg.n_routed_experts, dtype=torch.long, device=tokens.device)
        return ModelOutput(logits, mtp_logits, balance_loss, expert_load, cross_entropies)


@torch.no_grad()
def init_parameters(module: nn.Module, std: float, seed: int) -> None:
    """Initialise every parameter of ``module`` (the model, or the part of it a rank holds, under the
    model's names): Normal(0, std) matrices, ones for norms, zero gate biases.

    Each tensor, and each routed expert, draws from its own generator seeded by (seed, its name, its
    global expert id), so a rank holding one pipeline stage or a shard of the experts initialises
    exactly what a single process would, and copies of a tensor on several ranks are identical.
    """

    def normal_(tensor: Tensor, name: str) -> None:
        digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
        generator = torch.Generator(device=tensor.device).manual_seed(int.from_bytes(digest, "little") >> 1)
        tensor.normal_(0.0, std, generator=generator)

    for name, sub in module.named_modules():
        if isinstance(sub, (nn.Linear, nn.Embedding)):
            normal_(sub.weight, f"{name}.weight")
        elif isinstance(sub, RMSNorm):
            nn.init.ones_(sub.weight)
        elif isinstance(sub, Gate):
            normal_(sub.weight, f"{name}.weight")
            sub.bias.zero_()
        elif isinstance(sub, RoutedExperts):
            for weight_name in ("w1", "w2", "w3"):
                for local, expert_weight in enumerate(getattr(sub, weight_name)):
                    normal_(expert_weight, f"{name}.{weight_name}.{sub.expert_offset + local}")


# --------------------------------------------------------------------------------------------------
# Parameter counts (analytic, so that 671B is counted without allocating it)


@dataclass
class ParamCounts:
    total: int  # main model: embedding, blocks, final norm, head (no MTP)
    active: int  # per token: everything but the routed experts not selected (embedding and head counted in full)
    mtp: int  # MTP modules including the shared embedding and head
    mtp_unique: int  # MTP modules' own parameters


def count_parameters(cfg: ModelConfig) -> ParamCounts:
    """Count parameters from the config; equals sum(p.numel()) of a built Transformer (tested)."""
    d, h = cfg.dim, cfg.n_heads
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    if cfg.q_lora_rank == 0:
        attn = d * h * qk
    else:
        attn = d * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * h * qk
    attn += d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank
    attn += cfg.kv_lora_rank * h * (cfg.qk_nope_head_dim + cfg.v_head_dim) + h * cfg.v_head_dim * d
    norms = 2 * d
    dense = 3 * d * cfg.inter_dim
    expert = 3 * d * cfg.moe_inter_dim
    gate = cfg.n_routed_experts * d
    moe_total = gate + (cfg.n_routed_experts + cfg.n_shared_experts) * expert
    moe_active = gate + (cfg.n_activated_experts + cfg.n_shared_experts) * expert
    n_moe = cfg.n_layers - cfg.n_dense_layers
    ends = 2 * cfg.vocab_size * d + d  # embedding, head, final norm
    base = cfg.n_dense_layers * (attn + norms + dense) + ends
    total = base + n_moe * (attn + norms + moe_total)
    active = base + n_moe * (attn + norms + moe_active)
    mtp_block = attn + norms + moe_total  # MTP blocks always sit past the dense layers
    mtp_unique = cfg.mtp_depth * (mtp_block + 2 * d * d + 3 * d)
    shared = 2 * cfg.vocab_size * d if cfg.mtp_depth else 0
    return ParamCounts(total=total, active=active, mtp=mtp_unique + shared, mtp_unique=mtp_unique)
