"""Our Transformer against HF transformers' ``DeepseekV3ForCausalLM`` as an oracle, through ``train/hf.py``.

Weights are copied across with the mapping table and the logits compared in fp32. HF builds no MTP
layer, so only the main logits are compared; the MTP keys are checked by exact round trips.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from train.config import ModelConfig
from train.hf import (
    config_from_hf,
    config_to_hf,
    from_hf_state_dict,
    to_hf_fused_experts,
    to_hf_state_dict,
)
from train.model import count_parameters

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

# Tolerance on logits: max |ours - HF| <= 1e-5 * max(1, max |logit|). Both run in fp32 (eps 1.2e-7) but
# in different op orders (SDPA vs eager matmul-softmax, fused vs manual RMSNorm, sorted-token expert
# GEMMs vs per-expert index_add, interleaved vs de-interleaved rope layout): observed differences are
# ~1e-6 of the logit scale after 3-4 layers. Any mapping error (swapped gate/up, wrong rope pairing,
# missing bias or norm, wrong softmax scale) moves logits by 1e-3 .. 1 (checked below for the bias).
RTOL = 1e-5

pytestmark = pytest.mark.usefixtures("single_thread")

CASES = {
    # name: (config overrides, sequence length, HF attention implementation)
    "no_q_lora_dense1": (dict(q_lora_rank=0, n_dense_layers=1), 24, "eager"),
    "q_lora_dense0": (dict(q_lora_rank=48, n_dense_layers=0), 24, "sdpa"),
    "groups4_keep2": (dict(q_lora_rank=48, n_routed_experts=16, n_activated_experts=4, n_expert_groups=4,
                           topk_groups=2), 24, "eager"),
    "groups8_keep4_shared2": (dict(n_routed_experts=16, n_activated_experts=4, n_expert_groups=8, topk_groups=4,
                                   n_shared_experts=2, n_dense_layers=0), 24, "sdpa"),
    # YaRN evaluated at T = 40 > original_seq_len = 16; rope_theta 100 puts the NTK-by-parts ramp
    # inside the 4 rope pairs (pair 0 kept, 1-2 blended, 3 interpolated)
    "yarn_mscale_equal": (dict(q_lora_rank=48, rope_factor=4.0, original_seq_len=16, max_seq_len=64,
                               rope_theta=100.0, mscale=1.0, mscale_all_dim=1.0), 40, "eager"),
    "yarn_mscale_differ": (dict(rope_factor=8.0, original_seq_len=16, max_seq_len=64, rope_theta=100.0,
                                mscale=1.0, mscale_all_dim=0.5, n_expert_groups=2, topk_groups=1), 40, "sdpa"),
}


def hf_model(cfg: ModelConfig, attn: str) -> DeepseekV3ForCausalLM:
    hf_cfg = DeepseekV3Config(**config_to_hf(cfg))
    hf_cfg._attn_implementation = attn
    return DeepseekV3ForCausalLM(hf_cfg).eval()


def load_ours_into_hf(model, cfg: ModelConfig, hf: DeepseekV3ForCausalLM) -> None:
    hf_sd = to_hf_state_dict(model.state_dict(), cfg)
    main_only = {k: v for k, v in hf_sd.items() if not _is_mtp_key(k, cfg)}
    hf.load_state_dict(to_hf_fused_experts(main_only), strict=True)


def _is_mtp_key(key: str, cfg: ModelConfig) -> bool:
    return key.startswith("model.layers.") and int(key.split(".")[2]) >= cfg.n_layers


def assert_logits_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    scale = max(1.0, ours.abs().max().item())
    diff = (ours - theirs).abs().max().item()
    assert diff <= RTOL * scale, f"max |diff| {diff:.3g} > {RTOL:g} x {scale:.3g}"


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_hf(tiny_cfg, random_model, case):
    overrides, T, attn = CASES[case]
    cfg = tiny_cfg(**overrides)
    model = random_model(cfg)
    hf = hf_model(cfg, attn)
    load_ours_into_hf(model, cfg, hf)
    tokens = torch.randint(0, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(1))

    captured = []  # the first MoE gate's input, to show the biases change the selection
    hook = model.moe_layers()[0].gate.register_forward_hook(lambda mod, args, out: captured.append(args[0]))
    with torch.no_grad():
        ours = model(tokens).logits
        theirs = hf(tokens).logits
    hook.remove()
    assert ours.abs().max() > 0.1  # non-trivial logits
    assert_logits_close(ours, theirs)

    gate = model.moe_layers()[0].gate
    with torch.no_grad():
        biased = gate(captured[0]).indices.sort(-1).values
        saved = gate.bias.clone()
        gate.bias.zero_()
        unbiased = gate(captured[0]).indices.sort(-1).values
        gate.bias.copy_(saved)
    assert (biased != unbiased).any(dim=-1).sum() > 0  # the random biases change some tokens' experts
    # ... and HF without them no longer matches: the biases were carried over and matter
    with torch.no_grad():
        for layer in hf.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias.zero_()
        unbiased_hf = hf(tokens).logits
    assert (ours - unbiased_hf).abs().max() > 100 * RTOL * max(1.0, ours.abs().max().item())


def test_on_disk_format_loads_with_from_pretrained_and_back(tmp_path, tiny_cfg, random_model):
    """Our export as config.json + safetensors is what HF's from_pretrained reads (per-expert keys, MTP
    layer ignored), and HF's save_pretrained output imports back to the same weights."""
    from safetensors.torch import load_file, save_file

    cfg = tiny_cfg(**CASES["yarn_mscale_equal"][0], n_routed_experts=16, n_activated_experts=4, n_expert_groups=4,
                   topk_groups=2)
    model = random_model(cfg)
    hf_sd = to_hf_state_dict(model.state_dict(), cfg)
    # tensors may share storage (expert views, MTP copies of embedding/head): clone for safetensors
    save_file({k: v.clone() for k, v in hf_sd.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(cfg)))

    hf, info = DeepseekV3ForCausalLM.from_pretrained(str(tmp_path), output_loading_info=True, dtype=torch.float32,
                                                     attn_implementation="eager")
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert info["unexpected_keys"] and all(_is_mtp_key(k, cfg) for k in info["unexpected_keys"])  # only MTP
    tokens = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_logits_close(model(tokens).logits, hf(tokens).logits)

    out = tmp_path / "saved"
    hf.save_pretrained(str(out))
    saved = load_file(str(out / "model.safetensors"))
    assert {k for k in hf_sd if not _is_mtp_key(k, cfg)} == set(saved)  # HF writes the same per-expert names
    no_mtp = dataclasses.replace(cfg, mtp_depth=0)  # HF dropped the MTP layer
    back = from_hf_state_dict(saved, no_mtp)
    ours = {k: v for k, v in model.state_dict().items() if not k.startswith("mtp.")}
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)
    with pytest.raises(KeyError, match="missing"):
        from_hf_state_dict(saved, cfg)  # the config expects an MTP module the file lacks
    # HF's in-memory (fused experts) state dict imports too
    fused = from_hf_state_dict(hf.state_dict(), no_mtp)
    assert all(torch.equal(fused[k], ours[k]) for k in ours) and fused.keys() == ours.keys()
    assert config_from_hf(json.loads((out / "config.json").read_text())) == dataclasses.replace(
        cfg, expert_impl="auto")


