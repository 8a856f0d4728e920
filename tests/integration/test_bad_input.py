"""Bad input: one clear line naming the field or file and the fix, never a traceback, never lost data.

Two tables. ``IN_PROCESS`` calls the function that makes the message (corpus reading, data preparation,
config composition and validation, the parallel layout): fast, one row per kind of bad input.
``LAUNCHER`` runs launch/pretrain.py for real and checks what a person sees: exactly one ``error:`` line
on stderr, no traceback, exit status 1. A bad file inside a usable corpus is not an error but a counted
skip, and an enormous line is cut into bounded pieces (tests at the end).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from data.corpus import MAX_DOCUMENT_BYTES, CorpusStats, iter_documents
from data.prepare import INDEX_FILE, TOKENS_FILE, _index_sha256, prepare_data
from data.tokenizer import train_tokenizer
from parallel.mesh import plan_layout
from tests.integration.pretrain_runs import LAUNCHER_TRACEBACK, REPO, failure_report, run_pretrain, run_torchrun
from train.config import DataConfig, load_config
from train.errors import UserError

VOCAB = 300
TEXT = "".join(f"def function_{i}(x):\n    return x * {i} + {i * i}\n\n" for i in range(300))


# --- in-process rows ---------------------------------------------------------------------------

def corpus_of(files: dict[str, bytes]) -> Callable[[Path], object]:
    """A case reading a source directory holding ``files`` (name -> bytes)."""

    def run(tmp: Path) -> object:
        src = tmp / "src"
        src.mkdir()
        for name, data in files.items():
            (src / name).write_bytes(data)
        return list(iter_documents(DataConfig(source=str(src), cache_dir=str(tmp / "cache"))))

    return run


def source(relative: str, files: dict[str, bytes] | None = None) -> Callable[[Path], object]:
    """A case reading ``data.source=tmp/relative`` after writing ``files`` under tmp."""

    def run(tmp: Path) -> object:
        for name, data in (files or {}).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)
        return list(iter_documents(DataConfig(source=str(tmp / relative), cache_dir=str(tmp / "cache"))))

    return run


def tokenizer_case(vocab: int, text: str | None = None) -> Callable[[Path], object]:
    """Preparation with a tokenizer.json of ``vocab`` tokens (or holding ``text``)."""

    def run(tmp: Path) -> object:
        (tmp / "corpus.txt").write_text(TEXT)
        path = tmp / "tokenizer.json"
        if text is None:
            train_tokenizer([TEXT], vocab_size=vocab).save(str(path))
        else:
            path.write_text(text)
        cfg = DataConfig(source=str(tmp / "corpus.txt"), tokenizer=str(path), cache_dir=str(tmp / "cache"), workers=1)
        return prepare_data(cfg, VOCAB, 0)

    return run


def config(*overrides: str, world: int = 1) -> Callable[[Path], object]:
    return lambda tmp: load_config(list(overrides), world_size=world)


def layout(*overrides: str, world: int) -> Callable[[Path], object]:
    return lambda tmp: plan_layout(load_config(["+conf=tiny", *overrides], world_size=world), world, 0, world)


@pytest.fixture(scope="module")
def prepared_cache(tmp_path_factory) -> tuple[DataConfig, Path]:
    """A small prepared-data cache that the cache rows copy and damage."""
    root = tmp_path_factory.mktemp("prepared")
    (root / "corpus.txt").write_text(TEXT)
    cfg = DataConfig(source=str(root / "corpus.txt"), cache_dir=str(root / "cache"), workers=1)
    return cfg, prepare_data(cfg, VOCAB, 0).directory


def damaged_cache(damage: Callable[[Path], None]) -> Callable[[Path, tuple[DataConfig, Path]], object]:
    """A case preparing again over a copy of the cache whose directory ``damage`` changed."""

    def run(tmp: Path, prepared: tuple[DataConfig, Path]) -> object:
        cfg, directory = prepared
        copy = tmp / "cache" / directory.name
        shutil.copytree(directory, copy)
        damage(copy)
        return prepare_data(DataConfig(**{**cfg.__dict__, "cache_dir": str(tmp / "cache")}), VOCAB, 0)

    return run


def truncate_tokens(directory: Path) -> None:
    with open(directory / TOKENS_FILE, "r+b") as f:
        f.truncate(f.seek(0, 2) - 4)


def flip_a_token(directory: Path) -> None:
    with open(directory / TOKENS_FILE, "r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 1]))


def edit_index(key: str, value: object) -> Callable[[Path], None]:
    def edit(directory: Path) -> None:
        index = json.loads((directory / INDEX_FILE).read_text())
        index[key] = value
        (directory / INDEX_FILE).write_text(json.dumps(index))

    return edit


def other_settings(directory: Path) -> None:
    """The index of a cache built with other settings, consistent in itself, under this hash's name."""
    index = json.loads((directory / INDEX_FILE).read_text())
    index["hash"] = "0" * 64
    index["index_sha256"] = _index_sha256(index)
    (directory / INDEX_FILE).write_text(json.dumps(index))


