"""Sharded, atomic checkpoints through torch.distributed.checkpoint (DCP).

Layout: ``RUN_DIR/checkpoints/step_NNNNNNNN/`` holds DCP's shards and ``.metadata`` plus our
``meta.json`` (step, tokens, model config). Every rank writes into ``.tmp-step_NNNNNNNN`` first; once
all ranks are done, rank 0 writes ``meta.json`` and renames the directory. A crash at any instant
therefore leaves either the complete new checkpoint or only the previous ones: a directory without
``meta.json`` or with a ``.tmp-`` name is never taken by ``resume=auto``.

Sharded tensors are DTensors of their global shape (routed experts split over the ep group, ZeRO-1
optimizer shards over dp / edp), so DCP writes each piece once and a checkpoint loads under any other
layout; before loading, the metadata must show every expert tensor stored exactly once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.tensor import DTensor, Replicate, Shard

from parallel.mesh import ProcessGroups
from train.config import ModelConfig
from train.errors import CheckpointError
from train.model import RoutedExperts

STEP_DIR = re.compile(r"^step_(\d{8})$")
META_FILE = "meta.json"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def is_complete(path: Path) -> bool:
    return STEP_DIR.match(path.name) is not None and (path / META_FILE).is_file() and (path / ".metadata").is_file()


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and is_complete(p))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def model_state(model: torch.nn.Module, groups: ProcessGroups | None = None,
                tensors: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """The model's persistent tensors, aliasing the live ones (DCP loads in place). With expert
    parallelism each routed-expert tensor is a DTensor of the global shape [E, ...], Shard(0) over the
    ep group and replicated over edp, so it is written once and can be loaded under any layout.
    ``tensors``: stand-ins by name (e.g. the parameters' EMA), laid out like the model's; only those."""
    sharded = groups is not None and groups.layout.ep > 1
    state: dict[str, Any] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensors is not None:
            if name not in tensors:
                continue
            tensor = tensors[name]
        tensor = tensor.detach()
        module = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        if sharded and isinstance(module, RoutedExperts):
            tensor = DTensor.from_local(tensor, groups.expert_mesh, [Replicate(), Shard(0), Shard(0)], run_check=False)
        state[name] = tensor
    return state


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    tokens: int,
    model_state: dict[str, Any],
    optim_state: dict[str, Any],
    model_cfg: ModelConfig,
    trainer_state: dict[str, Any],
    keep: int,
    ema_state: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically and keep only the newest ``keep`` complete ones.

    model_state / optim_state: tensors or DTensors (sharded ones carry their global shape, so DCP
    writes each piece once and can load it under another layout); trainer_state: picklable values
    equal on every rank (counters, the data loader's global position, schedules).
    """
    root = checkpoint_root(run_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a crash during an earlier save of this step
    _barrier()
    state = {"model": model_state, "optim": optim_state,
             "trainer": pickle.dumps({"step": step, "tokens": tokens, **trainer_state})}
    if ema_state is not None:
        state["ema"] = ema_state
    with _quiet_single_process():
        dcp.save(state, checkpoint_id=str(tmp), no_dist=not dist.is_initialized())
    _barrier()
    if _rank() == 0:
        check_experts_complete(tmp)
        meta = {"step": step, "tokens": tokens, "model": dataclasses.asdict(model_cfg),
                "world_size": dist.get_world_size() if dist.is_initialized() else 1}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
        _fsync_dir(tmp)
        if final.exists():  # same step saved again (e.g. a rerun): replace only after the new one is complete
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


EXPERT_KEY = re.compile(r"^model\..*\.experts\.w[123]$")


def check_experts_complete(path: Path) -> int:
    """Every routed-expert tensor must be stored exactly once: its chunks tile the global shape with no gap
    and no overlap (a layout bug could otherwise save, or load, one rank's experts only). Returns the
    number of expert tensors checked."""
    try:
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as err:
        raise CheckpointError(f"{path}: unreadable checkpoint metadata ({_root_cause(err)}); pass another "
                              "checkpoint.resume=PATH") from err
    checked = 0
    for key, item in metadata.state_dict_metadata.items():
        if not EXPERT_KEY.match(key):
            continue
        size = tuple(item.size)
        boxes = [(tuple(c.offsets), tuple(c.sizes)) for c in item.chunks]
        volume = sum(math.prod(sizes) for _, sizes in boxes)
        overlap = any(_overlap(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
        inside = all(o + n <= d for offsets, sizes in boxes for o, n, d in zip(offsets, sizes, size))
        if volume != math.prod(size) or overlap or not inside:
            raise CheckpointError(f"{path}: expert tensor {key} of shape {list(size)} is not stored exactly once "
                                  f"({len(boxes)} chunks covering {volume} of {math.prod(size)} elements, "
                                  f"overlapping: {overlap}); the checkpoint is incomplete: use an earlier one")
        checked += 1
    return checked


def _overlap(a: tuple[tuple[int, ...], tuple[int, ...]], b: tuple[tuple[int, ...], tuple[int, ...]]) -> bool:
    return all(oa < ob + nb and ob < oa + na for oa, na, ob, nb in zip(a[0], a[1], b[0], b[1]))


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns that it runs without a process group; in a one-process run that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_meta(path: Path) -> dict[str, Any]:
    meta_file = path / META_FILE
    try:
        return json.loads(meta_file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not a complete checkpoint (no {META_FILE}); pass another "
                              "checkpoint.resume=PATH or checkpoint.resume=none") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{meta_file}: corrupt ({err}); pass another checkpoint.resume=PATH") from None


# The context (sec 4.3): an extension stage starts from pretrained weights with these changed.
CONTEXT_FIELDS = frozenset({"max_seq_len", "rope_factor", "original_seq_len", "beta_fast", "beta_slow", "mscale",
                            "mscale_all_dim"})


def check_model_config(path: Path, meta: dict[str, Any], model_cfg: ModelConfig,
                       may_differ: frozenset[str] = frozenset()) -> None:
    """A checkpoint must hold the same architecture as the run; name every field that differs (except
    ``may_differ``)."""
    saved = meta.get("model", {})
    ours = dataclasses.asdict(model_cfg)
    ignore = {"expert_impl", *may_differ}  # execution choice, not architecture
    differ = [f"model.{k} (checkpoint {saved.get(k)!r}, run {v!r})" for k, v in ours.items()
              if k not in ignore and saved.get(k) != v]
    if differ:
        raise CheckpointError(f"{path}: model config differs from the run: {', '.join(differ)}; "
                              "use the checkpoint's model config or checkpoint.resume=none")


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory whose newest complete checkpoint is taken."""
    path = Path(path)
    if (path / META_FILE).is_file() and (path / ".metadata").is_file():  # any name (an import, a copy)
        return path
    latest = latest_checkpoint(path) if path.is_dir() else None
    if latest is None:
        raise CheckpointError(f"{path}: no complete checkpoint there (a checkpoint directory with {META_FILE}, "
                              "or a run directory with checkpoints/); check checkpoint.init_from")
    return latest


def load_model_weights(path: str | Path, model_state: dict[str, Any], model_cfg: ModelConfig) -> dict[str, Any]:
    """Fill ``model_state`` in place with a checkpoint's model tensors only (a new run from trained
    weights: ``checkpoint.init_from``); the context fields may differ (sec 4.3). Returns its meta."""
    path = resolve_checkpoint(path)
    meta = read_meta(path)
    check_model_config(path, meta, model_cfg, may_differ=CONTEXT_FIELDS)
    check_experts_complete(path)
    _load(path, {"model": model_state}, "its model weights ", "check checkpoint.init_from")
    return {"path": path, **meta}


def _root_cause(err: BaseException) -> str:
    """The last line of the innermost failure DCP reports (e.g. torch.load's 'failed finding central directory')."""
    if isinstance(err, CheckpointException) and err.failures:
        err = next(iter(err.failures.values()))[0]  # failures: rank -> (exception, traceback)
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[-1]}" if lines else type(err).__name__


def load_checkpoint(
    path: str | Path,
    model_state: dict[str, Any],
    optim_state: dict[str, Any],
    model_cfg: ModelConfig,
) -> dict[str, Any]:
    """Fill model_state and optim_state in place (they alias the live tensors, in the current layout,
    whatever layout saved the checkpoint); return the trainer state."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory not found; check checkpoint.resume")
    meta = read_meta(path)
    if meta.get("weights_only"):
        raise CheckpointError(f"{path}: holds model weights only (an import, launch/convert.py); start a run from it "
                              f"with checkpoint.init_from={path} instead of resuming it")
    check_model_config(path, meta, model_cfg)
    check_experts_complete(path)
    state = {"model": model_state, "optim": optim_state, "trainer": b""}
    _load(path, state, "", "the checkpoint is corrupt or from a different run: pass another checkpoint.resume=PATH")
    return pickle.loads(state["trainer"])


def has_ema(path: str | Path) -> bool:
    """Whether the checkpoint holds a parameter EMA (``memory.ema``)."""
    return any(key.startswith("ema.") for key in dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)


def load_ema(path: str | Path, ema_state: dict[str, Any]) -> None:
    """Fill ``ema_state`` (``model_state(..., tensors=ema.state())``) from the checkpoint, in place."""
    _load(path, {"ema": ema_state}, "its parameter EMA ", "resume with memory.ema=false or from another checkpoint")


def _load(path: str | Path, state: dict[str, Any], what: str, fix: str) -> None:
    """DCP-load the sections of ``state`` in place; any failure is one CheckpointError line:
    "PATH: {what}cannot be loaded (root cause); {fix}"."""
    try:
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    except (Exception, CheckpointException) as err:  # CheckpointException (a BaseException) wraps rank failures
        raise CheckpointError(f"{path}: {what}cannot be loaded ({_root_cause(err)}); {fix}") from err