def test_import_hf_model_with_generic_yarn_config():
    """Import direction from a config we did not write: an HF model with plain YaRN (no mscale keys: HF then
    scales cos/sin by 0.1 ln s + 1 and leaves the softmax scale alone) and its own random weights."""
    hf_json = {
        "vocab_size": 80, "hidden_size": 48, "intermediate_size": 64, "moe_intermediate_size": 24,
        "num_hidden_layers": 2, "first_k_dense_replace": 1, "num_attention_heads": 3, "num_key_value_heads": 3,
        "q_lora_rank": 32, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8,
        "n_routed_experts": 6, "n_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 3, "topk_group": 2,
        "routed_scaling_factor": 1.5, "max_position_embeddings": 64, "num_nextn_predict_layers": 0,
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 50.0, "factor": 4.0,
                            "original_max_position_embeddings": 16},
    }
    hf = DeepseekV3ForCausalLM(DeepseekV3Config(**hf_json)).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if name.endswith("norm.weight") else torch.randn_like(p) * 0.08)
        for layer in hf.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0.0, 0.05)
    cfg = config_from_hf(hf_json)
    assert (cfg.rope_factor, cfg.mscale, cfg.mscale_all_dim, cfg.original_seq_len) == (4.0, 1.0, 0.0, 16)
    from train.model import Transformer

    ours = Transformer(cfg)
    ours.load_state_dict(from_hf_state_dict(hf.state_dict(), cfg), strict=True)
    ours.eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert_logits_close(ours(tokens).logits, hf(tokens).logits)


