"""MLA (report sec 2.1.1, eqs. 1-11) and the rotary / YaRN pieces (sec 4.3) against independent references.

The reference attention is written from the equations with explicit loops over heads, an explicit
causal softmax with the scale, and RoPE on interleaved pairs as complex rotations
(``torch.view_as_complex``), as DeepSeek's released inference code does.
"""

from __future__ import annotations

import math

import pytest
import torch

from train.config import ModelConfig
from train.model import MLA, apply_rope, attention_softmax_scale, rope_inv_freq, rope_tables, yarn_mscale

# fp32 throughout; the reference and the module differ only in op order (per-head matmuls vs batched
# SDPA, complex vs real rotation). Observed differences are ~1e-7 of the output scale; 1e-5 relative
# leaves room for BLAS differences while any layout error (wrong head slice, rope pairing, scale)
# changes the output by O(1e-2) or more.
RTOL = 1e-5

pytestmark = pytest.mark.usefixtures("single_thread")

V3 = dict(dim=7168, n_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
          v_head_dim=128, rope_theta=10000.0, original_seq_len=4096, beta_fast=32.0, beta_slow=1.0)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def rope_complex(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """x [T, rope_dim]: pairs (x0, x1), (x2, x3), ... as complex numbers, times freqs_cis [T, rope_dim/2]."""
    z = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(z * freqs_cis).flatten(-2)


def naive_mla(attn: MLA, cfg: ModelConfig, h: torch.Tensor) -> torch.Tensor:
    """Eqs. 1-11 for one sequence h [T, d], one head at a time, from the module's weight matrices."""
    T = h.shape[0]
    nope, rope, dv, dc = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    # RoPE angles t * theta_i (YaRN-blended theta_i when extended), magnitude = YaRN attention factor
    inv_freq = rope_inv_freq(cfg)
    factor = yarn_mscale(cfg.rope_factor, cfg.mscale) / yarn_mscale(cfg.rope_factor, cfg.mscale_all_dim)
    angles = torch.arange(T, dtype=torch.float32)[:, None] * inv_freq[None, :]
    freqs_cis = torch.polar(torch.full_like(angles, factor), angles)

    W_DKV, W_KR = attn.wkv_a.weight[:dc], attn.wkv_a.weight[dc:]  # wkv_a rows: [W^DKV; W^KR]
    c_kv = h @ W_DKV.t()  # (1)
    c_kv = rms_norm(c_kv, attn.kv_norm.weight, cfg.norm_eps)  # extra RMSNorm on the latent (V2/V3)
    k_R = rope_complex(h @ W_KR.t(), freqs_cis)  # (3): one rotary key shared by all heads
    if cfg.q_lora_rank == 0:
        W_Q, c_q = attn.wq.weight, h
    else:
        c_q = rms_norm(h @ attn.wq_a.weight.t(), attn.q_norm.weight, cfg.norm_eps)  # (6)
        W_Q = attn.wq_b.weight
    scale = (nope + rope) ** -0.5 * yarn_mscale(cfg.rope_factor, cfg.mscale_all_dim) ** 2
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    heads = []
    for i in range(cfg.n_heads):
        q_rows = W_Q[i * (nope + rope):(i + 1) * (nope + rope)]  # head i of W^UQ (nope) and W^QR (rope)
        kv_rows = attn.wkv_b.weight[i * (nope + dv):(i + 1) * (nope + dv)]  # head i of W^UK, then W^UV
        q_C = c_q @ q_rows[:nope].t()  # (7)
        q_R = rope_complex(c_q @ q_rows[nope:].t(), freqs_cis)  # (8)
        k_C = c_kv @ kv_rows[:nope].t()  # (2)
        v_C = c_kv @ kv_rows[nope:].t()  # (5)
        q = torch.cat([q_C, q_R], dim=-1)  # (9)
        k = torch.cat([k_C, k_R], dim=-1)  # (4)
        logits = (q @ k.t()) * scale
        logits = logits.masked_fill(~causal, float("-inf"))
        p = logits.exp() / logits.exp().sum(-1, keepdim=True)  # softmax over j <= t
        heads.append(p @ v_C)  # (10)
    return torch.cat(heads, dim=-1) @ attn.wo.weight.t()  # (11)


def _mla(cfg: ModelConfig, seed: int = 0) -> MLA:
    torch.manual_seed(seed)
    attn = MLA(cfg)
    with torch.no_grad():
        for name, p in attn.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.08)
    return attn


