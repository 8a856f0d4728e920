"""Sharded, atomic, verified checkpoints through torch.distributed.checkpoint (DCP).

Layout: ``RUN_DIR/checkpoints/step_NNNNNNNN/`` holds DCP's shards (``__R_I.distcp``, written by rank R) and
``.metadata`` plus our ``meta.json`` (step, tokens, model config) and ``manifest.json`` (step, tokens, the
sha256 of the run config, and every file's size and sha256). Every rank writes into
``.tmp-step_NNNNNNNN`` first; once all ranks are done, each rank checksums the files it wrote itself (read
back from the page cache), rank 0 gathers the checksums, writes ``meta.json`` and ``manifest.json`` and
renames the directory. A crash at any instant therefore leaves either the complete new checkpoint or only
the previous ones: a directory without ``meta.json`` or with a ``.tmp-`` name is never taken by
``resume=auto``, and ``latest_good_checkpoint`` also skips one whose files no longer match its manifest.

Sharded tensors are DTensors of their global shape (routed experts split over the ep group, ZeRO-1
optimizer shards over dp / edp), so DCP writes each piece once and a checkpoint loads under any other
layout; before loading, the metadata must show every expert tensor stored exactly once.

No pickle is ever loaded from a checkpoint's data: the trainer state is JSON (small tensors such as the RNG
states inline, base64) stored as a uint8 tensor, which DCP reads with ``torch.load(weights_only=True)``;
a load that would make DCP unpickle a byte entry is refused; DCP's own ``.metadata`` (a pickle) is read
with an unpickler that admits only DCP's metadata classes, torch.Size and dtypes.

``CheckpointWriter`` saves synchronously (``save_checkpoint``) or in the background (``dcp.async_save``:
the state is copied to CPU before ``save`` returns; writing, checksums, manifest and rename run behind
training, on a dedicated gloo process group).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import pickle
import re
import shutil
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.tensor import DTensor, Replicate, Shard

from parallel.mesh import ProcessGroups
from train.config import ModelConfig
from train.errors import CheckpointError
from train.model import RoutedExperts

STEP_DIR = re.compile(r"^step_(\d{8})$")
META_FILE = "meta.json"
MANIFEST_FILE = "manifest.json"
TRAINER_KEY = "trainer_json"  # the trainer state: JSON as a uint8 tensor (older checkpoints: a pickle under "trainer")
VERIFY_LEVELS = ("full", "size", "none")


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


def model_state(model: torch.nn.Module, groups: ProcessGroups | None = None,
                tensors: dict[str, torch.Tensor] | None = None,
                masters: dict[str, DTensor] | None = None) -> dict[str, Any]:
    """The model's persistent tensors, aliasing the live ones (DCP loads in place). With expert
    parallelism each routed-expert tensor is a DTensor of the global shape [E, ...], Shard(0) over the
    ep group and replicated over edp, so it is written once and can be loaded under any layout.
    ``tensors``: stand-ins by name (e.g. the parameters' EMA), laid out like the model's; only those.
    ``masters``: the FP32 masters of BF16 working weights (``ZeroAdamW.master_tensors``), which stand in for
    those parameters: a checkpoint holds FP32 weights whatever the compute precision."""
    sharded = groups is not None and groups.layout.ep > 1
    # a parameter held under two names (an embedding shared by two stages) has its master under the first
    master_of = {id(p): masters[n] for n, p in model.named_parameters() if n in masters} if masters else {}
    state: dict[str, Any] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensors is not None:
            if name not in tensors:
                continue
            tensor = tensors[name]
        elif id(tensor) in master_of:
            state[name] = master_of[id(tensor)]
            continue
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
    config: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically, with its manifest, and keep only the newest ``keep`` complete ones.

    model_state / optim_state: tensors or DTensors (sharded ones carry their global shape, so DCP
    writes each piece once and can load it under another layout); trainer_state: JSON values (dicts with
    string keys, lists, numbers, strings) and small CPU tensors (RNG states), equal on every rank;
    config: the run config, whose sha256 goes into the manifest. Collective when torch.distributed is
    initialized.
    """
    tmp, final = _prepare(run_dir, step, group=None)
    state = _save_state(step, tokens, model_state, optim_state, trainer_state, ema_state)
    with _quiet_single_process():
        dcp.save(state, checkpoint_id=str(tmp), no_dist=not dist.is_initialized())
    _finish(_Pending(run_dir, tmp, final, step, tokens, model_cfg, config_hash(config), keep), group=None)
    return final


def _prepare(run_dir: str | Path, step: int, group: dist.ProcessGroup | None) -> tuple[Path, Path]:
    """The temporary and final directories of checkpoint ``step``; rank 0 removes a stale temporary one."""
    root = checkpoint_root(run_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a crash during an earlier save of this step
    if dist.is_initialized():
        dist.barrier(group=group)
    return tmp, final


def _save_state(step: int, tokens: int, model_state: dict[str, Any], optim_state: dict[str, Any],
                trainer_state: dict[str, Any], ema_state: dict[str, Any] | None) -> dict[str, Any]:
    state = {"model": model_state, "optim": optim_state,
             TRAINER_KEY: encode_trainer_state({"step": step, "tokens": tokens, **trainer_state})}
    if ema_state is not None:
        state["ema"] = ema_state
    return state


@dataclasses.dataclass(frozen=True)
class _Pending:
    """A checkpoint whose DCP files are written (or being written) into ``tmp``; what finishing it needs."""

    run_dir: str | Path
    tmp: Path
    final: Path
    step: int
    tokens: int
    model_cfg: ModelConfig
    config_sha256: str | None
    keep: int


def _finish(pending: _Pending, group: dist.ProcessGroup | None) -> None:
    """After every rank's DCP write: each rank checksums the data files it wrote (``__R_*.distcp``, R its rank
    in the save's group), rank 0 gathers them, checks the experts, writes meta.json and manifest.json,
    renames and prunes; then every rank gets rank 0's outcome (so all raise, or none). Collective on ``group``."""
    distributed = dist.is_initialized()
    rank = dist.get_rank(group) if distributed else 0
    try:
        local: tuple[dict[str, dict[str, Any]], str | None] = (
            describe_files(pending.tmp, sorted(p.name for p in pending.tmp.glob(f"__{rank}_*.distcp"))), None)
    except OSError as err:
        local = ({}, f"{pending.tmp}: rank {rank} cannot checksum its files ({err})")
    gathered: list[Any] | None = [None] * dist.get_world_size(group) if distributed and rank == 0 else None
    if distributed:
        dist.gather_object(local, gathered, group=group, group_dst=0)
    else:
        gathered = [local]
    error: BaseException | None = None
    if rank == 0:
        try:
            _publish(pending, gathered)
        except Exception as err:  # every rank raises it below
            error = err
    outcome = [None if error is None else str(error)]
    if distributed:
        dist.broadcast_object_list(outcome, group=group, group_src=0)
    if error is not None:
        raise error if isinstance(error, CheckpointError) else CheckpointError(outcome[0]) from error
    if outcome[0] is not None:
        raise CheckpointError(outcome[0])


def _publish(pending: _Pending, gathered: list[Any]) -> None:
    """Rank 0: meta.json, manifest.json (every file of the directory), fsync, rename, prune."""
    tmp = pending.tmp
    files: dict[str, dict[str, Any]] = {}
    for described, error in gathered:
        if error is not None:
            raise CheckpointError(f"{error}; the checkpoint was not published")
        files.update(described)
    check_experts_complete(tmp)
    meta = {"step": pending.step, "tokens": pending.tokens, "model": dataclasses.asdict(pending.model_cfg),
            "world_size": len(gathered)}
    (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
    unclaimed = sorted(p.name for p in tmp.iterdir() if p.is_file() and p.name not in files)  # .metadata, meta.json
    files.update(describe_files(tmp, unclaimed))
    write_manifest(tmp, files, pending.step, pending.tokens, pending.config_sha256)
    _fsync_dir(tmp)
    if pending.final.exists():  # same step saved again (e.g. a rerun): replace only after the new one is complete
        shutil.rmtree(pending.final)
    os.replace(tmp, pending.final)
    _fsync_dir(pending.final.parent)
    for old in list_checkpoints(pending.run_dir)[:-pending.keep]:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# The manifest: sizes and checksums of every file, verified before loading


def file_sha256(path: Path, block: int = 4 << 20) -> str:
    """sha256 of a file (hashlib: about 1.5 GB/s per core with SHA-NI, faster than blake2b there)."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buffer = bytearray(block)
        view = memoryview(buffer)
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def describe_files(directory: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """Manifest entries (size, sha256) of ``names`` in ``directory``."""
    return {name: {"bytes": (directory / name).stat().st_size, "sha256": file_sha256(directory / name)}
            for name in names}


def config_hash(config: dict[str, Any] | None) -> str | None:
    """sha256 of the run config's canonical JSON (sorted keys, no spaces); None without a config."""
    if config is None:
        return None
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def write_manifest(directory: Path, files: dict[str, dict[str, Any]], step: int, tokens: int,
                   config_sha256: str | None) -> None:
    manifest = {"format": 1, "step": step, "tokens": tokens, "config_sha256": config_sha256, "hash": "sha256",
                "files": dict(sorted(files.items()))}
    with open(directory / MANIFEST_FILE, "w") as f:
        f.write(json.dumps(manifest, indent=1))
        f.flush()
        os.fsync(f.fileno())


def read_manifest(path: Path) -> dict[str, Any]:
    """The checkpoint's manifest.json; CheckpointError if it is missing or unreadable."""
    manifest_file = path / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no {MANIFEST_FILE} (written by an older version, or not a complete checkpoint),"
                              " so it cannot be verified; use another checkpoint or checkpoint.verify=none") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{manifest_file}: corrupt ({err}); use another checkpoint or "
                              "checkpoint.verify=none") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, dict) and isinstance(v.get("bytes"), int)
                                              and isinstance(v.get("sha256"), str) for v in files.values()):
        raise CheckpointError(f"{manifest_file}: corrupt (no valid 'files' table); use another checkpoint or "
                              "checkpoint.verify=none")
    return manifest


