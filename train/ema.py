"""Exponential moving average of the parameters, kept in CPU memory (report sec 3.2.3).

After each optimizer step ``update()`` copies the parameters into host staging buffers (non-blocking
device-to-host copies from a GPU, into pinned memory) and hands the blend

    ema = decay * ema + (1 - decay) * parameters

to a background thread, so the step does not wait for it: the next ``update()`` (or ``state()``,
``wait()``) waits for the previous blend first, which has had a whole training step to finish. The
device memory cost is nothing; the host holds two fp32 copies of this rank's parameters (EMA and
staging). Each rank averages the parameters it holds (its pipeline stages, its expert shard), and
checkpoints store the EMA with the model's layout (``checkpoint.model_state(..., tensors=...)``).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import Tensor, nn


class CpuEma:
    """The EMA of ``module``'s parameters on the CPU, updated asynchronously."""

    def __init__(self, module: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.params = dict(module.named_parameters())
        pin = any(p.is_cuda for p in self.params.values()) and torch.cuda.is_available()
        self.average = {n: p.detach().to("cpu", torch.float32, copy=True) for n, p in self.params.items()}
        self.staging = {n: torch.empty(p.shape, dtype=torch.float32, pin_memory=pin) for n, p in self.params.items()}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ema")
        self._pending: Future | None = None

    def update(self) -> None:
        """Start blending the current parameters in (returns before the blend is done)."""
        self.wait()
        copied = None
        for name, param in self.params.items():
            self.staging[name].copy_(param.detach(), non_blocking=True)
        if any(p.is_cuda for p in self.params.values()):
            copied = torch.cuda.Event()
            copied.record()
        self._pending = self._pool.submit(self._blend, copied)

    def _blend(self, copied: torch.cuda.Event | None) -> None:
        if copied is not None:
            copied.synchronize()
        with torch.no_grad():
            for name, average in self.average.items():
                average.lerp_(self.staging[name], 1.0 - self.decay)

    def wait(self) -> None:
        """Block until the last update is blended in (re-raises its error, if any)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def state(self) -> dict[str, Tensor]:
        """The averages by parameter name (after the pending update); load into them in place."""
        self.wait()
        return self.average

    def copy_to(self, module: nn.Module) -> None:
        """Overwrite ``module``'s parameters with the averages (for evaluation with the EMA)."""
        averages = self.state()
        with torch.no_grad():
            for name, param in module.named_parameters():
                param.copy_(averages[name])

    def close(self) -> None:
        self.wait()
        self._pool.shutdown()
