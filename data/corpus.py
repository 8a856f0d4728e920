"""The corpus: where documents come from (report sec 4.1, documents are the unit of FIM and packing).

``data.source="stdlib"`` is the ``.py`` source of the running interpreter's standard library
(without test folders and site-packages), one document per file, sorted so every run sees the
same order. Otherwise ``data.source`` is a file, a directory or a glob of ``.txt``/``.md``/``.py``
files (one document per file), ``.jsonl``/``.json``/``.parquet`` files (one document per record,
field ``data.text_field``, read through ``datasets``), or a ``datasets.save_to_disk`` directory.
Files that are not valid UTF-8 are skipped and counted in ``CorpusStats.skipped_files``.
"""

from __future__ import annotations

import codecs
import glob
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from train.config import DataConfig
from train.errors import DataError

TEXT_SUFFIXES = (".txt", ".md", ".py")
RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")
SUPPORTED = ("a .txt/.md/.py/.jsonl/.json/.parquet file, a directory or glob of them, a datasets save_to_disk "
             "directory, or 'stdlib'")
STDLIB_SKIPPED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


@dataclass
class CorpusStats:
    """What one pass over the corpus saw: documents yielded, their UTF-8 bytes, skipped files."""

    documents: int = 0
    bytes: int = 0
    skipped_files: list[str] = field(default_factory=list)


def stdlib_files() -> list[Path]:
    """The standard library's .py files, sorted; folders named test/tests/idle_test and site-packages excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_SKIPPED_DIRS]
        files.extend(Path(dirpath) / name for name in filenames if name.endswith(".py"))
    return sorted(files)


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in ("state.json", "dataset_dict.json"))


def _is_supported_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in TEXT_SUFFIXES + RECORD_SUFFIXES


def _files_under(directory: Path) -> list[Path]:
    """Supported files below a plain directory, sorted; hidden files and folders are left out."""
    files = []
    for path in directory.rglob("*"):
        hidden = any(part.startswith(".") for part in path.relative_to(directory).parts)
        if not hidden and _is_supported_file(path):
            files.append(path)
    return sorted(files)


def resolve_source(cfg: DataConfig) -> list[Path]:
    """The files (or saved-dataset directories) of ``data.source``, in reading order."""
    if cfg.source == "stdlib":
        return stdlib_files()
    path = Path(cfg.source).expanduser()
    if path.is_file():
        if not _is_supported_file(path):
            raise DataError(f"data.source {path}: unsupported file type '{path.suffix}'; give {SUPPORTED}")
        return [path]
    if _is_saved_dataset(path):
        return [path]
    if path.is_dir():
        files = _files_under(path)
        if not files:
            raise DataError(f"data.source {path}: the directory holds no supported files; give {SUPPORTED}")
        return files
    if any(c in cfg.source for c in "*?["):
        matches = [Path(p) for p in glob.glob(str(path), recursive=True)]
        found = sorted(p for p in matches if _is_supported_file(p) or _is_saved_dataset(p))
        if not found:
            raise DataError(f"data.source {cfg.source}: the glob matches no supported file; give {SUPPORTED}")
        return found
    raise DataError(f"data.source {path}: no such file or directory; give {SUPPORTED}")


def _is_utf8(path: Path) -> bool:
    """Whether a file decodes as UTF-8, checked in 1 MiB pieces."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(path, "rb") as f:
            while piece := f.read(1 << 20):
                decoder.decode(piece)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def _record_texts(path: Path, cfg: DataConfig, stats: CorpusStats) -> Iterator[str]:
    """Texts of field ``data.text_field`` of a jsonl/json/parquet file or a saved dataset."""
    if path.suffix.lower() in (".jsonl", ".json") and not _is_utf8(path):
        stats.skipped_files.append(str(path))
        return
    import datasets
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    bars_were_off = are_progress_bars_disabled()
    disable_progress_bars()  # restored below: datasets' bars are a library-wide switch
    try:
        if path.is_dir():
            ds: Any = datasets.load_from_disk(str(path))
        else:
            builder = "parquet" if path.suffix.lower() == ".parquet" else "json"
            hf_cache = Path(cfg.cache_dir).expanduser() / "hf-datasets"
            ds = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=str(hf_cache))
    except Exception as exc:  # datasets raises many types; a bad file is the user's to fix
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"data.source {path}: datasets cannot read it ({reason}); check the file format") from exc
    finally:
        if not bars_were_off:
            enable_progress_bars()
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"data.source {path}: saved DatasetDict has no 'train' split (splits: {', '.join(ds)})")
        ds = ds["train"]
    name = cfg.text_field
    if name not in ds.column_names:
        raise DataError(f"data.source {path}: records have no field '{name}' (fields: {', '.join(ds.column_names)}); "
                        "set data.text_field=NAME")
    yield from _column_texts(ds.select_columns([name]), name, path)


def _column_texts(ds: Any, name: str, path: Path) -> Iterator[str]:
    """Non-null strings of column ``name``, read 1024 rows at a time."""
    batches = ds.iter(batch_size=1024)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except UnicodeDecodeError as exc:  # binary formats may hold bytes that are not UTF-8
            raise DataError(f"data.source {path}: field '{name}' holds text that is not valid UTF-8 ({exc}); "
                            "fix or remove the file") from exc
        for text in batch[name]:
            if text is None:
                continue
            if not isinstance(text, str):
                raise DataError(f"data.source {path}: field '{name}' holds {type(text).__name__}, not text; "
                                "set data.text_field to a string field")
            yield text


def _texts_of(path: Path, cfg: DataConfig, stats: CorpusStats) -> Iterator[str]:
    if path.is_dir() or path.suffix.lower() in RECORD_SUFFIXES:
        yield from _record_texts(path, cfg, stats)
        return
    try:
        yield path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        stats.skipped_files.append(str(path))


def take_bytes(texts: Iterable[str], limit: int, stats: CorpusStats | None = None) -> Iterator[str]:
    """Non-empty texts until ``limit`` UTF-8 bytes (0 = no limit); the last one is cut to fit."""
    stats = stats if stats is not None else CorpusStats()
    for text in texts:
        if not text:
            continue
        size = len(text.encode("utf-8"))
        if limit > 0 and stats.bytes + size > limit:
            text = text.encode("utf-8")[: limit - stats.bytes].decode("utf-8", errors="ignore")
            size = len(text.encode("utf-8"))
            if not text:
                return
        stats.documents += 1
        stats.bytes += size
        yield text
        if limit > 0 and stats.bytes >= limit:
            return


def iter_documents(cfg: DataConfig, stats: CorpusStats | None = None) -> Iterator[str]:
    """The corpus's non-empty documents in a fixed order, at most ``data.max_bytes`` bytes of them.

    ``stats`` (optional) is filled as the iterator advances: documents, bytes, skipped files.
    Raises DataError for a missing source or a corpus without any non-empty document.
    """
    stats = stats if stats is not None else CorpusStats()
    paths = resolve_source(cfg)
    texts = (text for path in paths for text in _texts_of(path, cfg, stats))
    yield from take_bytes(texts, cfg.max_bytes, stats)
    if stats.documents == 0:
        skipped = f" ({len(stats.skipped_files)} files skipped as not UTF-8)" if stats.skipped_files else ""
        raise DataError(f"data.source {cfg.source}: no non-empty document found{skipped}; point it at text data")
