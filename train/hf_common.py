"""Shared pieces of the Hugging Face DeepSeek-V3 conversion (train/hf_io.py; the parts: train/hf_read.py,
train/hf_import.py, train/hf_export.py): the on-disk layout from train/hf.py's table (``Entry``, ``hf_layout``),
sizes, memory, hashing, progress, the manifest, FP8 block scales, and ``ConvertStats``.

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
import hashlib
import json
import os
import re
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from train.config import ModelConfig
from train.errors import UserError
from train.hf import TOP_KEYS, to_hf_state_dict

MANIFEST = "manifest.json"
META_FILE = "meta.json"  # = train.checkpoint.META_FILE
FP8_BLOCK = (128, 128)

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
# What a conversion did


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

    def count_written(self, manifest: dict[str, Any]) -> None:
        """Files and bytes written, from the output's manifest (``{"files": {name: {"bytes": n}}}``)."""
        self.files = len(manifest["files"])
        self.bytes_written = sum(f["bytes"] for f in manifest["files"].values())

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