BINARY = bytes(range(256)) * 4
IN_PROCESS = {
    # corpus files
    "binary file": (corpus_of({"a.txt": b"\x00\x01ELF" + BINARY}), "1 files skipped as not UTF-8 text"),
    "NUL bytes in valid UTF-8": (corpus_of({"a.py": b"x = 1\x00\x00"}), "1 files skipped as not UTF-8 text"),
    "invalid UTF-8": (corpus_of({"a.md": "caf\u00e9".encode("latin-1")}), "1 files skipped as not UTF-8 text"),
    "only empty files": (corpus_of({"a.txt": b"", "b.jsonl": b""}), "2 empty files skipped"),
    "glob matching nothing": (source("*.jsonl"), "the glob matches no supported file"),
    "directory without supported files": (source("dir", {"dir/a.bin": b"x", "dir/.hidden.txt": b"x"}),
                                          "the directory holds no supported files"),
    "missing source": (source("nope"), "nope: no such file or directory"),
    "unsupported file type": (source("a.csv", {"a.csv": b"a,b\n"}), "unsupported file type '.csv'"),
    "broken JSON lines": (source("a.jsonl", {"a.jsonl": b'{"text": "a"\n'}), "datasets cannot read it (JSON parse"),
    "JSON lines without the text field": (source("a.jsonl", {"a.jsonl": b'{"body": "a"}\n'}),
                                          "records have no field 'text' (fields: body); set data.text_field"),
    "JSON lines with a number as text": (source("a.jsonl", {"a.jsonl": b'{"text": 5}\n'}), "holds int, not text"),
    "garbage parquet": (source("a.parquet", {"a.parquet": BINARY}), "Parquet magic bytes not found"),
    # tokenizer
    "tokenizer larger than model.vocab_size": (tokenizer_case(VOCAB + 100), f"exceeds model.vocab_size ({VOCAB})"),
    "tokenizer file that is not JSON": (tokenizer_case(0, text="{not json"), "not a readable tokenizer.json"),
    # prepared-data cache
    "cache: truncated token file": (damaged_cache(truncate_tokens), "tokens.bin: missing or not"),
    "cache: a token changed": (damaged_cache(flip_a_token), "tokens.bin is missing or does not match its SHA-256"),
    "cache: index.json edited": (damaged_cache(edit_index("n_tokens", 7)), "does not match its index_sha256"),
    "cache: filed under another hash": (damaged_cache(other_settings), "was made from other data or settings"),
    "cache: offsets removed": (damaged_cache(lambda d: (d / "doc_offsets.npy").unlink()),
                               "doc_offsets.npy is unreadable"),
    # presets and overrides
    "preset typo": (config("+conf=tinny"), "unknown preset +conf=tinny: did you mean +conf=tiny? choose one of"),
    "preset without plus": (config("conf=tiny"), "select a preset with a leading plus: +conf=tiny"),
    "train.stepz": (config("+conf=tiny", "train.stepz=5"), "unknown setting train.stepz in train.stepz=5 (train has "
                                                           "no field stepz): did you mean train.steps?"),
    "model.dimm": (config("+conf=tiny", "model.dimm=3"), "did you mean model.dim?"),
    "section typo": (config("trian.steps=3"), "did you mean train.steps?"),
    "field without its section": (config("steps=3"), "did you mean train.steps?"),
    "a section set as a value": (config("train=5"), "train is a section, not a value"),
    "override without a value": (config("train.steps"), "has no value: write train.steps=VALUE"),
    "value of the wrong type": (config("train.steps=abc"), "Value 'abc' of type 'str' could not be converted"),
    "bad override syntax": (config("train.steps=[1"), "train.steps=[1: not a valid override"),
    "contradictory model fields": (config("+conf=tiny", "model.topk_groups=5"),
                                   "model.topk_groups (5) must be <= model.n_expert_groups (2)"),
    "batch not a multiple of micro-batches": (config("+conf=tiny", "train.batch_size=10"), "train.batch_size (10)"),
    "unknown AdamW update": (config("+conf=tiny", "optim.update=fast"),
                             "optim.update ('fast') must be auto, fused, foreach or triton"),
    # parallel sizes
    "parallel.pp=0": (config("+conf=tiny", "parallel.pp=0"), "parallel.pp (0) must be >= 1"),
    "micro_batches not dividing the batch": (config("+conf=tiny", "parallel.pp=2", "parallel.micro_batches=3",
                                                    "train.batch_size=16", world=4), "must divide train.batch_size"),
    "ep larger than the world": (layout("parallel.ep=2", world=1),
                                 "parallel.ep (2) is larger than the data-parallel ranks (1 = 1 processes"),
    "pp not dividing the world": (layout("parallel.pp=3", world=4), "parallel.pp (3) must divide the number of "
                                                                    "processes (4)"),
    "ep larger than dp under pp": (layout("parallel.pp=2", "parallel.ep=4", "train.micro_batch_size=1", world=4),
                                   "parallel.ep (4) is larger than the data-parallel ranks (2"),
    "ep not dividing the experts": (layout("parallel.ep=3", "train.micro_batch_size=1", "train.batch_size=24",
                                           "train.batch_size_start=24", world=6), "model.n_routed_experts (8) must be divisible "
                                                                      "by parallel.ep (3)"),
    "ranks per node not dividing the world": (layout("parallel.ranks_per_node=3", "train.micro_batch_size=1",
                                                     world=4),
                                              "parallel.ranks_per_node (3) must divide the processes (4)"),
}


