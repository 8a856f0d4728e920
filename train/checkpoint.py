"""Sharded, atomic checkpoints through torch.distributed.checkpoint (DCP).

Layout: ``RUN_DIR/checkpoints/step_NNNNNNNN/`` holds DCP's shards and ``.metadata`` plus our
``meta.json`` (step, tokens, model config). Every rank writes into ``.tmp-step_NNNNNNNN`` first; once
all ranks are done, rank 0 writes ``meta.json`` and renames the directory. A crash at any instant
therefore leaves either the complete new checkpoint or only the previous ones: a directory without
``meta.json`` or with a ``.tmp-`` name is never taken by ``resume=auto``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
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
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from train.config import ModelConfig
from train.errors import CheckpointError

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


def _rank_key() -> str:
    """State that differs between ranks (loader position, RNG) is stored under the rank's own key."""
    return f"rank{_rank()}"


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    tokens: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    model_cfg: ModelConfig,
    trainer_state: dict[str, Any],
    per_rank_state: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint ``step`` atomically and keep only the newest ``keep`` complete ones.

    trainer_state: picklable values equal on every rank (schedules, counters); per_rank_state: values
    each rank keeps for itself (data loader position, RNG states).
    """
    root = checkpoint_root(run_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a crash during an earlier save of this step
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {
        "model": model_sd,
        "optim": optim_sd,
        "trainer": pickle.dumps({"step": step, "tokens": tokens, **trainer_state}),
        _rank_key(): pickle.dumps(per_rank_state),
    }
    with _quiet_single_process():
        dcp.save(state, checkpoint_id=str(tmp), no_dist=not dist.is_initialized())
    _barrier()
    if _rank() == 0:
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


def check_model_config(path: Path, meta: dict[str, Any], model_cfg: ModelConfig) -> None:
    """A checkpoint must hold the same architecture as the run; name every field that differs."""
    saved = meta.get("model", {})
    ours = dataclasses.asdict(model_cfg)
    ignore = {"expert_impl"}  # execution choice, not architecture
    differ = [f"model.{k} (checkpoint {saved.get(k)!r}, run {v!r})" for k, v in ours.items()
              if k not in ignore and saved.get(k) != v]
    if differ:
        raise CheckpointError(f"{path}: model config differs from the run: {', '.join(differ)}; "
                              "use the checkpoint's model config or checkpoint.resume=none")


def _root_cause(err: BaseException) -> str:
    """The last line of the innermost failure DCP reports (e.g. torch.load's 'failed finding central directory')."""
    if isinstance(err, CheckpointException) and err.failures:
        err = next(iter(err.failures.values()))[0]  # failures: rank -> (exception, traceback)
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[-1]}" if lines else type(err).__name__


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    model_cfg: ModelConfig,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore model and optimizer in place; return (trainer_state, this rank's per-rank state)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory not found; check checkpoint.resume")
    meta = read_meta(path)
    check_model_config(path, meta, model_cfg)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if meta.get("world_size", 1) != world:
        raise CheckpointError(f"{path}: saved by {meta.get('world_size')} processes, resuming with {world}; the "
                              "data loader position is per process: resume with the same number of processes")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd, "trainer": b"", _rank_key(): b""}
    try:
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    except (Exception, CheckpointException) as err:  # CheckpointException (a BaseException) wraps rank failures
        first_line = _root_cause(err)
        raise CheckpointError(f"{path}: cannot be loaded ({first_line[:300]}); the checkpoint is corrupt or "
                              "from a different run: pass another checkpoint.resume=PATH") from err
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return pickle.loads(state["trainer"]), pickle.loads(state[_rank_key()])
