"""Numerical guards of the training loop: non-finite steps and loss spikes.

The report's run had "no irrecoverable loss spikes" and "no rollbacks" (sec 1); a long run must still
survive the ones it meets. Each step's loss is judged before the optimizer applies it:

- a non-finite loss, or a non-finite gradient norm (ZeroAdamW then drops the gradients itself), skips the
  update: parameters, AdamW moments, gate biases and the EMA stay as they were; the data position moves on
  (the batch was consumed). ``train.max_bad_steps`` skipped steps in a row (non-finite, or spikes skipped
  under ``on_spike=skip``) stop the run with a checkpoint, as do that many rollbacks to one checkpoint.
- a spike, a loss more than ``train.spike_zscore`` standard deviations above the mean of the last
  ``train.spike_window`` good losses (judged once the window is full), is logged, and with
  ``train.on_spike=skip`` skipped like a non-finite step, or with ``rollback`` rolled back: the trainer
  reloads the last checkpoint and replays, drawing past the offending batch.

The guard's state (the window, the counters, the batches to skip) is plain JSON in each checkpoint, so a
resumed run judges the same way an uninterrupted one does.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Any

from train.config import TrainConfig
from train.errors import UserError

SPREAD_FLOOR = 1e-3  # the std never counts as less than 0.1% of the mean loss (a flat loss is not all spikes)


class TrainingHalted(UserError):
    """Too many non-finite steps in a row: the run stopped after saving its last good state."""


@dataclass
class Verdict:
    """What to do with this step's update."""

    skip: bool = False  # do not apply it
    reason: str = ""  # "" | "nonfinite" | "spike"
    zscore: float | None = None  # the loss's z-score against the window (None until the window is full)
    rollback: bool = False  # reload the last checkpoint and skip this step's batch


class LossGuard:
    def __init__(self, cfg: TrainConfig):
        self.max_bad_steps = cfg.max_bad_steps
        self.on_spike = cfg.on_spike
        self.zscore_limit = cfg.spike_zscore
        self.window: deque[float] = deque(maxlen=cfg.spike_window)
        self.bad_in_a_row = 0
        self.nonfinite_steps = 0  # counted over the whole run
        self.spikes = 0
        self.skip_batches: list[int] = []  # steps whose batch is drawn and thrown away (after a rollback)

    def judge_loss(self, loss: float) -> Verdict:
        """Before the optimizer step: a non-finite loss, or a spike against the window."""
        if not math.isfinite(loss):
            return Verdict(skip=True, reason="nonfinite")
        zscore = self.zscore(loss)
        if zscore is None or zscore <= self.zscore_limit:
            return Verdict(zscore=zscore)
        return Verdict(skip=self.on_spike != "log", reason="spike", zscore=zscore, rollback=self.on_spike == "rollback")

    def zscore(self, loss: float) -> float | None:
        if len(self.window) < (self.window.maxlen or 0):
            return None
        mean = statistics.fmean(self.window)
        spread = max(statistics.pstdev(self.window), SPREAD_FLOOR * abs(mean), 1e-12)
        return (loss - mean) / spread

    def after_step(self, verdict: Verdict, loss: float, grad_norm: float) -> Verdict:
        """After the optimizer step (which skipped a non-finite gradient norm by itself): update the counters
        and the window (good steps only); raise nothing, see ``must_halt``."""
        if not verdict.skip and not math.isfinite(grad_norm):
            verdict = Verdict(skip=True, reason="nonfinite", zscore=verdict.zscore)
        self.nonfinite_steps += verdict.reason == "nonfinite"
        self.spikes += verdict.reason == "spike"
        if verdict.skip:  # a loss that stays up is not skipped forever: these count towards must_halt too
            self.bad_in_a_row += 1
        else:
            self.bad_in_a_row = 0
            self.window.append(loss)
        return verdict

    def must_halt(self) -> bool:
        return self.bad_in_a_row >= self.max_bad_steps

    def state_dict(self) -> dict[str, Any]:
        return {"window": list(self.window), "bad_in_a_row": self.bad_in_a_row,
                "nonfinite_steps": self.nonfinite_steps, "spikes": self.spikes, "skip_batches": list(self.skip_batches)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window.clear()
        self.window.extend(float(x) for x in state.get("window", []))
        self.bad_in_a_row = int(state.get("bad_in_a_row", 0))
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
        self.spikes = int(state.get("spikes", 0))
        self.skip_batches = [int(x) for x in state.get("skip_batches", [])]
