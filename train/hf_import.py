"""The streaming import of a DeepSeek-V3 / HF safetensors checkpoint into our DCP format (part of
train/hf_io.py): ``import_hf``, plus ``write_synthetic_hf`` (a random checkpoint for benchmarks and tests),
``model_overrides``, ``is_weights_only`` and ``load_weights``. Reading the source: train/hf_read.py; shared
pieces: train/hf_common.py.

Memory. Nothing holds the model. The import validates every name, shape and dtype from the safetensors
headers before it reads any data, then writes the DCP checkpoint with ONE ``dcp.save`` whose planner
(``_StreamingPlanner``) knows the tensors only as recipes: DCP's writer asks for each item when it writes
it (``resolve_data``), so one item is in memory at a time. Our routed experts are stacked per layer
([E, I, D]); they are saved as E chunks of [1, I, D] (as an expert-parallel save would store them), so
the largest item is one HF tensor, not one layer's experts. Source shards are read in order through
``safetensors.safe_open`` (mmap), one open at a time; its file pages count in RSS until the shard is
closed, so the bound is about one source shard plus one tensor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

from train.config import ModelConfig
from train.errors import UserError
from train.hf import config_to_hf
from train.hf_common import (
    META_FILE,
    ConvertError,
    ConvertStats,
    Progress,
    RssMeter,
    _atomic_dir,
    hf_layout,
    our_shapes,
    sha256_file,
    write_manifest,
)
from train.hf_export import SafetensorsWriter
from train.hf_read import HFCheckpoint


@dataclass
class _Piece:
    """One DCP write item of our checkpoint: a whole tensor, or expert ``offsets[0]`` of a stacked one."""

    fqn: str  # "model." + our key
    size: tuple[int, ...]  # the global shape
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], Tensor]
    order: tuple[int, int]  # (source file, byte offset): items are written in this order
    source_bytes: int

    def write_item(self) -> WriteItem:
        whole = self.sizes == self.size
        return WriteItem(
            index=MetadataIndex(self.fqn, self.offsets),
            type=WriteItemType.TENSOR if whole else WriteItemType.SHARD,
            tensor_data=TensorWriteData(
                chunk=ChunkStorageMetadata(offsets=torch.Size(self.offsets), sizes=torch.Size(self.sizes)),
                properties=TensorProperties(dtype=self.dtype),
                size=torch.Size(self.size),
            ),
        )


class _StreamingPlanner(DefaultSavePlanner):
    """DCP save planner whose tensors are recipes (``_Piece.produce``), run when the writer reaches them.

    ``dcp.save`` gets only the small real entries (the trainer state: JSON in a uint8 tensor); the model's items
    are added to the local plan here, with the flatten mapping (``model``, key) that DCP's own save would record."""

    def __init__(self, pieces: list[_Piece], progress: Progress) -> None:
        super().__init__(flatten_state_dict=True, flatten_sharded_tensors=False)
        self.pieces = {(p.fqn, p.offsets): p for p in pieces}
        self.ordered = pieces
        self.progress = progress
        self.largest = 0  # bytes of the largest item produced
        self.produced = 0
        self.max_alive = 0  # most produced tensors' storages alive at once (checked when each is produced)
        self._alive: list[weakref.ref[torch.UntypedStorage]] = []
        self._lock = threading.Lock()

    def create_local_plan(self) -> SavePlan:
        plan = super().create_local_plan()
        mappings = dict(plan.planner_data or {})
        mappings.update({p.fqn: ("model", p.fqn[len("model."):]) for p in self.ordered})
        self.plan = dataclasses.replace(plan, items=list(plan.items) + [p.write_item() for p in self.ordered],
                                        planner_data=mappings)
        return self.plan

    def resolve_data(self, write_item: WriteItem) -> Tensor | io.BytesIO:
        piece = self.pieces.get((write_item.index.fqn, tuple(write_item.index.offset or ())))
        if piece is None:  # a real entry of the state dict (the trainer state)
            return super().resolve_data(write_item)
        tensor = piece.produce().contiguous()
        if tuple(tensor.shape) != piece.sizes or tensor.dtype != piece.dtype:
            raise ConvertError(f"{piece.fqn}: produced {list(tensor.shape)} {tensor.dtype}, planned "
                               f"{list(piece.sizes)} {piece.dtype}")
        with self._lock:
            # storages, not tensor objects: a view (detach, narrow) kept by a writer keeps the memory alive too
            self._alive = [ref for ref in self._alive if ref() is not None] + [weakref.ref(tensor.untyped_storage())]
            self.max_alive = max(self.max_alive, len(self._alive))
            self.largest = max(self.largest, tensor.nbytes)
            self.produced += 1
        self.progress.advance(piece.source_bytes)
        return tensor


class _HashingFileSystem(FileSystem):
    """DCP's local file system that records the sha256 of each data file right after it is closed (read
    back while it is still in the page cache)."""

    def __init__(self, hashes: dict[str, str]) -> None:
        super().__init__()
        self.hashes = hashes
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[io.IOBase]:
        with super().create_stream(path, mode) as stream:
            yield stream
        if "w" in mode and str(path).endswith(".distcp"):
            digest = sha256_file(Path(path))
            with self._lock:
                self.hashes[Path(path).name] = digest


