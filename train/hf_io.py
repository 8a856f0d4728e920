"""Streaming conversion between DeepSeek-V3 / HF safetensors checkpoints and our DCP checkpoints.

``import_hf(HF_DIR, OUT)`` reads a DeepSeek-V3-format directory (``config.json`` + safetensors, sharded with
``model.safetensors.index.json`` or a single ``model.safetensors``; BF16 / FP16 / FP32 weights or DeepSeek's
FP8 weights with 128x128 ``weight_scale_inv`` block scales) and writes one of our checkpoints: a DCP
directory with ``meta.json`` that ``train.checkpoint.load_checkpoint`` loads, marked ``"weights_only": true``
(model weights only, step 0: no optimizer, data-loader or RNG state). ``export_hf(OUR_CKPT, OUT, dtype)``
writes the reverse: ``config.json`` (``config_to_hf``), safetensors shards of a bounded size, the index, and
for ``dtype="fp8"`` float8_e4m3fn weights with their ``weight_scale_inv`` and the ``quantization_config``
that transformers reads. Names come from the one table in ``train/hf.py`` (``to_hf_state_dict`` applied to
a meta-device model gives the whole on-disk layout; see ``hf_layout``).

Memory. Nothing holds the model. The import validates every name, shape and dtype from the safetensors
headers before it reads any data, then writes the DCP checkpoint with ONE ``dcp.save`` whose planner
(``_StreamingPlanner``) knows the tensors only as recipes: DCP's writer asks for each item when it writes
it (``resolve_data``), so one item is in memory at a time. Our routed experts are stacked per layer
([E, I, D]); they are saved as E chunks of [1, I, D] (as an expert-parallel save would store them), so
the largest item is one HF tensor, not one layer's experts. Source shards are read in order through
``safetensors.safe_open`` (mmap), one open at a time; its file pages count in RSS until the shard is
closed, so the bound is about one source shard plus one tensor. The export reads our checkpoint chunk
by chunk (the last chunk cached: our imports and expert-parallel saves store experts in small chunks; a
single-process trainer checkpoint stores a layer's stacked experts as one chunk, which is then the
read unit) and writes each safetensors shard tensor by tensor (``SafetensorsWriter``: the header is
known from the plan), so its bound is one stored chunk plus one output tensor, whatever the shard size.

Files: every written file's sha256 goes into ``manifest.json`` (``verify_manifest`` checks it). Both
directions write into ``.tmp-NAME`` beside the target and rename it when complete (an existing target
is replaced only with ``force``).

FP8 convention (DeepSeek's released weights, and ours): ``weight`` float8_e4m3fn [out, in],
``weight_scale_inv`` fp32 [ceil(out/128), ceil(in/128)], real = fp8 * scale_inv of its 128x128 block
(edge blocks cover only the rows / columns present). The import computes exactly that product in fp32
(``dequantize_fp8``); the export quantizes with ``fp8.quant.quantize_weight`` (scale = block amax / 448).
The export quantizes the linear weights DeepSeek quantizes (attention projections, dense FFN, shared
and routed experts, also inside the MTP block) and keeps the embedding, norms, MoE gate and its bias, the
head, ``eh_proj`` and the MTP copies of the embedding and head in BF16 (the gate bias in FP32).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import shutil
import struct
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
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

from train.config import ConfigError, ModelConfig
from train.errors import UserError
from train.hf import TOP_KEYS, config_from_hf, config_to_hf, to_hf_state_dict

MANIFEST = "manifest.json"
META_FILE = "meta.json"  # = train.checkpoint.META_FILE
FP8_BLOCK = (128, 128)
# The quantization_config of DeepSeek's released FP8 checkpoint; transformers' FineGrainedFP8 reads it.
FP8_QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                           "weight_block_size": list(FP8_BLOCK)}
DEFAULT_SHARD_BYTES = 5 * 1000**3  # transformers' classic default max_shard_size "5GB"

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
FP8_DTYPES = {"F8_E4M3", "F8_E5M2"}
SCALE_SUFFIX = "_scale_inv"  # "x.weight" -> "x.weight_scale_inv"

# Our keys whose HF tensors DeepSeek stores in FP8 (and our export quantizes): every linear of MLA, of the
# dense FFN, of the shared experts and of the routed experts, in main and MTP blocks. Not: the embedding,
# the head, norms, the MoE gate and its bias, eh_proj.
_FP8_OURS = re.compile(r"(layers\.\d+|mtp\.\d+\.block)\.(attn\.(wq|wq_a|wq_b|wkv_a|wkv_b|wo)\.weight"
                       r"|ffn\.(w1|w2|w3)\.weight|ffn\.shared_experts\.(w1|w2|w3)\.weight|ffn\.experts\.(w1|w2|w3))")
_STACKED = re.compile(r".*\.ffn\.experts\.w[123]")
_HF_EXPERT_INDEX = re.compile(r"\.mlp\.experts\.(\d+)\.")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.")


class ConvertError(UserError):
    """A checkpoint that cannot be converted; the message is one line naming the file or tensor."""


# --------------------------------------------------------------------------------------------------
# The on-disk layout, from train/hf.py's table


@dataclass(frozen=True)
class Entry:
    """One tensor of the HF on-disk layout and where it lives on our side."""

    hf: str  # HF name
    ours: str  # our state-dict key
    expert: int | None  # index into our stacked [E, ...] tensor; None: the whole tensor
    shape: tuple[int, ...]  # the HF tensor's shape
    copy: bool = False  # an MTP layer's copy of the shared embedding / head (no tensor of its own on our side)

    @property
    def fp8(self) -> bool:
        """DeepSeek stores this tensor in FP8 with a weight_scale_inv."""
        return not self.copy and _FP8_OURS.fullmatch(self.ours) is not None


def our_shapes(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Our state-dict keys -> (shape, dtype), from a meta-device build (nothing allocated)."""
    from train.model import Transformer

    with torch.device("meta"):
        return {k: (tuple(t.shape), t.dtype) for k, t in Transformer(cfg).state_dict().items()}


