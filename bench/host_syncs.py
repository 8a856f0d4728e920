"""Where a training step makes the host wait for the GPU (issue 9: "no host syncs in the step"; the expert
counts are the classic one), found with ``torch.cuda.set_sync_debug_mode``: every synchronising CUDA call
then warns, and the innermost frame of this repository on the stack names the place. ``--device cpu``
shows what the CPU can: what passes the dispatcher and would make a GPU wait (``HostReads``: ``.item()``,
``bool()``, ``int()`` of a tensor, and operations whose output is sized by values, such as ``nonzero``;
not ``.tolist()``, not a copy to the host).

The step is the trainer's own on one GPU: ``train.trainer.forward_backward`` over the micro-batches (BF16
autocast, BF16 working weights by default), then ``ZeroAdamW.step``, counted separately, after one warm-up
step (cuBLAS and Triton set-up synchronise once). The trainer's per-step bookkeeping after that (loss
guard, metrics) syncs on purpose, once a step, and is not counted here.

    python bench/host_syncs.py --device cuda                  # +conf=small, BF16
    python bench/host_syncs.py --device cuda --set fp8.enabled=true
    python bench/host_syncs.py --device cpu --preset tiny     # the dispatcher's view, no GPU needed
    torchrun --nproc-per-node=2 bench/host_syncs.py --device cpu --preset tiny --set parallel.ep=2   # with EP
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
OURS = tuple(str(ROOT / part) for part in ("train", "parallel", "fp8", "data"))


def innermost_own_frame(stack: traceback.StackSummary) -> str:
    """``path:line (function)`` of the last frame in this repository's packages, else the last frame."""
    frames = [f for f in stack if f.filename.startswith(OURS)] or list(stack)
    frame = frames[-1]
    return f"{Path(frame.filename).relative_to(ROOT) if frame.filename.startswith(str(ROOT)) else frame.filename}" \
           f":{frame.lineno} ({frame.name})"


ATEN = torch.ops.aten
# Operations whose output's size depends on the values of their input: on a GPU each makes the host
# wait for the count (bincount for the largest value). repeat_interleave given its output_size is not one.
SIZED_BY_VALUES = frozenset({ATEN.nonzero.default, ATEN.nonzero_numpy.default, ATEN.masked_select.default,
                             ATEN.bincount.default, ATEN.repeat_interleave.Tensor, ATEN._unique2.default,
                             ATEN.unique_consecutive.default, ATEN.unique_dim.default})
INDEXING = frozenset({ATEN.index.Tensor, ATEN.index_put.default, ATEN.index_put_.default,
                      ATEN._index_put_impl_.default})


def reads_back(func, args: tuple, kwargs: dict) -> str | None:
    """What ``func(*args, **kwargs)`` reads back to the host, if anything: ``"value"`` (``.item()``,
    ``bool()``, ``int()``), the operation's name (an output sized by the input's values: ``nonzero``, a boolean
    mask as an index, ...), or None."""
    if func is ATEN._local_scalar_dense.default:
        return "value"
    if func is ATEN.repeat_interleave.Tensor and kwargs.get("output_size") is not None:
        return None
    if func in SIZED_BY_VALUES:
        return func.__name__
    if func in INDEXING and any(i is not None and i.dtype == torch.bool for i in args[1]):
        return f"{func.__name__} with a boolean mask"
    return None


