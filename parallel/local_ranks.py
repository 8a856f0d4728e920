"""Run a function on N real gloo ranks in forked processes (0.1 s to start, against ~6 s for torchrun).

For tests and benchmarks on one machine (CPU, gloo); training jobs are started with torchrun.

    def body(rank, world, x):          # runs in every rank, the process group is initialized
        ...
        return something_picklable
    results = run_ranks(body, 4, x)   # list indexed by rank; a failure in any rank re-raises here
"""

from __future__ import annotations

import gc
import io
import os
import queue as queue_module
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple, env: dict[str, str], queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), **env)
    torch.set_num_threads(1)
    # What the parent had allocated stays as it was: a process group it left for the garbage collector
    # would otherwise be freed here, where its threads do not exist (a fork copies only the calling
    # thread), and its destructor would wait forever on a condition variable those threads held.
    gc.freeze()
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        result = fn(rank, world, *args)
        dist.barrier()
        buffer = io.BytesIO()
        torch.save(result, buffer)  # tensors sent as is would share storage with a process about to exit
        queue.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # report every failure to the parent, with its traceback
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class RankFailure(RuntimeError):
    """A rank raised: the message holds each failed rank's traceback."""


def run_ranks(fn: Callable, world: int, *args: Any, env: dict[str, str] | None = None, timeout: float = 300) -> list:
    """``fn(rank, world, *args)`` on ``world`` forked processes with a gloo group; results by rank (they travel
    serialized by torch.save: our own processes, so loading them with weights_only=False is safe)."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = free_port()
    gc.collect()  # free this process's unreachable process groups (and their threads) before forking
    procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, env or {}, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors = []
    deadline = time.monotonic() + timeout
    while len(results) < world and not errors:
        try:
            rank, status, value = queue.get(timeout=1.0)
        except queue_module.Empty:
            died = [f"rank {r} died (exit code {p.exitcode}) without a result" for r, p in enumerate(procs)
                    if p.exitcode not in (None, 0) and r not in results]  # a rank that returns reports first
            if died:
                errors.extend(died)
            elif time.monotonic() > deadline:
                waiting = [r for r in range(world) if r not in results]
                errors.append(f"ranks {waiting}: no result within {timeout:g} s (a hang: a collective waiting "
                              "for a rank, or a deadlock)")
            continue
        if status == "ok":
            # trusted, so weights_only=False: the bytes come through a pipe from the children this call forked
            # (never from a file or the network), and results may be any picklable object, not only tensors
            results[rank] = torch.load(io.BytesIO(value), weights_only=False)
        else:
            errors.append(f"rank {rank}:\n{value}")  # the other ranks may now hang in a collective: stopped below
    for p in procs:
        p.join(timeout=timeout if not errors else 5)
        if p.is_alive():
            p.kill()
            p.join()
    if errors:
        raise RankFailure("\n".join(errors))
    return [results[r] for r in range(world)]
