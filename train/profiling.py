"""torch.profiler over chosen training steps (``logging.profile_steps``), written where the run lives.

Each run of consecutive steps in ``logging.profile_steps`` (e.g. ``[5,6]``) is one profile window: it opens
at the top of the first step (data loading included) and closes once the step's metrics are logged
(checkpoint writes left out). Every profiled rank writes, under ``RUN_DIR/profile/steps_A-B/``:

- ``rank{R}.trace.json.gz``: the Chrome trace (open it in https://ui.perfetto.dev or chrome://tracing);
- ``rank{R}.txt``: the operators that took the most time (self time on the device on GPUs, on the host
  elsewhere), with their input shapes when ``logging.profile_memory`` records them.

``logging.profile_ranks`` limits which ranks profile (empty: all; a 2,048-rank job wants a few). Profiled
steps run slower (the profiler's own cost); their metrics carry ``"profiled": true``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

TABLE_ROWS = 40


def profile_windows(steps: list[int]) -> list[tuple[int, int]]:
    """The windows (first, last) of consecutive step numbers: [5, 6, 9] -> [(5, 6), (9, 9)]."""
    windows: list[tuple[int, int]] = []
    for step in sorted(set(steps)):
        if windows and step == windows[-1][1] + 1:
            windows[-1] = (windows[-1][0], step)
        else:
            windows.append((step, step))
    return windows


class StepProfiler:
    """Opens torch.profiler before a chosen step and writes the trace and the table after its window."""

    def __init__(self, steps: list[int], run_dir: str | Path, rank: int, device: torch.device,
                 ranks: list[int] | None = None, record_memory: bool = False):
        self.windows = profile_windows(steps) if not ranks or rank in ranks else []
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.device = device
        self.record_memory = record_memory
        self._active: profile | None = None
        self._window: tuple[int, int] | None = None

    def profiling(self, step: int) -> bool:
        """Whether ``step`` (1-based, the step about to run or just run) is inside a window."""
        return any(first <= step <= last for first, last in self.windows)

    def before_step(self, step: int) -> None:
        """Called at the top of the loop with the number of the step about to run."""
        if self._active is not None:
            return
        window = next((w for w in self.windows if w[0] <= step <= w[1]), None)
        if window is None:
            return
        activities = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        self._active = profile(activities=activities, record_shapes=self.record_memory,
                               profile_memory=self.record_memory, with_stack=False)
        self._window = (step, window[1])  # a resume inside a window profiles what is left of it
        self._active.start()

    def after_step(self, step: int) -> list[Path]:
        """Called once the step's metrics are logged; after the window's last step, closes it and returns the
        files written (else [])."""
        if self._active is None or self._window is None or step < self._window[1]:
            return []
        return self.close()

    def close(self) -> list[Path]:
        """Stop an open window early (the loop ended inside it) and write what it recorded."""
        if self._active is None or self._window is None:
            return []
        prof, (first, last) = self._active, self._window
        self._active, self._window = None, None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the window's last kernels finish inside it
        prof.stop()
        out = self.run_dir / "profile" / f"steps_{first}-{last}"
        out.mkdir(parents=True, exist_ok=True)
        trace = out / f"rank{self.rank}.trace.json.gz"
        prof.export_chrome_trace(str(trace))
        sort = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages(group_by_input_shape=self.record_memory).table(sort_by=sort, row_limit=TABLE_ROWS)
        text = out / f"rank{self.rank}.txt"
        text.write_text(f"steps {first}-{last}, rank {self.rank}, {self.device}, sorted by {sort}\n{table}\n")
        return [trace, text]
