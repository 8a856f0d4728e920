"""LR, batch-size, lambda and gamma schedules at the 671B breakpoints (report sec 4.2)."""

from __future__ import annotations

import dataclasses
import math

import pytest

from train.config import CONF_DIR, Config, ConfigError, OptimConfig, TrainConfig, load_config, validate
from train.schedules import (
    Schedules,
    balance_alpha,
    batch_size,
    bias_update_speed,
    learning_rate,
    mtp_weight,
    token_learning_rate,
)

T = 1e12
B = 1e9
PEAK, LR_MIN, LR_LAST = 2.2e-4, 2.2e-5, 7.3e-6


def approx(x: float) -> pytest.approx:
    return pytest.approx(x, rel=1e-12, abs=0)


def test_defaults_are_the_671b_values():
    o, t = OptimConfig(), TrainConfig()
    assert (o.lr, o.warmup_steps, o.lr_min) == (PEAK, 2000, LR_MIN)
    assert (o.lr_hold_tokens, o.lr_decay_tokens) == (10 * T, 4.3 * T)
    assert (o.lr_tail_tokens, o.lr_tail_values) == ([333 * B, 167 * B], [LR_MIN, LR_LAST])
    assert (t.batch_size_start, t.batch_size, t.batch_ramp_tokens) == (3072, 15360, 469 * B)
    assert (t.mtp_weight, t.mtp_weight_late, t.mtp_weight_switch_tokens) == (0.3, 0.1, 10 * T)
    assert (t.bias_update_speed, t.bias_update_stop_tokens, t.balance_alpha) == (0.001, 14.3 * T, 0.0001)
    assert o.lr_hold_tokens + o.lr_decay_tokens + sum(o.lr_tail_tokens) == approx(t.total_tokens)


@pytest.mark.skipif(not (CONF_DIR / "671b.yaml").exists(), reason="conf/671b.yaml not written yet")
def test_671b_preset_matches_the_defaults():
    cfg = load_config(["+conf=671b"])
    assert cfg.optim == OptimConfig()
    schedule_fields = ("batch_size", "batch_ramp_tokens", "total_tokens", "mtp_weight",
                       "mtp_weight_late", "mtp_weight_switch_tokens", "bias_update_speed",
                       "bias_update_stop_tokens", "balance_alpha")
    for name in schedule_fields:
        assert getattr(cfg.train, name) == getattr(TrainConfig(), name), name
    # the one departure (docs/planner.md): the report's 3072 gives DualPipe 24 micro-batches at PP 16 x DP 128,
    # under its minimum of 2 x PP - 2 = 30; the preset's ramp starts at 4096 (32 micro-batches) instead
    assert (TrainConfig().batch_size_start, cfg.train.batch_size_start) == (3072, 4096)


def test_warmup_by_steps():
    cfg = OptimConfig()
    assert learning_rate(0, 0, cfg) == approx(PEAK / 2000)  # (step + 1) / warmup: the first step is not 0
    assert learning_rate(999, 4e9, cfg) == approx(PEAK / 2)
    assert learning_rate(1000, 4e9, cfg) == approx(PEAK * 1001 / 2000)
    assert learning_rate(1999, 8e9, cfg) == approx(PEAK)
    assert learning_rate(2000, 8e9, cfg) == approx(PEAK)
    lrs = [learning_rate(s, 0, cfg) for s in range(2100)]
    assert all(a < b for a, b in zip(lrs[:1999], lrs[1:2000])) and set(lrs[1999:]) == {PEAK}
    assert learning_rate(0, 0, OptimConfig(warmup_steps=0)) == PEAK


def test_token_stages():
    cfg = OptimConfig()
    lr = lambda tokens: learning_rate(10**6, tokens, cfg)  # noqa: E731  (long past the warm-up)
    assert lr(5 * T) == approx(PEAK)
    assert lr(10 * T) == approx(PEAK)  # cosine starts at the peak
    assert lr(12.15 * T) == approx((PEAK + LR_MIN) / 2)  # midpoint of the 4.3T decay
    assert lr(11 * T) == approx(LR_MIN + (PEAK - LR_MIN) * 0.5 * (1 + math.cos(math.pi / 4.3)))
    assert lr(14.3 * T - 1) == pytest.approx(LR_MIN, rel=1e-9)  # the cosine ends at lr_min ...
    assert lr(14.3 * T) == LR_MIN  # ... where the first constant tail stage (333B) begins
    assert lr(14.5 * T) == LR_MIN
    assert lr(14.633 * T - 1) == LR_MIN
    assert lr(14.633 * T) == LR_LAST  # last 167B
    assert lr(14.7 * T) == LR_LAST
    assert lr(14.8 * T) == LR_LAST
    assert lr(20 * T) == LR_LAST  # after the last stage: its value
    decay = [lr(10 * T + i * 0.1 * T) for i in range(44)]
    assert all(a > b for a, b in zip(decay, decay[1:]))


