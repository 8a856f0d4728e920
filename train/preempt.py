"""Preemption: SIGTERM / SIGINT finish the current step, write a checkpoint and exit 0.

Schedulers (Slurm, Kubernetes, torchrun's agent) send SIGTERM before they kill a job. The handler only
raises a flag; the training loop checks it after each step, and every rank agrees on it with one small
all-reduce (a signal may reach the ranks at different steps), so all of them stop after the same step.
A second SIGINT (Ctrl-C twice) interrupts at once.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """A context manager that turns SIGTERM / SIGINT into a stop request for the training loop."""

    def __init__(self) -> None:
        self.signal_name = ""
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_name and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.signal_name = signal.Signals(signum).name

    def agreed(self) -> bool:
        """Whether any rank was asked to stop (a collective over the default group: call it on every rank)."""
        flag = torch.tensor([1.0 if self.signal_name else 0.0])
        if dist.is_initialized() and dist.get_world_size() > 1:
            backend = dist.get_backend()
            if backend == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stop = flag.item() > 0
        if stop and not self.signal_name:
            self.signal_name = "a signal on another rank"
        return stop