def _check_file(path: Path, name: str, entry: dict[str, Any], level: str) -> str | None:
    """Why ``path/name`` does not match its manifest entry, or None."""
    file = path / name
    try:
        size = file.stat().st_size
    except FileNotFoundError:
        return f"{file}: missing (listed in {MANIFEST_FILE}); the checkpoint cannot be loaded, use another one"
    if size != entry["bytes"]:
        return (f"{file}: corrupt ({size} bytes, {MANIFEST_FILE} says {entry['bytes']}: truncated or overwritten); "
                "the checkpoint cannot be loaded, use another one")
    if level == "full" and file_sha256(file) != entry["sha256"]:
        return (f"{file}: corrupt (sha256 differs from {MANIFEST_FILE}: modified or damaged); the checkpoint "
                "cannot be loaded, use another one")
    return None


def _verification_order(files: dict[str, dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """The small files that describe the checkpoint first (meta.json, .metadata), then the data by name."""
    first = [META_FILE, ".metadata"]
    return sorted(files.items(), key=lambda item: (first.index(item[0]) if item[0] in first else 2, item[0]))


def verify_checkpoint(path: str | Path, level: str = "full", group: dist.ProcessGroup | None = None) -> int:
    """Check a checkpoint against its manifest: ``full`` (every listed file present, of its size, of its sha256),
    ``size`` (present and of its size) or ``none``. Raises CheckpointError naming the first bad file; returns
    the number of files checked (0 for ``none``).

    Collective when torch.distributed is initialized (on ``group``, default: all ranks): each rank checks every
    world-th file and the verdicts are all-gathered, so every rank raises the same error or none."""
    if level not in VERIFY_LEVELS:
        raise CheckpointError(f"checkpoint.verify={level!r}: must be one of {', '.join(VERIFY_LEVELS)}")
    if level == "none":
        return 0
    path = Path(path)
    rank, world = (dist.get_rank(group), dist.get_world_size(group)) if dist.is_initialized() else (0, 1)
    error: str | None = None
    checked = 0
    try:
        files = _verification_order(read_manifest(path)["files"])
        checked = len(files)
        for name, entry in files[rank::world]:
            if (error := _check_file(path, name, entry, level)) is not None:
                break
    except CheckpointError as err:
        error = str(err)
    if world > 1:
        verdicts: list[Any] = [None] * world
        dist.all_gather_object(verdicts, error, group=group)
        error = next((v for v in verdicts if v is not None), None)
    if error is not None:
        raise CheckpointError(error)
    return checked


def latest_good_checkpoint(run_dir: str | Path, verify: str, warn: Callable[[str], None],
                           group: dist.ProcessGroup | None = None) -> Path | None:
    """The newest complete checkpoint that passes ``verify_checkpoint(level=verify)`` (``resume=auto``); each
    newer one that fails is reported through ``warn`` with the reason and skipped. Collective like
    ``verify_checkpoint``: every rank gets the same answer and the same warnings."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(path, verify, group)
            return path
        except CheckpointError as err:
            warn(f"skipping checkpoint {path.name}: {err}")
    return None


# --------------------------------------------------------------------------------------------------
# The trainer state as JSON (no pickle)


def _encode_value(value: Any) -> Any:
    """json.dumps' hook: a tensor becomes {"$tensor": {dtype, shape, base64 of its bytes}}."""
    if isinstance(value, torch.Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1)
        data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
        return {"$tensor": {"dtype": str(value.dtype).removeprefix("torch."), "shape": list(value.shape),
                            "base64": base64.b64encode(data).decode("ascii")}}
    raise TypeError(f"trainer state: a {type(value).__name__} cannot be stored (JSON values and tensors only)")


def _decode_value(obj: dict[str, Any]) -> Any:
    if set(obj) != {"$tensor"}:
        return obj
    spec = obj["$tensor"]
    dtype = getattr(torch, str(spec.get("dtype")), None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"trainer state: unknown tensor dtype {spec.get('dtype')!r}")
    raw = bytearray(base64.b64decode(spec["base64"]))
    flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    return flat.view(dtype).reshape(spec["shape"]).clone()


def encode_trainer_state(state: dict[str, Any]) -> torch.Tensor:
    """The trainer state as JSON bytes in a uint8 tensor (tuples come back as lists, tensors as tensors)."""
    text = json.dumps(state, default=_encode_value)
    return torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8).clone()


def decode_trainer_state(data: torch.Tensor, where: Path) -> dict[str, Any]:
    try:
        return json.loads(bytes(data.numpy()).decode(), object_hook=_decode_value)
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{where}: corrupt trainer state ({type(err).__name__}: {err}); pass another "
                              "checkpoint.resume=PATH") from None


