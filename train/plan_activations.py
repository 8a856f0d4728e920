"""Planner: bytes each token leaves cached for backward, per block and recompute mode (report sec 3.2.3,
3.3.3; the table in docs/planner.md, "Activations")."""

from __future__ import annotations

from train.config import ModelConfig
from train.plan_cluster import E5M6_BYTES, FP8_BYTES, FP8_TILE, Precision
from train.plan_flops import is_dense


# How an element is stored: "act" in the activation (autocast) dtype, BF16 / FP32, which is also the
# residual stream's and the RMSNorms' outputs'; "gemm" as the input of a GEMM whose Wgrad runs in FP8
# (E4M3 with 1x128 scales under fp8.enabled, else "act"; an input two GEMMs read is kept once, also in
# FP8: fp8/linear.py shares its quantization within a step); "fp8" a GEMM input kept in FP8 under
# fp8.enabled only (without FP8 the tensor is kept elsewhere anyway); "e5m6" the input of the Linear
# after attention (E5M6 under fp8.enabled); "fp32" and "int64" always.
# Which modes keep it: N = none, S = selective (the RMSNorms, the MLA projections but W^O, and the
# attention rerun in backward: the block input, the latents and W^O's input stay). Under full recompute
# a block keeps only its input.
# The table is what autograd keeps, tensor by tensor (tests/unit/test_plan_memory.py measures it).


