"""Fuzzing the data path: random and damaged files of every accepted type fed to corpus reading and to
data preparation. Each case must end in success or a one-line DataError (UserError), never another
exception and never a hang (each case runs under a SIGALRM deadline). The seed is fixed: a failure
names its case and reproduces."""

from __future__ import annotations

import io
import json
import random
import signal
from collections.abc import Iterator
from contextlib import contextmanager

import datasets
import pytest

from data.corpus import RECORD_SUFFIXES, TEXT_SUFFIXES, iter_documents
from data.prepare import prepare_data
from train.config import DataConfig
from train.errors import UserError

SEED = 20240817
CASE_SECONDS = 20  # generous: a case takes well under a second; this only turns a hang into a failure
SUFFIXES = TEXT_SUFFIXES + RECORD_SUFFIXES
WORDS = ["def", "return", "x", "caf\u00e9", "\u4e2d\u6587", "\U0001f600", "\t", " ", "\n", "{", "}", "\"", "\\"]


class CaseTimeout(Exception):
    pass


@contextmanager
def deadline(seconds: int) -> Iterator[None]:
    def expire(signum, frame):
        raise CaseTimeout(f"no result after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(WORDS) for _ in range(n))


def random_value(rng: random.Random, depth: int = 0) -> object:
    kind = rng.randrange(7 if depth < 2 else 5)
    if kind == 0:
        return text(rng, rng.randrange(20))
    if kind == 1:
        return rng.randrange(-10**6, 10**6)
    if kind == 2:
        return rng.random()
    if kind == 3:
        return None
    if kind == 4:
        return rng.random() < 0.5
    if kind == 5:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(3))]
    return {rng.choice(["text", "body", "t"]): random_value(rng, depth + 1) for _ in range(rng.randrange(3))}


def valid_parquet(rng: random.Random) -> bytes:
    buffer = io.BytesIO()
    datasets.Dataset.from_list([{"text": text(rng, 30)} for _ in range(5)]).to_parquet(buffer)
    return buffer.getvalue()


def mutate(rng: random.Random, data: bytes) -> bytes:
    """Flip, insert, delete or truncate a few bytes."""
    data = bytearray(data)
    for _ in range(rng.randrange(1, 6)):
        if not data:
            break
        at = rng.randrange(len(data))
        op = rng.randrange(4)
        if op == 0:
            data[at] ^= 1 << rng.randrange(8)
        elif op == 1:
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 8)))
        elif op == 2:
            del data[at: at + rng.randrange(1, 8)]
        else:
            del data[at:]
    return bytes(data)


def make_file(rng: random.Random, kind: str) -> tuple[str, bytes]:
    """(suffix, content) for one fuzz case of ``kind``."""
    suffix = rng.choice(SUFFIXES)
    if kind == "random bytes":
        return suffix, rng.randbytes(rng.choice([0, 1, 7, 100, 4096]))
    if kind == "mixed encodings":
        parts = [text(rng, 20).encode(rng.choice(["utf-8", "utf-16", "latin-1", "cp1252", "utf-32"]), "replace")
                 for _ in range(3)]
        return rng.choice(TEXT_SUFFIXES + (".jsonl",)), b"".join(parts)
    if kind == "NUL bytes":
        raw = text(rng, 50).encode()
        at = rng.randrange(len(raw) + 1)
        return rng.choice(TEXT_SUFFIXES + (".jsonl",)), raw[:at] + b"\0" * rng.randrange(1, 4) + raw[at:]
    if kind == "huge line":
        return rng.choice(TEXT_SUFFIXES), ("".join(rng.choice("abc\u00e9") for _ in range(1000)) * 1500).encode()
    if kind == "empty":
        return suffix, b""
    if kind == "random records":
        rows = [{rng.choice(["text", "body", "t", ""]): random_value(rng) for _ in range(rng.randrange(3))}
                for _ in range(rng.randrange(1, 6))]
        lines = "\n".join(json.dumps(row) for row in rows)
        return rng.choice([".jsonl", ".json"]), (lines if rng.random() < 0.8 else json.dumps(rows)).encode()
    if kind == "damaged records":
        good = "\n".join(json.dumps({"text": text(rng, 20)}) for _ in range(5)).encode()
        return rng.choice([".jsonl", ".json"]), mutate(rng, good)
    if kind == "parquet-ish":
        body = valid_parquet(rng)
        garbage = rng.choice([mutate(rng, body), b"PAR1" + rng.randbytes(64) + b"PAR1", body[: len(body) // 2]])
        return ".parquet", garbage
    raise ValueError(kind)


KINDS = ["random bytes", "mixed encodings", "NUL bytes", "huge line", "empty", "random records", "damaged records",
         "parquet-ish"]
CASES = [(kind, i) for kind in KINDS for i in range(1 if kind == "huge line" else 4)]


@pytest.mark.parametrize("kind,index", CASES, ids=[f"{kind}-{i}" for kind, i in CASES])
def test_reading_and_preparing_random_files_ends_cleanly(kind, index, tmp_path):
    rng = random.Random(f"{SEED}-{kind}-{index}")
    suffix, data = make_file(rng, kind)
    source = tmp_path / "src"
    source.mkdir()
    (source / f"case{suffix}").write_bytes(data)
    if rng.random() < 0.5:  # a good file next to it: the bad one must be skipped or named, not crash the corpus
        (source / "good.txt").write_text("def good():\n    return 1\n" * 20)
    cfg = DataConfig(source=str(source), cache_dir=str(tmp_path / "cache"), workers=1)
    with deadline(CASE_SECONDS):
        try:
            documents = list(iter_documents(cfg))
            assert documents and all(isinstance(d, str) and d for d in documents)
            if kind != "huge line":  # tokenizing 1.5 MB takes seconds; reading it is what is under test
                prepared = prepare_data(cfg, 300, 0)
                assert prepared.n_tokens > 0 and prepared.n_documents >= len(documents)
        except UserError as err:
            assert str(err) and "\n" not in str(err), str(err)
