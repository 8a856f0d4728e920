"""parallel/local_ranks.py, the harness of the multi-rank tests: it must fail, not hang, when a rank hangs or
dies, and a process group the test process left for the garbage collector must not hang the forked ranks."""

from __future__ import annotations

import gc
import os
import time

import pytest
import torch
import torch.distributed as dist

from parallel.local_ranks import RankFailure, run_ranks


def _sum(rank: int, world: int) -> float:
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    gc.collect()  # a collection in the child: it must not free what the parent had allocated
    return t.item()


def _hang(rank: int, world: int) -> None:
    time.sleep(120)


def _die(rank: int, world: int) -> None:
    os._exit(3)


class _Cycle:
    """Keeps a process group unreachable but alive until a collection, as torch's DeviceMesh does."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.me = self


def test_a_process_group_left_to_the_garbage_collector_does_not_hang_the_ranks():
    """A fork copies only the calling thread: a group of this process freed in a child would wait forever for
    its worker threads' condition variable. run_ranks collects before forking and the children freeze what
    they inherit."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    _Cycle(dist.new_group([0]))
    dist.destroy_process_group()
    assert run_ranks(_sum, 2, timeout=60) == [3.0, 3.0]


def test_a_hanging_rank_fails_after_the_timeout():
    t0 = time.monotonic()
    with pytest.raises(RankFailure, match=r"ranks \[0, 1\]: no result within 3 s"):
        run_ranks(_hang, 2, timeout=3)
    assert time.monotonic() - t0 < 30


def test_a_rank_that_dies_fails_at_once():
    t0 = time.monotonic()
    with pytest.raises(RankFailure, match=r"rank 0 died \(exit code 3\)"):
        run_ranks(_die, 1, timeout=120)
    assert time.monotonic() - t0 < 30