class CheckpointWriter:
    """Saves the trainer's checkpoints: synchronously (``save_checkpoint``) or, with ``async_save``, in the
    background through ``dcp.async_save``.

    Async: ``save`` first waits for the previous save (at most one pending), then DCP copies the state to CPU
    (staging buffers reused from save to save) and returns; training may change the parameters from then on.
    DCP's write and our finishing (checksums, meta.json, manifest, rename, pruning) run in background threads
    whose collectives use a gloo process group of all ranks created once here, so they never interleave with
    training's collectives. Same atomicity as the sync save: files go to ``.tmp-step_N``, renamed only after
    every rank has written and the manifest is complete; a crash mid-save leaves only an ignored ``.tmp-``.
    Construct, ``save``, ``wait`` and ``close`` on every rank (the constructor creates the group collectively)."""

    def __init__(self, run_dir: str | Path, keep: int, async_save: bool = False) -> None:
        self.run_dir = run_dir
        self.keep = keep
        self.async_save = async_save
        self._group = dist.new_group(backend="gloo") if async_save and dist.is_initialized() else None
        self._stager = DefaultStager(StagingOptions(False, False, False, False)) if async_save else None
        self._finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint") if async_save else None
        self._pending: Future[Path] | None = None

    def save(self, step: int, tokens: int, model_state: dict[str, Any], optim_state: dict[str, Any],
             model_cfg: ModelConfig, trainer_state: dict[str, Any], ema_state: dict[str, Any] | None = None,
             config: dict[str, Any] | None = None) -> Path:
        """Save checkpoint ``step`` (arguments as ``save_checkpoint``); returns its final path, which exists
        once ``wait`` returns (sync: already)."""
        if not self.async_save:
            return save_checkpoint(self.run_dir, step, tokens, model_state, optim_state, model_cfg, trainer_state,
                                   self.keep, ema_state=ema_state, config=config)
        self.wait()
        tmp, final = _prepare(self.run_dir, step, self._group)
        state = _save_state(step, tokens, model_state, optim_state, trainer_state, ema_state)
        written = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self._group,
                                 async_stager=self._stager, no_dist=not dist.is_initialized())
        pending = _Pending(self.run_dir, tmp, final, step, tokens, model_cfg, config_hash(config), self.keep)
        self._pending = self._finisher.submit(self._finish_in_background, written, pending)
        return final

    def _finish_in_background(self, written: Future, pending: _Pending) -> Path:
        try:
            written.result()  # DCP raises the same error on every rank, so then no rank enters _finish
        except (Exception, CheckpointException) as err:
            raise CheckpointError(f"{pending.tmp}: background checkpoint save failed ({_root_cause(err)}); "
                                  "the previous checkpoints are intact") from err
        _finish(pending, self._group)
        return pending.final

    @property
    def pending(self) -> bool:
        """Whether a background save has not been waited for."""
        return self._pending is not None

    def wait(self) -> Path | None:
        """Block until the pending background save is published on every rank (its last step is rank 0's
        outcome broadcast after the rename), re-raising its error on every rank; returns its path (None: no
        pending save). Call on every rank."""
        if self._pending is None:
            return None
        pending, self._pending = self._pending, None
        return pending.result()

    def close(self) -> None:
        """Finish the pending save and release the threads, staging buffers and process group."""
        try:
            self.wait()
        finally:
            if self._finisher is not None:
                self._finisher.shutdown()
                self._stager.close()
                self._finisher = None
            if self._group is not None and dist.is_initialized():
                dist.destroy_process_group(self._group)
            self._group = None


