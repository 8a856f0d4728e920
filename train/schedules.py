"""Training schedules as pure functions of (step, tokens) and the config (report sec 2.1.2, 2.2, 4.2).

Convention for every function: ``tokens`` is the number of training tokens consumed BEFORE the
step being prepared (0 for the first step), and ``step`` counts optimizer steps from 0. A stage
that "lasts until T tokens" covers the steps with ``tokens < T``; the step that starts with exactly
T tokens consumed belongs to the next stage. 671B values (sec 4.2): LR warm-up to 2.2e-4 over 2K
steps, constant until 10T tokens, cosine to 2.2e-5 over 4.3T, then 2.2e-5 for 333B and 7.3e-6 for
the last 167B; batch 3072 -> 15360 sequences over 469B tokens; MTP weight 0.3 then 0.1 from 10T;
bias update speed 0.001 then 0 from 14.3T; balance alpha 0.0001.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from train.config import Config, ConfigError, OptimConfig, TrainConfig


def warmup_factor(step: int, cfg: OptimConfig) -> float:
    """Linear warm-up factor (step + 1) / warmup_steps, capped at 1.

    The ``+ 1`` makes the first update non-zero: step 0 uses lr / warmup_steps and step
    warmup_steps - 1 is the first at the peak, so the ramp from 0 takes exactly warmup_steps steps.
    """
    if step + 1 >= cfg.warmup_steps:
        return 1.0
    return (step + 1) / cfg.warmup_steps


def token_learning_rate(tokens: float, cfg: OptimConfig) -> float:
    """The token-based part of the LR schedule (sec 4.2), without warm-up.

    [0, hold): lr.  [hold, hold + decay): cosine from lr (at hold) towards lr_min (at hold + decay).
    Then lr_tail_values[i] for lr_tail_tokens[i] tokens each; after the last stage, its value
    (lr_min when there are no tail stages).
    """
    if tokens < cfg.lr_hold_tokens:
        return cfg.lr
    start = cfg.lr_hold_tokens
    if tokens < start + cfg.lr_decay_tokens:
        progress = (tokens - start) / cfg.lr_decay_tokens
        return cfg.lr_min + (cfg.lr - cfg.lr_min) * 0.5 * (1.0 + math.cos(math.pi * progress))
    start += cfg.lr_decay_tokens
    for length, value in zip(cfg.lr_tail_tokens, cfg.lr_tail_values):
        if tokens < start + length:
            return value
        start += length
    return cfg.lr_tail_values[-1] if cfg.lr_tail_values else cfg.lr_min


def learning_rate(step: int, tokens: float, cfg: OptimConfig) -> float:
    """Learning rate of optimizer step ``step`` that starts after ``tokens`` tokens (sec 4.2).

    The warm-up factor (by steps) multiplies the token-based schedule; for the 671B run the warm-up
    (2K steps, ~26B tokens) ends long before the first token boundary (10T), so it is a plain ramp
    from 0 to the peak lr.
    """
    return warmup_factor(step, cfg) * token_learning_rate(tokens, cfg)


def batch_size(tokens: float, cfg: TrainConfig, quantum: int) -> int:
    """Global sequences per optimizer step after ``tokens`` tokens (sec 4.2 batch-size schedule).

    Linear in tokens from batch_size_start (at 0) to batch_size (at batch_ramp_tokens and after),
    rounded DOWN to a multiple of ``quantum`` = micro_batch_size x data-parallel ranks (the trainer
    realises it with gradient accumulation), and kept within [batch_size_start, batch_size].
    """
    if quantum <= 0:
        raise ValueError(f"batch_size: quantum ({quantum}) must be > 0")
    for name in ("batch_size_start", "batch_size"):
        if getattr(cfg, name) % quantum:
            raise ConfigError(
                f"train.{name} ({getattr(cfg, name)}) must be a multiple of train.micro_batch_size x "
                f"data-parallel ranks ({quantum})"
            )
    if tokens >= cfg.batch_ramp_tokens:
        return cfg.batch_size
    exact = cfg.batch_size_start + (cfg.batch_size - cfg.batch_size_start) * tokens / cfg.batch_ramp_tokens
    rounded = int(exact // quantum) * quantum
    return min(max(rounded, cfg.batch_size_start), cfg.batch_size)


def mtp_weight(tokens: float, cfg: TrainConfig) -> float:
    """MTP loss weight lambda (sec 2.2, 4.2): mtp_weight before mtp_weight_switch_tokens, mtp_weight_late from it on."""
    return cfg.mtp_weight if tokens < cfg.mtp_weight_switch_tokens else cfg.mtp_weight_late


def bias_update_speed(tokens: float, cfg: TrainConfig) -> float:
    """Gate-bias update speed gamma (sec 2.1.2, 4.2): bias_update_speed before bias_update_stop_tokens, 0 from it on."""
    return cfg.bias_update_speed if tokens < cfg.bias_update_stop_tokens else 0.0


def balance_alpha(cfg: TrainConfig) -> float:
    """Sequence-wise balance loss weight alpha (sec 2.1.2, 4.2): constant."""
    return cfg.balance_alpha


@dataclass(frozen=True)
class Schedules:
    """Every scheduled value of one optimizer step; ``dataclasses.asdict`` gives the log fields."""

    lr: float
    batch_size: int  # global sequences
    mtp_weight: float  # lambda
    bias_update_speed: float  # gamma
    balance_alpha: float  # alpha

    @classmethod
    def at(cls, step: int, tokens: float, cfg: Config, quantum: int) -> Schedules:
        """The values for step ``step`` starting after ``tokens`` tokens (quantum: see batch_size)."""
        return cls(
            lr=learning_rate(step, tokens, cfg.optim),
            batch_size=batch_size(tokens, cfg.train, quantum),
            mtp_weight=mtp_weight(tokens, cfg.train),
            bias_update_speed=bias_update_speed(tokens, cfg.train),
            balance_alpha=balance_alpha(cfg.train),
        )
