"""Byte-level BPE with DeepSeek-V3's special tokens (data/tokenizer.py), trained on real stdlib text."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer

from data.corpus import iter_documents
from data.tokenizer import (BOS, EOS, FIM_BEGIN, FIM_END, FIM_HOLE, SpecialTokens, check_vocab_fits, for_encoding,
                            load_tokenizer, tokenizer_vocab_size, train_tokenizer)
from train.config import DataConfig
from train.errors import DataError


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return list(iter_documents(DataConfig(max_bytes=200_000)))


@pytest.fixture(scope="module")
def tok(texts):
    return train_tokenizer(texts, 512)


def test_special_token_strings_are_deepseek_v3s():
    bar, block = "\uff5c", "\u2581"  # FULLWIDTH VERTICAL LINE, LOWER ONE EIGHTH BLOCK
    assert BOS == f"<{bar}begin{block}of{block}sentence{bar}>"
    assert EOS == f"<{bar}end{block}of{block}sentence{bar}>"
    assert (FIM_HOLE, FIM_BEGIN, FIM_END) == (f"<{bar}fim{block}hole{bar}>", f"<{bar}fim{block}begin{bar}>",
                                              f"<{bar}fim{block}end{bar}>")


def test_trained_vocab_and_special_ids(tok):
    assert tok.get_vocab_size() == 512 == tokenizer_vocab_size(tok)
    assert [tok.id_to_token(i) for i in range(5)] == [BOS, EOS, FIM_HOLE, FIM_BEGIN, FIM_END]
    assert SpecialTokens.of(tok) == SpecialTokens(bos=0, eos=1, fim_hole=2, fim_begin=3, fim_end=4)


def test_round_trip_code(tok, texts):
    for text in texts[:3] + ["def f(x):\n\treturn x ** 2  # caf\u00e9 \u2603 \U0001F600\n"]:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids, skip_special_tokens=False) == text
        assert max(ids) < 512


def test_special_strings_inside_text_stay_text(tok):
    text = f"x = '{EOS}' + '{FIM_HOLE}'"
    ids = for_encoding(Tokenizer.from_str(tok.to_str())).encode(text, add_special_tokens=False).ids
    assert not set(ids) & {0, 1, 2, 3, 4}
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_save_load_and_vocab_check(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    loaded = load_tokenizer(path)
    assert check_vocab_fits(loaded, 512) == 512
    with pytest.raises(DataError, match=r"tokenizer vocab \(512\) exceeds model.vocab_size \(300\): raise model"):
        check_vocab_fits(loaded, 300)


def test_missing_specials_and_bad_files(tok, tmp_path):
    spec = json.loads(tok.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in (EOS, FIM_END)]
    for name in (EOS, FIM_END):
        del spec["model"]["vocab"][name]
    stripped = tmp_path / "no_specials.json"
    stripped.write_text(json.dumps(spec))
    with pytest.raises(DataError, match=f"{stripped}: lacks the special tokens {EOS} {FIM_END}"):
        load_tokenizer(stripped)
    with pytest.raises(DataError, match="file not found"):
        load_tokenizer(tmp_path / "absent.json")
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    with pytest.raises(DataError, match=f"{garbage}: not a readable tokenizer.json"):
        load_tokenizer(garbage)


def test_vocab_too_small_for_bytes():
    with pytest.raises(DataError, match=r"model.vocab_size \(100\) is too small"):
        train_tokenizer(["abc"], 100)
