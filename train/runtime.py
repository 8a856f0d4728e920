"""Where a training process runs: torchrun's environment, the device, the process groups, autocast and the
RNG states a checkpoint carries."""

from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass
from datetime import timedelta
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from parallel.mesh import ProcessGroups, build_process_groups, plan_layout
from train.config import Config
from train.errors import UserError
from train.ops import shared_weight_casts


@dataclass
class Runtime:
    """Where this process runs: its rank, its device, and the process groups of the parallel layout."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    compute_dtype: torch.dtype  # autocast dtype (float32 = no autocast)
    groups: ProcessGroups
    param_dtype: torch.dtype = torch.float32  # the working weights (train/precision.py)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def choose_device(cfg: Config) -> torch.device:
    want = cfg.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but CUDA is not available; use train.device=cpu or auto")
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def setup_runtime(cfg: Config, device: torch.device) -> Runtime:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK, check the layout, start NCCL (GPUs) or gloo (CPU).

    A plain one-process run gets a one-rank process group too, so every run takes the same code path
    (ZeRO-1 over one rank, DTensor checkpoints that reshard into any later layout).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    layout = plan_layout(cfg, world_size, rank, local_world_size)  # config errors before any process group
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if world_size == 1 and "MASTER_ADDR" not in os.environ:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        else:
            dist.init_process_group(backend, store=_rendezvous_store(world_size), rank=rank, world_size=world_size,
                                    device_id=device if device.type == "cuda" else None)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(cfg.train.dtype)
    if dtype is None:  # auto: bf16 autocast on GPUs (FP32 master weights stay in the optimizer), fp32 on CPU
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    groups = build_process_groups(layout, device.type)
    return Runtime(rank, world_size, local_rank, device, dtype, groups, working_dtype(cfg.train.param_dtype, dtype))


def working_dtype(param_dtype: str, compute_dtype: torch.dtype) -> torch.dtype:
    """``train.param_dtype`` for this compute dtype: auto -> BF16 working weights under BF16 compute, else FP32."""
    if param_dtype == "bfloat16" and compute_dtype != torch.bfloat16:
        raise UserError("train.param_dtype=bfloat16 needs BF16 compute, and train.dtype=auto means FP32 on a CPU: "
                        "set train.dtype=bfloat16, or train.param_dtype=float32")
    if param_dtype == "auto":
        return compute_dtype
    return torch.bfloat16 if param_dtype == "bfloat16" else torch.float32


def release_process_groups() -> None:
    """Destroy the process groups and free them now, while the interpreter is alive.

    Destroying a gloo group does not stop its worker threads; they stop when the C++ object is freed, and
    torch's DeviceMesh keeps our groups in reference cycles that only the garbage collector frees. Left to
    the interpreter's last collection at exit, a worker still letting go of a finished collective's tensors
    asks for the GIL while the interpreter is torn down, and a run that succeeded aborts ("terminate called
    without an active exception", SIGABRT; seen on loaded CI machines, torch 2.13). Collected here, the
    workers are joined first."""
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


def _rendezvous_store(world_size: int) -> dist.Store:
    """The key-value store the process groups meet in: torchrun's (MASTER_ADDR:MASTER_PORT), under a prefix
    of its own for each restart. torchrun keeps one store across ``--max-restarts`` attempts, and the keys
    an earlier attempt's groups left there made a restarted job wait forever for dead peers (torch 2.13,
    gloo); a fresh prefix per attempt gives each attempt clean keys."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
                          and int(os.environ.get("RANK", "0")) == 0, timeout=timedelta(minutes=10))
    return dist.PrefixStore(f"dsv3/attempt_{attempt}/", store)


def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def autocast_to(device_type: str, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device_type``; no autocast for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


def autocast(runtime: Runtime) -> contextlib.AbstractContextManager:
    return autocast_to(runtime.device.type, runtime.compute_dtype)


@contextlib.contextmanager
def one_weight_cast_per_step(autocast_factory: Callable[[], contextlib.AbstractContextManager], device_type: str):
    """Around a whole training step (every micro-batch's forward and backward): each weight is cast to
    the autocast dtype once and the micro-batches share that copy. Autocast caches a weight's cast until
    its outermost context exits; with one context per forward, every micro-batch kept its own BF16
    copy of every weight alive for its backward, PP+1 copies of a stage under a pipeline schedule. The
    outer context owns the cache for the step; autocast is off inside it except in the forwards, which
    enter ``autocast_factory()`` as before (so backward runs without autocast, as it should). The routed
    experts cast their stacked weights themselves (``train.ops.cast_weight``): shared the same way. The
    step's memo (``train.ops.step_memo``: one FP8 quantization of an input two linears read) is on in
    either case."""
    outer = autocast_factory()
    if not isinstance(outer, torch.autocast):  # no autocast (FP32): no casts to share, the memo still
        with shared_weight_casts():
            yield
        return
    with outer, torch.autocast(device_type, enabled=False), shared_weight_casts():
        yield


@torch.no_grad()
def all_reduce_sum(*tensors: torch.Tensor, group: dist.ProcessGroup) -> None:
    """Sum small statistics (losses, expert loads, traffic) over the group, in place."""
    for t in tensors:
        dist.all_reduce(t, group=group)


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4


def keep_freed_host_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the OS (no chunks of
    their own from mmap, no trimming of the heap). PyTorch has no caching allocator for CPU tensors: a CPU
    step allocates and frees hundreds of MB of activations, and every large block would come back from the
    OS as fresh pages, faulted in one at a time (about 100K faults a step of ``+conf=small`` at 2 x 1024
    tokens in BF16 on 2 cores: 5% of the step; docs/perf.md). torch's CPU launcher
    (``torch.backends.xeon.run_cpu``) preloads jemalloc or tcmalloc for the same reason; this needs neither.
    The process's peak resident set is unchanged; it no longer shrinks after the peak. Returns whether it
    applied (False off glibc, e.g. macOS or musl, or under another preloaded malloc: nothing changes)."""
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return all(libc.mallopt(option, value) == 1 for option, value in
               ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1), (M_TOP_PAD, 64 << 20)))


def peak_memory_gib(device: torch.device) -> float:
    """This process's peak memory, GiB: on a GPU the most bytes the caching allocator handed out since the last
    call (the step's peak; the counter is reset), on a CPU the process's peak resident set so far."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return peak / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # Linux reports KiB


def all_reduce_max(value: float, device: torch.device) -> float:
    """The largest of ``value`` over every rank (the fullest pipeline rank's memory)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def rng_states() -> dict[str, Any]:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