def hf_layout(cfg: ModelConfig) -> list[Entry]:
    """Every HF tensor of ``cfg``'s checkpoint, in file order (embedding, layer 0, ..., MTP layers, norm,
    head; a layer's routed experts grouped by projection). ``to_hf_state_dict`` of each meta tensor alone
    gives its HF names, so the names are those of the table in train/hf.py."""
    from train.model import Transformer

    with torch.device("meta"):
        state = Transformer(cfg).state_dict()
    entries: list[Entry] = []
    for ours, tensor in state.items():
        for hf, value in to_hf_state_dict({ours: tensor}, cfg).items():
            expert = None
            if _STACKED.fullmatch(ours):
                expert = int(_HF_EXPERT_INDEX.search(hf)[1])
            copy = ours in TOP_KEYS and hf != TOP_KEYS[ours]
            entries.append(Entry(hf, ours, expert, tuple(value.shape), copy))

    def rank(item: tuple[int, Entry]) -> tuple[int, int]:
        position, entry = item
        layer = _HF_LAYER.match(entry.hf)
        if layer is not None:
            return int(layer[1]), position
        return (-1 if entry.hf == TOP_KEYS["embed.weight"] else 1 << 30), position

    return [entry for _, entry in sorted(enumerate(entries), key=rank)]


# --------------------------------------------------------------------------------------------------
# Small helpers: sizes, memory, hashing, progress


