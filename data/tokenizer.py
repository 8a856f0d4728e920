"""Byte-level BPE tokenizer with DeepSeek-V3's special tokens (report sec 4.1).

A tokenizer is either trained here on the corpus (``data.tokenizer=""``) or loaded from any
``tokenizer.json`` (``data.tokenizer=PATH``). Trained ones put the special tokens first: BOS = 0,
EOS = 1, then FIM hole, begin, end. The strings are DeepSeek-V3's own, written with the fullwidth
vertical bar U+FF5C and the lower one-eighth block U+2581.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from train.errors import DataError

BOS = "<\uff5cbegin\u2581of\u2581sentence\uff5c>"  # <｜begin▁of▁sentence｜>
EOS = "<\uff5cend\u2581of\u2581sentence\uff5c>"  # <｜end▁of▁sentence｜>
FIM_HOLE = "<\uff5cfim\u2581hole\uff5c>"  # <｜fim▁hole｜>
FIM_BEGIN = "<\uff5cfim\u2581begin\uff5c>"  # <｜fim▁begin｜>
FIM_END = "<\uff5cfim\u2581end\uff5c>"  # <｜fim▁end｜>
SPECIAL_TOKENS = (BOS, EOS, FIM_HOLE, FIM_BEGIN, FIM_END)  # ids 0..4 of a trained tokenizer
N_BYTES = 256
MIN_VOCAB = len(SPECIAL_TOKENS) + N_BYTES  # a byte-level BPE holds at least the specials and every byte
# BPE training time grows with the square of a word's length (64K characters without whitespace: seconds, 1M:
# many minutes), so training sees runs of non-whitespace cut into pieces of at most this many characters.
MAX_TRAIN_WORD = 1000
_LONG_RUN = re.compile(r"\S{%d,}" % (MAX_TRAIN_WORD + 1))


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the special tokens; ``bos`` is None for a loaded tokenizer that has none."""

    eos: int
    fim_hole: int
    fim_begin: int
    fim_end: int
    bos: int | None = None

    @classmethod
    def of(cls, tok: Tokenizer, where: str = "tokenizer") -> SpecialTokens:
        """Look the ids up; DataError naming the missing EOS/FIM tokens (``where`` names the file)."""
        ids = {s: tok.token_to_id(s) for s in SPECIAL_TOKENS}
        missing = [s for s in (EOS, FIM_HOLE, FIM_BEGIN, FIM_END) if ids[s] is None]
        if missing:
            raise DataError(f"{where}: lacks the special tokens {' '.join(missing)}; add them or set "
                            "data.tokenizer='' to train a tokenizer that has them")
        return cls(eos=ids[EOS], fim_hole=ids[FIM_HOLE], fim_begin=ids[FIM_BEGIN], fim_end=ids[FIM_END], bos=ids[BOS])


def bounded_words(texts: Iterable[str], limit: int = MAX_TRAIN_WORD) -> Iterator[str]:
    """The texts, each cut inside runs of more than ``limit`` non-whitespace characters (text is otherwise kept;
    stdlib sources have no such run, so they pass unchanged)."""
    for text in texts:
        start = 0
        for run in _LONG_RUN.finditer(text):
            for cut in range(run.start() + limit, run.end(), limit):
                yield text[start:cut]
                start = cut
        yield text[start:]


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE of ``vocab_size`` tokens (fewer only if the text is too small)."""
    if vocab_size < MIN_VOCAB:
        raise DataError(f"model.vocab_size ({vocab_size}) is too small for a byte-level BPE: it needs at least "
                        f"{MIN_VOCAB} ({N_BYTES} bytes + {len(SPECIAL_TOKENS)} special tokens); raise model.vocab_size")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(bounded_words(texts), trainer)
    return tok


def tokenizer_file(path: str | Path) -> Path:
    """The ``data.tokenizer`` file; DataError if it does not exist."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"data.tokenizer {file}: file not found; give a tokenizer.json or data.tokenizer='' to "
                        "train one")
    return file


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a ``tokenizer.json``; DataError if it is missing, unreadable or lacks EOS/FIM tokens."""
    file = tokenizer_file(path)
    where = f"data.tokenizer {file}"
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises bare Exception for bad JSON
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{where}: not a readable tokenizer.json ({reason}); give a file saved by "
                        "tokenizers/transformers") from exc
    SpecialTokens.of(tok, where)
    return tok


def for_encoding(tok: Tokenizer) -> Tokenizer:
    """Make special-token strings inside document text encode as plain text (markers come by id only)."""
    tok.encode_special_tokens = True
    return tok


def tokenizer_vocab_size(tok: Tokenizer) -> int:
    """Embedding rows the tokenizer needs: its largest id + 1 (ids can be sparse in loaded files)."""
    return max(tok.get_vocab(with_added_tokens=True).values()) + 1


def check_vocab_fits(tok: Tokenizer, model_vocab_size: int) -> int:
    """Return the tokenizer's vocab size; DataError if the model's embedding is smaller."""
    size = tokenizer_vocab_size(tok)
    if size > model_vocab_size:
        raise DataError(f"tokenizer vocab ({size}) exceeds model.vocab_size ({model_vocab_size}): raise "
                        f"model.vocab_size to at least {size} or use a smaller tokenizer (data.tokenizer)")
    return size
