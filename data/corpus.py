"""The corpus: where documents come from (report sec 4.1, documents are the unit of FIM and packing).

``data.source="stdlib"`` is the ``.py`` source of the running interpreter's standard library
(without test folders and site-packages), one document per file, sorted so every run sees the
same order. Otherwise ``data.source`` is a file, a directory or a glob of ``.txt``/``.md``/``.py``
files (one document per file), ``.jsonl``/``.json``/``.parquet`` files (one document per record,
field ``data.text_field``, read through ``datasets``), or a ``datasets.save_to_disk`` directory.
Bad files never stop a corpus: text and JSON files that are not UTF-8 text (invalid UTF-8, or NUL
bytes: binary) are skipped and listed in ``CorpusStats.skipped_files``, empty files in
``CorpusStats.empty_files``. A document longer than ``MAX_DOCUMENT_BYTES`` (a 200 MB file without a
newline, a huge record) is cut into documents of at most that many bytes, at the last newline before
the bound where there is one, else at a character boundary, and counted in
``CorpusStats.split_documents``; files are read in bounded blocks, so memory stays bounded whatever
the input. A source that yields no document at all, or a record file ``datasets`` cannot read, is a
``DataError`` naming the file.
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
MAX_DOCUMENT_BYTES = 1 << 20  # longer documents are cut into pieces of at most this many UTF-8 bytes
READ_BLOCK_BYTES = 1 << 20  # files are read this much at a time


@dataclass
class CorpusStats:
    """What one pass over the corpus saw: documents yielded, their UTF-8 bytes, files left out."""

    documents: int = 0
    bytes: int = 0
    skipped_files: list[str] = field(default_factory=list)  # not UTF-8 text: invalid UTF-8 or NUL bytes
    empty_files: list[str] = field(default_factory=list)
    split_documents: int = 0  # documents longer than MAX_DOCUMENT_BYTES, cut into pieces

    def skipped_summary(self) -> str:
        """'3 files skipped as not UTF-8 text, 1 empty, 2 long documents split' (only the non-zero parts)."""
        parts = []
        if self.skipped_files:
            parts.append(f"{len(self.skipped_files)} files skipped as not UTF-8 text (first: {self.skipped_files[0]})")
        if self.empty_files:
            parts.append(f"{len(self.empty_files)} empty files skipped")
        if self.split_documents:
            parts.append(f"{self.split_documents} documents over {MAX_DOCUMENT_BYTES} bytes split")
        return ", ".join(parts)


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


def _text_problem(path: Path) -> str | None:
    """Why a file is not usable as UTF-8 text ('empty', 'not UTF-8', 'binary'), or None; read in blocks."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    empty = True
    try:
        with open(path, "rb") as f:
            while block := f.read(READ_BLOCK_BYTES):
                empty = False
                if b"\0" in block:
                    return "binary"
                decoder.decode(block)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return "not UTF-8"
    except OSError as exc:
        raise DataError(f"data.source {path}: cannot read it ({exc.strerror or exc}); check its permissions") from exc
    return "empty" if empty else None


def _usable_text_file(path: Path, stats: CorpusStats) -> bool:
    """Whether ``path`` holds UTF-8 text; files that do not are recorded in ``stats``."""
    problem = _text_problem(path)
    if problem == "empty":
        stats.empty_files.append(str(path))
    elif problem is not None:
        stats.skipped_files.append(str(path))
    return problem is None


def _cut(buffer: bytearray | bytes, limit: int) -> int:
    """Where to end a piece of at most ``limit`` bytes of UTF-8 ``buffer``: after its last newline, else at the
    last character boundary."""
    newline = buffer.rfind(b"\n", 0, limit)
    if newline >= 0:
        return newline + 1
    cut = limit
    while cut > 0 and buffer[cut] & 0xC0 == 0x80:  # a continuation byte: step back to the character's start
        cut -= 1
    return cut


