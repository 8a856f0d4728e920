"""Token preparation (data/prepare.py, launch/prepare_data.py): stream, cache, atomicity, ranks."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from data.corpus import iter_documents
from data.fim import fim_split
from data.prepare import INDEX_FILE, cache_key, open_prepared, prepare_data
from data.tokenizer import SpecialTokens, for_encoding
from train.config import DataConfig
from train.errors import DataError

REPO = Path(__file__).resolve().parents[2]
VOCAB, SEED = 512, 3


def small_cfg(cache: Path, **kw) -> DataConfig:
    return DataConfig(**{"max_bytes": 300_000, "cache_dir": str(cache), "workers": 2, "fim_rate": 0.3, **kw})


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def prepared(cache):
    return prepare_data(small_cfg(cache), VOCAB, SEED)


def reference_stream(cfg: DataConfig, tokenizer_path: Path, seed: int) -> tuple[list[int], list[int], int]:
    """One process, one document at a time, straight from the definition of the layout."""
    tok = for_encoding(Tokenizer.from_file(str(tokenizer_path)))
    sp = SpecialTokens.of(tok)

    def enc(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False).ids

    stream, starts, n_fim = [], [], 0
    for i, doc in enumerate(iter_documents(cfg)):
        starts.append(len(stream))
        split = fim_split(seed, i, len(doc), cfg.fim_rate)
        if split is None:
            stream += enc(doc)
        else:
            n_fim += 1
            pre, mid, suf = doc[: split.start], doc[split.start: split.end], doc[split.end:]
            stream += [sp.fim_begin, *enc(pre), sp.fim_hole, *enc(suf), sp.fim_end, *enc(mid)]
        stream.append(sp.eos)
    return stream, starts, n_fim


def test_stream_equals_single_process_reference(prepared, cache):
    stream, starts, n_fim = reference_stream(small_cfg(cache), prepared.tokenizer_path, SEED)
    tokens = np.fromfile(prepared.tokens_path, dtype="<u4")
    assert tokens.tolist() == stream
    assert np.load(prepared.offsets_path).tolist() == starts
    assert (prepared.n_tokens, prepared.n_documents, prepared.n_fim) == (len(stream), len(starts), n_fim)
    assert prepared.n_fim > 0 and prepared.tokenizer_vocab_size == VOCAB and not prepared.cache_hit
    index = json.loads((prepared.directory / INDEX_FILE).read_text())
    assert index["dtype"] == "uint32" and index["hash"].startswith(prepared.directory.name.split("-")[1])


def test_worker_count_does_not_change_the_result(prepared, tmp_path):
    one = prepare_data(small_cfg(tmp_path, workers=1), VOCAB, SEED)
    assert one.directory.name == prepared.directory.name
    assert one.tokens_path.read_bytes() == prepared.tokens_path.read_bytes()
    assert one.n_fim == prepared.n_fim


def test_second_call_is_a_cache_hit(prepared, cache):
    before = {p.name: p.stat().st_mtime_ns for p in prepared.directory.iterdir()}
    start = time.perf_counter()
    again = prepare_data(small_cfg(cache), VOCAB, SEED)
    assert time.perf_counter() - start < 1.0
    assert again.cache_hit and again.directory == prepared.directory
    assert {p.name: p.stat().st_mtime_ns for p in again.directory.iterdir()} == before
    assert dataclasses.replace(again, cache_hit=False, seconds=0) == dataclasses.replace(prepared, seconds=0)


def test_settings_and_content_change_the_directory(cache, tmp_path):
    base = cache_key(small_cfg(cache), VOCAB, SEED)
    assert cache_key(small_cfg(cache, workers=1), VOCAB, SEED) == base  # workers do not change tokens
    assert cache_key(small_cfg(cache), VOCAB, SEED + 1) != base
    assert cache_key(small_cfg(cache), VOCAB * 2, SEED) != base
    for change in ({"fim_rate": 0.2}, {"max_bytes": 200_000}, {"tokenizer_train_bytes": 100_000}):
        assert cache_key(small_cfg(cache, **change), VOCAB, SEED) != base, change
    doc = tmp_path / "doc.txt"
    doc.write_text("hello")
    first = cache_key(small_cfg(cache, source=str(doc)), VOCAB, SEED)
    doc.write_text("hellO")
    assert cache_key(small_cfg(cache, source=str(doc)), VOCAB, SEED) != first


def test_killed_preparation_leaves_nothing_taken_as_complete(tmp_path):
    """SIGKILL a real preparation mid-build; the next call ignores the leftover and succeeds."""
    cache = tmp_path / "cache"
    cfg = small_cfg(cache, max_bytes=1_500_000, workers=1)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from data.prepare import prepare_data; "
            "from train.config import DataConfig; "
            f"prepare_data(DataConfig(max_bytes={cfg.max_bytes}, cache_dir=sys.argv[2], workers=1, fim_rate=0.3), "
            f"{VOCAB}, {SEED})")
    child = subprocess.Popen([sys.executable, "-c", code, str(REPO), str(cache)])
    deadline = time.time() + 60
    while not list(cache.glob(".tmp-*")) and time.time() < deadline and child.poll() is None:
        time.sleep(0.02)
    time.sleep(0.2)  # into tokenizer training / tokenizing
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    leftovers = list(cache.glob(".tmp-*"))
    assert leftovers and not list(cache.glob("tokens-*")), "the kill came too late to test anything"
    foreign = cache / ".tmp-0123456789abcdef0123-otherhost-1"  # another host's: not ours to delete
    foreign.mkdir()
    (foreign / INDEX_FILE).write_text("{}")
    result = prepare_data(cfg, VOCAB, SEED)
    assert not result.cache_hit and open_prepared(result.directory).n_tokens == result.n_tokens
    assert not any(p.exists() for p in leftovers) and foreign.exists()  # dead same-host leftover cleaned up
    assert prepare_data(cfg, VOCAB, SEED).cache_hit


def test_given_tokenizer_is_used_and_checked(prepared, tmp_path):
    cfg = small_cfg(tmp_path, tokenizer=str(prepared.tokenizer_path), workers=1)
    result = prepare_data(cfg, 1024, SEED)
    assert result.tokenizer_path.read_bytes() == prepared.tokenizer_path.read_bytes()
    assert result.tokens_path.read_bytes() == prepared.tokens_path.read_bytes()  # same tokenizer, seed, corpus
    with pytest.raises(DataError, match=r"tokenizer vocab \(512\) exceeds model.vocab_size \(400\)"):
        prepare_data(cfg, 400, SEED)
    assert not list(tmp_path.glob(".tmp-*"))
    with pytest.raises(DataError, match="data.tokenizer .*absent.json: file not found"):
        prepare_data(small_cfg(tmp_path, tokenizer=str(tmp_path / "absent.json")), 1024, SEED)


def run_launcher(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "launch" / "prepare_data.py"), *args], capture_output=True,
                          text=True, cwd=cwd, timeout=120)


def test_launcher_summary_and_error_line(tmp_path):
    cache = tmp_path / "cache"
    ok = run_launcher(tmp_path, "+conf=tiny", "data.max_bytes=200000", "model.vocab_size=512",
                      f"data.cache_dir={cache}")
    assert ok.returncode == 0, ok.stderr
    assert "prepared in" in ok.stdout and "tokens/byte" in ok.stdout and "with FIM" in ok.stdout
    assert os.listdir(tmp_path) == ["cache"]  # Hydra wrote no outputs/ or .hydra/
    missing = tmp_path / "missing"
    bad = run_launcher(tmp_path, f"data.source={missing}", f"data.cache_dir={cache}")
    assert bad.returncode == 1
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: data.source {missing}: no such file or directory; give ")


DIST_SCRIPT = """
import json, sys
import torch.distributed as dist
sys.path.insert(0, sys.argv[1])
from data.prepare import prepare_data
from train.config import DataConfig
dist.init_process_group("gloo")
out = prepare_data(DataConfig(max_bytes=100_000, cache_dir=sys.argv[2], workers=1), 512, 0)
print(json.dumps({"rank": dist.get_rank(), "dir": str(out.directory), "hit": out.cache_hit, "n": out.n_tokens}))
dist.destroy_process_group()
"""


def test_rank0_prepares_and_other_ranks_open_it(tmp_path):
    script = tmp_path / "dist_prepare.py"
    script.write_text(DIST_SCRIPT)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(script), str(REPO), str(tmp_path / "cache")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = sorted((json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")),
                   key=lambda r: r["rank"])
    assert [r["rank"] for r in lines] == [0, 1]
    assert lines[0]["dir"] == lines[1]["dir"] and lines[0]["n"] == lines[1]["n"] > 0
    assert not lines[0]["hit"] and lines[1]["hit"]  # built once, by rank 0


def test_damaged_directory_and_bad_settings_are_refused(tmp_path):
    cfg = small_cfg(tmp_path, max_bytes=20_000, workers=1)
    first = prepare_data(cfg, VOCAB, SEED)
    with open(first.tokens_path, "r+b") as f:
        f.truncate(first.n_tokens * 4 - 4)
    with pytest.raises(DataError, match=f"{first.tokens_path}: missing or not .*delete {first.directory}"):
        prepare_data(cfg, VOCAB, SEED)
    with pytest.raises(DataError, match=r"data.max_bytes \(-1\) must be >= 0"):
        prepare_data(small_cfg(tmp_path, max_bytes=-1), VOCAB, SEED)
