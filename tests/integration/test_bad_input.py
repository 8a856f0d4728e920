"""Bad input at the launcher: one clear line on stderr naming the field or file, exit status 1."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from data.tokenizer import train_tokenizer
from tests.integration.pretrain_runs import REPO, run_pretrain


def launch(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "launch" / "pretrain.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    return lines[0]


def test_unknown_preset_lists_the_presets(tmp_path):
    line = one_error_line(launch("+conf=tinyy", f"run.dir={tmp_path}"))
    presets = sorted(path.stem for path in (REPO / "conf").glob("*.yaml"))
    assert "+conf=tinyy" in line and f"choose one of {', '.join(presets)} " in line and "tiny" in presets


def test_preset_without_plus_is_explained(tmp_path):
    line = one_error_line(launch("conf=tiny", f"run.dir={tmp_path}"))
    assert "+conf=tiny" in line


def test_contradictory_config_names_the_fields(tmp_path):
    line = one_error_line(launch("+conf=tiny", "model.topk_groups=5", f"run.dir={tmp_path}"))
    assert "model.topk_groups (5) must be <= model.n_expert_groups (2)" in line
    line = one_error_line(launch("+conf=tiny", "train.batch_size=10", f"run.dir={tmp_path}"))
    assert "train.batch_size (10)" in line
    assert not (tmp_path / "config.yaml").exists()  # nothing written before the config is valid


def test_expert_parallel_layout_that_does_not_fit_the_world(tmp_path):
    line = one_error_line(launch("+conf=tiny", "parallel.ep=2", f"run.dir={tmp_path}"))
    assert "parallel.ep (2) is larger than the data-parallel ranks (1 = 1 processes" in line
    assert not (tmp_path / "config.yaml").exists()


def test_671b_prints_its_size_and_the_layout_it_needs(tmp_path):
    result = launch("+conf=671b", f"run.dir={tmp_path}")
    line = one_error_line(result)
    assert "671,026.40M parameters" in result.stdout and "37,552.28M activated" in result.stdout
    assert "MTP 13,463.43M (11,610.07M unique)" in result.stdout
    assert "model too large" in line and "parallel.pp=16 parallel.ep=64" in line


def test_missing_corpus_names_the_path(tmp_path, data_cache):
    result = run_pretrain(tmp_path / "run", data_cache, f"data.source={tmp_path}/no_such_corpus")
    line = one_error_line(result)
    assert "no_such_corpus" in line


def test_tokenizer_larger_than_the_model_vocab(tmp_path, data_cache):
    texts = [f"def function_{i}(x):\n    return x * {i} + {i * i}\n" for i in range(400)]
    path = tmp_path / "tokenizer.json"
    train_tokenizer(texts, vocab_size=600).save(str(path))
    result = run_pretrain(tmp_path / "run", data_cache, f"data.tokenizer={path}", "model.vocab_size=512")
    line = one_error_line(result)
    assert "exceeds model.vocab_size (512)" in line


def test_missing_checkpoint_to_resume(tmp_path, data_cache):
    result = run_pretrain(tmp_path / "run", data_cache, f"checkpoint.resume={tmp_path}/nope", "train.steps=1")
    line = one_error_line(result)
    assert f"{tmp_path}/nope" in line and "checkpoint" in line
