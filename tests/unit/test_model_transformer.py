"""The whole Transformer: causality of main and MTP logits (sec 2.2), the MTP input order, shapes,
parameter counts (671B / 37B / 14B), initialisation and expert-load statistics."""

from __future__ import annotations

import pytest
import torch

from train.config import ModelConfig
from train.model import RMSNorm, Transformer, count_parameters

# Positions that must not depend on a changed token are compared with a tolerance rather than bit for
# bit: the expert GEMMs batch a different set of tokens when one token's routing changes, and BLAS may
# then block the sums differently (~1e-7 relative in fp32). 1e-5 of the logit scale is far below the
# change a real dependence produces (checked in the same test: > 1e-3).
RTOL = 1e-5

pytestmark = pytest.mark.usefixtures("single_thread")

V3_671B = dict(
    vocab_size=129280, dim=7168, inter_dim=18432, moe_inter_dim=2048, n_layers=61, n_dense_layers=3, n_heads=128,
    q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
    n_routed_experts=256, n_shared_experts=1, n_activated_experts=8, n_expert_groups=8, topk_groups=4,
    route_scale=2.5, mtp_depth=1,
)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() if a.numel() else 0.0


@pytest.mark.parametrize("q_lora_rank", [0, 24])
def test_causality_of_main_and_mtp_logits(tiny_cfg, random_model, q_lora_rank):
    cfg = tiny_cfg(q_lora_rank=q_lora_rank, mtp_depth=2, n_routed_experts=8, n_expert_groups=2, topk_groups=1)
    model = random_model(cfg)
    T = 16
    tokens = torch.randint(0, cfg.vocab_size, (2, T))
    with torch.no_grad():
        base = model(tokens)
    scale = base.logits.abs().max()
    for j in (0, 5, T - 1):
        changed = tokens.clone()
        changed[:, j] = (changed[:, j] + 1 + torch.randint(0, cfg.vocab_size - 1, (2,))) % cfg.vocab_size
        with torch.no_grad():
            out = model(changed)
        # main logits at i depend on tokens <= i
        assert max_diff(out.logits[:, :j], base.logits[:, :j]) <= RTOL * scale, j
        assert (out.logits[:, j] - base.logits[:, j]).abs().max() > 1e-3, j
        # MTP depth k logits at i depend on tokens <= i + k (the embedding of t_{i+k} enters at depth k)
        for k, (new, old) in enumerate(zip(out.mtp_logits, base.mtp_logits), start=1):
            first = max(j - k, 0)  # first position that sees token j
            assert max_diff(new[:, :first], old[:, :first]) <= RTOL * scale, (j, k)
            if first < new.shape[1]:
                assert (new[:, first] - old[:, first]).abs().max() > 1e-3, (j, k)


def test_mtp_logit_shapes(tiny_cfg, random_model):
    cfg = tiny_cfg(mtp_depth=3)
    model = random_model(cfg)
    with torch.no_grad():
        out = model(torch.randint(0, cfg.vocab_size, (2, 10)))
    assert out.logits.shape == (2, 10, cfg.vocab_size)
    assert [tuple(m.shape) for m in out.mtp_logits] == [(2, 10 - k, cfg.vocab_size) for k in (1, 2, 3)]
    assert out.balance_loss.shape == () and out.balance_loss.dtype == torch.float32


def test_mtp_concatenation_order_is_embedding_then_hidden(tiny_cfg, random_model):
    """eh_proj's input is [enorm(Emb(t_{i+1})); hnorm(h_i)]: the released weights' order (spec.md, MTP)."""
    cfg = tiny_cfg(mtp_depth=1)
    tokens = torch.randint(0, cfg.vocab_size, (2, 12))

    def run(zero_columns: slice, perturb_main: bool):
        model = random_model(cfg)
        with torch.no_grad():
            model.mtp[0].eh_proj.weight[:, zero_columns] = 0
            if perturb_main:  # change the main model's hidden states, not the embedding
                model.layers[0].attn.wo.weight.mul_(3.0)
            return model(tokens)

    d = cfg.dim
    # hidden-state columns zeroed: MTP output depends only on the next-token embeddings
    a, b = run(slice(d, 2 * d), False), run(slice(d, 2 * d), True)
    assert (a.logits - b.logits).abs().max() > 1e-3  # the perturbation does change the main model
    assert (a.mtp_logits[0] - b.mtp_logits[0]).abs().max() <= RTOL * a.mtp_logits[0].abs().max()
    # and it is exactly the MTP block applied to eh_proj[:, :d] @ enorm(Emb(t_{i+1}))
    model = random_model(cfg)
    with torch.no_grad():
        model.mtp[0].eh_proj.weight[:, d:] = 0
        mtp = model.mtp[0]
        x = mtp.enorm(model.embed(tokens[:, 1:])) @ mtp.eh_proj.weight[:, :d].t()
        h, _ = mtp.block(x, model.rope_cos[:11], model.rope_sin[:11])
        want = model.head(mtp.norm(h))
        got = model(tokens).mtp_logits[0]
    assert (got - want).abs().max() <= RTOL * want.abs().max()
    # embedding columns zeroed instead: now the main hidden state matters
    a, b = run(slice(0, d), False), run(slice(0, d), True)
    assert (a.mtp_logits[0] - b.mtp_logits[0]).abs().max() > 1e-3


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(q_lora_rank=24, n_dense_layers=0, mtp_depth=2),
        dict(n_dense_layers=3, n_layers=3, mtp_depth=1),  # all main blocks dense; the MTP block is MoE
        dict(n_shared_experts=0, mtp_depth=0, n_routed_experts=16, n_activated_experts=4, n_expert_groups=4,
             topk_groups=2),
        dict(n_shared_experts=2, q_lora_rank=16),
    ],
    ids=["default", "q_lora_mtp2", "all_dense", "no_shared_no_mtp", "two_shared"],
)
def test_count_parameters_equals_built_model(tiny_cfg, overrides):
    cfg = tiny_cfg(**overrides)
    model = Transformer(cfg)
    counts = count_parameters(cfg)
    main = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("mtp."))
    mtp_own = sum(p.numel() for p in model.mtp.parameters())
    assert counts.total == main
    assert counts.mtp_unique == mtp_own
    shared_ends = model.embed.weight.numel() + model.head.weight.numel()
    assert counts.mtp == mtp_own + (shared_ends if cfg.mtp_depth else 0)
    # active: the unselected routed experts of each main MoE layer are not counted
    expert = sum(w[0].numel() for w in (model.layers[-1].ffn.experts.w1, model.layers[-1].ffn.experts.w2,
                                        model.layers[-1].ffn.experts.w3)) if cfg.n_dense_layers < cfg.n_layers else 0
    idle = (cfg.n_routed_experts - cfg.n_activated_experts) * expert * (cfg.n_layers - cfg.n_dense_layers)
    assert counts.active == main - idle


