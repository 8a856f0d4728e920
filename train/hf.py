"""Our state dict and config <-> the HF / DeepSeek-V3 checkpoint format (``DeepseekV3ForCausalLM``).

One table (``LAYER_KEYS`` plus the few top-level and MTP names) maps our names to the names the
released safetensors and ``save_pretrained`` use on disk; the only non-renaming steps are

* routed experts: ours are stacked per layer (``ffn.experts.w1`` [E, I, D], ``w3`` [E, I, D],
  ``w2`` [E, D, I]); on disk each expert has its own ``mlp.experts.{e}.{gate,up,down}_proj.weight``.
  transformers >= 5 holds them fused in memory (``mlp.experts.gate_up_proj`` [E, 2I, D] = gate rows
  then up rows, ``mlp.experts.down_proj`` [E, D, I]) and converts to per-expert keys when saving;
  ``from_hf_state_dict`` accepts both, ``to_hf_fused_experts`` gives the in-memory form.
* MTP: module k is stored as decoder layer ``num_hidden_layers + k`` (layer 61 for the 671B) with
  ``enorm``, ``hnorm``, ``eh_proj``, ``shared_head.norm`` and copies of the shared embedding and head
  (``embed_tokens``, ``shared_head.head``). ``eh_proj`` takes [enorm(emb); hnorm(h)], our order.
  ``DeepseekV3ForCausalLM`` ignores these keys; transformers' ``MtpModel`` (speculative decoding) reads
  them and, like our model, feeds each depth the normalised hidden state of the one before.

FP8 block scales (``*.weight_scale_inv`` of the released FP8 weights) are not handled here: such keys
are rejected, dequantize to BF16 first. Tensors are not copied: expert slices are views of the
stacked tensors and the MTP copies of the embedding/head are the same tensors, so clone before
``safetensors.torch.save_file`` (which refuses shared storage).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from train.config import ConfigError, ModelConfig

# Our key inside a block (``layers.{i}.`` or ``mtp.{k}.block.``) -> HF key inside ``model.layers.{n}.``.
LAYER_KEYS: dict[str, str] = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",  # q_lora_rank == 0
    "attn.wq_a.weight": "self_attn.q_a_proj.weight",  # q_lora_rank > 0
    "attn.q_norm.weight": "self_attn.q_a_layernorm.weight",
    "attn.wq_b.weight": "self_attn.q_b_proj.weight",
    "attn.wkv_a.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn.kv_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attn.wkv_b.weight": "self_attn.kv_b_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "ffn.w1.weight": "mlp.gate_proj.weight",  # dense FFN (first n_dense_layers blocks)
    "ffn.w2.weight": "mlp.down_proj.weight",
    "ffn.w3.weight": "mlp.up_proj.weight",
    "ffn.gate.weight": "mlp.gate.weight",
    "ffn.gate.bias": "mlp.gate.e_score_correction_bias",  # buffer b_i of the aux-loss-free balancing
    "ffn.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
    "ffn.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
}
# Stacked routed experts: ours ``ffn.experts.{w}`` [E, ...] <-> ``mlp.experts.{e}.{proj}.weight``.
EXPERT_KEYS: dict[str, str] = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
# Our top-level keys -> HF keys.
TOP_KEYS: dict[str, str] = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "head.weight": "lm_head.weight",
}
# Our ``mtp.{k}.`` keys outside its block -> HF keys inside ``model.layers.{n_layers + k}.``.
MTP_KEYS: dict[str, str] = {
    "enorm.weight": "enorm.weight",
    "hnorm.weight": "hnorm.weight",
    "eh_proj.weight": "eh_proj.weight",
    "norm.weight": "shared_head.norm.weight",
}
# HF keys of the MTP layer that copy the shared embedding and head (our embed / head).
MTP_SHARED_COPIES: dict[str, str] = {"embed_tokens.weight": "embed.weight", "shared_head.head.weight": "head.weight"}

_LAYER_KEYS_FROM_HF = {hf: ours for ours, hf in LAYER_KEYS.items()}
_TOP_KEYS_FROM_HF = {hf: ours for ours, hf in TOP_KEYS.items()}
_MTP_KEYS_FROM_HF = {hf: ours for ours, hf in MTP_KEYS.items()}
_EXPERT_KEYS_FROM_HF = {hf: ours for ours, hf in EXPERT_KEYS.items()}


# --------------------------------------------------------------------------------------------------
# Config


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The ``config.json`` dict of ``DeepseekV3Config`` for our config (transformers 5 layout).

    ``rope_parameters`` is the transformers >= 5 field; ``rope_theta`` and ``rope_scaling`` (the
    released checkpoint's fields) are written too so that older readers get the same rotary setup.
    """
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    rope_scaling = None
    if cfg.rope_factor > 1.0:
        rope_scaling = {
            "type": "yarn",
            "factor": cfg.rope_factor,
            "beta_fast": cfg.beta_fast,
            "beta_slow": cfg.beta_slow,
            "mscale": cfg.mscale,
            "mscale_all_dim": cfg.mscale_all_dim,
            "original_max_position_embeddings": cfg.original_seq_len,
        }
        rope = {"rope_type": "yarn", "rope_theta": cfg.rope_theta,
                **{k: v for k, v in rope_scaling.items() if k != "type"}}
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.inter_dim,
        "moe_intermediate_size": cfg.moe_inter_dim,
        "num_hidden_layers": cfg.n_layers,
        "first_k_dense_replace": cfg.n_dense_layers,
        "moe_layer_freq": 1,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_heads,
        "q_lora_rank": cfg.q_lora_rank or None,
        "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim,
        "n_routed_experts": cfg.n_routed_experts,
        "n_shared_experts": cfg.n_shared_experts,
        "num_experts_per_tok": cfg.n_activated_experts,
        "n_group": cfg.n_expert_groups,
        "topk_group": cfg.topk_groups,
        "routed_scaling_factor": cfg.route_scale,
        "norm_topk_prob": True,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "hidden_act": "silu",
        "attention_bias": False,
        "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": cfg.max_seq_len,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling,
        "rope_parameters": rope,
        "rope_interleave": True,
        "num_nextn_predict_layers": cfg.mtp_depth,
        "tie_word_embeddings": False,
        "initializer_range": cfg.init_std,
    }


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Our ``ModelConfig`` from an HF DeepSeek-V3 ``config.json`` dict (released or transformers 5 form).

    Raises ConfigError naming the HF field when the checkpoint uses a variant our model does not have.
    """
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(f"HF config: {message}")

    need(hf.get("hidden_act", "silu") == "silu", f"hidden_act={hf.get('hidden_act')!r}; only silu is supported")
    need(hf.get("scoring_func", "sigmoid") == "sigmoid",
         f"scoring_func={hf.get('scoring_func')!r}; only sigmoid gating (DeepSeek-V3) is supported")
    need(hf.get("topk_method", "noaux_tc") == "noaux_tc",
         f"topk_method={hf.get('topk_method')!r}; only noaux_tc (biased group-limited top-k) is supported")
    need(hf.get("norm_topk_prob", True) is True, "norm_topk_prob=false is not supported")
    need(not hf.get("attention_bias", False), "attention_bias=true is not supported")
    need(not hf.get("tie_word_embeddings", False), "tie_word_embeddings=true is not supported")
    need(hf.get("moe_layer_freq", 1) == 1, f"moe_layer_freq={hf.get('moe_layer_freq')}; only 1 is supported")
    heads = hf["num_attention_heads"]
    need(hf.get("num_key_value_heads", heads) in (None, heads),
         f"num_key_value_heads={hf.get('num_key_value_heads')} must equal num_attention_heads={heads} (MLA)")

    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    need(rope_type in ("default", "yarn"), f"rope type {rope_type!r}; only default and yarn are supported")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    max_len = hf["max_position_embeddings"]
    yarn = rope_type == "yarn"
    defaults = ModelConfig()
    original_len = rope.get("original_max_position_embeddings", max_len) if yarn else max_len
    factor = float(rope.get("factor") or max_len / original_len) if yarn else 1.0
    # HF's YaRN: attention factor m(s, mscale) / m(s, mscale_all_dim) and softmax scale * m(s, mscale_all_dim)^2
    # when both are set; without mscale_all_dim, m(s, 1) and no softmax factor, i.e. ours with mscale_all_dim = 0.
    mscale, mscale_all_dim = (rope.get("mscale"), rope.get("mscale_all_dim")) if yarn else (1.0, 1.0)
    if yarn and not mscale_all_dim:
        mscale, mscale_all_dim = 1.0, 0.0
    need(bool(mscale), f"rope mscale={mscale!r} with mscale_all_dim={mscale_all_dim!r} is not supported")
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        dim=hf["hidden_size"],
        inter_dim=hf["intermediate_size"],
        moe_inter_dim=hf["moe_intermediate_size"],
        n_layers=hf["num_hidden_layers"],
        n_dense_layers=hf.get("first_k_dense_replace", 0) or 0,
        n_heads=heads,
        q_lora_rank=hf.get("q_lora_rank") or 0,
        kv_lora_rank=hf["kv_lora_rank"],
        qk_nope_head_dim=hf["qk_nope_head_dim"],
        qk_rope_head_dim=hf["qk_rope_head_dim"],
        v_head_dim=hf["v_head_dim"],
        n_routed_experts=hf["n_routed_experts"],
        n_shared_experts=hf.get("n_shared_experts") or 0,
        n_activated_experts=hf["num_experts_per_tok"],
        n_expert_groups=hf.get("n_group") or 1,
        topk_groups=hf.get("topk_group") or 1,
        route_scale=float(hf.get("routed_scaling_factor", 1.0)),
        mtp_depth=hf.get("num_nextn_predict_layers", 0) or 0,
        max_seq_len=max_len,
        rope_theta=float(theta),
        rope_factor=factor,
        original_seq_len=original_len,
        beta_fast=float(rope.get("beta_fast") or defaults.beta_fast) if yarn else defaults.beta_fast,
        beta_slow=float(rope.get("beta_slow") or defaults.beta_slow) if yarn else defaults.beta_slow,
        mscale=float(mscale),
        mscale_all_dim=float(mscale_all_dim),
        norm_eps=float(hf.get("rms_norm_eps", defaults.norm_eps)),
        init_std=float(hf.get("initializer_range", defaults.init_std)),
    )


# --------------------------------------------------------------------------------------------------
# State dict

_OUR_BLOCK = re.compile(r"(layers\.(\d+)|mtp\.(\d+)\.block)\.(.+)")
_OUR_MTP = re.compile(r"mtp\.(\d+)\.(.+)")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_HF_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")


def to_hf_state_dict(our_sd: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Our state dict -> HF on-disk names: per-expert keys, MTP module k as layer ``n_layers + k``."""
    out: dict[str, Tensor] = {}
    for key, tensor in our_sd.items():
        if key in TOP_KEYS:
            out[TOP_KEYS[key]] = tensor
            continue
        block = _OUR_BLOCK.fullmatch(key)
        if block is not None:
            layer = int(block[2]) if block[2] is not None else cfg.n_layers + int(block[3])
            prefix, rest = f"model.layers.{layer}.", block[4]
            if rest.startswith("ffn.experts.") and rest[len("ffn.experts."):] in EXPERT_KEYS:
                proj = EXPERT_KEYS[rest[len("ffn.experts."):]]
                for expert, weight in enumerate(tensor.unbind(0)):
                    out[f"{prefix}mlp.experts.{expert}.{proj}.weight"] = weight
            elif rest in LAYER_KEYS:
                out[prefix + LAYER_KEYS[rest]] = tensor
            else:
                raise KeyError(f"no HF name for our key {key!r}")
            continue
        mtp = _OUR_MTP.fullmatch(key)
        if mtp is not None and mtp[2] in MTP_KEYS:
            out[f"model.layers.{cfg.n_layers + int(mtp[1])}.{MTP_KEYS[mtp[2]]}"] = tensor
            continue
        raise KeyError(f"no HF name for our key {key!r}")
    for k in range(cfg.mtp_depth):  # the released format stores the shared embedding/head again per MTP layer
        for hf_key, ours in MTP_SHARED_COPIES.items():
            if ours in our_sd:
                out[f"model.layers.{cfg.n_layers + k}.{hf_key}"] = our_sd[ours]
    return out