@pytest.mark.parametrize("case", list(IN_PROCESS), ids=list(IN_PROCESS))
def test_in_process(case, tmp_path, prepared_cache):
    run, fragment = IN_PROCESS[case]
    with pytest.raises(UserError) as caught:
        run(tmp_path, prepared_cache) if case.startswith("cache:") else run(tmp_path)
    message = str(caught.value)
    assert fragment in message and "\n" not in message, message


def test_damaged_cache_is_left_in_place(tmp_path, prepared_cache):
    """Reporting a damaged cache deletes nothing: the user decides (the message names what to delete)."""
    run = damaged_cache(truncate_tokens)
    with pytest.raises(UserError, match="delete .*tokens-"):
        run(tmp_path, prepared_cache)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [prepared_cache[1].name]


# --- counted skips and bounded pieces ----------------------------------------------------------

def test_bad_files_in_a_usable_corpus_are_skipped_and_counted(tmp_path):
    files = {"a.txt": b"good text\n", "b.txt": BINARY, "c.txt": b"", "d.py": "\u00e9".encode("latin-1"),
             "e.jsonl": b"", "f.md": b"more text\n"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    stats = CorpusStats()
    docs = list(iter_documents(DataConfig(source=str(tmp_path), cache_dir=str(tmp_path / "cache")), stats))
    assert docs == ["good text\n", "more text\n"]
    assert stats.skipped_files == [str(tmp_path / "b.txt"), str(tmp_path / "d.py")]
    assert stats.empty_files == [str(tmp_path / "c.txt"), str(tmp_path / "e.jsonl")]
    assert stats.skipped_summary() == (f"2 files skipped as not UTF-8 text (first: {tmp_path / 'b.txt'}), "
                                       "2 empty files skipped")


def test_an_enormous_line_is_cut_into_bounded_pieces_in_bounded_memory(tmp_path):
    """A 24 MiB file without a newline (multi-byte characters included) becomes documents of at most
    MAX_DOCUMENT_BYTES, cut at character boundaries, while Python holds a few pieces at a time."""
    path = tmp_path / "one_line.txt"
    unit = ("x" * 97 + "\u00e9\u4e2d").encode()  # 102 bytes: cuts at MAX_DOCUMENT_BYTES fall inside characters
    with open(path, "wb") as f:
        for _ in range(24):
            f.write(unit * ((1 << 20) // len(unit)))
    size = path.stat().st_size
    stats = CorpusStats()
    tracemalloc.start()
    lengths = [len(doc.encode()) for doc in iter_documents(DataConfig(source=str(path)), stats)]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert sum(lengths) == size and max(lengths) <= MAX_DOCUMENT_BYTES and len(lengths) == -(-size // MAX_DOCUMENT_BYTES)
    assert stats.split_documents == 1 and stats.documents == len(lengths)
    assert peak < 16 * MAX_DOCUMENT_BYTES, peak  # a few pieces at a time, not the 24 MiB file


def test_long_lines_are_cut_after_their_last_newline(tmp_path):
    path = tmp_path / "lines.txt"
    line = "y" * (MAX_DOCUMENT_BYTES // 3) + "\n"
    path.write_text(line * 5)
    docs = list(iter_documents(DataConfig(source=str(path))))
    assert "".join(docs) == line * 5 and all(doc.endswith("\n") for doc in docs)
    assert [len(doc) for doc in docs] == [len(line) * 2, len(line) * 2, len(line)]


# --- the launcher: one line, status 1 ----------------------------------------------------------

def launch(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "launch" / "pretrain.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    return lines[0]


PRESETS = ", ".join(sorted(path.stem for path in (REPO / "conf").glob("*.yaml")))
LAUNCHER = {
    "unknown preset": (["+conf=tinyy"], f"+conf=tinyy: did you mean +conf=tiny? choose one of {PRESETS} "),
    "preset without plus": (["conf=tiny"], "+conf=tiny"),
    "override typo": (["+conf=tiny", "train.stepz=5"], "did you mean train.steps?"),
    "contradictory config": (["+conf=tiny", "model.topk_groups=5"],
                             "model.topk_groups (5) must be <= model.n_expert_groups (2)"),
}


@pytest.mark.parametrize("case", list(LAUNCHER), ids=list(LAUNCHER))
def test_launcher(case, tmp_path):
    args, fragment = LAUNCHER[case]
    line = one_error_line(launch(*args, f"run.dir={tmp_path}"))
    assert fragment in line, line
    assert not (tmp_path / "config.yaml").exists()  # nothing written before the config is valid


@pytest.mark.parametrize("bad", [["train.max_steps=20"],  # refused before Hydra runs
                                 ["parallel.pp=2", "parallel.schedule=dualpipev", "train.steps=1"]])
def test_config_errors_print_once_under_torchrun(bad, tmp_path, data_cache):
    """Every rank meets the same config error; one line in all (rank 0's), not one per rank (interleaved)."""
    result = run_torchrun(2, tmp_path / "run", data_cache, *bad, timeout=300)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert result.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), failure_report(result)
    assert "Traceback" not in LAUNCHER_TRACEBACK.sub("", result.stderr), failure_report(result)
    if "parallel.pp=2" in bad:  # tiny's batch_size_start 8 = 2 micro-batches of 4 x 1 data-parallel rank;
        assert lines[0].endswith("use train.micro_batch_size=2"), lines[0]  # DualPipeV needs 3 at pp 2
    else:
        assert "did you mean train.max_bad_steps?" in lines[0]


def test_other_errors_are_printed_by_each_rank_with_its_number(monkeypatch, capsys):
    """A data or checkpoint error may be one rank's own (its shard of a checkpoint): each rank that meets it
    prints it, prefixed by its rank; alone, a process prints the plain line. Always one line."""
    from train.config import ConfigError
    from train.errors import CheckpointError, print_error

    for rank, world, err, want in [("0", "1", CheckpointError("shard 3\nmissing"), "error: shard 3 missing\n"),
                                   ("3", "4", CheckpointError("shard 3 missing"), "error (rank 3): shard 3 missing\n"),
                                   ("3", "4", ConfigError("bad field"), ""),
                                   ("0", "4", ConfigError("bad field"), "error: bad field\n")]:
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", world)
        print_error(err, rank0_grace_s=0.0)
        assert capsys.readouterr().err == want


def test_other_ranks_wait_for_rank_0s_line(monkeypatch, capsys):
    """A config error every rank meets: the ranks that print nothing wait before they exit, because torchrun
    stops every worker as soon as one exits with an error and would cut rank 0 off before its line (a job
    that failed without a word, seen under load). Rank 0, and an error of one rank's own, do not wait."""
    import train.errors
    from train.config import ConfigError
    from train.errors import CheckpointError, print_error

    waits: list[float] = []
    monkeypatch.setattr(train.errors.time, "sleep", waits.append)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, err, want in [("1", ConfigError("bad field"), [10.0]), ("0", ConfigError("bad field"), []),
                            ("1", CheckpointError("shard 1 missing"), [])]:
        waits.clear()
        monkeypatch.setenv("RANK", rank)
        print_error(err)
        assert waits == want, (rank, err)
    capsys.readouterr()


def test_671b_prints_its_size_and_the_layout_it_needs(tmp_path):
    result = launch("+conf=671b", f"run.dir={tmp_path}")
    line = one_error_line(result)
    assert "671,026.40M parameters" in result.stdout and "37,552.28M activated" in result.stdout
    assert "MTP 13,463.43M (11,610.07M unique)" in result.stdout
    assert "model too large" in line and "parallel.pp=16 parallel.ep=64" in line


def test_fp8_backends_this_machine_cannot_run_say_so_in_one_line(tmp_path, data_cache):
    """A CPU box: the Triton kernels and torch._scaled_mm's blockwise scales need CUDA, and the te backend is
    not a GEMM: each is refused at start-up in one line that names a backend to use, not at the first GEMM."""
    reasons = {"triton": ("runs on CUDA", "cannot import"), "torch": ("rejects blockwise",), "te": ("fp8 backend 'te'",)}
    for backend, fragments in reasons.items():
        line = one_error_line(run_pretrain(tmp_path / backend, data_cache, "fp8.enabled=true",
                                           f"fp8.backend={backend}", "train.steps=1"))
        assert line.startswith(f"error: fp8.backend={backend}: ") and "use " in line, line
        assert any(fragment in line for fragment in fragments), line


def test_missing_corpus_names_the_path(tmp_path, data_cache):
    line = one_error_line(run_pretrain(tmp_path / "run", data_cache, f"data.source={tmp_path}/no_such_corpus"))
    assert "no_such_corpus" in line


def test_tokenizer_larger_than_the_model_vocab(tmp_path, data_cache):
    path = tmp_path / "tokenizer.json"
    train_tokenizer([TEXT], vocab_size=600).save(str(path))
    line = one_error_line(run_pretrain(tmp_path / "run", data_cache, f"data.tokenizer={path}", "model.vocab_size=512"))
    assert "exceeds model.vocab_size (512)" in line


def test_missing_checkpoint_to_resume(tmp_path, data_cache):
    result = run_pretrain(tmp_path / "run", data_cache, f"checkpoint.resume={tmp_path}/nope", "train.steps=1")
    line = one_error_line(result)
    assert f"{tmp_path}/nope" in line and "checkpoint" in line


def test_resuming_a_checkpoint_of_another_model_shape(tmp_path, data_cache):
    """A real checkpoint, resumed by a run whose model differs: the fields that differ, in one line, and the
    checkpoint is left as it was."""
    short = ["train.seq_len=32", "train.batch_size_start=4", "train.batch_size=4", "train.micro_batch_size=4"]
    run_dir = tmp_path / "run"
    first = run_pretrain(run_dir, data_cache, "train.steps=1", *short)
    assert first.returncode == 0, failure_report(first)
    saved = sorted((run_dir / "checkpoints").iterdir())
    before = {p: p.stat().st_size for p in saved[-1].rglob("*") if p.is_file()}
    line = one_error_line(run_pretrain(run_dir, data_cache, "train.steps=2", *short, "model.n_heads=2",
                                       "model.dim=64"))
    assert "model config differs from the run" in line and "model.n_heads (checkpoint 4, run 2)" in line
    assert "model.dim (checkpoint 128, run 64)" in line
    assert {p: p.stat().st_size for p in saved[-1].rglob("*") if p.is_file()} == before