def test_count_parameters_671b():
    cfg = ModelConfig(**V3_671B)
    counts = count_parameters(cfg)
    assert counts.total == pytest.approx(671e9, rel=0.005)
    assert counts.active == pytest.approx(37e9, rel=0.03)
    assert counts.mtp == pytest.approx(14e9, rel=0.05)  # with the shared embedding and head
    assert counts.mtp_unique == pytest.approx(11.5e9, rel=0.03)
    with torch.device("meta"):  # nothing is allocated
        model = Transformer(cfg)
    assert sum(p.numel() for p in model.parameters()) == counts.total + counts.mtp_unique


def test_init_weights(tiny_cfg):
    cfg = tiny_cfg(q_lora_rank=24, mtp_depth=1, init_std=0.006)
    model = Transformer(cfg)
    with torch.no_grad():  # start from something else so that init_weights has to reset everything
        for p in model.parameters():
            p.fill_(0.5)
        for moe in model.moe_layers():
            moe.gate.bias.fill_(0.3)
        model.rope_cos.zero_()
    model.init_weights()
    norms = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm)}
    for name, p in model.named_parameters():
        if id(p) in norms:
            assert torch.all(p == 1), name
        else:
            assert p.dim() >= 2, name
            # sample std of >= 512 normal draws is within ~3% of 0.006 (2 sigma); 15% is generous
            assert p.numel() >= 512 and p.std().item() == pytest.approx(0.006, rel=0.15), name
            assert abs(p.mean().item()) < 0.006 * 5 / p.numel() ** 0.5, name
    for moe in model.moe_layers():
        assert torch.all(moe.gate.bias == 0)
    cos, _ = Transformer(cfg).rope_cos, None
    assert torch.equal(model.rope_cos, cos)


def test_expert_load_rows(tiny_cfg, random_model):
    cfg = tiny_cfg(n_layers=4, n_dense_layers=1, mtp_depth=2, n_activated_experts=3)
    model = random_model(cfg)
    B, T = 2, 9
    with torch.no_grad():
        out = model(torch.randint(0, cfg.vocab_size, (B, T)))
    moe_layers = model.moe_layers()
    assert len(moe_layers) == 3 + 2  # main MoE blocks, then one per MTP module
    assert out.expert_load.shape == (len(moe_layers), cfg.n_routed_experts)
    tokens_per_row = [B * T] * 3 + [B * (T - 1), B * (T - 2)]
    assert out.expert_load.sum(dim=1).tolist() == [n * cfg.n_activated_experts for n in tokens_per_row]
    assert out.balance_loss.item() > 0


def test_init_of_an_expert_shard_equals_the_slice_of_the_full_init(tiny_cfg):
    """A rank that holds experts [offset, offset + n) initialises them exactly as one process would."""
    cfg = tiny_cfg(n_routed_experts=8)
    full = Transformer(cfg)
    full.init_weights(seed=7)
    shard = Transformer(cfg)
    for layer in shard.moe_layers():
        experts = layer.experts
        experts.expert_offset = 4
        for name in ("w1", "w2", "w3"):
            setattr(experts, name, torch.nn.Parameter(getattr(experts, name)[4:].clone()))
    shard.init_weights(seed=7)
    for ours, theirs in zip(shard.moe_layers(), full.moe_layers()):
        for name in ("w1", "w2", "w3"):
            assert torch.equal(getattr(ours.experts, name), getattr(theirs.experts, name)[4:])
    assert torch.equal(shard.embed.weight, full.embed.weight)
    other = Transformer(cfg)
    other.init_weights(seed=8)
    assert not torch.equal(other.embed.weight, full.embed.weight)
