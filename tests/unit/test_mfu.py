"""MFU (train/mfu.py): the peak's source, and the arithmetic against a count by hand."""

from __future__ import annotations

import pytest
import torch

from train.config import load_config
from train.mfu import DENSE_BF16_TFLOPS, model_flops_utilization, peak_tflops


def test_peak_is_configured_or_looked_up():
    assert peak_tflops(torch.device("cpu")) is None  # no MFU on a CPU unless configured
    assert peak_tflops(torch.device("cpu"), 1.5) == 1.5
    names = [key for key, _ in DENSE_BF16_TFLOPS]
    # a more specific name must come before any key it contains, or it would never match
    for i, key in enumerate(names):
        assert not any(earlier in key for earlier in names[:i]), key


def test_mfu_against_a_hand_count():
    """A dense one-block model without MTP: forward FLOPs per token = 2 x (matrix parameters a token
    passes through, head included, embedding excluded) + causal attention 2 x h x (qk + v) x (T+1)/2;
    training 3x that."""
    cfg = load_config(["+conf=tiny", "model.n_layers=1", "model.n_dense_layers=1", "model.mtp_depth=0"]).model
    h, qk, v, t = cfg.n_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim, 128
    mla = (cfg.dim * cfg.q_lora_rank + cfg.q_lora_rank * h * qk + cfg.dim * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
           + cfg.kv_lora_rank * h * (cfg.qk_nope_head_dim + v) + h * v * cfg.dim)
    matrices = mla + 3 * cfg.dim * cfg.inter_dim + cfg.vocab_size * cfg.dim
    forward = 2 * matrices + 2 * h * (qk + v) * (t + 1) / 2
    tokens_per_s, peak, devices = 1.0e4, 2.0, 4
    want = 3 * forward * tokens_per_s / (peak * 1e12 * devices)
    assert model_flops_utilization(cfg, t, tokens_per_s, peak, devices) == pytest.approx(want, rel=1e-6)
