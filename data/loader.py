"""Packed, data-parallel, resumable batches from a prepared token stream (report sec 4.1).

Documents are packed, as in the report, without cross-document masking: the EOS-joined stream is
cut into windows of ``seq_len + 1`` tokens with stride ``seq_len`` (window ``j`` is
``stream[j*seq_len : j*seq_len + seq_len + 1]``), so every token after the first is a target
exactly once per epoch. Each epoch visits the windows in an order keyed by ``(seed, epoch)``, computed
position by position rather than stored (``data/order.py``: billions of windows at full scale);
data-parallel rank ``r`` of ``dp_size`` takes positions ``r, r + dp_size, ...`` of it, with the
remainder dropped so all ranks have the same count. The file is memory-mapped, never read whole.

Reading stays off the critical path (issue 9) without a thread: ``next_batches(n)``, the trainer's call
for a step, reads its windows (one gather a batch, tens of microseconds from the page cache) and then asks the
kernel to fetch the pages of the next ``n`` batches in the background (``madvise(MADV_WILLNEED)``), so
the next step finds them in memory even when the file is on a slow disk or a network file system. (A
reader thread was tried first: handing its work over cost the step ~0.3 ms of waiting for the GIL, more
than the reads it saved from the page cache.)

The state is global, the same on every rank: the epoch and how many windows of its permutation all
ranks together have consumed. Resuming under another data-parallel size re-splits the rest of the
epoch from that point, so no window is repeated or skipped.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np
import torch

from data.order import EpochOrder
from data.prepare import TOKEN_DTYPE, TOKENS_FILE, PreparedData
from train.errors import DataError

STATE_KEYS = ("epoch", "consumed", "seed", "seq_len", "n_windows", "order")
ORDER = 2  # the window order's version in the state: 2 = data/order.py (1, a stored permutation, never saved it)


def _tokens_path(source: str | Path | PreparedData) -> Path:
    if isinstance(source, PreparedData):
        return source.tokens_path
    path = Path(source).expanduser()
    return path / TOKENS_FILE if path.is_dir() else path


class TokenLoader:
    """Batches ``[micro_batch_size, seq_len + 1]`` (int64) of packed windows for one DP rank."""

    def __init__(self, tokens: str | Path | PreparedData, seq_len: int, micro_batch_size: int, seed: int,
                 dp_rank: int = 0, dp_size: int = 1) -> None:
        if seq_len < 1 or micro_batch_size < 1:
            raise ValueError(f"seq_len ({seq_len}) and micro_batch_size ({micro_batch_size}) must be >= 1")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank ({dp_rank}) must be within [0, dp_size ({dp_size}))")
        path = _tokens_path(tokens)
        if not path.is_file():
            raise DataError(f"{path}: token file not found; run launch/prepare_data.py first")
        size = path.stat().st_size
        if size % TOKEN_DTYPE.itemsize:
            raise DataError(f"{path}: size {size} is not a whole number of uint32 tokens; prepare the data again")
        n_tokens = size // TOKEN_DTYPE.itemsize
        self.path = path
        self.n_tokens = n_tokens
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.n_windows = max(0, (n_tokens - 1) // seq_len)
        self.windows_per_rank = self.n_windows // dp_size
        if self.windows_per_rank == 0:
            raise DataError(f"{path}: {n_tokens} tokens make {self.n_windows} windows of train.seq_len+1 "
                            f"({seq_len + 1}) tokens, fewer than one per data-parallel rank ({dp_size}); "
                            "add data (data.source, data.max_bytes) or lower train.seq_len")
        with open(path, "rb") as file:  # the mapping keeps the file open
            self._map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        self._tokens = np.frombuffer(self._map, dtype=TOKEN_DTYPE, count=n_tokens)
        self.epoch = 0
        self.start = 0  # windows of the epoch's permutation consumed before this dp_size took over
        self.position = 0  # rounds (one window per rank) since ``start``
        self.order = ORDER
        self._orders: dict[int, EpochOrder] = {}
        self._last_lookup: tuple[tuple, list[int]] | None = None  # the read-ahead's, reused by the next take

    @property
    def consumed(self) -> int:
        """Windows of this epoch's permutation consumed by all ranks together."""
        return self.start + self.position * self.dp_size

    def epoch_order(self, epoch: int) -> EpochOrder:
        """The order of ``epoch``'s windows (the current and the next epoch's are kept)."""
        if epoch not in self._orders:
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = EpochOrder(self.n_windows, self.seed, epoch)
        return self._orders[epoch]

    def rank_windows(self, epoch: int) -> np.ndarray:
        """Window indices this rank reads in ``epoch`` (from its start), in order."""
        start = self.start if epoch == self.epoch else 0
        rounds = (self.n_windows - start) // self.dp_size
        return self.epoch_order(epoch)(np.arange(start + self.dp_rank, start + rounds * self.dp_size, self.dp_size))

    def window(self, j: int) -> np.ndarray:
        """Tokens of window ``j``: ``seq_len + 1`` of them starting at ``j * seq_len``."""
        start = j * self.seq_len
        return np.asarray(self._tokens[start: start + self.seq_len + 1])

    def next_batch(self) -> torch.Tensor:
        """The next ``[micro_batch_size, seq_len + 1]`` int64 batch; epochs roll over seamlessly."""
        return self.read(self.next_windows())

    def next_batches(self, n: int) -> list[torch.Tensor]:
        """The next ``n`` batches (as ``n`` calls of ``next_batch``); then the pages of the ``n`` after them
        are requested from the kernel, to be read while this step computes (``read_ahead``)."""
        ids, size = self._take(n * self.micro_batch_size), self.micro_batch_size
        batches = [self.read(ids[i: i + size]) for i in range(0, len(ids), size)]
        self.read_ahead(self.peek_windows(n))
        return batches

    def next_windows(self) -> list[int]:
        """The window indices of the next batch, consumed (the state advances; nothing is read)."""
        return self._take(self.micro_batch_size)

    def peek_windows(self, batches: int) -> list[int]:
        """The window indices of the next ``batches`` batches, without consuming them."""
        saved = self.epoch, self.start, self.position
        try:
            return self._take(batches * self.micro_batch_size)
        finally:
            self.epoch, self.start, self.position = saved

    def _take(self, count: int) -> list[int]:
        """Consume this rank's next ``count`` windows; their indices (one order lookup per epoch touched)."""
        runs: list[tuple[int, list[int]]] = []  # (epoch, positions in its order)
        for _ in range(count):
            if self.consumed + self.dp_size > self.n_windows:  # the remainder is dropped
                self.epoch, self.start, self.position = self.epoch + 1, 0, 0
            if not runs or runs[-1][0] != self.epoch:
                runs.append((self.epoch, []))
            runs[-1][1].append(self.consumed + self.dp_rank)
            self.position += 1
        # positions within a run step by dp_size: (epoch, first, count) per run names the lookup
        key = tuple((epoch, positions[0], len(positions)) for epoch, positions in runs)
        if self._last_lookup is not None and self._last_lookup[0] == key:  # the step's read-ahead peeked it
            return list(self._last_lookup[1])
        ids = [int(j) for epoch, positions in runs for j in self.epoch_order(epoch)(positions)]
        self._last_lookup = key, ids
        return list(ids)

    def read(self, ids: list[int]) -> torch.Tensor:
        """The batch of windows ``ids``, [len(ids), seq_len + 1] int64 (reads the file; safe in a thread):
        one gather from the mapped file, which touches only the pages of these windows."""
        starts = np.asarray(ids, dtype=np.int64)[:, None] * self.seq_len
        return torch.from_numpy(self._tokens[starts + np.arange(self.seq_len + 1)].astype(np.int64))

    def read_ahead(self, ids: list[int]) -> None:
        """Ask the kernel to start reading windows ``ids`` into the page cache (no wait; a hint where the
        platform has none)."""
        if not hasattr(self._map, "madvise"):
            return
        for start, length in self.page_ranges(ids):
            self._map.madvise(mmap.MADV_WILLNEED, start, length)

    def page_ranges(self, ids: list[int]) -> list[tuple[int, int]]:
        """(byte offset, length) of the file's pages holding windows ``ids``, the offsets page-aligned."""
        ranges = []
        for j in ids:
            first = j * self.seq_len * TOKEN_DTYPE.itemsize
            end = (j * self.seq_len + self.seq_len + 1) * TOKEN_DTYPE.itemsize
            start = first - first % mmap.PAGESIZE
            ranges.append((start, end - start))
        return ranges

    def state_dict(self) -> dict[str, int]:
        """Plain ints: where the next batch starts and what the position means."""
        return {key: int(getattr(self, key)) for key in STATE_KEYS}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume exactly at ``state`` (seed included). The state is the same on every rank; under another
        dp_size the rest of the epoch is re-split from the consumed point. DataError if it describes other data."""
        missing = [key for key in STATE_KEYS if key not in state and key != "order"]
        if missing:
            raise DataError(f"data loader state lacks {', '.join(missing)}; it was not saved by TokenLoader")
        if int(state.get("order", 1)) != ORDER:  # before "order" was saved, a stored permutation (1)
            raise DataError(f"data loader state was saved with window order {state.get('order', 1)} (this version "
                            f"uses {ORDER}): resuming would repeat and skip windows; resume with the version that "
                            "wrote the checkpoint, or start a new run from its weights (checkpoint.init_from)")
        differ = [f"{key} {state[key]} (checkpoint) != {getattr(self, key)} (now)"
                  for key in ("seq_len", "n_windows") if int(state[key]) != getattr(self, key)]
        if differ:
            raise DataError(f"data loader state does not match this run: {'; '.join(differ)}; resume with the same "
                            "train.seq_len and data, or start a new run")
        if not 0 <= int(state["consumed"]) <= self.n_windows or int(state["epoch"]) < 0:
            raise DataError(f"data loader state has epoch {state['epoch']} / consumed {state['consumed']} outside "
                            f"[0, {self.n_windows}]; the checkpoint is damaged")
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.start = int(state["consumed"])
        self.position = 0
        self._orders = {}
        self._last_lookup = None  # the seed may have changed
