"""Packed, data-parallel, resumable batches from a prepared token stream (report sec 4.1).

Documents are packed, as in the report, without cross-document masking: the EOS-joined stream is
cut into windows of ``seq_len + 1`` tokens with stride ``seq_len`` (window ``j`` is
``stream[j*seq_len : j*seq_len + seq_len + 1]``), so every token after the first is a target
exactly once per epoch. Each epoch visits the windows in a permutation seeded by ``(seed, epoch)``;
data-parallel rank ``r`` of ``dp_size`` takes positions ``r, r + dp_size, ...`` of it, with the
remainder dropped so all ranks have the same count. The file is memory-mapped, never read whole.

The state is global, the same on every rank: the epoch and how many windows of its permutation all
ranks together have consumed. Resuming under another data-parallel size re-splits the rest of the
epoch from that point, so no window is repeated or skipped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from data.prepare import TOKEN_DTYPE, TOKENS_FILE, PreparedData
from train.errors import DataError

STATE_KEYS = ("epoch", "consumed", "seed", "seq_len", "n_windows")


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
        self._tokens = np.memmap(path, dtype=TOKEN_DTYPE, mode="r", shape=(n_tokens,))
        self.epoch = 0
        self.start = 0  # windows of the epoch's permutation consumed before this dp_size took over
        self.position = 0  # rounds (one window per rank) since ``start``
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    @property
    def consumed(self) -> int:
        """Windows of this epoch's permutation consumed by all ranks together."""
        return self.start + self.position * self.dp_size

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            self._order = np.random.default_rng([self.seed % 2**64, epoch]).permutation(self.n_windows)
            self._order_epoch = epoch
        return self._order

    def rank_windows(self, epoch: int) -> np.ndarray:
        """Window indices this rank reads in ``epoch`` (from its start), in order."""
        start = self.start if epoch == self.epoch else 0
        rounds = (self.n_windows - start) // self.dp_size
        return self.permutation(epoch)[start + self.dp_rank: start + rounds * self.dp_size: self.dp_size]

    def window(self, j: int) -> np.ndarray:
        """Tokens of window ``j``: ``seq_len + 1`` of them starting at ``j * seq_len``."""
        start = j * self.seq_len
        return np.asarray(self._tokens[start: start + self.seq_len + 1])

    def next_batch(self) -> torch.Tensor:
        """The next ``[micro_batch_size, seq_len + 1]`` int64 batch; epochs roll over seamlessly."""
        rows = []
        for _ in range(self.micro_batch_size):
            if self.consumed + self.dp_size > self.n_windows:  # the remainder is dropped
                self.epoch, self.start, self.position = self.epoch + 1, 0, 0
            rows.append(self.window(int(self.permutation(self.epoch)[self.consumed + self.dp_rank])))
            self.position += 1
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def state_dict(self) -> dict[str, int]:
        """Plain ints: where the next batch starts and what the position means."""
        return {key: int(getattr(self, key)) for key in STATE_KEYS}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume exactly at ``state`` (seed included). The state is the same on every rank; under another
        dp_size the rest of the epoch is re-split from the consumed point. DataError if it describes other data."""
        missing = [key for key in STATE_KEYS if key not in state]
        if missing:
            raise DataError(f"data loader state lacks {', '.join(missing)}; it was not saved by TokenLoader")
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
        self._order_epoch = -1