def parse_size(text: str | int) -> int:
    """``"5GB"`` -> 5e9 bytes, ``"200KiB"`` -> 204800, ``1000`` -> 1000 (transformers' max_shard_size style)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
    if match is None:
        raise ConvertError(f"size {text!r}: expected a number of bytes with an optional unit, e.g. 5GB or 500MiB")
    base = 1024 if match[3] else 1000
    return int(float(match[1]) * base ** " KMGT".index(match[2].upper() or " "))


def _proc_status(field_name: str) -> int | None:
    """A ``/proc/self/status`` field in bytes (Linux), else None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class RssMeter:
    """Peak resident memory of this process during a block, from the kernel's high-water mark (VmHWM),
    which is reset at the start (``/proc/self/clear_refs``; Linux >= 4.0). ``growth`` = peak - RSS at the
    start: the memory the block itself needed. None where the kernel does not offer this."""

    def __init__(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.resettable = True
        except OSError:
            self.resettable = False
        self.start = _proc_status("VmRSS")

    @property
    def peak(self) -> int | None:
        return _proc_status("VmHWM") if self.resettable else None

    @property
    def growth(self) -> int | None:
        peak = self.peak
        return None if peak is None or self.start is None else max(0, peak - self.start)


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path, hashes: dict[str, str], info: dict[str, Any]) -> dict[str, Any]:
    """``manifest.json``: size and sha256 of every other file in ``directory`` (given or computed here)."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        name = path.relative_to(directory).as_posix()
        files[name] = {"bytes": path.stat().st_size, "sha256": hashes.get(name) or sha256_file(path)}
    manifest = {**info, "files": files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def verify_manifest(directory: str | Path) -> int:
    """Check every file listed in ``manifest.json`` (size and sha256) and that no file is unlisted; returns
    the number of files checked; raises ConvertError naming the first file that differs."""
    directory = Path(directory)
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConvertError(f"{directory}: unreadable {MANIFEST} ({err})") from None
    listed = manifest.get("files", {})
    present = {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST}
    if present - listed.keys():
        raise ConvertError(f"{directory}: files not in {MANIFEST}: {sorted(present - listed.keys())}")
    for name, item in listed.items():
        path = directory / name
        if not path.is_file():
            raise ConvertError(f"{directory}: {name} is listed in {MANIFEST} but missing")
        if path.stat().st_size != item["bytes"] or sha256_file(path) != item["sha256"]:
            raise ConvertError(f"{directory}: {name} does not match its sha256 in {MANIFEST}")
    return len(listed)


class Progress:
    """A byte-counting progress bar (rich) on stderr; silent when disabled."""

    def __init__(self, description: str, total: int, enabled: bool) -> None:
        self._progress = None
        self._lock = threading.Lock()
        if enabled:
            from rich.console import Console
            from rich.progress import (BarColumn, DownloadColumn, Progress as RichProgress, TextColumn,
                                       TimeRemainingColumn, TransferSpeedColumn)

            self._progress = RichProgress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                          TransferSpeedColumn(), TimeRemainingColumn(),
                                          console=Console(stderr=True), transient=False)
            self._task = self._progress.add_task(description, total=total)

    def __enter__(self) -> Progress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.stop()

    def advance(self, nbytes: int) -> None:
        if self._progress is not None:
            with self._lock:
                self._progress.advance(self._task, nbytes)


@contextlib.contextmanager
def _atomic_dir(out: Path, force: bool) -> Iterator[Path]:
    """Yield ``.tmp-NAME`` beside ``out``; rename it to ``out`` when the block completes (removed on error)."""
    if out.exists() and not force:
        raise ConvertError(f"{out}: already exists; choose another output directory or pass --force")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}"
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a crash of an earlier conversion
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return f"{shown}, ... ({len(names)} in all)" if len(names) > limit else shown


# --------------------------------------------------------------------------------------------------
# FP8 block scales


def fp8_scale_shape(shape: tuple[int, ...], block: tuple[int, int] = FP8_BLOCK) -> tuple[int, int]:
    """Shape of ``weight_scale_inv`` for a weight [out, in]: [ceil(out/128), ceil(in/128)]."""
    return (-(-shape[0] // block[0]), -(-shape[1] // block[1]))


def dequantize_fp8(weight: Tensor, scale_inv: Tensor, block: tuple[int, int] = FP8_BLOCK) -> Tensor:
    """fp32 ``weight.float() * scale_inv`` of each element's block (DeepSeek's ``weight_dequant``), edge
    blocks covering only the rows / columns present. One fp32 multiply per element, computed in place one
    row-block at a time (no expanded scale of the whole weight)."""
    rows, cols = weight.shape
    if tuple(scale_inv.shape) != fp8_scale_shape((rows, cols), block):
        raise ValueError(f"scale shape {list(scale_inv.shape)} != {list(fp8_scale_shape((rows, cols), block))}")
    out = weight.to(torch.float32, copy=True)
    scale = scale_inv.to(torch.float32)
    for i in range(scale.shape[0]):
        row_scale = scale[i].repeat_interleave(block[1])[:cols]
        out[i * block[0]:(i + 1) * block[0]].mul_(row_scale)
    return out


# --------------------------------------------------------------------------------------------------
# Reading a DeepSeek-V3 / HF safetensors directory


@dataclass(frozen=True)
class StoredTensor:
    file: Path
    file_index: int  # position of the file in the directory's shard order
    dtype: str  # safetensors dtype code ("BF16", "F8_E4M3", ...)
    shape: tuple[int, ...]
    offset: int  # byte offset of the data in the file

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * SAFETENSORS_DTYPES[self.dtype].itemsize


def read_safetensors_header(path: Path, file_index: int = 0) -> dict[str, StoredTensor]:
    """The tensors of one safetensors file (name -> dtype, shape, offset) from its header alone."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100 * 1024**2:
                raise ValueError(f"header length {length}")
            header = json.loads(f.read(length))
    except (OSError, ValueError, struct.error, UnicodeDecodeError) as err:
        raise ConvertError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err})") from None
    start = 8 + length
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in SAFETENSORS_DTYPES:
            raise ConvertError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')!r}")
        out[name] = StoredTensor(path, file_index, info["dtype"], tuple(info["shape"]), start + info["data_offsets"][0])
    return out


