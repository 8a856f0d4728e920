"""The export of our DCP checkpoints as DeepSeek-V3 / HF safetensors directories (part of train/hf_io.py):
``DcpCheckpoint`` (our checkpoint opened for streaming reads), ``SafetensorsWriter``, ``hf_config_for_export``
and ``export_hf``. Shared pieces: train/hf_common.py.

Memory. The export reads our checkpoint chunk by chunk (the last chunk cached: our imports and
expert-parallel saves store experts in small chunks; a single-process trainer checkpoint stores a layer's
stacked experts as one chunk, which is then the read unit) and writes each safetensors shard tensor by
tensor (``SafetensorsWriter``: the header is known from the plan), so its bound is one stored chunk plus
one output tensor, whatever the shard size.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import struct
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from train.config import ModelConfig
from train.hf import config_to_hf
from train.hf_common import (
    FP8_BLOCK,
    META_FILE,
    SAFETENSORS_DTYPES,
    SCALE_SUFFIX,
    ConvertError,
    ConvertStats,
    Entry,
    Progress,
    RssMeter,
    _atomic_dir,
    _names,
    fp8_scale_shape,
    hf_layout,
    our_shapes,
    parse_size,
    write_manifest,
)

# The quantization_config of DeepSeek's released FP8 checkpoint; transformers' FineGrainedFP8 reads it.
FP8_QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                           "weight_block_size": list(FP8_BLOCK)}
DEFAULT_SHARD_BYTES = 5 * 1000**3  # transformers' classic default max_shard_size "5GB"


# --------------------------------------------------------------------------------------------------
# Reading our DCP checkpoint chunk by chunk


class _FileSlice(io.RawIOBase):
    """A read-only, seekable window [offset, offset + length) of an open file (what torch.load reads)."""

    def __init__(self, file: io.BufferedReader, offset: int, length: int) -> None:
        super().__init__()
        self.file, self.start, self.length, self.pos = file, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        self.pos = {io.SEEK_SET: pos, io.SEEK_CUR: self.pos + pos, io.SEEK_END: self.length + pos}[whence]
        return self.pos

    def readinto(self, buffer: Any) -> int:
        n = max(0, min(len(buffer), self.length - self.pos))
        if n == 0:
            return 0
        self.file.seek(self.start + self.pos)
        got = self.file.readinto(memoryview(buffer)[:n])
        self.pos += got
        return got


class DcpCheckpoint:
    """One of our checkpoints opened for streaming reads: its meta.json, ModelConfig and DCP metadata.

    ``read(key, expert)`` assembles our tensor ``key`` (or expert ``expert`` of a stacked one) from the
    stored chunks that overlap it, caching the last chunk read (so the experts of a layer stored as one
    chunk are read once)."""

    def __init__(self, path: str | Path) -> None:
        from train.checkpoint import latest_checkpoint, read_meta, read_metadata

        self.path = Path(path)
        if not self.path.is_dir():
            raise ConvertError(f"{self.path}: checkpoint directory not found")
        if not (self.path / META_FILE).is_file():  # a run directory: its newest complete checkpoint
            latest = latest_checkpoint(self.path)
            if latest is None:
                raise ConvertError(f"{self.path}: no complete checkpoint there (pass a checkpoint directory with "
                                   f"{META_FILE}, or a run directory with checkpoints/)")
            self.path = latest
        self.meta = read_meta(self.path)
        names = {f.name for f in dataclasses.fields(ModelConfig)}
        saved = self.meta.get("model")
        if not isinstance(saved, dict) or set(saved) - names:
            raise ConvertError(f"{self.path / META_FILE}: model config has unknown fields "
                               f"{sorted(set(saved or {}) - names)}")
        try:
            self.cfg = ModelConfig(**saved)
        except TypeError as err:
            raise ConvertError(f"{self.path / META_FILE}: bad model config ({err})") from None
        try:
            metadata = read_metadata(self.path)  # DCP's pickle through an unpickler that admits its classes only
        except Exception as err:  # noqa: BLE001
            raise ConvertError(f"{self.path}: unreadable DCP metadata ({type(err).__name__}: {err})") from None
        self.tensors = {k: v for k, v in metadata.state_dict_metadata.items() if hasattr(v, "chunks")}
        self.storage = {(index.fqn, tuple(index.offset or ())): info for index, info in metadata.storage_data.items()}
        self._cached: tuple[tuple[str, tuple[int, ...]], Tensor] | None = None
        self.bytes_read = 0
        self.largest_chunk = 0

    def check(self, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
        stored = {k[len("model."):]: v for k, v in self.tensors.items() if k.startswith("model.")}
        missing = sorted(shapes.keys() - stored.keys())
        if missing:
            raise ConvertError(f"{self.path}: {len(missing)} tensor(s) missing: {_names(missing)}")
        unexpected = sorted(stored.keys() - shapes.keys())
        if unexpected:
            raise ConvertError(f"{self.path}: {len(unexpected)} unexpected tensor(s): {_names(unexpected)}")
        for key, (shape, _) in shapes.items():
            if tuple(stored[key].size) != shape:
                raise ConvertError(f"{self.path}: tensor {key} has shape {list(stored[key].size)}, "
                                   f"expected {list(shape)}")

    def _chunk(self, fqn: str, offsets: tuple[int, ...]) -> Tensor:
        key = (fqn, offsets)
        if self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        self._cached = None  # free the previous chunk before reading the next
        info = self.storage.get(key)
        if info is None:
            raise ConvertError(f"{self.path}: chunk {list(offsets)} of {fqn} has no storage entry")
        if getattr(info, "transform_descriptors", None):
            raise ConvertError(f"{self.path}: {fqn} is stored with DCP transforms {info.transform_descriptors}; "
                               "not supported")
        with open(self.path / info.relative_path, "rb") as f:
            tensor = torch.load(io.BufferedReader(_FileSlice(f, info.offset, info.length)), map_location="cpu",
                                weights_only=True)
        self.bytes_read += info.length
        self.largest_chunk = max(self.largest_chunk, tensor.nbytes)
        self._cached = (key, tensor)
        return tensor

    def read(self, key: str, expert: int | None = None) -> Tensor:
        fqn = "model." + key
        item = self.tensors[fqn]
        size = tuple(item.size)
        lo = (expert,) + (0,) * (len(size) - 1) if expert is not None else (0,) * len(size)
        hi = (expert + 1,) + size[1:] if expert is not None else size
        region = tuple(h - l for l, h in zip(lo, hi))
        out: Tensor | None = None
        covered = 0
        for chunk in item.chunks:
            c_lo, c_size = tuple(chunk.offsets), tuple(chunk.sizes)
            a = tuple(max(x, y) for x, y in zip(lo, c_lo))
            b = tuple(min(x, y + s) for x, y, s in zip(hi, c_lo, c_size))
            if any(x >= y for x, y in zip(a, b)):
                continue
            data = self._chunk(fqn, c_lo)
            if c_lo == lo and c_size == region:  # the chunk is exactly the region: no copy
                out, covered = data, math.prod(region)
                break
            if out is None:
                out = torch.empty(region, dtype=data.dtype)
            src = data[tuple(slice(x - c, y - c) for x, y, c in zip(a, b, c_lo))]
            out[tuple(slice(x - l, y - l) for x, y, l in zip(a, b, lo))] = src
            covered += math.prod(y - x for x, y in zip(a, b))
        if out is None or covered != math.prod(region):
            what = f"expert {expert}" if expert is not None else "it"
            raise ConvertError(f"{self.path}: the stored chunks of {fqn} do not cover {what}")
        return out[0] if expert is not None else out


# --------------------------------------------------------------------------------------------------
# Export


EXPORT_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp8": torch.bfloat16}  # non-FP8 tensors in fp8 mode
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32"}
_SAFETENSORS_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}


def _out_specs(entry: Entry, dtype: str) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """The HF tensor(s) an entry becomes: an FP8 weight and its weight_scale_inv, or one tensor in the export
    dtype (the gate bias stays fp32, as in DeepSeek's release)."""
    if dtype == "fp8" and entry.fp8:
        return [(entry.hf, torch.float8_e4m3fn, entry.shape),
                (entry.hf + SCALE_SUFFIX, torch.float32, fp8_scale_shape(entry.shape))]
    target = torch.float32 if entry.ours.endswith("ffn.gate.bias") else EXPORT_DTYPES[dtype]
    return [(entry.hf, target, entry.shape)]


def _out_tensors(entry: Entry, tensor: Tensor, dtype: str) -> list[Tensor]:
    """The tensors of ``_out_specs(entry, dtype)``, in that order."""
    if dtype == "fp8" and entry.fp8:
        from fp8.quant import quantize_weight

        q = quantize_weight(tensor)
        return [q.data, q.scale]
    return [tensor.to(spec[1]) for spec in _out_specs(entry, dtype)]


def _nbytes(specs: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> int:
    return sum(math.prod(shape) * dtype.itemsize for _, dtype, shape in specs)


class SafetensorsWriter:
    """Writes a safetensors file whose tensors (names, dtypes, shapes) are known up front, one tensor at a
    time: the header first, then each tensor's bytes as it comes (``safetensors.torch.save_file`` instead
    needs them all at once and makes a bytes copy of each). sha256 is computed on the way."""

    def __init__(self, path: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None) -> None:
        header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        for name, dtype, shape in specs:
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": _SAFETENSORS_CODES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
        self.path, self.specs, self.next = path, specs, 0
        self.digest = hashlib.sha256()
        self.file = open(path, "wb")
        self._write(struct.pack("<Q", len(encoded)) + encoded)

    def _write(self, data: Any) -> None:
        self.file.write(data)
        self.digest.update(data)

    def write(self, name: str, tensor: Tensor) -> None:
        want = self.specs[self.next]
        if (name, tensor.dtype, tuple(tensor.shape)) != want:
            raise ConvertError(f"{self.path}: tensor {name} {tensor.dtype} {list(tensor.shape)} written where "
                               f"{want[0]} {want[1]} {list(want[2])} was planned")
        self._write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
        self.next += 1

    def close(self) -> str:
        if self.next != len(self.specs):
            raise ConvertError(f"{self.path}: {len(self.specs) - self.next} planned tensor(s) were not written")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        return self.digest.hexdigest()


def hf_config_for_export(cfg: ModelConfig, dtype: str) -> dict[str, Any]:
    """config.json of an export: ``config_to_hf`` plus the dtype and, for fp8, DeepSeek's quantization_config."""
    config = config_to_hf(cfg)
    name = _DTYPE_NAMES[EXPORT_DTYPES[dtype]]
    config.update({"torch_dtype": name, "dtype": name})
    if dtype == "fp8":
        config["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG)
    return config


def export_hf(ckpt_dir: str | Path, out_dir: str | Path, *, dtype: str = "bf16",
              max_shard_size: int | str = DEFAULT_SHARD_BYTES, progress: bool = False,
              force: bool = False) -> ConvertStats:
    """Export one of our checkpoints (any, trainer-written or imported) as a DeepSeek-V3-format directory
    that ``DeepseekV3ForCausalLM.from_pretrained`` loads: config.json, ``model-0000i-of-0000n.safetensors``
    of at most ``max_shard_size`` bytes of tensors each (a tensor larger than that gets a shard of its own)
    with ``model.safetensors.index.json``, or one ``model.safetensors``; ``manifest.json`` with sha256 sums.
    ``dtype``: ``bf16``, ``fp32`` or ``fp8`` (DeepSeek's FP8 weights with 128x128 block scales). Tensors are
    written one at a time (``SafetensorsWriter``): the memory bound is one tensor plus one stored chunk."""
    if dtype not in EXPORT_DTYPES:
        raise ConvertError(f"--dtype {dtype!r}: expected one of {sorted(EXPORT_DTYPES)}")
    shard_limit = parse_size(max_shard_size)
    if shard_limit <= 0:
        raise ConvertError(f"--max-shard-size {max_shard_size!r}: must be positive")
    start = time.perf_counter()
    source = DcpCheckpoint(ckpt_dir)
    cfg = source.cfg
    source.check(our_shapes(cfg))
    layout = hf_layout(cfg)

    shards: list[list[Entry]] = []
    sizes: list[int] = []
    for entry in layout:  # greedy in file order; a tensor larger than the limit gets a shard of its own
        nbytes = _nbytes(_out_specs(entry, dtype))
        if not shards or (sizes[-1] + nbytes > shard_limit and shards[-1]):
            shards.append([])
            sizes.append(0)
        shards[-1].append(entry)
        sizes[-1] += nbytes
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    out = Path(out_dir)
    hashes: dict[str, str] = {}
    weight_map: dict[str, str] = {}
    total = sum(sizes)
    meter = RssMeter()  # memory of the data phase (the plan above is metadata)
    stats = ConvertStats(shard_bytes=max(sizes))
    with _atomic_dir(out, force) as tmp, Progress(f"export {out.name} ({dtype})", total, progress) as bar:
        for name, entries in zip(names, shards):
            specs = [spec for entry in entries for spec in _out_specs(entry, dtype)]
            writer = SafetensorsWriter(tmp / name, specs)
            try:
                for entry in entries:
                    outs = _out_tensors(entry, source.read(entry.ours, entry.expert), dtype)
                    for (hf, _, _), tensor in zip(_out_specs(entry, dtype), outs):
                        writer.write(hf, tensor)
                        stats.largest_item = max(stats.largest_item, tensor.nbytes)
                        weight_map[hf] = name
                    del outs, tensor  # before the next entry is read
                    bar.advance(_nbytes(_out_specs(entry, dtype)))
            finally:
                hashes[name] = writer.close() if writer.next == len(specs) else (writer.file.close() or "")
            stats.tensors += len(specs)
        source._cached = None
        if n > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(hf_config_for_export(cfg, dtype), indent=2))
        stats.seconds = time.perf_counter() - start
        manifest = write_manifest(tmp, hashes, {"kind": "DeepSeek-V3 safetensors checkpoint",
                                                "tool": "launch/convert.py export", "dtype": dtype,
                                                "source": {"path": str(Path(ckpt_dir).resolve()),
                                                           "step": source.meta.get("step"),
                                                           "tokens": source.meta.get("tokens")}})
        stats.count_written(manifest)
    stats.bytes_read = source.bytes_read
    stats.extra["largest_chunk"] = source.largest_chunk
    stats.rss_start, stats.rss_peak = meter.start, meter.peak
    return stats
