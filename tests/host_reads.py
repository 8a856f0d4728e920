"""Counting the reads of a tensor's value back to the host: ``.item()``, ``bool(t)``, ``int(t)``.

Each dispatches ``aten._local_scalar_dense``; on a GPU it makes the host wait for every queued kernel.
``.tolist()`` does not pass through the dispatcher on the CPU and is not counted.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class HostReads(TorchDispatchMode):
    """``with HostReads() as reads: ...`` then ``reads.count`` (and ``reads.seen``, every operation)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.seen = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen += 1
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))
