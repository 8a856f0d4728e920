"""Preparation: corpus -> tokenizer -> FIM -> one EOS-joined uint32 token stream on disk (report sec 4.1).

The output directory ``<data.cache_dir>/tokens-<hash>/`` holds

    tokens.bin       raw little-endian uint32 tokens; every document is followed by EOS
    doc_offsets.npy  uint64 start of each document in tokens.bin
    tokenizer.json   the tokenizer that made them
    index.json       counts, dtype, vocab size, settings, the hash, the files' SHA-256 sums and its own
                     (written last)

The hash covers the document text read, in order, and every setting that changes the tokens, so a
second call with the same inputs rereads and hashes the corpus and returns (a cache hit). A cache hit
is trusted only after its index.json matches its own checksum and the hash it is filed under, and the
three files match their sizes and SHA-256 sums (a truncated, replaced or edited file is a DataError
naming the directory to delete; rereading the files costs about as much as rehashing the corpus). A
directory is built under a temporary sibling name and renamed when complete: a crash never leaves a
half directory under the final name, and a complete one is never overwritten. Under
torch.distributed, rank 0 prepares while the other ranks wait, then they open its result.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from data.corpus import CorpusStats, iter_documents, take_bytes
from data.fim import EncodedChunk, encode_documents
from data.tokenizer import (SpecialTokens, check_vocab_fits, for_encoding, load_tokenizer, tokenizer_file,
                            tokenizer_vocab_size, train_tokenizer)
from tokenizers import Tokenizer
from train.config import DataConfig
from train.errors import DataError, UserError

FORMAT_VERSION = 2  # 2: checksums in index.json
TOKENS_FILE = "tokens.bin"
OFFSETS_FILE = "doc_offsets.npy"
TOKENIZER_FILE = "tokenizer.json"
INDEX_FILE = "index.json"
TOKEN_DTYPE = np.dtype("<u4")
CHUNK_BYTES = 256 * 1024  # text per worker task


@dataclass
class PreparedData:
    """A complete prepared directory and what it holds."""

    directory: Path
    tokens_path: Path
    offsets_path: Path
    tokenizer_path: Path
    n_tokens: int
    n_documents: int
    n_fim: int
    n_bytes: int  # UTF-8 bytes of document text tokenized
    skipped_files: list[str]
    tokenizer_vocab_size: int
    cache_hit: bool = False
    seconds: float = 0.0  # time this call took
    empty_files: list[str] = field(default_factory=list)
    split_documents: int = 0  # documents over data/corpus.py MAX_DOCUMENT_BYTES, cut into pieces


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _index_sha256(index: dict[str, Any]) -> str:
    """SHA-256 of index.json's content without its own checksum field (keys sorted)."""
    body = {key: value for key, value in index.items() if key != "index_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _untrusted(directory: Path, what: str) -> DataError:
    return DataError(f"{directory}: {what}; the prepared data cannot be trusted: delete {directory} and run again")


def open_prepared(directory: str | Path, cache_hit: bool = True, key: str | None = None,
                  verify_files: bool = False) -> PreparedData:
    """Open a complete prepared directory; DataError if it is incomplete, damaged or edited.

    Always checked: index.json against its own checksum and format version, the token file's size, the
    offsets' length. ``key``: the hash the directory must have been built for. ``verify_files``: also the
    SHA-256 sums of the token, offsets and tokenizer files (reads them whole).
    """
    directory = Path(directory)
    index_path = directory / INDEX_FILE
    tokens_path = directory / TOKENS_FILE
    try:
        index = json.loads(index_path.read_text())
        prepared = PreparedData(
            directory=directory, tokens_path=tokens_path, offsets_path=directory / OFFSETS_FILE,
            tokenizer_path=directory / TOKENIZER_FILE, n_tokens=int(index["n_tokens"]),
            n_documents=int(index["n_documents"]), n_fim=int(index["n_fim"]), n_bytes=int(index["n_bytes"]),
            skipped_files=list(index["skipped_files"]), tokenizer_vocab_size=int(index["tokenizer_vocab_size"]),
            cache_hit=cache_hit, empty_files=list(index["empty_files"]), split_documents=int(index["split_documents"]))
        stored_sha, checksums = index["index_sha256"], dict(index["checksums"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"{index_path}: missing or unreadable ({type(exc).__name__}: {exc}); delete {directory} "
                        "and prepare again") from exc
    if index.get("format_version") != FORMAT_VERSION:
        raise _untrusted(directory, f"format version {index.get('format_version')}, not {FORMAT_VERSION}")
    if stored_sha != _index_sha256(index):
        raise _untrusted(directory, f"{INDEX_FILE} does not match its index_sha256 (edited or damaged)")
    if key is not None and index.get("hash") != key:
        raise _untrusted(directory, f"{INDEX_FILE} was made from other data or settings (hash {index.get('hash')}, "
                                    f"not {key})")
    expected = prepared.n_tokens * TOKEN_DTYPE.itemsize
    if not tokens_path.is_file() or tokens_path.stat().st_size != expected:
        raise DataError(f"{tokens_path}: missing or not {expected} bytes as index.json says; delete {directory} "
                        "and prepare again")
    try:
        offsets = np.load(prepared.offsets_path, mmap_mode="r", allow_pickle=False)
        offsets_ok = offsets.dtype == np.uint64 and offsets.shape == (prepared.n_documents,)
    except (OSError, ValueError) as exc:
        raise _untrusted(directory, f"{OFFSETS_FILE} is unreadable ({exc})") from exc
    if not offsets_ok:
        raise _untrusted(directory, f"{OFFSETS_FILE} does not hold {prepared.n_documents} uint64 offsets")
    if verify_files:
        for name in (TOKENS_FILE, OFFSETS_FILE, TOKENIZER_FILE):
            path = directory / name
            if not path.is_file() or _file_sha256(path) != checksums.get(name):
                raise _untrusted(directory, f"{name} is missing or does not match its SHA-256 in {INDEX_FILE}")
    return prepared


def _check_settings(cfg: DataConfig) -> None:
    """The data fields train/config.py's validate does not check."""
    for name, zero in (("max_bytes", "no limit"), ("tokenizer_train_bytes", "no limit"), ("workers", "all cores")):
        if getattr(cfg, name) < 0:
            raise DataError(f"data.{name} ({getattr(cfg, name)}) must be >= 0 (0 = {zero})")


def _settings(cfg: DataConfig, vocab_size: int, seed: int) -> dict[str, Any]:
    tokenizer = str(Path(cfg.tokenizer).expanduser().resolve()) if cfg.tokenizer else ""
    return {"format_version": FORMAT_VERSION, "vocab_size": vocab_size, "fim_rate": cfg.fim_rate, "seed": seed,
            "tokenizer": tokenizer, "max_bytes": cfg.max_bytes, "tokenizer_train_bytes": cfg.tokenizer_train_bytes}


def cache_key(cfg: DataConfig, vocab_size: int, seed: int, stats: CorpusStats | None = None) -> str:
    """SHA-256 of the settings, the tokenizer file's bytes and the documents read, in order."""
    digest = hashlib.sha256(json.dumps(_settings(cfg, vocab_size, seed), sort_keys=True).encode())
    if cfg.tokenizer:
        digest.update(tokenizer_file(cfg.tokenizer).read_bytes())
    for text in iter_documents(cfg, stats):
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


# --- tokenizing in worker processes ------------------------------------------------------------

_worker_encoder: _ChunkEncoder | None = None  # set only inside pool worker processes


@dataclass
class _ChunkEncoder:
    tok: Tokenizer
    specials: SpecialTokens
    seed: int
    fim_rate: float

    @classmethod
    def load(cls, tokenizer_path: str, seed: int, fim_rate: float) -> _ChunkEncoder:
        tok = for_encoding(Tokenizer.from_file(tokenizer_path))
        return cls(tok, SpecialTokens.of(tok, tokenizer_path), seed, fim_rate)

    def __call__(self, chunk: tuple[int, list[str]]) -> EncodedChunk:
        first_index, texts = chunk
        return encode_documents(self.tok, self.specials, texts, first_index, self.seed, self.fim_rate)


def _init_worker(tokenizer_path: str, seed: int, fim_rate: float) -> None:
    global _worker_encoder
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per process: the pool is the parallelism
    _worker_encoder = _ChunkEncoder.load(tokenizer_path, seed, fim_rate)


def _encode_in_worker(chunk: tuple[int, list[str]]) -> EncodedChunk:
    assert _worker_encoder is not None, "pool initializer did not run"
    return _worker_encoder(chunk)


def _chunks(texts: Iterator[str]) -> Iterator[tuple[int, list[str]]]:
    """(index of the first document, documents) groups of about CHUNK_BYTES of text."""
    first, batch, size = 0, [], 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= CHUNK_BYTES:
            yield first, batch
            first, batch, size = first + len(batch), [], 0
    if batch:
        yield first, batch


def encode_corpus(cfg: DataConfig, tokenizer_path: Path, seed: int, workers: int,
                  stats: CorpusStats | None = None) -> Iterator[EncodedChunk]:
    """Encoded chunks of the corpus in order; ``workers`` > 1 spreads them over a process pool."""
    chunks = _chunks(iter_documents(cfg, stats))
    if workers <= 1:
        encoder = _ChunkEncoder.load(str(tokenizer_path), seed, cfg.fim_rate)
        yield from map(encoder, chunks)
        return
    context = multiprocessing.get_context("spawn")  # fresh workers: no forked tokenizer threads or torch state
    with context.Pool(workers, initializer=_init_worker, initargs=(str(tokenizer_path), seed, cfg.fim_rate)) as pool:
        pending: deque = deque()
        for chunk in chunks:  # at most 2 tasks per worker in flight: memory stays bounded
            pending.append(pool.apply_async(_encode_in_worker, (chunk,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# --- building a directory ----------------------------------------------------------------------

def _fsync_write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _build(tmp: Path, cfg: DataConfig, vocab_size: int, seed: int, key: str, total: CorpusStats,
           progress: Progress) -> None:
    """Write tokenizer.json, tokens.bin, doc_offsets.npy and, last, index.json into ``tmp``."""
    tokenizer_path = tmp / TOKENIZER_FILE
    if cfg.tokenizer:
        tok = load_tokenizer(cfg.tokenizer)
        shutil.copyfile(tokenizer_file(cfg.tokenizer), tokenizer_path)
    else:
        task = progress.add_task("training tokenizer", total=None)
        tok = train_tokenizer(take_bytes(iter_documents(cfg), cfg.tokenizer_train_bytes), vocab_size)
        tok.save(str(tokenizer_path))
        progress.update(task, total=1, completed=1)
        if tokenizer_vocab_size(tok) < vocab_size:
            progress.console.print(f"warning: the corpus only supports {tokenizer_vocab_size(tok)} BPE tokens, not "
                                   f"model.vocab_size ({vocab_size}); add data or lower model.vocab_size",
                                   markup=False, highlight=False, soft_wrap=True)
    check_vocab_fits(tok, vocab_size)
    n_chunks = -(-total.bytes // CHUNK_BYTES)
    workers = max(1, min(cfg.workers or os.cpu_count() or 1, n_chunks))  # no idle worker start-ups

    stats = CorpusStats()
    lengths, n_tokens, n_fim = [], 0, 0
    tokens_sha = hashlib.sha256()
    task = progress.add_task("tokenizing documents", total=total.documents)
    with open(tmp / TOKENS_FILE, "wb") as out:
        for chunk in encode_corpus(cfg, tokenizer_path, seed, workers, stats):
            data = chunk.tokens.astype(TOKEN_DTYPE, copy=False).tobytes()
            out.write(data)
            tokens_sha.update(data)
            lengths.append(chunk.doc_lengths)
            n_tokens += len(chunk.tokens)
            n_fim += chunk.n_fim
            progress.advance(task, len(chunk.doc_lengths))
        out.flush()
        os.fsync(out.fileno())
    doc_lengths = np.concatenate(lengths)
    offsets = np.zeros(len(doc_lengths), dtype=np.uint64)
    offsets[1:] = np.cumsum(doc_lengths[:-1])
    np.save(tmp / OFFSETS_FILE, offsets)
    index = {
        "format_version": FORMAT_VERSION, "hash": key, "n_tokens": n_tokens, "n_documents": len(doc_lengths),
        "n_fim": n_fim, "n_bytes": stats.bytes, "dtype": "uint32", "byte_order": "little",
        "tokenizer_vocab_size": tokenizer_vocab_size(tok), "skipped_files": stats.skipped_files,
        "empty_files": stats.empty_files, "split_documents": stats.split_documents,
        "settings": {**_settings(cfg, vocab_size, seed), "source": cfg.source, "text_field": cfg.text_field},
        "files": {"tokens": TOKENS_FILE, "doc_offsets": OFFSETS_FILE, "tokenizer": TOKENIZER_FILE},
        "checksums": {TOKENS_FILE: tokens_sha.hexdigest(), OFFSETS_FILE: _file_sha256(tmp / OFFSETS_FILE),
                      TOKENIZER_FILE: _file_sha256(tokenizer_path)},
    }
    index["index_sha256"] = _index_sha256(index)
    _fsync_write(tmp / INDEX_FILE, json.dumps(index, indent=1) + "\n")


def _remove_dead_temporaries(root: Path) -> None:
    """Delete temporary directories left on this host by preparations whose process is gone."""
    host = socket.gethostname()
    for path in root.glob(f".tmp-*-{host}-*"):
        try:
            os.kill(int(path.name.rsplit("-", 1)[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except (ValueError, PermissionError):
            pass  # not ours to judge: keep it


def _prepare_here(cfg: DataConfig, vocab_size: int, seed: int) -> PreparedData:
    """Prepare in this process, or open the complete directory the inputs hash to."""
    start = time.perf_counter()
    _check_settings(cfg)
    total = CorpusStats()
    key = cache_key(cfg, vocab_size, seed, total)
    root = Path(cfg.cache_dir).expanduser()
    final = root / f"tokens-{key[:20]}"
    if (final / INDEX_FILE).is_file():
        result = open_prepared(final, cache_hit=True, key=key, verify_files=True)
        check_vocab_fits_size(result, vocab_size)
        result.seconds = time.perf_counter() - start
        return result

    root.mkdir(parents=True, exist_ok=True)
    _remove_dead_temporaries(root)
    tmp = root / f".tmp-{key[:20]}-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=console, disable=not console.is_terminal) as progress:
            _build(tmp, cfg, vocab_size, seed, key, total, progress)
        if total.skipped_files or total.empty_files or total.split_documents:
            console.print(f"warning: data.source: {total.skipped_summary()}", markup=False, highlight=False,
                          soft_wrap=True)
        try:
            os.rename(tmp, final)  # atomic; refuses to replace a non-empty directory
        except OSError:
            if not final.exists():
                raise
            if not (final / INDEX_FILE).is_file():
                raise DataError(f"{final}: exists but is incomplete (no {INDEX_FILE}); delete it and prepare again")
            # another process completed the same directory first: use theirs
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = open_prepared(final, cache_hit=False, key=key)
    result.seconds = time.perf_counter() - start
    return result


def check_vocab_fits_size(prepared: PreparedData, vocab_size: int) -> None:
    """DataError if the prepared tokens come from a tokenizer larger than the model's embedding."""
    if prepared.tokenizer_vocab_size > vocab_size:
        raise DataError(f"{prepared.directory}: its tokenizer has {prepared.tokenizer_vocab_size} tokens, more than "
                        f"model.vocab_size ({vocab_size}); raise model.vocab_size or prepare with a smaller tokenizer")


def _initialized_distributed() -> Any:
    """torch.distributed if a process group is up. Only looked up when already imported: it cannot be
    initialized otherwise, and importing torch would cost the data launcher a second."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    return dist


def prepare_data(cfg: DataConfig, vocab_size: int, seed: int) -> PreparedData:
    """Prepare (or find in the cache) the token stream for ``cfg`` with a model of ``vocab_size``.

    Under an initialized torch.distributed process group rank 0 prepares while the other ranks wait
    at a broadcast, then open rank 0's directory (``data.cache_dir`` must be shared between nodes).
    Workers are spawned processes, so a script calling this needs the ``if __name__ == "__main__":``
    guard (or ``data.workers=1``).
    """
    dist = _initialized_distributed()
    if dist is None:
        return _prepare_here(cfg, vocab_size, seed)
    rank = dist.get_rank()
    result, error, message = None, None, [None]
    if rank == 0:
        try:
            result = _prepare_here(cfg, vocab_size, seed)
            message = [("ok", str(result.directory))]
        except BaseException as exc:  # tell the waiting ranks before re-raising, or they hang
            error = exc
            message = [("error", str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}")]
    dist.broadcast_object_list(message, src=0)
    if error is not None:
        raise error
    if result is not None:
        return result
    status, text = message[0]
    if status == "error":
        raise DataError(f"rank 0 could not prepare the data: {text}")
    directory = Path(text)
    if not (directory / INDEX_FILE).is_file():
        raise DataError(f"{directory}: prepared by rank 0 but not visible on rank {rank}; put data.cache_dir on a "
                        "filesystem all nodes share, or run launch/prepare_data.py on every node first")
    return open_prepared(directory)