EXPERT_KEY = re.compile(r"^model\..*\.experts\.w[123]$")


def check_experts_complete(path: Path) -> int:
    """Every routed-expert tensor must be stored exactly once: its chunks tile the global shape with no gap
    and no overlap (a layout bug could otherwise save, or load, one rank's experts only). Returns the
    number of expert tensors checked."""
    try:
        metadata = read_metadata(path)
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


def load_model_weights(path: str | Path, model_state: dict[str, Any], model_cfg: ModelConfig,
                       verify: str = "full") -> dict[str, Any]:
    """Fill ``model_state`` in place with a checkpoint's model tensors only (a new run from trained
    weights: ``checkpoint.init_from``); the context fields may differ (sec 4.3). Verifies the files first
    (``verify_checkpoint``; collective when torch.distributed is initialized). Returns its meta."""
    path = resolve_checkpoint(path)
    meta = read_meta(path)
    check_model_config(path, meta, model_cfg, may_differ=CONTEXT_FIELDS)
    check_experts_complete(path)
    verify_checkpoint(path, verify)
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
    verify: str = "full",
) -> dict[str, Any]:
    """Check the checkpoint (meta.json, model config, DCP metadata, then ``verify_checkpoint`` at level
    ``verify``), fill model_state and optim_state in place (they alias the live tensors, in the current
    layout, whatever layout saved the checkpoint) and return the trainer state (JSON values; tensors such
    as the RNG states come back as tensors). Collective when torch.distributed is initialized."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory not found; check checkpoint.resume")
    meta = read_meta(path)  # the cheap checks first (meta.json, DCP metadata), then the files' checksums
    if meta.get("weights_only"):
        raise CheckpointError(f"{path}: holds model weights only (an import, launch/convert.py); start a run from it "
                              f"with checkpoint.init_from={path} instead of resuming it")
    check_model_config(path, meta, model_cfg)
    check_experts_complete(path)
    stored = read_metadata(path).state_dict_metadata.get(TRAINER_KEY)
    if stored is None or isinstance(stored, BytesStorageMetadata):
        raise CheckpointError(f"{path}: no JSON trainer state (an older checkpoint whose trainer state is a pickle, "
                              "which is never loaded); start from its weights with checkpoint.init_from=PATH")
    verify_checkpoint(path, verify)
    trainer = torch.empty(tuple(stored.size), dtype=torch.uint8)
    state = {"model": model_state, "optim": optim_state, TRAINER_KEY: trainer}
    _load(path, state, "", "the checkpoint is corrupt or from a different run: pass another checkpoint.resume=PATH")
    return decode_trainer_state(state[TRAINER_KEY], path)


def has_ema(path: str | Path) -> bool:
    """Whether the checkpoint holds a parameter EMA (``memory.ema``)."""
    return any(key.startswith("ema.") for key in read_metadata(Path(path)).state_dict_metadata)


def load_ema(path: str | Path, ema_state: dict[str, Any], verify: str = "full") -> None:
    """Fill ``ema_state`` (``model_state(..., tensors=ema.state())``) from the checkpoint, in place, after
    verifying it (pass ``verify="none"`` right after a load that verified the same checkpoint)."""
    verify_checkpoint(path, verify)
    _load(path, {"ema": ema_state}, "its parameter EMA ", "resume with memory.ema=false or from another checkpoint")


def _load(path: str | Path, state: dict[str, Any], what: str, fix: str) -> None:
    """DCP-load the sections of ``state`` in place; any failure is one CheckpointError line:
    "PATH: {what}cannot be loaded (root cause); {fix}"."""
    try:
        with _quiet_single_process():
            dcp.load(state, storage_reader=_SafeReader(str(path)), planner=_NoPickleLoadPlanner(),
                     no_dist=not dist.is_initialized())
    except (Exception, CheckpointException) as err:  # CheckpointException (a BaseException) wraps rank failures
        raise CheckpointError(f"{path}: {what}cannot be loaded ({_root_cause(err)}); {fix}") from err


# --------------------------------------------------------------------------------------------------
# Reading without unpickling


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's ``.metadata`` is a pickle: admit only the classes DCP's metadata is made of, torch.Size and
    dtypes, so an edited file cannot run code."""

    ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
               ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("pathlib", "PosixPath"),
               ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        if module == "torch.distributed.checkpoint.metadata" and "." not in name:
            found = super().find_class(module, name)
            if isinstance(found, type) and found.__module__ == module:  # its classes, not what it imports
                return found
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in DCP metadata")


def read_metadata(path: Path) -> Metadata:
    """DCP's metadata of a checkpoint, read with ``_MetadataUnpickler``."""
    with open(Path(path) / ".metadata", "rb") as f:
        metadata = _MetadataUnpickler(f).load()
    if not isinstance(metadata, Metadata):
        raise pickle.UnpicklingError(f"holds a {type(metadata).__name__}, not DCP Metadata")
    return metadata


class _SafeReader(dcp.FileSystemReader):
    """DCP's file reader with ``read_metadata`` through ``_MetadataUnpickler`` (tensors are read by DCP with
    ``torch.load(weights_only=True)``)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_metadata(Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _NoPickleLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, refusing byte entries: DCP would ``torch.load(weights_only=False)`` them (unpickle)."""

    def create_local_plan(self) -> LoadPlan:
        plan = super().create_local_plan()
        pickled = sorted(item.dest_index.fqn for item in plan.items if item.type == LoadItemType.BYTE_IO)
        if pickled:
            raise CheckpointError(f"entries {pickled} are stored as pickled bytes, which are never loaded")
        return plan

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        raise CheckpointError(f"{read_item.dest_index.fqn}: stored as pickled bytes, which are never loaded")
