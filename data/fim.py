"""Fill-in-the-Middle at document level, PSM framing (report sec 4.1).

With probability ``data.fim_rate`` a document is cut at two uniformly random character positions
into prefix / middle / suffix and laid out as

    <｜fim▁begin｜> prefix <｜fim▁hole｜> suffix <｜fim▁end｜> middle <｜end▁of▁sentence｜>

otherwise it is ``document <｜end▁of▁sentence｜>``. The decision and the cut for document ``i``
come from an RNG seeded by ``(seed, i)`` alone, so any split of the corpus over worker processes
gives the same token stream.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from data.tokenizer import SpecialTokens


@dataclass(frozen=True)
class FimSplit:
    """Character positions: prefix = doc[:start], middle = doc[start:end], suffix = doc[end:]."""

    start: int
    end: int


def fim_split(seed: int, index: int, n_chars: int, rate: float) -> FimSplit | None:
    """The FIM cut of document ``index`` (None = plain document); depends only on its arguments."""
    rng = random.Random(f"dsv3-fim:{seed}:{index}")  # str seeds are hashed with SHA-512: stable everywhere
    if rng.random() >= rate:
        return None
    a, b = sorted((rng.randint(0, n_chars), rng.randint(0, n_chars)))
    return FimSplit(a, b)


@dataclass
class EncodedChunk:
    """Token stream of consecutive documents (each ending in EOS) with per-document lengths."""

    tokens: np.ndarray  # uint32
    doc_lengths: np.ndarray  # int64, one per document
    n_fim: int


def encode_documents(tok: Tokenizer, specials: SpecialTokens, texts: list[str], first_index: int,
                     seed: int, fim_rate: float) -> EncodedChunk:
    """Encode documents ``first_index, first_index+1, ...`` with FIM applied; one ``encode_batch`` call."""
    pieces: list[str] = []
    splits: list[FimSplit | None] = []
    for offset, text in enumerate(texts):
        split = fim_split(seed, first_index + offset, len(text), fim_rate)
        splits.append(split)
        if split is None:
            pieces.append(text)
        else:
            pieces += [text[: split.start], text[split.end:], text[split.start: split.end]]  # prefix, suffix, middle
    encoded = iter(tok.encode_batch(pieces, add_special_tokens=False))
    stream: list[int] = []
    lengths = []
    for split in splits:
        before = len(stream)
        if split is None:
            stream += next(encoded).ids
        else:
            prefix, suffix, middle = next(encoded).ids, next(encoded).ids, next(encoded).ids
            stream += [specials.fim_begin, *prefix, specials.fim_hole, *suffix, specials.fim_end, *middle]
        stream.append(specials.eos)
        lengths.append(len(stream) - before)
    n_fim = sum(split is not None for split in splits)
    return EncodedChunk(np.asarray(stream, dtype=np.uint32), np.asarray(lengths, dtype=np.int64), n_fim)