_RECORD_WRITER_ARGS = ["transforms", "stream", "data", "write_item", "storage_key", "serialization_format"]


def _record_writer() -> Callable[..., Any] | None:
    """DCP's per-item record writer (``filesystem._write_item``) if it has the signature we call, else None."""
    import inspect

    from torch.distributed.checkpoint import filesystem

    write_item = getattr(filesystem, "_write_item", None)
    if write_item is None or list(inspect.signature(write_item).parameters) != _RECORD_WRITER_ARGS:
        return None
    return write_item


class _GroupedWriter(FileSystemWriter):
    """DCP's FileSystemWriter writing one data file per source shard (``__0_{i}.distcp``), items in plan order,
    ``threads`` files at a time, ONE item alive per thread.

    DCP's own loop (``_write_files_from_queue``, torch 2.13) keeps a reference to every tensor of a file until
    the file is closed (for its safetensors format), which would make the bound a whole source shard in fp32;
    so the loop is ours and only the record format is DCP's (``_write_item``: a ``torch.save`` record per item,
    the offsets and lengths that the metadata stores). With a torch whose ``_write_item`` differs, DCP's own
    ``write_data`` is used (same files, weaker memory bound)."""

    def __init__(self, path: Path, threads: int, hashes: dict[str, str], group: Callable[[WriteItem], int]) -> None:
        super().__init__(str(path), single_file_per_rank=True, sync_files=True, thread_count=threads,
                         per_thread_copy_ahead=0, overwrite=True)
        self.fs = _HashingFileSystem(hashes)
        self.group = group
        self.threads = threads

    def write_data(self, plan: SavePlan, planner: Any) -> Any:
        from concurrent.futures import ThreadPoolExecutor

        from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX
        from torch.futures import Future

        write_item = _record_writer()
        if write_item is None:
            return super().write_data(plan, planner)
        files: dict[int, list[WriteItem]] = {}
        for item in plan.items:
            files.setdefault(self.group(item), []).append(item)
        names = [f"{plan.storage_data.prefix}{number}{DEFAULT_SUFFIX}" for number in range(len(files))]

        def write_file(name: str, items: list[WriteItem]) -> list[Any]:
            results = []
            with self.fs.create_stream(self.fs.concat_path(self.path, name), "wb") as stream:
                for item in items:
                    data = planner.resolve_data(item)  # a fresh CPU tensor (or the trainer bytes)
                    results.append(write_item(self.transforms, stream, data, item, name, self.serialization_format))
                    del data  # before the next item is produced
                stream.flush()
                os.fsync(stream.fileno())
            return results

        with ThreadPoolExecutor(max_workers=max(1, self.threads)) as pool:
            done = pool.map(write_file, names, [files[key] for key in sorted(files)])
            results = [result for per_file in done for result in per_file]
        if len(results) != len(plan.items):
            raise ConvertError(f"{self.path}: {len(plan.items) - len(results)} item(s) were not written")
        future: Future[list[Any]] = Future()
        future.set_result(results)
        return future


def _unwrap(err: BaseException) -> BaseException:
    """DCP wraps failures in CheckpointException (rank -> (exception, traceback)); return ours."""
    from torch.distributed.checkpoint.api import CheckpointException

    if isinstance(err, CheckpointException) and err.failures:
        inner = next(iter(err.failures.values()))
        return inner[0] if isinstance(inner, tuple) else inner
    return err


