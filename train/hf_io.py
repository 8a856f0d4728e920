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

The code is in four modules, re-exported here (``from train.hf_io import X`` / ``hf_io.X`` for all of them):

* train/hf_common.py: the shared pieces: ``ConvertError``, the on-disk layout (``Entry``, ``hf_layout``,
  ``our_shapes``), sizes, memory, hashing and progress (``parse_size``, ``RssMeter``, ``sha256_file``,
  ``write_manifest``, ``verify_manifest``, ``Progress``), FP8 block scales (``fp8_scale_shape``,
  ``dequantize_fp8``), ``ConvertStats`` and the constants; the manifest and the FP8 convention are described
  there.
* train/hf_read.py: reading a DeepSeek-V3 / HF safetensors directory (``HFCheckpoint``,
  ``read_safetensors_header``, ``model_config_from_hf``).
* train/hf_import.py: the streaming import into our DCP format (``import_hf``; ``write_synthetic_hf``,
  ``model_overrides``, ``is_weights_only``, ``load_weights``), and its memory bound.
* train/hf_export.py: reading our DCP checkpoint chunk by chunk (``DcpCheckpoint``) and the export
  (``SafetensorsWriter``, ``hf_config_for_export``, ``export_hf``), and its memory bound.

Memory. Nothing holds the model: the import writes one DCP item at a time (about one source shard plus one
tensor in memory), the export one output tensor plus one stored chunk, whatever the shard size.
"""

from __future__ import annotations

# ruff: noqa: F401  (the names below are this module's API: re-exported from its parts)
from train.hf_common import (
    FLOAT_DTYPES,
    FP8_BLOCK,
    FP8_DTYPES,
    MANIFEST,
    META_FILE,
    SAFETENSORS_DTYPES,
    SCALE_SUFFIX,
    ConvertError,
    ConvertStats,
    Entry,
    Progress,
    RssMeter,
    dequantize_fp8,
    fp8_scale_shape,
    hf_layout,
    our_shapes,
    parse_size,
    sha256_file,
    verify_manifest,
    write_manifest,
)
from train.hf_export import (
    DEFAULT_SHARD_BYTES,
    EXPORT_DTYPES,
    FP8_QUANTIZATION_CONFIG,
    DcpCheckpoint,
    SafetensorsWriter,
    export_hf,
    hf_config_for_export,
)
from train.hf_import import import_hf, is_weights_only, load_weights, model_overrides, write_synthetic_hf
from train.hf_read import HFCheckpoint, StoredTensor, model_config_from_hf, read_safetensors_header

__all__ = [
    "write_synthetic_hf",
    "ConvertError", "ConvertStats", "DcpCheckpoint", "Entry", "HFCheckpoint", "dequantize_fp8", "export_hf",
    "fp8_scale_shape", "hf_config_for_export", "hf_layout", "import_hf", "is_weights_only", "load_weights",
    "model_overrides", "our_shapes", "parse_size", "read_safetensors_header", "SafetensorsWriter", "verify_manifest",
]