def _read_config(directory: Path) -> dict[str, Any]:
    if not directory.is_dir():
        raise ConvertError(f"{directory}: not a directory; expected a DeepSeek-V3 checkpoint directory "
                           "(config.json + *.safetensors)")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ConvertError(f"{directory}: no config.json; expected a DeepSeek-V3 checkpoint directory "
                           "(config.json + *.safetensors)")
    try:
        hf_config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConvertError(f"{config_path}: not valid JSON ({err})") from None
    if not isinstance(hf_config, dict):
        raise ConvertError(f"{config_path}: expected a JSON object")
    return hf_config


def model_config_from_hf(hf_config: dict[str, Any], where: str | Path) -> ModelConfig:
    """``config_from_hf`` with its errors as one line naming the file (a missing field: not DeepSeek-V3-shaped)."""
    try:
        return config_from_hf(hf_config)
    except ConfigError as err:
        raise ConvertError(f"{where}: not a DeepSeek-V3 config we can import: {err}") from None
    except KeyError as err:
        kind = hf_config.get("model_type", "unknown model_type")
        raise ConvertError(f"{where}: not a DeepSeek-V3 config (model_type {kind!r}): field {err} is missing") from None
    except (TypeError, ValueError) as err:
        raise ConvertError(f"{where}: not a DeepSeek-V3 config we can import: {err}") from None


def _fp8_block(hf_config: dict[str, Any], where: Path) -> tuple[int, int]:
    quant = hf_config.get("quantization_config")
    if not quant:
        return FP8_BLOCK
    method = quant.get("quant_method")
    if method != "fp8":
        raise ConvertError(f"{where}: quantization_config.quant_method={method!r} is not supported; only DeepSeek's "
                           "block-scaled fp8 (quant_method 'fp8') is")
    if quant.get("fmt", "e4m3") != "e4m3":
        raise ConvertError(f"{where}: quantization_config.fmt={quant.get('fmt')!r} is not supported; only e4m3")
    block = tuple(quant.get("weight_block_size") or FP8_BLOCK)
    if len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
        raise ConvertError(f"{where}: quantization_config.weight_block_size={list(block)} must be two positive ints")
    return block  # type: ignore[return-value]


