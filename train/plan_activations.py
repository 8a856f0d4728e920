"""Planner: bytes each token leaves cached for backward, per block and recompute mode (report sec 3.2.3,
3.3.3; the table in docs/planner.md, "Activations")."""

from __future__ import annotations

from train.config import ModelConfig
from train.plan_cluster import E5M6_BYTES, FP8_BYTES, Precision
from train.plan_flops import is_dense


# How an element is stored: "act" in the activation dtype (BF16 / FP32); "gemm" as the input of a GEMM
# whose Wgrad runs in FP8 (E4M3 with 1x128 scales under fp8.enabled, else "act"); "e5m6" the input of
# the Linear after attention (E5M6 under fp8.enabled); "fp32" always FP32.
# Which modes keep it: N = none, S = selective (report: every RMSNorm and the MLA up-projections
# recomputed, the attention core's q, k, v with them; flash attention keeps only its output and
# log-sum-exp). Under full recompute a block keeps only its input.


def activation_items(m: ModelConfig, layer_id: int, p: Precision) -> list[tuple[str, float, str, str]]:
    """(tensor, elements per token, storage kind, modes "NS" that keep it) for block ``layer_id``."""
    h, qk, dv = m.n_heads, m.qk_nope_head_dim + m.qk_rope_head_dim, m.v_head_dim
    items = [("block input x (attn_norm input)", m.dim, "act", "NS"),
             ("attn_norm output (wq/wq_a, wkv_a input)", m.dim, "gemm", "N")]
    if m.q_lora_rank:
        items += [("c_q (q_norm input)", m.q_lora_rank, "act", "NS"),
                  ("q_norm output (wq_b input)", m.q_lora_rank, "gemm", "N")]
    items += [("c_kv and k_rope (kv_norm input)", m.kv_lora_rank + m.qk_rope_head_dim, "act", "NS"),
              ("kv_norm output (wkv_b input)", m.kv_lora_rank, "gemm", "N"),
              ("attention q, k, v", h * (2 * qk + dv), "act", "N"),
              ("attention output (wo input)", h * dv, "e5m6", "NS"),
              ("softmax log-sum-exp", h, "fp32", "NS"),
              ("residual after attention (ffn_norm input)", m.dim, "act", "NS"),
              ("ffn_norm output (FFN, gate and dispatch input)", m.dim, "gemm", "N")]
    fp8_moe = p.fp8  # MoE SwiGLU inputs cached in FP8, its output recomputed (sec 3.3.3)
    if is_dense(m, layer_id):
        items += [("dense FFN w1, w3 outputs (SwiGLU input)", 2 * m.inter_dim, "act", "NS"),
                  ("dense FFN SwiGLU output (w2 input)", m.inter_dim, "gemm", "NS")]
        return items
    inter, k, s = m.moe_inter_dim, m.n_activated_experts, m.n_shared_experts
    items += [("gate scores", m.n_routed_experts, "fp32", "NS"),
              ("top-k expert ids and weights", k * 3, "fp32", "NS"),  # int64 ids + fp32 weights = 12 bytes
              ("shared experts' SwiGLU inputs", s * 2 * inter, "gemm" if fp8_moe else "act", "NS"),
              ("shared experts' SwiGLU output", 0 if fp8_moe else s * inter, "gemm", "NS"),
              ("routed: dispatched token per expert slot", k * m.dim, "gemm", "NS"),
              ("routed: SwiGLU inputs", k * 2 * inter, "gemm" if fp8_moe else "act", "NS"),
              ("routed: SwiGLU output", 0 if fp8_moe else k * inter, "gemm", "NS")]
    return items


def element_bytes(kind: str, p: Precision) -> float:
    if kind == "fp32":
        return 4.0
    if kind == "gemm" and p.fp8:
        return FP8_BYTES
    if kind == "e5m6" and p.fp8:
        return E5M6_BYTES
    return float(p.act)


def layer_activation_bytes(m: ModelConfig, layer_id: int, p: Precision, mode: str | None = None) -> float:
    """Bytes one token leaves cached for backward in block ``layer_id`` under recompute ``mode``
    (default: the precision's). Routed weights are applied to the SwiGLU output, so no expert output is
    kept for the gate's gradient."""
    mode = p.recompute if mode is None else mode
    if mode == "full":
        return p.act * m.dim  # the block input; the rest is rebuilt in backward (StagePlan.recompute_bytes)
    keep = "N" if mode == "none" else "S"
    return sum(n * element_bytes(kind, p) for _, n, kind, modes in activation_items(m, layer_id, p) if keep in modes)


def tail_activation_bytes(m: ModelConfig, p: Precision, seq_len: int) -> float:
    """Per token of the last stage's fixed part: final-norm input, FP32 log-softmax of each head use
    (cross-entropy in FP32), and each MTP module (its two norm inputs, its block, its output norm input)
    on T-k positions."""
    a = p.act
    total = a * m.dim + 4 * m.vocab_size
    for k in range(1, m.mtp_depth + 1):
        per = 2 * a * m.dim + layer_activation_bytes(m, m.n_layers + k - 1, p) + a * m.dim + 4 * m.vocab_size
        total += per * (seq_len - k) / seq_len
    return total