def test_token_schedule_edge_cases():
    no_tail = OptimConfig(lr_tail_tokens=[], lr_tail_values=[])
    assert token_learning_rate(20 * T, no_tail) == LR_MIN
    no_decay = OptimConfig(lr_decay_tokens=0.0)
    assert token_learning_rate(10 * T, no_decay) == LR_MIN  # straight into the first tail stage


def test_batch_size_ramp():
    cfg = TrainConfig()
    assert batch_size(0, cfg, quantum=1) == 3072
    assert batch_size(469 * B, cfg, quantum=1) == 15360
    assert batch_size(1 * T, cfg, quantum=1) == 15360
    assert batch_size(234.5 * B, cfg, quantum=1) == 9216  # halfway: (3072 + 15360) / 2
    # 100B tokens: 3072 + 12288 * 100 / 469 = 5692.04 -> 5632 = 22 x 256 (rounded down)
    assert batch_size(100 * B, cfg, quantum=256) == 5632
    assert batch_size(100 * B, cfg, quantum=1) == 5692
    quantum = 3 * 1024  # e.g. micro-batch 3 x 1024 data-parallel ranks
    sizes = [batch_size(i * B, cfg, quantum) for i in range(0, 500)]
    assert all(s % quantum == 0 and 3072 <= s <= 15360 for s in sizes)
    assert all(a <= b for a, b in zip(sizes, sizes[1:]))
    assert sizes[0] == 3072 and sizes[-1] == 15360
    fine = [batch_size(i * B, cfg, 1) for i in range(0, 500)]
    assert all(a <= b for a, b in zip(fine, fine[1:]))


def test_batch_size_refuses_bad_quantum():
    with pytest.raises(ConfigError, match="train.batch_size_start"):
        batch_size(0, TrainConfig(), quantum=5)
    with pytest.raises(ValueError):
        batch_size(0, TrainConfig(), quantum=0)


def test_mtp_weight_and_bias_update_speed_switch():
    cfg = TrainConfig()
    assert mtp_weight(0, cfg) == 0.3
    assert mtp_weight(10 * T - 1, cfg) == 0.3
    assert mtp_weight(10 * T, cfg) == 0.1  # the step starting after 10T tokens is in the remaining 4.8T
    assert mtp_weight(14.8 * T, cfg) == 0.1
    assert bias_update_speed(0, cfg) == 0.001
    assert bias_update_speed(14.3 * T - 1, cfg) == 0.001
    assert bias_update_speed(14.3 * T, cfg) == 0.0
    assert bias_update_speed(14.8 * T, cfg) == 0.0
    assert balance_alpha(cfg) == 0.0001


def test_schedules_bundle():
    cfg = Config()
    s = Schedules.at(3000, 12.15 * T, cfg, quantum=1024)
    assert s.lr == approx((PEAK + LR_MIN) / 2)
    assert (s.batch_size, s.mtp_weight, s.bias_update_speed, s.balance_alpha) == (15360, 0.1, 0.001, 0.0001)
    assert set(dataclasses.asdict(s)) == {"lr", "batch_size", "mtp_weight", "bias_update_speed", "balance_alpha"}


def test_config_refuses_negative_schedule_lengths():
    with pytest.raises(ConfigError, match="optim.lr_decay_tokens"):
        validate(Config(optim=OptimConfig(lr_decay_tokens=-1.0)))
    with pytest.raises(ConfigError, match="optim.lr_tail_tokens"):
        validate(Config(optim=OptimConfig(lr_tail_tokens=[1.0, -1.0])))
    with pytest.raises(ConfigError, match="train.batch_ramp_tokens"):
        validate(Config(train=TrainConfig(batch_ramp_tokens=-1.0)))
