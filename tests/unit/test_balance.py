"""Aux-loss-free balancing (sec 2.1.2) and the training objective (sec 2.2)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from train.balance import max_violation, update_gate_biases
from train.config import ModelConfig
from train.losses import compute_losses, cross_entropy
from train.model import MoE, ModelOutput, Transformer

pytestmark = pytest.mark.usefixtures("single_thread")

MOE_CFG = ModelConfig(dim=32, moe_inter_dim=16, n_routed_experts=8, n_activated_experts=2, n_expert_groups=2,
                      topk_groups=2)


def test_max_violation_formula():
    load = torch.tensor([[10, 10, 10, 10], [40, 0, 0, 0], [20, 10, 5, 5]])
    # max/mean - 1: balanced 0; all on one expert 4-1 = 3; 20/10 - 1 = 1
    assert max_violation(load).tolist() == pytest.approx([0.0, 3.0, 1.0])


def test_bias_update_sign_and_speed():
    moe = MoE(MOE_CFG)
    moe.gate.bias.zero_()
    load = torch.tensor([[30.0, 10, 10, 10, 10, 10, 10, 0]])  # mean 11.25
    update_gate_biases([moe], load, speed=0.001)
    expected = torch.tensor([-0.001, 0.001, 0.001, 0.001, 0.001, 0.001, 0.001, 0.001])
    assert torch.equal(moe.gate.bias, expected)  # overloaded lowered, underloaded raised, by exactly gamma
    update_gate_biases([moe], load, speed=0.0)
    assert torch.equal(moe.gate.bias, expected)  # gamma = 0 (the last 500B tokens) changes nothing


def test_bias_updates_move_a_skewed_router_toward_balance():
    """With a router that strongly prefers two experts, repeated updates from the observed loads
    lower MaxVio on the same tokens, without touching the gate weights (selection-only bias)."""
    torch.manual_seed(0)
    moe = MoE(MOE_CFG)
    with torch.no_grad():
        moe.gate.weight.normal_(0, 0.02)
        moe.gate.weight[0] += 0.3  # experts 0 and 5 favoured by every token with a positive mean
        moe.gate.weight[5] += 0.3
    x = torch.randn(4, 64, MOE_CFG.dim) + 1.0
    weights_before = moe.gate.weight.clone()

    history = []
    for _ in range(400):
        with torch.no_grad():
            _, stats = moe(x)
        history.append(max_violation(stats.expert_load[None]).item())
        update_gate_biases([moe], stats.expert_load[None], speed=0.003)
    # The sign rule with a constant gamma ends oscillating around balance on a fixed batch: compare the
    # mean of the last 100 updates (0.63 here) with the start (3.0 = everything on two of eight experts).
    late = sum(history[-100:]) / 100
    assert history[0] > 2.0 and late < 0.35 * history[0], (history[0], late)
    assert torch.equal(moe.gate.weight, weights_before)


def test_mtp_loss_is_the_average_over_depths_with_shifted_targets():
    torch.manual_seed(0)
    cfg = dataclasses.replace(MOE_CFG, vocab_size=50, n_layers=2, n_dense_layers=1, n_heads=2, kv_lora_rank=16,
                              qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, inter_dim=32, mtp_depth=2,
                              max_seq_len=32)
    model = Transformer(cfg)
    model.init_weights(std=0.1)
    window = torch.randint(0, cfg.vocab_size, (2, 17))
    out = model(window[:, :-1])
    losses = compute_losses(out, window, mtp_weight=0.3, balance_alpha=1e-4)
    depth1 = cross_entropy(out.mtp_logits[0], window[:, 2:])  # depth k at position i predicts token i+k+1
    depth2 = cross_entropy(out.mtp_logits[1], window[:, 3:])
    assert losses.mtp_loss.item() == pytest.approx(((depth1 + depth2) / 2).item())  # (1/D) sum, not the sum
    assert losses.lm_loss.item() == pytest.approx(cross_entropy(out.logits, window[:, 1:]).item())
    assert losses.balance_loss.item() == pytest.approx(1e-4 * out.balance_loss.item())
    total = losses.lm_loss + 0.3 * losses.mtp_loss + losses.balance_loss
    assert losses.loss.item() == pytest.approx(total.item())
    assert losses.lm_loss.item() == pytest.approx(math.log(cfg.vocab_size), rel=0.2)  # random init is near uniform


def test_balance_loss_gradient_reaches_the_gate():
    """alpha * L_bal is differentiable through the normalised affinities P_i (not through f_i)."""
    torch.manual_seed(0)
    moe = MoE(MOE_CFG)
    with torch.no_grad():
        moe.gate.weight.normal_(0, 0.1)
    _, stats = moe(torch.randn(2, 16, MOE_CFG.dim))
    stats.balance_loss.backward()
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0
    out = ModelOutput(torch.zeros(1, 1, 3), [], stats.balance_loss.detach(), stats.expert_load[None])
    assert compute_losses(out, torch.zeros(1, 2, dtype=torch.long), 0.3, 0.0).balance_loss.item() == 0.0