class HFCheckpoint:
    """A DeepSeek-V3-format directory: its config, our ModelConfig, and where every tensor is stored.

    Opening reads only config.json, the index and the safetensors headers. ``read(name)`` returns one tensor
    as fp32 (FP8 ones multiplied by their block scales); files are opened with ``safe_open`` one at a time
    per thread (the previous one is closed when another is needed).
    """

    def __init__(self, path: str | Path, drop_mtp: bool = False) -> None:
        self.path = Path(path)
        self.hf_config = _read_config(self.path)
        self.cfg = model_config_from_hf(self.hf_config, self.path / "config.json")
        self.config_mtp_depth = self.cfg.mtp_depth
        if drop_mtp:
            self.cfg = dataclasses.replace(self.cfg, mtp_depth=0)
        self.drop_mtp = drop_mtp
        self.block = _fp8_block(self.hf_config, self.path / "config.json")
        self.files, self.tensors = self._index()
        self._local = threading.local()

    def _index(self) -> tuple[list[Path], dict[str, StoredTensor]]:
        index_path = self.path / "model.safetensors.index.json"
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as err:
                raise ConvertError(f"{index_path}: not a safetensors index with a weight_map ({err!r})") from None
            files = [self.path / name for name in sorted(set(weight_map.values()))]
        elif (self.path / "model.safetensors").is_file():
            weight_map, files = None, [self.path / "model.safetensors"]
        else:
            files = sorted(self.path.glob("*.safetensors"))
            weight_map = None
            if not files:
                raise ConvertError(f"{self.path}: no model.safetensors.index.json, model.safetensors or *.safetensors")
        tensors: dict[str, StoredTensor] = {}
        for i, file in enumerate(files):
            if not file.is_file():
                raise ConvertError(f"{index_path}: names shard {file.name}, which is missing")
            for name, stored in read_safetensors_header(file, i).items():
                if name in tensors:
                    raise ConvertError(f"{self.path}: tensor {name} is stored twice ({tensors[name].file.name} and "
                                       f"{file.name})")
                if weight_map is not None and weight_map.get(name) != file.name:
                    raise ConvertError(f"{index_path}: tensor {name} is in {file.name} but the index maps it to "
                                       f"{weight_map.get(name)}")
                tensors[name] = stored
        if weight_map is not None and weight_map.keys() - tensors.keys():
            lost = sorted(weight_map.keys() - tensors.keys())
            raise ConvertError(f"{index_path}: tensors in the index but in no shard: {_names(lost)}")
        return files, tensors

    def check(self, layout: list[Entry]) -> list[Entry]:
        """Validate names, shapes and dtypes against ``layout`` (headers only); return the entries to import
        (all but the MTP copies of the embedding / head, which ``check_copies`` compares)."""
        expected = {e.hf: e for e in layout}
        n_layers = self.cfg.n_layers
        ignored = set()
        if self.drop_mtp:
            ignored = {n for n in self.tensors if (m := _HF_LAYER.match(n)) and int(m[1]) >= n_layers}
        scales = {n for n in self.tensors if n.endswith(SCALE_SUFFIX) and n not in ignored}
        unexpected = sorted(n for n in self.tensors.keys() - expected.keys() - ignored
                            if not (n in scales and n.removesuffix(SCALE_SUFFIX) in self.tensors))
        if unexpected:
            hint = ""
            if all((m := _HF_LAYER.match(n)) and int(m[1]) >= n_layers for n in unexpected):
                hint = (f" (layers past num_hidden_layers={n_layers} + num_nextn_predict_layers="
                        f"{self.cfg.mtp_depth} are MTP layers the config does not declare)")
            raise ConvertError(f"{self.path}: {len(unexpected)} unexpected tensor(s): {_names(unexpected)}{hint}")
        missing = sorted(e.hf for e in layout if not e.copy and e.hf not in self.tensors)
        if missing:
            hint = ""
            if all((m := _HF_LAYER.match(n)) and int(m[1]) >= n_layers for n in missing):
                hint = (f" (the MTP layer(s) of num_nextn_predict_layers={self.cfg.mtp_depth} are absent, as in a "
                        "transformers save_pretrained: pass --drop-mtp to import without MTP)")
            raise ConvertError(f"{self.path}: {len(missing)} tensor(s) missing: {_names(missing)}{hint}")
        for name in sorted(expected.keys() & self.tensors.keys()):
            entry, stored = expected[name], self.tensors[name]
            if stored.shape != entry.shape:
                raise ConvertError(f"{stored.file}: tensor {name} has shape {list(stored.shape)}, expected "
                                   f"{list(entry.shape)}")
            if stored.dtype in FP8_DTYPES:
                scale = self.tensors.get(name + SCALE_SUFFIX)
                if scale is None:
                    raise ConvertError(f"{stored.file}: FP8 tensor {name} ({stored.dtype}) has no "
                                       f"{name + SCALE_SUFFIX}")
                if len(stored.shape) != 2:
                    raise ConvertError(f"{stored.file}: FP8 tensor {name} must be 2-D, has shape {list(stored.shape)}")
                want = fp8_scale_shape(stored.shape, self.block)
                if scale.shape != want or scale.dtype not in FLOAT_DTYPES:
                    raise ConvertError(f"{scale.file}: {name + SCALE_SUFFIX} has shape {list(scale.shape)} "
                                       f"{scale.dtype}, expected {list(want)} float for {list(stored.shape)} weights "
                                       f"in {self.block[0]}x{self.block[1]} blocks")
            elif stored.dtype not in FLOAT_DTYPES:
                raise ConvertError(f"{stored.file}: tensor {name} has dtype {stored.dtype}; expected a float dtype")
            elif name + SCALE_SUFFIX in self.tensors:
                raise ConvertError(f"{stored.file}: {name + SCALE_SUFFIX} scales a {stored.dtype} tensor; only FP8 "
                                   "tensors have scales")
        return [e for e in layout if not e.copy]

    # reading ------------------------------------------------------------------------------------

    def _handle(self, file: Path) -> Any:
        """This thread's open file: the previous one is closed (its mmap released) when another is needed."""
        from safetensors import safe_open

        local = self._local
        if getattr(local, "file", None) != file:
            local.handle = None  # drop the old mapping first
            local.handle = safe_open(str(file), framework="pt")
            local.file = file
        return local.handle

    def close(self) -> None:
        self._local.handle, self._local.file = None, None

    def raw(self, name: str) -> Tensor:
        stored = self.tensors[name]
        return self._handle(stored.file).get_tensor(name)

    def read(self, name: str) -> Tensor:
        """Tensor ``name`` as a fresh fp32 tensor; FP8 weights dequantized with their block scales."""
        stored = self.tensors[name]
        if stored.dtype in FP8_DTYPES:
            scale = self.tensors[name + SCALE_SUFFIX]
            scale_inv = self.raw(name + SCALE_SUFFIX) if scale.file == stored.file else None
            weight = self.raw(name)
            if scale_inv is None:  # scale in another shard (never in DeepSeek's release): switch files once more
                weight = weight.clone()
                scale_inv = self.raw(name + SCALE_SUFFIX)
            return dequantize_fp8(weight, scale_inv, self.block)
        tensor = self.raw(name)
        return tensor.to(torch.float32, copy=True)

    def source_bytes(self, name: str) -> int:
        stored = self.tensors[name]
        scale = self.tensors.get(name + SCALE_SUFFIX) if stored.dtype in FP8_DTYPES else None
        return stored.nbytes + (scale.nbytes if scale is not None else 0)

    def check_copies(self, layout: list[Entry]) -> int:
        """The MTP layers' copies of the embedding and head must equal the shared ones (they are dropped, as
        in ``from_hf_state_dict``). Returns the number compared."""
        main = {e.ours: e.hf for e in layout if e.ours in TOP_KEYS and not e.copy}
        compared = 0
        for entry in layout:
            if entry.copy and entry.hf in self.tensors:
                if self.tensors[entry.hf].dtype == self.tensors[main[entry.ours]].dtype:  # compare as stored
                    copy = self.raw(entry.hf).clone()  # cloned: the next read may switch files (unmapping this one)
                    equal = torch.equal(copy, self.raw(main[entry.ours]))
                else:
                    equal = torch.equal(self.read(entry.hf), self.read(main[entry.ours]))
                if not equal:
                    raise ConvertError(f"{self.tensors[entry.hf].file}: {entry.hf} should be a copy of the shared "
                                       f"{main[entry.ours]} but differs")
                compared += 1
        self.close()
        return compared


