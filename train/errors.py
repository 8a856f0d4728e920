"""User-facing errors: each carries one line that names the file or field and what to do.

Launch scripts catch ``UserError``, print its message as one line (``print_error``) and exit with status 1.
"""

from __future__ import annotations

import os
import sys
import time


class UserError(Exception):
    """A problem with the user's input (config, data, checkpoint), not a bug."""


class DataError(UserError):
    """Bad or missing corpus, tokenizer or token shards."""


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt or does not match the run."""


def print_error(err: Exception | str, same_on_every_rank: bool | None = None, rank0_grace_s: float = 10.0) -> None:
    """Write ``error: <err>`` to stderr as one line, once per job under torchrun: an error every rank meets
    alike (a config error, by default) is printed by rank 0 only; any other by each rank that meets it,
    prefixed by its rank. One write per line, so that lines of several ranks do not interleave.

    The other ranks wait up to ``rank0_grace_s`` before returning (and exiting): torchrun stops every worker
    as soon as one exits with an error, so a rank that got there first would cut rank 0 off before its line
    (seen on a loaded machine: the job failed without a word). Rank 0 printing and exiting ends the wait."""
    if same_on_every_rank is None:
        from train.config import ConfigError

        same_on_every_rank = isinstance(err, ConfigError)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and same_on_every_rank and rank != 0:
        time.sleep(rank0_grace_s)
        return
    where = f" (rank {rank})" if world > 1 and not same_on_every_rank else ""
    sys.stderr.write(f"error{where}: {' '.join(str(err).split())}\n")
    sys.stderr.flush()