def test_mtp_logits_match_hf_mtp_model(tmp_path, tiny_cfg, random_model):
    """HF's ``MtpModel`` (transformers >= 5.2x: speculative decoding with the released MTP weights) reads our
    exported MTP layers and gives our MTP logits at every depth. It feeds each depth the NORMALISED hidden
    state of the previous one (main: model.norm, depth k: shared_head.norm), and RoPE positions shifted
    by k (irrelevant: attention scores depend on position differences only)."""
    modeling_layers = pytest.importorskip("transformers.modeling_layers")
    if not hasattr(modeling_layers, "MtpModel"):
        pytest.skip("this transformers has no MtpModel")
    from safetensors.torch import save_file

    cfg = tiny_cfg(mtp_depth=2, q_lora_rank=48, n_routed_experts=16, n_activated_experts=4, n_expert_groups=4,
                   topk_groups=2)
    model = random_model(cfg)
    save_file({k: v.clone() for k, v in to_hf_state_dict(model.state_dict(), cfg).items()},
              str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(cfg)))
    hf = DeepseekV3ForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32, attn_implementation="eager")
    # HF finds MTP weights by DeepseekV3's hard-coded pattern for layer 61 (the 671B); point it at our layers
    hf._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{cfg.n_layers + k}\..*" for k in range(cfg.mtp_depth)]
    mtp = modeling_layers.MtpModel.from_pretrained(hf).eval()

    T = 20
    tokens = torch.randint(0, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model(tokens).mtp_logits
        h = hf(tokens, output_hidden_states=True).hidden_states[-1]  # after the final norm
        for k in range(1, cfg.mtp_depth + 1):
            length = T - k
            position_ids = torch.arange(k, T)[None]  # HF places depth k at the positions of t_{i+k}
            h = mtp.forward_layer(k - 1, h[:, :length], position_ids, None, input_ids=tokens[:, k:])
            theirs = mtp.shared_head(h)
            assert ours[k - 1].shape == theirs.shape
            assert_logits_close(ours[k - 1], theirs)


@pytest.mark.parametrize(
    "overrides",
    [dict(mtp_depth=1), dict(mtp_depth=2, q_lora_rank=48, n_dense_layers=0), dict(mtp_depth=0)],
    ids=["mtp1", "mtp2_q_lora", "no_mtp"],
)
def test_state_dict_round_trip_with_mtp(tiny_cfg, random_model, overrides):
    cfg = tiny_cfg(**overrides)
    model = random_model(cfg)
    ours = model.state_dict()
    hf_sd = to_hf_state_dict(ours, cfg)
    n = cfg.n_layers
    for k in range(cfg.mtp_depth):  # the released layout of MTP module k
        for name in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                     "input_layernorm.weight", "self_attn.kv_a_proj_with_mqa.weight", "mlp.gate.weight",
                     "mlp.gate.e_score_correction_bias", "mlp.experts.0.gate_proj.weight"):
            assert f"model.layers.{n + k}.{name}" in hf_sd
        assert torch.equal(hf_sd[f"model.layers.{n + k}.embed_tokens.weight"], ours["embed.weight"])
        assert torch.equal(hf_sd[f"model.layers.{n + k}.shared_head.head.weight"], ours["head.weight"])
        assert torch.equal(hf_sd[f"model.layers.{n + k}.eh_proj.weight"], ours[f"mtp.{k}.eh_proj.weight"])
    assert not any(k.startswith(f"model.layers.{n + cfg.mtp_depth}.") for k in hf_sd)
    e = cfg.n_routed_experts
    assert torch.equal(hf_sd[f"model.layers.{n - 1}.mlp.experts.{e - 1}.up_proj.weight"],
                       ours[f"layers.{n - 1}.ffn.experts.w3"][e - 1])
    assert torch.equal(hf_sd[f"model.layers.{n - 1}.mlp.experts.2.down_proj.weight"],
                       ours[f"layers.{n - 1}.ffn.experts.w2"][2])

    back = from_hf_state_dict(hf_sd, cfg)
    assert back.keys() == ours.keys()
    for key in ours:
        assert torch.equal(back[key], ours[key]), key
    model.load_state_dict(back, strict=True)
    # and through the fused in-memory form
    back_fused = from_hf_state_dict(to_hf_fused_experts(hf_sd), cfg)
    assert all(torch.equal(back_fused[k], ours[k]) for k in ours)


