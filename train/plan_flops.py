"""Planner: parameters and forward FLOPs per block (the arithmetic of ``count_parameters``, split by layer).

FLOPs count 2 per multiply-add; causal attention sees (T+1)/2 keys per query; training = 3 x forward
(docs/planner.md, "FLOPs per token").
"""

from __future__ import annotations

from train.config import ModelConfig
from train.plan_cluster import Precision


def _mla_params(m: ModelConfig) -> tuple[int, int]:
    """(MLA matrices, of which up-projections) of one block; RMSNorm vectors not included."""
    h, qk = m.n_heads, m.qk_nope_head_dim + m.qk_rope_head_dim
    if m.q_lora_rank:
        q_down, q_up = m.dim * m.q_lora_rank, m.q_lora_rank * h * qk
    else:
        q_down, q_up = 0, m.dim * h * qk  # no compression: wq is the query up-projection
    kv_down = m.dim * (m.kv_lora_rank + m.qk_rope_head_dim)
    kv_up = m.kv_lora_rank * h * (m.qk_nope_head_dim + m.v_head_dim)
    out = h * m.v_head_dim * m.dim
    return q_down + q_up + kv_down + kv_up + out, q_up + kv_up


def is_dense(m: ModelConfig, layer_id: int) -> bool:
    return layer_id < m.n_dense_layers  # MTP blocks (layer_id >= n_layers) are MoE blocks


def layer_params(m: ModelConfig, layer_id: int) -> tuple[int, int]:
    """(parameters outside the routed experts, routed-expert parameters) of block ``layer_id``."""
    mla, _ = _mla_params(m)
    vectors = 2 * m.dim + m.kv_lora_rank + (m.q_lora_rank if m.q_lora_rank else 0)  # RMSNorm weights
    if is_dense(m, layer_id):
        return mla + vectors + 3 * m.dim * m.inter_dim, 0
    expert = 3 * m.dim * m.moe_inter_dim
    return mla + vectors + m.n_routed_experts * m.dim + m.n_shared_experts * expert, m.n_routed_experts * expert


def gemm_free_params(m: ModelConfig, layer_id: int) -> int:
    """Parameters of block ``layer_id`` outside the routed experts that no autocast GEMM reads: the RMSNorm
    weights and the gate (its affinities are computed in FP32)."""
    vectors = 2 * m.dim + m.kv_lora_rank + (m.q_lora_rank if m.q_lora_rank else 0)
    return vectors + (0 if is_dense(m, layer_id) else m.n_routed_experts * m.dim)


def block_cost(m: ModelConfig, layer_id: int) -> int:
    """Parameters a token passes through in block ``layer_id`` (``parallel.pipeline.stages.stage_costs``)."""
    dense, _ = layer_params(m, layer_id)
    return dense + (0 if is_dense(m, layer_id) else m.n_activated_experts * 3 * m.dim * m.moe_inter_dim)


def tail_cost(m: ModelConfig) -> int:
    """The last stage's fixed part: final norm, head, and each MTP module with its use of the head."""
    mtp = 2 * m.dim + 2 * m.dim * m.dim + block_cost(m, m.n_layers) + m.dim + m.vocab_size * m.dim
    return m.dim + m.vocab_size * m.dim + m.mtp_depth * mtp