def to_hf_fused_experts(hf_sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per-expert HF keys -> the fused in-memory form of transformers >= 5 (``DeepseekV3Experts``):
    ``mlp.experts.gate_up_proj`` [E, 2I, D] (gate rows, then up rows) and ``mlp.experts.down_proj`` [E, D, I].
    Other keys pass through. This is what ``DeepseekV3ForCausalLM.load_state_dict`` expects."""
    out: dict[str, Tensor] = {}
    experts: dict[tuple[str, str], dict[int, Tensor]] = {}
    for key, tensor in hf_sd.items():
        layer = _HF_LAYER.fullmatch(key)
        expert = _HF_EXPERT.fullmatch(layer[2]) if layer is not None else None
        if expert is None:
            out[key] = tensor
        else:
            experts.setdefault((f"model.layers.{layer[1]}.", expert[2]), {})[int(expert[1])] = tensor
    for prefix in sorted({p for p, _ in experts}):
        gate, up, down = (_stack(experts[(prefix, p)], prefix + p) for p in ("gate_proj", "up_proj", "down_proj"))
        out[prefix + "mlp.experts.gate_up_proj"] = torch.cat([gate, up], dim=1)
        out[prefix + "mlp.experts.down_proj"] = down
    return out


def from_hf_state_dict(hf_sd: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """HF names (on-disk per-expert keys, or transformers' fused in-memory expert keys) -> our state dict.

    Layers ``>= n_layers`` are MTP modules. Their copies of the embedding and head must equal the main
    ones (they are dropped). Unknown keys (e.g. FP8 ``weight_scale_inv``) and missing keys raise KeyError.
    """
    out: dict[str, Tensor] = {}
    experts: dict[tuple[str, str], dict[int, Tensor]] = {}
    copies: list[tuple[str, str]] = []
    for key, tensor in hf_sd.items():
        if key in _TOP_KEYS_FROM_HF:
            out[_TOP_KEYS_FROM_HF[key]] = tensor
            continue
        layer_match = _HF_LAYER.fullmatch(key)
        if layer_match is None:
            raise KeyError(f"unknown HF key {key!r}")
        layer, rest = int(layer_match[1]), layer_match[2]
        is_mtp = layer >= cfg.n_layers
        if is_mtp and layer - cfg.n_layers >= cfg.mtp_depth:
            raise KeyError(f"HF key {key!r}: layer {layer} is past the {cfg.mtp_depth} MTP module(s) of the config")
        prefix = f"mtp.{layer - cfg.n_layers}.block." if is_mtp else f"layers.{layer}."
        expert = _HF_EXPERT.fullmatch(rest)
        if expert is not None:
            experts.setdefault((prefix, _EXPERT_KEYS_FROM_HF[expert[2]]), {})[int(expert[1])] = tensor
        elif rest == "mlp.experts.gate_up_proj":  # transformers' fused in-memory form
            gate, up = tensor.chunk(2, dim=1)
            out[prefix + "ffn.experts.w1"], out[prefix + "ffn.experts.w3"] = gate, up
        elif rest == "mlp.experts.down_proj":
            out[prefix + "ffn.experts.w2"] = tensor
        elif rest in _LAYER_KEYS_FROM_HF:
            out[prefix + _LAYER_KEYS_FROM_HF[rest]] = tensor
        elif is_mtp and rest in _MTP_KEYS_FROM_HF:
            out[f"mtp.{layer - cfg.n_layers}.{_MTP_KEYS_FROM_HF[rest]}"] = tensor
        elif is_mtp and rest in MTP_SHARED_COPIES:
            copies.append((key, MTP_SHARED_COPIES[rest]))
        else:
            raise KeyError(f"unknown HF key {key!r}")
    for (prefix, ours), by_expert in experts.items():
        out[prefix + "ffn.experts." + ours] = _stack(by_expert, prefix + "ffn.experts." + ours)
    for key, ours in copies:
        if ours in out and not torch.equal(hf_sd[key], out[ours]):
            raise ValueError(f"HF key {key!r} should be a copy of the shared {TOP_KEYS[ours]!r} but differs")
    expected = expected_keys(cfg)
    missing, extra = sorted(expected - out.keys()), sorted(out.keys() - expected)
    if missing or extra:
        raise KeyError(f"HF state dict does not fit the config: missing {missing[:5]} ({len(missing)}), "
                       f"unexpected {extra[:5]} ({len(extra)})")
    return out


def expected_keys(cfg: ModelConfig) -> set[str]:
    """Our state-dict keys for ``cfg`` (from a meta-device build: nothing is allocated)."""
    from train.model import Transformer

    with torch.device("meta"):
        return set(Transformer(cfg).state_dict().keys())


def _stack(by_expert: dict[int, Tensor], name: str) -> Tensor:
    if sorted(by_expert) != list(range(len(by_expert))):
        raise KeyError(f"{name}: experts {sorted(by_expert)} are not 0..{len(by_expert) - 1}")
    return torch.stack([by_expert[e] for e in range(len(by_expert))])