# --------------------------------------------------------------------------------------------------
# Writing our DCP checkpoint one item at a time


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


@dataclass
class ConvertStats:
    """What a conversion did, for the CLI's summary, the benchmark and the tests."""

    tensors: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    largest_item: int = 0  # bytes of the largest tensor produced: one DCP item (import) / one HF tensor (export)
    shard_bytes: int = 0  # largest source shard (import) / largest output shard (export)
    rss_start: int | None = None
    rss_peak: int | None = None
    files: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rss_growth(self) -> int | None:
        return None if self.rss_peak is None or self.rss_start is None else max(0, self.rss_peak - self.rss_start)

    def summary(self, what: str) -> str:
        gb = 1e9
        rate = self.bytes_read / self.seconds / gb if self.seconds else float("nan")
        rss = f"; peak RSS +{self.rss_growth / 2**20:,.0f} MiB" if self.rss_growth is not None else ""
        return (f"{what}: {self.tensors:,} tensors, {self.bytes_read / gb:.3f} GB read, "
                f"{self.bytes_written / gb:.3f} GB written in {self.files} files, {self.seconds:.1f} s "
                f"({rate:.2f} GB/s read){rss}")


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
        stats.files = len(manifest["files"])
        stats.bytes_written = sum(f["bytes"] for f in manifest["files"].values())
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
        from train.checkpoint import read_meta, read_metadata

        self.path = Path(path)
        if not self.path.is_dir():
            raise ConvertError(f"{self.path}: checkpoint directory not found")
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
        stats.files = len(manifest["files"])
        stats.bytes_written = sum(f["bytes"] for f in manifest["files"].values())
    stats.bytes_read = source.bytes_read
    stats.extra["largest_chunk"] = source.largest_chunk
    stats.rss_start, stats.rss_peak = meter.start, meter.peak
    return stats


__all__ = [
    "write_synthetic_hf",
    "ConvertError", "ConvertStats", "DcpCheckpoint", "Entry", "HFCheckpoint", "dequantize_fp8", "export_hf",
    "fp8_scale_shape", "hf_config_for_export", "hf_layout", "import_hf", "is_weights_only", "load_weights",
    "model_overrides", "our_shapes", "parse_size", "read_safetensors_header", "SafetensorsWriter", "verify_manifest",
]
