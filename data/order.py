"""The order of an epoch's windows without storing it (report sec 4.1's packed stream, shuffled).

A full-scale run has billions of windows (14.8T tokens / 4096 = 3.6e9): a stored permutation would be
29 GB of int64 per process and take minutes to draw each epoch. ``EpochOrder(n, seed, epoch)(positions)``
instead computes where each position of the epoch's order points, a pseudo-random bijection of [0, n)
keyed by (seed, epoch): a balanced Feistel network on the smallest even number of bits that covers n
(6 rounds of a 64-bit mixing function), walking the cycle until the value falls inside [0, n) (at most
4n domain points, so a few steps on average). O(1) memory, microseconds per batch, the same on every rank.
"""

from __future__ import annotations

import numpy as np

ROUNDS = 6
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer: a 64-bit bijection whose output bits each depend on every input bit."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def _feistel(x: np.ndarray, half_bits: int, keys: np.ndarray) -> np.ndarray:
    mask = np.uint64((1 << half_bits) - 1)
    left, right = x >> np.uint64(half_bits), x & mask
    for key in keys:
        left, right = right, left ^ (_mix(right ^ key) & mask)
    return (left << np.uint64(half_bits)) | right


class EpochOrder:
    """Epoch ``epoch``'s order of ``n`` windows under ``seed``: ``order(positions)`` -> the windows there."""

    def __init__(self, n: int, seed: int, epoch: int) -> None:
        if n < 1:
            raise ValueError(f"EpochOrder needs n >= 1 windows (got {n})")
        self.n, self.seed, self.epoch = n, seed, epoch
        self.half_bits = max(1, -(-int(n - 1).bit_length() // 2))
        self.keys = np.random.default_rng([seed % 2**64, epoch]).integers(0, 2**63, size=ROUNDS, dtype=np.uint64)

    def __call__(self, positions: np.ndarray | list[int]) -> np.ndarray:
        """int64 [len(positions)]: the window at each position (0 <= position < n) of the order."""
        x = np.asarray(positions, dtype=np.int64)
        if x.size and (x.min() < 0 or x.max() >= self.n):
            raise ValueError(f"positions must lie in [0, {self.n})")
        n = np.uint64(self.n)
        with np.errstate(over="ignore"):  # the mixing multiplies wrap modulo 2^64 by design
            y = _feistel(x.astype(np.uint64), self.half_bits, self.keys)
            outside = y >= n
            while outside.any():  # cycle-walk back into [0, n): a bijection of [0, n) (Black & Rogaway)
                y[outside] = _feistel(y[outside], self.half_bits, self.keys)
                outside = y >= n
        return y.astype(np.int64)