@pytest.mark.parametrize(
    "overrides",
    [
        dict(q_lora_rank=0),
        dict(q_lora_rank=24),
        # YaRN: evaluated past original_seq_len, with mscale != mscale_all_dim so both factors show
        dict(q_lora_rank=24, rope_factor=4.0, original_seq_len=8, max_seq_len=32, mscale=1.0, mscale_all_dim=0.5,
             rope_theta=100.0),
    ],
    ids=["no_q_lora", "q_lora", "q_lora_yarn"],
)
def test_mla_matches_naive_per_head_reference(tiny_cfg, overrides):
    cfg = tiny_cfg(**overrides)
    attn = _mla(cfg)
    T = 20
    h = torch.randn(2, T, cfg.dim)
    cos, sin = rope_tables(cfg)
    with torch.no_grad():
        out = attn(h, cos[:T], sin[:T])
        ref = torch.stack([naive_mla(attn, cfg, h[b]) for b in range(2)])
    assert out.shape == (2, T, cfg.dim)
    scale = ref.abs().max()
    assert scale > 0.1  # non-trivial output
    assert (out - ref).abs().max() <= RTOL * scale


def test_apply_rope_is_complex_rotation_of_interleaved_pairs():
    torch.manual_seed(0)
    T, H, D = 7, 3, 8
    x = torch.randn(1, T, H, D)
    angles = torch.rand(T, D // 2) * 10
    got = apply_rope(x, angles.cos(), angles.sin())
    want = rope_complex(x[0].transpose(0, 1), torch.polar(torch.ones_like(angles), angles)).transpose(0, 1)
    torch.testing.assert_close(got[0], want, rtol=0, atol=1e-6)  # fp32, |x| ~ 3: one-ulp-level differences


def test_rope_inv_freq_yarn_ntk_by_parts_671b_dims():
    """NTK-by-parts written out for rope dim 64, theta 1e4, L = 4096, s = 40, beta_fast 32 / beta_slow 1."""
    cfg = ModelConfig(**V3, rope_factor=40.0, max_seq_len=4096 * 32)
    d, theta, L, s = 64, 10000.0, 4096, 40.0
    base = torch.tensor([theta ** (-2 * i / d) for i in range(d // 2)], dtype=torch.float64)

    # correction dim for b rotations over L: the pair index i with L * theta_i / (2 pi) = b
    def corr(b: float) -> float:
        return d * math.log(L / (2 * math.pi * b)) / (2 * math.log(theta))

    low, high = math.floor(corr(32.0)), math.ceil(corr(1.0))
    assert (low, high) == (10, 23)  # 10.47 -> 10, 22.51 -> 23
    # orientation: pairs up to `low` turn >= 32 times over L (kept), pairs from `high` on < 1 time (interpolated)
    assert L * base[low] / (2 * math.pi) >= 32 and L * base[high] / (2 * math.pi) < 1
    expected = torch.empty(d // 2, dtype=torch.float64)
    for i in range(d // 2):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)  # 0 = keep theta_i, 1 = theta_i / s
        expected[i] = (1 - ramp) * base[i] + ramp * base[i] / s
    got = rope_inv_freq(cfg).double()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)  # fp32 vs fp64 powers
    torch.testing.assert_close(rope_inv_freq(ModelConfig(**V3, rope_factor=1.0)).double(), base, rtol=1e-6, atol=0)
    torch.testing.assert_close(got[:low + 1], base[:low + 1], rtol=1e-6, atol=0)
    torch.testing.assert_close(got[high:], base[high:] / s, rtol=1e-6, atol=0)


def test_yarn_mscale_and_softmax_scale_671b():
    assert yarn_mscale(40.0) == pytest.approx(0.1 * math.log(40.0) + 1.0)
    assert yarn_mscale(40.0) == pytest.approx(1.3689, abs=1e-4)
    assert yarn_mscale(1.0) == 1.0 and yarn_mscale(0.5) == 1.0
    extended = ModelConfig(**V3, rope_factor=40.0, max_seq_len=4096 * 32, mscale=1.0, mscale_all_dim=1.0)
    want = 192 ** -0.5 * (0.1 * math.log(40.0) + 1.0) ** 2
    assert attention_softmax_scale(extended) == pytest.approx(want, rel=1e-12)
    assert attention_softmax_scale(ModelConfig(**V3)) == pytest.approx(192 ** -0.5, rel=1e-12)
    with torch.device("meta"):  # the module uses the same scale (meta: nothing allocated)
        assert MLA(extended).softmax_scale == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("mscale_all_dim", [1.0, 0.5])
def test_rope_tables_are_angles_times_attention_factor(mscale_all_dim):
    cfg = ModelConfig(**V3, rope_factor=40.0, max_seq_len=1024, mscale=1.0, mscale_all_dim=mscale_all_dim)
    cos, sin = rope_tables(cfg)
    assert cos.shape == sin.shape == (1024, 32) and cos.dtype == torch.float32
    angles = torch.arange(1024, dtype=torch.float32)[:, None] * rope_inv_freq(cfg)[None, :]  # fp32 product
    factor = (0.1 * math.log(40.0) + 1.0) / (0.1 * mscale_all_dim * math.log(40.0) + 1.0)
    torch.testing.assert_close(cos.double(), angles.double().cos() * factor, rtol=0, atol=2e-6)
    torch.testing.assert_close(sin.double(), angles.double().sin() * factor, rtol=0, atol=2e-6)