def activation_items(m: ModelConfig, layer_id: int, p: Precision) -> list[tuple[str, float, str, str]]:
    """(tensor, elements per token, storage kind, modes "NS" that keep it) for block ``layer_id``."""
    h, qk, dv = m.n_heads, m.qk_nope_head_dim + m.qk_rope_head_dim, m.v_head_dim
    items = [("block input x (attn_norm input)", m.dim, "act", "NS"),
             ("attn_norm 1/rms", 1, "fp32", "N"),
             ("attn_norm output (wq/wq_a and wkv_a input)", m.dim, "gemm", "N")]
    if m.q_lora_rank:
        items += [("c_q (q_norm input)", m.q_lora_rank, "act", "NS"),
                  ("q_norm 1/rms", 1, "fp32", "N"),
                  ("q_norm output (wq_b input)", m.q_lora_rank, "gemm", "N")]
    else:  # the queries straight from wq: selective recompute keeps them as its input
        items += [("queries (wq output)", h * qk, "act", "S")]
    items += [("c_kv and k_rope (kv_norm input)", m.kv_lora_rank + m.qk_rope_head_dim, "act", "NS"),
              ("kv_norm 1/rms", 1, "fp32", "N"),
              ("kv_norm output (wkv_b input)", m.kv_lora_rank, "gemm", "N"),
              # fused kernels take one head dim: v is zero-padded to q/k's, and so is the output
              ("attention q, k, v", h * (2 * qk + max(qk, dv)), "act", "N"),
              ("attention output, as the kernel returns it", h * max(qk, dv), "act", "N"),
              ("softmax log-sum-exp", h, "fp32", "N"),
              ("attention output (wo input)", h * dv, "e5m6", "NS"),
              ("residual after attention (ffn_norm input)", m.dim, "act", "NS"),
              ("ffn_norm 1/rms", 1, "fp32", "NS")]
    if is_dense(m, layer_id):
        items += [("ffn_norm output (w1 and w3 input)", m.dim, "gemm", "NS"),
                  ("dense FFN w1, w3 outputs (SwiGLU input)", 2 * m.inter_dim, "act", "NS"),
                  ("dense FFN SwiGLU output (w2 input)", m.inter_dim, "gemm", "NS")]
        return items
    inter, k, s = m.moe_inter_dim, m.n_activated_experts, m.n_shared_experts
    items += [("ffn_norm output (gate, shared experts and dispatch input)", m.dim, "act", "NS"),
              ("gate scores", m.n_routed_experts, "fp32", "NS"),
              ("top-k expert ids", k, "int64", "NS"),
              ("top-k weights and their sum, sequence-balance sums", k + 2, "fp32", "NS")]
    if s:
        items += [("shared experts' w1 and w3 input under FP8", m.dim, "fp8", "NS"),
                  ("shared experts' SwiGLU inputs", s * 2 * inter, "act", "NS"),
                  ("shared experts' SwiGLU output (w2 input)", s * inter, "gemm", "NS")]
    # routed experts: the gate weight scales the SwiGLU output (train/ops.py); FP8 caches the SwiGLU inputs
    # in FP8 and recomputes its output (sec 3.3.3), as the output of the stacked gate/up GEMM, where each
    # is padded to a multiple of 128 columns (fp8/experts.py StepGateUp; real configs need no padding)
    stacked = -(-inter // FP8_TILE) * FP8_TILE if p.fp8 else inter
    items += [("routed: dispatched token per expert slot", k * m.dim, "gemm", "NS"),
              ("routed: SwiGLU inputs", k * 2 * stacked, "gemm", "NS"),
              ("routed: gate weight per slot", k, "fp32", "NS"),
              ("routed: weighted SwiGLU output (w2 input)", 0 if p.fp8 else k * inter, "act", "NS"),
              ("routed: slot order, token of each slot", 2 * k, "int64", "NS")]
    return items


def expert_padding_bytes(m: ModelConfig, p: Precision, rows: int, n_local_experts: int) -> float:
    """Bytes a MoE block caches per micro-batch beyond its per-token items: under FP8 the routed experts keep
    x for Wgrad in a layout where each expert's rows start on a 128-row tile, sized for the worst case,
    ``128 (ceil(rows / 128) + E)`` rows of ``dim`` FP8 elements for ``rows`` (token, expert) pairs on
    ``E`` local experts (fp8/experts.py ``ExpertRows``); the table counts ``rows`` of them."""
    if not p.fp8:
        return 0.0
    padded = FP8_TILE * (-(-rows // FP8_TILE) + n_local_experts)
    return (padded - rows) * m.dim * FP8_BYTES


def element_bytes(kind: str, p: Precision) -> float:
    """Bytes of one element of ``kind`` (see the table above)."""
    if kind in ("fp32", "int64"):
        return 4.0 if kind == "fp32" else 8.0
    if p.fp8 and kind in ("gemm", "fp8", "e5m6"):
        return E5M6_BYTES if kind == "e5m6" else FP8_BYTES
    return 0.0 if kind == "fp8" else float(p.act)


def layer_activation_bytes(m: ModelConfig, layer_id: int, p: Precision, mode: str | None = None) -> float:
    """Bytes one token leaves cached for backward in block ``layer_id`` under recompute ``mode``
    (default: the precision's)."""
    mode = p.recompute if mode is None else mode
    if mode == "full":
        return p.act * m.dim  # the block input; the rest is rebuilt in backward (StagePlan.recompute_bytes)
    keep = "N" if mode == "none" else "S"
    return sum(n * element_bytes(kind, p) for _, n, kind, modes in activation_items(m, layer_id, p) if keep in modes)


def tail_activation_bytes(m: ModelConfig, p: Precision, seq_len: int, holds_embedding: bool) -> float:
    """Per token of the last stage's fixed part (sec 2.2): the final norm's input and 1/rms, the head's
    input (the norm's output), the logits of each head use (the chunked cross-entropy keeps them in
    their dtype with one FP32 log-sum-exp per row) and each MTP depth k on T-k positions: its two norms
    (the embedding it normalises is the first block's input when ``holds_embedding``, else its own copy;
    the hidden state is the previous head's input), eh_proj's input, its block and its output norm."""
    a = p.act
    head_use = a * m.dim + a * m.vocab_size + 4  # the head's input, the logits and their log-sum-exp
    total = a * m.dim + 4 + head_use  # final norm: input and 1/rms
    for k in range(1, m.mtp_depth + 1):
        per = (4 + (0 if holds_embedding else a * m.dim)  # enorm
               + 4  # hnorm
               + a * 2 * m.dim  # eh_proj input
               + layer_activation_bytes(m, m.n_layers + k - 1, p)
               + a * m.dim + 4 + head_use)  # the module's norm, the head
        total += per * (seq_len - k) / seq_len
    return total