def test_from_hf_rejects_bad_inputs(tiny_cfg, random_model):
    cfg = tiny_cfg(mtp_depth=1)
    hf_sd = dict(to_hf_state_dict(random_model(cfg).state_dict(), cfg))
    copy_key = f"model.layers.{cfg.n_layers}.embed_tokens.weight"
    with pytest.raises(ValueError, match="copy"):
        from_hf_state_dict({**hf_sd, copy_key: hf_sd[copy_key] + 1}, cfg)
    with pytest.raises(KeyError, match="weight_scale_inv"):  # FP8 scales of the released weights
        from_hf_state_dict({**hf_sd, "model.layers.0.self_attn.o_proj.weight_scale_inv": torch.ones(1, 1)}, cfg)
    missing = dict(hf_sd)
    del missing["model.layers.2.mlp.experts.3.up_proj.weight"]
    with pytest.raises(KeyError, match="experts"):
        from_hf_state_dict(missing, cfg)
    with pytest.raises(KeyError, match="past"):
        from_hf_state_dict({**hf_sd, f"model.layers.{cfg.n_layers + 1}.enorm.weight": torch.ones(cfg.dim)}, cfg)


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(q_lora_rank=48, mtp_depth=2),
     dict(rope_factor=40.0, max_seq_len=131072, original_seq_len=4096, mscale=1.0, mscale_all_dim=0.7)],
    ids=["default", "q_lora", "yarn"],
)
def test_config_round_trip(tiny_cfg, overrides):
    cfg = tiny_cfg(**overrides, expert_impl="auto")  # expert_impl is not an HF field: the default comes back
    hf = config_to_hf(cfg)
    assert config_from_hf(hf) == cfg
    assert config_from_hf(json.loads(json.dumps(hf))) == cfg  # survives config.json
    hf_cfg = DeepseekV3Config(**hf)  # and HF reads every field as meant
    assert hf_cfg.q_lora_rank == (cfg.q_lora_rank or None)
    assert (hf_cfg.hidden_size, hf_cfg.first_k_dense_replace, hf_cfg.n_group, hf_cfg.topk_group) == (
        cfg.dim, cfg.n_dense_layers, cfg.n_expert_groups, cfg.topk_groups)
    assert hf_cfg.num_nextn_predict_layers == cfg.mtp_depth and hf_cfg.rope_interleave is True
    rope = hf_cfg.rope_parameters
    assert rope["rope_theta"] == cfg.rope_theta
    if cfg.rope_factor > 1:
        assert rope["rope_type"] == "yarn" and rope["factor"] == cfg.rope_factor
        assert rope["original_max_position_embeddings"] == cfg.original_seq_len
        assert (rope["mscale"], rope["mscale_all_dim"]) == (cfg.mscale, cfg.mscale_all_dim)
    else:
        assert rope["rope_type"] == "default"


def test_config_from_released_deepseek_v3_config_json():
    """The fields of deepseek-ai/DeepSeek-V3's config.json (legacy ``rope_scaling`` form, FP8 weights)."""
    released = {
        "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3,
        "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432,
        "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3",
        "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
        "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8,
        "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "pretraining_tp": 1,
        "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "weight_block_size": [128, 128]},
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "original_max_position_embeddings": 4096, "type": "yarn"},
        "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
        "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
        "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
    }
    cfg = config_from_hf(released)
    assert (cfg.n_layers, cfg.n_dense_layers, cfg.dim, cfg.n_heads, cfg.q_lora_rank, cfg.kv_lora_rank) == (
        61, 3, 7168, 128, 1536, 512)
    assert (cfg.n_routed_experts, cfg.n_activated_experts, cfg.n_expert_groups, cfg.topk_groups) == (256, 8, 8, 4)
    assert (cfg.route_scale, cfg.mtp_depth, cfg.rope_factor, cfg.original_seq_len, cfg.max_seq_len) == (
        2.5, 1, 40.0, 4096, 163840)
    counts = count_parameters(cfg)
    assert counts.total == pytest.approx(671e9, rel=0.005)
    from train.config import ConfigError

    with pytest.raises(ConfigError, match="scoring_func"):
        config_from_hf({**released, "scoring_func": "softmax"})
