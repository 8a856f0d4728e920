"""Corpus sources (data/corpus.py): stdlib listing, text/jsonl/parquet/glob/saved datasets, errors."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import datasets
import pytest

from data.corpus import CorpusStats, iter_documents, stdlib_files
from train.config import DataConfig
from train.errors import DataError


def cfg_for(source: Path | str, tmp_path: Path, **kw) -> DataConfig:
    return DataConfig(source=str(source), cache_dir=str(tmp_path / "cache"), **kw)


def test_stdlib_listing_excludes_tests_and_site_packages():
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files()
    rel = [f.relative_to(root) for f in files]
    assert len(files) > 500 and files == sorted(files)
    assert all(f.suffix == ".py" for f in files)
    assert root / "json" / "decoder.py" in files and root / "argparse.py" in files
    for parts in (r.parts for r in rel):
        assert not {"test", "tests", "idle_test", "site-packages"} & set(parts), parts
    # the test folders exist, so the exclusion did something
    assert (root / "test").is_dir() and (root / "idlelib" / "idle_test").is_dir()


def test_stdlib_documents_with_max_bytes():
    stats = CorpusStats()
    docs = list(iter_documents(DataConfig(max_bytes=100_000), stats))
    first = stdlib_files()[0].read_text(encoding="utf-8")
    assert docs[0] == first[: len(docs[0])]
    assert stats.bytes == sum(len(d.encode()) for d in docs) == 100_000
    assert stats.documents == len(docs)


def test_non_utf8_file_is_skipped_and_counted(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("first document\n")
    (src / "b.py").write_bytes(b"# coding: latin-1\nname = '\xe9t\xe9'\n")  # latin-1, not UTF-8
    (src / "c.md").write_text("# third \u00e9\n")
    (src / "d.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')  # latin-1 inside JSON lines
    (src / "empty.txt").write_text("")
    (src / "ignored.bin").write_bytes(b"\x00\x01")
    stats = CorpusStats()
    docs = list(iter_documents(cfg_for(src, tmp_path), stats))
    assert docs == ["first document\n", "# third \u00e9\n"]
    assert stats.skipped_files == [str(src / "b.py"), str(src / "d.jsonl")]


def test_single_txt_file_and_glob(tmp_path):
    for i in range(3):
        (tmp_path / f"doc{i}.txt").write_text(f"text {i}")
    (tmp_path / "other.md").write_text("markdown")
    assert list(iter_documents(cfg_for(tmp_path / "doc1.txt", tmp_path))) == ["text 1"]
    assert list(iter_documents(cfg_for(tmp_path / "doc*.txt", tmp_path))) == ["text 0", "text 1", "text 2"]


def test_jsonl_and_parquet_and_saved_dataset(tmp_path):
    rows = [{"content": f"def f{i}():\n    return {i}\n", "id": i} for i in range(5)]
    jsonl = tmp_path / "shard.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = [r["content"] for r in rows]
    assert list(iter_documents(cfg_for(jsonl, tmp_path, text_field="content"))) == texts

    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "shard.parquet"))
    assert list(iter_documents(cfg_for(tmp_path / "shard.parquet", tmp_path, text_field="content"))) == texts

    saved = tmp_path / "saved"
    ds.save_to_disk(str(saved))
    assert list(iter_documents(cfg_for(saved, tmp_path, text_field="content"))) == texts


def test_missing_text_field_names_field_and_choices(tmp_path):
    jsonl = tmp_path / "shard.jsonl"
    jsonl.write_text(json.dumps({"body": "x", "lang": "py"}) + "\n")
    with pytest.raises(DataError, match=r"no field 'text' \(fields: body, lang\).*data.text_field"):
        list(iter_documents(cfg_for(jsonl, tmp_path)))


def test_missing_and_empty_sources_name_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=str(missing)):
        list(iter_documents(cfg_for(missing, tmp_path)))
    with pytest.raises(DataError, match="glob matches no"):
        list(iter_documents(cfg_for(tmp_path / "*.jsonl", tmp_path)))
    (tmp_path / "blank.txt").write_text("")
    with pytest.raises(DataError, match="no non-empty document"):
        list(iter_documents(cfg_for(tmp_path / "blank.txt", tmp_path)))
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(DataError, match=f"{empty_dir}.*no supported files"):
        list(iter_documents(cfg_for(empty_dir, tmp_path)))
