"""Reading a DeepSeek-V3 / HF safetensors directory (part of train/hf_io.py): ``HFCheckpoint`` opens one
from its config.json, index and safetensors headers alone, validates every name, shape and dtype against
``hf_layout`` before any data is read, and reads one tensor at a time as fp32 (FP8 weights multiplied by
their block scales, ``dequantize_fp8``). Shared pieces: train/hf_common.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from train.config import ConfigError, ModelConfig
from train.hf import TOP_KEYS, config_from_hf
from train.hf_common import (
    _HF_LAYER,
    FLOAT_DTYPES,
    FP8_BLOCK,
    FP8_DTYPES,
    SAFETENSORS_DTYPES,
    SCALE_SUFFIX,
    ConvertError,
    Entry,
    _names,
    dequantize_fp8,
    fp8_scale_shape,
)


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