def import_hf(hf_dir: str | Path, out_dir: str | Path, *, drop_mtp: bool = False, threads: int = 1,
              progress: bool = False, force: bool = False) -> ConvertStats:
    """Import a DeepSeek-V3-format checkpoint directory as one of our checkpoints (weights only, step 0).

    Raises ConvertError (one line) for a directory without config.json, a config that is not DeepSeek-V3
    shaped, missing / unexpected tensors, a shape mismatch, an FP8 weight without its scale.
    """
    from train.checkpoint import TRAINER_KEY, encode_trainer_state

    start = time.perf_counter()
    source = HFCheckpoint(hf_dir, drop_mtp=drop_mtp)
    cfg = source.cfg
    layout = hf_layout(cfg)
    entries = source.check(layout)
    copies = source.check_copies(layout)
    shapes = our_shapes(cfg)

    pieces: list[_Piece] = []
    for entry in entries:
        size, dtype = shapes[entry.ours]
        stored = source.tensors[entry.hf]

        def produce(name: str = entry.hf, shape: tuple[int, ...] = entry.shape,
                    stacked: bool = entry.expert is not None, dtype: torch.dtype = dtype) -> Tensor:
            tensor = source.read(name).to(dtype).reshape(shape)
            return tensor.unsqueeze(0) if stacked else tensor

        if entry.expert is None:
            offsets, sizes = (0,) * len(size), size
        else:
            offsets, sizes = (entry.expert,) + (0,) * (len(size) - 1), (1,) + size[1:]
        pieces.append(_Piece("model." + entry.ours, size, offsets, sizes, dtype, produce,
                             (stored.file_index, stored.offset), source.source_bytes(entry.hf)))
    pieces.sort(key=lambda p: p.order)
    group_of = {(p.fqn, p.offsets): p.order[0] for p in pieces}

    out = Path(out_dir)
    hashes: dict[str, str] = {}
    trainer = {"step": 0, "tokens": 0, "weights_only": True}
    # memory of the data phase (the plan above is metadata: names, shapes, offsets; O(number of tensors))
    meter = RssMeter()
    total = sum(p.source_bytes for p in pieces)
    stats = ConvertStats(tensors=len(pieces), bytes_read=total,
                         shard_bytes=max(f.stat().st_size for f in source.files))
    with _atomic_dir(out, force) as tmp, Progress(f"import {Path(hf_dir).name}", total, progress) as bar:
        planner = _StreamingPlanner(pieces, bar)
        first = pieces[0].order[0]  # the trainer state goes with the first source shard
        writer = _GroupedWriter(tmp, threads, hashes,
                                lambda item: group_of.get((item.index.fqn, tuple(item.index.offset or ())), first))
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.save({TRAINER_KEY: encode_trainer_state(trainer)}, storage_writer=writer, planner=planner,
                         no_dist=True)
        except BaseException as err:  # noqa: BLE001 - DCP raises CheckpointException, a BaseException
            inner = _unwrap(err)
            if isinstance(inner, UserError):
                raise inner from None
            raise ConvertError(f"{out}: writing the checkpoint failed ({type(inner).__name__}: {inner})") from err
        finally:
            source.close()
        meta = {"step": 0, "tokens": 0, "model": dataclasses.asdict(cfg), "world_size": 1, "weights_only": True,
                "source": {"format": "hf-safetensors", "path": str(Path(hf_dir).resolve()),
                           "fp8_block": list(source.block), "mtp_dropped": drop_mtp and source.config_mtp_depth > 0,
                           "mtp_copies_checked": copies}}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
        stats.seconds = time.perf_counter() - start
        # the manifest train.checkpoint.verify_checkpoint reads (files: bytes and sha256), like a trainer save's
        manifest = write_manifest(tmp, hashes, {"format": 1, "step": 0, "tokens": 0, "config_sha256": None,
                                                "hash": "sha256", "kind": "dsv3 DCP checkpoint (weights only)",
                                                "tool": "launch/convert.py import", "source": meta["source"]})
        stats.count_written(manifest)
    stats.largest_item = planner.largest
    stats.extra["max_items_alive"] = planner.max_alive
    stats.rss_start, stats.rss_peak = meter.start, meter.peak
    return stats


def write_synthetic_hf(path: Path, cfg: ModelConfig, shard_bytes: int) -> tuple[int, int, int]:
    """A DeepSeek-V3-layout checkpoint of random BF16 weights (norms U(0.5, 1.5), the rest N(0, 0.02)) in
    shards of about ``shard_bytes``, one tensor in memory at a time: for benchmarks and memory tests.
    Returns (bytes, largest shard, files)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config_to_hf(cfg), indent=1))
    entries = [e for e in hf_layout(cfg) if not e.copy]
    shards, sizes = [[]], [0]
    for e in entries:
        nbytes = 2 * math.prod(e.shape)
        if sizes[-1] + nbytes > shard_bytes and shards[-1]:
            shards.append([])
            sizes.append(0)
        shards[-1].append(e)
        sizes[-1] += nbytes
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        writer = SafetensorsWriter(path / name, [(e.hf, torch.bfloat16, e.shape) for e in shard])
        for e in shard:
            if e.hf.endswith("norm.weight"):
                tensor = torch.rand(e.shape, generator=generator) + 0.5
            else:
                tensor = torch.randn(e.shape, generator=generator) * 0.02
            writer.write(e.hf, tensor.to(torch.bfloat16))
            weight_map[e.hf] = name
        writer.close()
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, indent=1))
    return sum(sizes), max(sizes), len(shards)


def model_overrides(cfg: ModelConfig) -> list[str]:
    """``model.FIELD=VALUE`` overrides (launch/pretrain.py) for the fields of ``cfg`` that differ from the
    defaults: a run must have the checkpoint's model config (``train.checkpoint.check_model_config``)."""
    default = ModelConfig()
    return [f"model.{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(ModelConfig)
            if f.name != "expert_impl" and getattr(cfg, f.name) != getattr(default, f.name)]


def is_weights_only(path: str | Path) -> bool:
    """True for a checkpoint that holds model weights only (``import_hf``): no optimizer / loader / RNG state."""
    from train.checkpoint import read_meta

    return bool(read_meta(Path(path)).get("weights_only"))


def load_weights(path: str | Path, model_state: dict[str, Any], model_cfg: ModelConfig) -> dict[str, Any]:
    """Fill ``model_state`` (``train.checkpoint.model_state(model, groups)``) from any of our checkpoints,
    reading no optimizer state (``checkpoint.init_from`` does this in the trainer). Returns its meta."""
    from train.checkpoint import load_model_weights

    return load_model_weights(path, model_state, model_cfg)
