"""Fill-in-the-Middle, PSM framing at document level (data/fim.py; report sec 4.1)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from data.corpus import iter_documents
from data.fim import encode_documents, fim_split
from data.tokenizer import SpecialTokens, for_encoding, train_tokenizer
from train.config import DataConfig


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return list(iter_documents(DataConfig(max_bytes=150_000)))


@pytest.fixture(scope="module")
def tok(docs):
    return for_encoding(train_tokenizer(docs, 512))


@pytest.fixture(scope="module")
def specials(tok) -> SpecialTokens:
    return SpecialTokens.of(tok)


def split_on(ids: list[int], marker: int) -> tuple[list[int], list[int]]:
    at = ids.index(marker)
    return ids[:at], ids[at + 1:]


def test_psm_layout_and_pieces(tok, specials, docs):
    small = [d[:3000] for d in docs[:6]]
    chunk = encode_documents(tok, specials, small, first_index=0, seed=7, fim_rate=1.0)
    assert chunk.n_fim == len(small)
    ends = np.cumsum(chunk.doc_lengths)
    starts = ends - chunk.doc_lengths
    for i, doc in enumerate(small):
        ids = chunk.tokens[starts[i]: ends[i]].tolist()
        assert ids[0] == specials.fim_begin and ids[-1] == specials.eos
        prefix, rest = split_on(ids[1:-1], specials.fim_hole)
        suffix, middle = split_on(rest, specials.fim_end)
        markers = {specials.fim_begin, specials.fim_hole, specials.fim_end, specials.eos}
        assert not markers & set(prefix + suffix + middle)
        split = fim_split(7, i, len(doc), 1.0)
        pre, mid, suf = (tok.decode(p, skip_special_tokens=False) for p in (prefix, middle, suffix))
        assert (pre, mid, suf) == (doc[: split.start], doc[split.start: split.end], doc[split.end:])
        assert pre + mid + suf == doc


def test_plain_documents_at_rate_zero(tok, specials, docs):
    small = [d[:2000] for d in docs[:4]]
    chunk = encode_documents(tok, specials, small, first_index=0, seed=0, fim_rate=0.0)
    assert chunk.n_fim == 0
    expected = []
    for doc in small:
        expected += tok.encode(doc, add_special_tokens=False).ids + [specials.eos]
    assert chunk.tokens.tolist() == expected


def test_rate_within_binomial_band():
    n, rate = 2000, 0.1
    hits = sum(fim_split(seed=3, index=i, n_chars=100, rate=rate) is not None for i in range(n))
    sigma = math.sqrt(n * rate * (1 - rate))
    assert abs(hits - n * rate) <= 4 * sigma, hits
    assert all(fim_split(3, i, 100, 0.0) is None for i in range(500))
    assert all(fim_split(3, i, 100, 1.0) is not None for i in range(500))


def test_split_points_are_sorted_and_in_range():
    for i in range(300):
        split = fim_split(1, i, 57, 1.0)
        assert 0 <= split.start <= split.end <= 57
    starts = {fim_split(1, i, 57, 1.0).start for i in range(300)}
    assert len(starts) > 40  # spread over the document, not stuck


def test_decision_depends_only_on_seed_and_index():
    a = [fim_split(5, i, 1000, 0.1) for i in range(400)]
    assert a == [fim_split(5, i, 1000, 0.1) for i in range(400)]
    assert a[::-1] == [fim_split(5, i, 1000, 0.1) for i in reversed(range(400))]  # order of asking is irrelevant
    assert a != [fim_split(6, i, 1000, 0.1) for i in range(400)]


def test_chunking_does_not_change_the_stream(tok, specials, docs):
    """Workers get arbitrary chunks; (seed, global index) keeps the stream identical."""
    small = [d[:1500] for d in docs[:12]]
    whole = encode_documents(tok, specials, small, 0, seed=11, fim_rate=0.5)
    bounds = ((0, 5), (5, 6), (6, 12))
    parts = [encode_documents(tok, specials, small[a:b], a, seed=11, fim_rate=0.5) for a, b in bounds]
    assert np.array_equal(whole.tokens, np.concatenate([p.tokens for p in parts]))
    assert whole.n_fim == sum(p.n_fim for p in parts) > 0