def layer_flops(m: ModelConfig, layer_id: int, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token of one block (2 per multiply-add) on sequences of ``seq_len`` tokens.

    Causal attention: query i attends to i+1 keys, (T+1)/2 on average, with q.k over the qk head dim
    (nope + rope) and p.v over the v head dim."""
    h = m.n_heads
    mla, up = _mla_params(m)
    keys = (seq_len + 1) / 2
    out = {
        "mla_proj": 2.0 * mla,
        "mla_up": 2.0 * up,  # part of mla_proj; recomputed in backward (sec 3.2.3)
        "attention": 2.0 * h * keys * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim),
        "dense_ffn": 0.0, "gate": 0.0, "shared_experts": 0.0, "routed_experts": 0.0,
    }
    if is_dense(m, layer_id):
        out["dense_ffn"] = 2.0 * 3 * m.dim * m.inter_dim
    else:
        expert = 2.0 * 3 * m.dim * m.moe_inter_dim
        out["gate"] = 2.0 * m.dim * m.n_routed_experts
        out["shared_experts"] = m.n_shared_experts * expert
        out["routed_experts"] = m.n_activated_experts * expert
    return out


FLOP_KEYS = ("mla_proj", "attention", "dense_ffn", "gate", "shared_experts", "routed_experts", "head", "mtp")


def _mtp_flops(m: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token (of the main sequence) of the MTP modules: depth k sees T-k positions."""
    total = 0.0
    for k in range(1, m.mtp_depth + 1):
        length = seq_len - k
        block = layer_flops(m, m.n_layers + k - 1, length)
        per_token = sum(v for key, v in block.items() if key != "mla_up") + 2.0 * 2 * m.dim * m.dim \
            + 2.0 * m.dim * m.vocab_size
        total += per_token * length / seq_len
    return total


def forward_flops_per_token(m: ModelConfig, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token by component (``FLOP_KEYS``); the embedding lookup costs none."""
    out = dict.fromkeys(FLOP_KEYS, 0.0)
    for layer in range(m.n_layers):
        for key, value in layer_flops(m, layer, seq_len).items():
            if key in out:
                out[key] += value
    out["head"] = 2.0 * m.dim * m.vocab_size
    out["mtp"] = _mtp_flops(m, seq_len)
    return out


def training_flops_per_token(m: ModelConfig, seq_len: int) -> float:
    """Model FLOPs per token for forward + backward: 3 x forward (backward = input and weight gradients)."""
    return 3.0 * sum(forward_flops_per_token(m, seq_len).values())



def layer_time_split(m: ModelConfig, layer_id: int, seq_len: int, p: Precision) -> dict[str, float]:
    """Forward FLOPs per token of a block by the peak they run at ("fp8" GEMMs under fp8.enabled, "bf16"
    GEMMs: the gate always, "attention" the core), and what its recompute mode adds in backward
    ("recompute_fp8", "recompute_bf16")."""
    f = layer_flops(m, layer_id, seq_len)
    gemm = f["mla_proj"] + f["dense_ffn"] + f["shared_experts"] + f["routed_experts"]
    out = {"fp8": gemm if p.fp8 else 0.0, "bf16": f["gate"] + (0.0 if p.fp8 else gemm), "attention": f["attention"],
           "recompute_fp8": 0.0, "recompute_bf16": 0.0}
    if p.recompute == "selective":  # the MLA projections but W^O, and the attention (Block.attention)
        projections = f["mla_proj"] - 2.0 * m.n_heads * m.v_head_dim * m.dim  # the RMSNorms: no GEMM FLOPs
        out["recompute_fp8" if p.fp8 else "recompute_bf16"] = projections
        out["recompute_bf16"] += f["attention"]
    elif p.recompute == "full":  # the whole block's forward again
        out["recompute_fp8"], out["recompute_bf16"] = out["fp8"], out["bf16"] + out["attention"]
    return out


def recompute_flops_per_token(m: ModelConfig, seq_len: int, p: Precision) -> float:
    """Forward FLOPs per token run again in backward (recompute mode), plus flash attention's second
    computation of the scores in its backward (half the attention forward)."""
    total = 0.0
    for layer in range(m.n_layers + m.mtp_depth):
        length = seq_len if layer < m.n_layers else seq_len - (layer - m.n_layers + 1)
        split = layer_time_split(m, layer, length, p)
        total += (split["recompute_fp8"] + split["recompute_bf16"] + 0.5 * split["attention"]) * length / seq_len
    return total