class HostReads(TorchDispatchMode):
    """Counts what passes the dispatcher and makes a GPU wait for a value (``reads_back``): reads of a value
    (``aten._local_scalar_dense``: ``.item()``, ``bool(t)``, ``int(t)``) and operations whose output is sized
    by the input's values (``nonzero``, boolean-mask indexing, ...), by the innermost place in this
    repository (suffixed by the operation for the latter): ``with HostReads() as reads: ...``, then
    ``reads.count``, ``reads.places`` and ``reads.seen`` (every operation the mode saw). ``.tolist()`` and
    copies to the host do not pass the dispatcher on the CPU."""

    def __init__(self) -> None:
        super().__init__()
        self.places: Counter[str] = Counter()
        self.seen = 0

    @property
    def count(self) -> int:
        return sum(self.places.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen += 1
        kwargs = kwargs or {}
        what = reads_back(func, args, kwargs)
        if what is not None:
            place = innermost_own_frame(traceback.extract_stack()[:-1])
            self.places[place if what == "value" else f"{place} [{what}]"] += 1
        return func(*args, **kwargs)


def count_syncs(fn: Callable[[], object], device: torch.device) -> Counter[str]:
    """Run ``fn``; how many synchronising calls each place made (CUDA: the sync debug mode; CPU: the
    dispatcher's reads, ``HostReads``)."""
    if device.type != "cuda":
        with HostReads() as reads:
            fn()
        return reads.places
    found: Counter[str] = Counter()
    show = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        if "synchroniz" in str(message) and "prototype" not in str(message):  # not the mode's own notice
            place = innermost_own_frame(traceback.extract_stack()[:-1])
            node = torch._C._current_autograd_node()  # a sync inside a built-in backward: no frame of ours
            found[f"{place} in {node.name()}" if node is not None else place] += 1
        else:
            show(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():  # restores warnings.showwarning on exit
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
            torch.cuda.set_sync_debug_mode(0)
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return found


def add_step_arguments(ap: argparse.ArgumentParser) -> None:
    """``trainer_step``'s arguments: --preset, --device, --micro-batches, --set (repeated)."""
    ap.add_argument("--preset", default="small")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--micro-batches", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")


@contextlib.contextmanager
def trainer_step(preset: str, device_name: str, overrides: list[str], micro_batches: int):
    """The trainer's step on one device (``pp`` 1; EP under torchrun): yields ``(cfg, runtime,
    forward_and_backward, optimizer_step)``, random token windows as the micro-batches; process groups
    released on exit. Also used by bench/profile_step.py."""
    os.environ.setdefault("WORLD_SIZE", "1")
    from train.config import load_config
    from train.runtime import release_process_groups, setup_runtime
    from train.trainer import build_meta_model, forward_backward, materialize
    from parallel.zero import ZeroAdamW

    cfg = load_config([f"+conf={preset}", f"train.device={device_name}", *overrides])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if device_name == "cuda" else torch.device("cpu")
    runtime = setup_runtime(cfg, device)
    try:
        if runtime.groups.layout.pp > 1:
            raise SystemExit("parallel.pp must be 1 (this runs forward_backward, not a schedule)")
        model = build_meta_model(cfg)
        quantizer = None
        if cfg.fp8.enabled:  # the trainer's order: the FP8 swap, then the expert sharding
            from fp8.convert import convert_to_fp8
            from fp8.dispatch import Fp8DispatchQuantizer

            convert_to_fp8(model, cfg.fp8.backend, device)
            quantizer = Fp8DispatchQuantizer(runtime.compute_dtype) if cfg.fp8.dispatch else None
        if runtime.groups.layout.ep > 1:
            from parallel.expert import parallelize_experts

            parallelize_experts(model, runtime.groups, cfg.parallel.dispatch, quantizer)
        model = materialize(model, cfg, runtime)
        optimizer = ZeroAdamW(model, runtime.groups, cfg.optim, working_dtype=runtime.param_dtype)
        gen = torch.Generator().manual_seed(0)
        windows = [torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.train.seq_len + 1),
                                 generator=gen).to(device) for _ in range(micro_batches)]

        def forward_and_backward() -> None:
            forward_backward(model, windows, cfg.train.mtp_weight, cfg.train.balance_alpha, runtime)

        def optimizer_step() -> None:
            optimizer.step(1e-4, cfg.optim.grad_clip)

        yield cfg, runtime, forward_and_backward, optimizer_step
    finally:
        release_process_groups()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_step_arguments(ap)
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/host_syncs.py --device cuda needs a CUDA GPU (torch.cuda.set_sync_debug_mode); nothing "
              "measured (--device cpu lists the reads the dispatcher sees)")
        return 0
    with trainer_step(args.preset, args.device, args.set, args.micro_batches) as (cfg, runtime, forward_and_backward,
                                                                                   optimizer_step):
        device = runtime.device
        forward_and_backward()  # warm-up: library set-up synchronises once
        optimizer_step()
        parts = {"forward + backward": count_syncs(forward_and_backward, device),
                 "optimizer step": count_syncs(optimizer_step, device)}
        if not runtime.is_main:
            return 0
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (reads the dispatcher sees)"
        print(f"+conf={args.preset} on {name}, {args.micro_batches} micro-batches of "
              f"{cfg.train.micro_batch_size} x {cfg.train.seq_len} tokens, weights {runtime.param_dtype}, "
              f"fp8 {cfg.fp8.enabled}, overrides {args.set}")
        for part, found in parts.items():
            print(f"{part}: {sum(found.values())} host {'syncs' if device.type == 'cuda' else 'reads'}")
            for place, n in found.most_common():
                print(f"  {n:>5}  {place}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