def split_document(text: str, stats: CorpusStats, limit: int = MAX_DOCUMENT_BYTES) -> Iterator[str]:
    """``text`` as it is, or, if longer than ``limit`` UTF-8 bytes, cut into pieces of at most ``limit``."""
    if len(text) * 4 <= limit or len(data := text.encode("utf-8")) <= limit:
        yield text
        return
    stats.split_documents += 1
    start = 0
    while len(data) - start > limit:
        cut = start + _cut(data[start: start + limit + 1], limit)
        yield data[start:cut].decode("utf-8")
        start = cut
    yield data[start:].decode("utf-8")


def _file_pieces(path: Path, stats: CorpusStats, limit: int = MAX_DOCUMENT_BYTES) -> Iterator[str]:
    """A UTF-8 text file as one document, or as pieces of at most ``limit`` bytes; read in bounded blocks."""
    buffer = bytearray()
    split = False
    try:
        with open(path, "rb") as f:
            while block := f.read(READ_BLOCK_BYTES):
                buffer += block
                while len(buffer) > limit:
                    cut = _cut(buffer, limit)
                    yield buffer[:cut].decode("utf-8")
                    del buffer[:cut]
                    split = True
        if buffer:
            yield buffer.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"data.source {path}: changed while being read (no longer UTF-8); keep the corpus unchanged "
                        "during preparation") from exc
    except OSError as exc:
        raise DataError(f"data.source {path}: cannot read it ({exc.strerror or exc}); check its permissions") from exc
    if split:
        stats.split_documents += 1


def _innermost_reason(exc: BaseException) -> str:
    """The first line of the innermost ``raise ... from`` cause of ``exc`` (datasets wraps the parser's error)."""
    seen = {id(exc)}
    while exc.__cause__ is not None and id(exc.__cause__) not in seen:
        exc = exc.__cause__
        seen.add(id(exc))
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _record_texts(path: Path, cfg: DataConfig, stats: CorpusStats) -> Iterator[str]:
    """Texts of field ``data.text_field`` of a jsonl/json/parquet file or a saved dataset."""
    if path.suffix.lower() in (".jsonl", ".json") and not _usable_text_file(path, stats):
        return
    if path.is_file() and path.stat().st_size == 0:  # an empty parquet file
        stats.empty_files.append(str(path))
        return
    import datasets
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from datasets.utils import logging as datasets_logging

    bars_were_off = are_progress_bars_disabled()
    verbosity = datasets_logging.get_verbosity()
    disable_progress_bars()  # both restored below: library-wide switches
    datasets_logging.set_verbosity(datasets_logging.CRITICAL + 1)  # its parse-error log lines: the error says it
    try:
        if path.is_dir():
            ds: Any = datasets.load_from_disk(str(path))
        else:
            builder = "parquet" if path.suffix.lower() == ".parquet" else "json"
            hf_cache = Path(cfg.cache_dir).expanduser() / "hf-datasets"
            ds = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=str(hf_cache))
    except Exception as exc:  # datasets raises many types; a bad file is the user's to fix
        raise DataError(f"data.source {path}: datasets cannot read it ({_innermost_reason(exc)}); check the file "
                        "format") from exc
    finally:
        datasets_logging.set_verbosity(verbosity)
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
    for text in _column_texts(ds.select_columns([name]), name, path):
        yield from split_document(text, stats)


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
        except Exception as exc:  # pyarrow / datasets: a damaged file found only while reading its rows
            raise DataError(f"data.source {path}: datasets cannot read its rows ({_innermost_reason(exc)}); check "
                            "the file format") from exc
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
    if _usable_text_file(path, stats):
        yield from _file_pieces(path, stats)


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
        skipped = f" ({stats.skipped_summary()})" if stats.skipped_files or stats.empty_files else ""
        raise DataError(f"data.source {cfg.source}: no non-empty document found{skipped}; point it at text data")
