"""Safety: no untrusted pickle is loaded, configs cannot name code to run, secrets stay out of run outputs.

- The shipped code (not tests) is read with ``ast``: every ``torch.load`` passes ``weights_only=True``,
  nothing calls ``pickle.load(s)`` / ``Unpickler``, ``np.load`` never allows pickles, YAML is read with
  ``safe_load``. Exceptions are listed with the reason they are trusted.
- No Hydra ``instantiate`` and no ``_target_`` anywhere; overrides naming code (``_target_``,
  ``hydra.callbacks``, which Hydra would instantiate) are refused with one line.
- A real tiny training with ``WANDB_API_KEY`` set writes the secret to no file of its run directory
  and prints it nowhere.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.integration.pretrain_runs import REPO, failure_report, run_pretrain
from train.config import ConfigError, check_command_line, load_config

SHIPPED = ("train", "data", "parallel", "fp8", "launch", "bench")
# file -> why its unpickling is trusted (read it before adding one)
TRUSTED = {
    "parallel/local_ranks.py": "torch.load of results its own forked children send through a pipe",
}


def shipped_files() -> list[Path]:
    return sorted(p for top in SHIPPED for p in (REPO / top).rglob("*.py"))


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def _keyword_is(call: ast.Call, name: str, value: object) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value for k in call.keywords)


def unsafe_loads(path: Path) -> list[str]:
    """'file:line what' for every call in ``path`` that can run code from the data it loads."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        last = name.rsplit(".", 1)[-1]
        where = f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}:{node.lineno}"
        if name.endswith("torch.load") and not _keyword_is(node, "weights_only", True):
            found.append(f"{where} {name} without weights_only=True")
        elif name.split(".")[0] in ("pickle", "cPickle", "dill", "cloudpickle", "joblib") and last in (
                "load", "loads", "Unpickler"):
            found.append(f"{where} {name}")
        elif last == "load" and name.split(".")[0] in ("np", "numpy") and _keyword_is(node, "allow_pickle", True):
            found.append(f"{where} {name}(allow_pickle=True)")
        elif name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all"):
            found.append(f"{where} {name} (use yaml.safe_load)")
    return found


def test_the_scan_finds_what_it_looks_for(tmp_path):
    probe = tmp_path / "probe.py"
    source = ("import pickle, torch, numpy as np, yaml\npickle.loads(b'')\ntorch.load('x')\n"
              "torch.load('x', weights_only=False)\nnp.load('x', allow_pickle=True)\nyaml.load('')\n"
              "torch.load('x', weights_only=True)\nnp.load('x')\nyaml.safe_load('')\n")
    probe.write_text(source)
    assert [f.split(" ", 1)[0].rsplit(":", 1)[1] for f in unsafe_loads(probe)] == ["2", "3", "4", "5", "6"]


def test_no_untrusted_pickle_is_loaded():
    found = []
    for path in shipped_files():
        relative = str(path.relative_to(REPO))
        if relative in TRUSTED:
            continue
        found += unsafe_loads(path)
    assert not found, "unsafe deserialization:\n" + "\n".join(found)
    for relative in TRUSTED:  # the exception is still needed and still explained where it is
        assert unsafe_loads(REPO / relative), f"{relative}: no longer loads pickles; drop it from TRUSTED"
        assert "trusted" in (REPO / relative).read_text()


def test_every_unpickler_restricts_what_it_builds():
    """DCP's own .metadata file is a pickle: train/checkpoint.py reads it with a pickle.Unpickler subclass
    whose find_class admits only DCP's metadata classes. Any such subclass must override find_class."""
    subclasses = 0
    for path in shipped_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef) and any(_dotted(b).endswith("Unpickler") for b in node.bases):
                subclasses += 1
                methods = {n.name for n in node.body if isinstance(n, ast.FunctionDef)}
                assert "find_class" in methods, f"{path}:{node.lineno} {node.name} unpickles without restriction"
    assert subclasses >= 1  # the checkpoint metadata reader


def _keys(node: object) -> list[str]:
    if isinstance(node, dict):
        return [str(k) for k in node] + [k for v in node.values() for k in _keys(v)]
    return [k for v in node for k in _keys(v)] if isinstance(node, list) else []


def test_nothing_is_instantiated_from_configs():
    for path in shipped_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                assert not _dotted(node.func).endswith("instantiate"), f"{path}:{node.lineno}"
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hydra"):
                assert all(alias.name != "instantiate" for alias in node.names), f"{path}:{node.lineno}"
    for path in (REPO / "conf").glob("*.yaml"):
        keys = _keys(yaml.safe_load(path.read_text()))
        assert "_target_" not in keys and "callbacks" not in keys, path


@pytest.mark.parametrize("override", ["+model._target_=os.system", "+_target_=os.system",
                                      "+hydra.callbacks.x._target_=os.getcwd", "+model={_target_: os.system}",
                                      "hydra={callbacks: {}}"])
def test_overrides_naming_code_are_refused(override):
    with pytest.raises(ConfigError, match="refused: an override cannot name code to instantiate") as caught:
        check_command_line(["+conf=tiny", override])
    assert "\n" not in str(caught.value)
    with pytest.raises(ConfigError):
        load_config(["+conf=tiny", override])


def test_the_launcher_refuses_a_target_in_one_line(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(REPO / "launch" / "pretrain.py"), "+conf=tiny",
                             "+hydra.callbacks.x._target_=os.getcwd", f"run.dir={tmp_path}"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: +hydra.callbacks.x._target_=os.getcwd: refused: an override cannot name code to instantiate "
        "(_target_, hydra.callbacks); settings are plain values"]
    assert not any(tmp_path.iterdir())


SECRET = "wandb-secret-3f9c2d7e41b8a6"


def test_no_secret_in_run_outputs(tmp_path, data_cache, monkeypatch):
    """A real tiny training (wandb offline) with WANDB_API_KEY in its environment: the key appears in no file
    of the run directory (config, metrics, checkpoints, wandb's offline run) and not in its output."""
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    run_dir = tmp_path / "run"
    result = run_pretrain(run_dir, data_cache, "train.steps=2", "checkpoint.every=1", "logging.wandb=offline",
                          "train.seq_len=32", "train.batch_size_start=4", "train.batch_size=4",
                          "train.micro_batch_size=4")
    assert result.returncode == 0, failure_report(result)
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert (run_dir / "config.yaml") in files and list((run_dir / "wandb").glob("offline-run-*"))
    leaks = [str(p) for p in files if SECRET.encode() in p.read_bytes()]
    assert not leaks, f"the secret was written to {leaks}"
    assert SECRET not in result.stdout + result.stderr
