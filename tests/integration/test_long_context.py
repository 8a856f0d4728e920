"""Long-context extension end to end at tiny scale (report sec 4.3): pretrain at 128 tokens, extend to 512
with YaRN through checkpoint.init_from (+conf=tiny_ext), evaluate both with launch/eval.py."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.integration.pretrain_runs import REPO, TINY_DATA, failure_report, run_pretrain
from train import checkpoint
from train.config import ModelConfig
from train.model import attention_softmax_scale, rope_inv_freq, rope_tables
from train.trainer import read_metrics

pytestmark = pytest.mark.slow

BASE_STEPS, EXT_STEPS = 100, 4  # 100: the base uses positions enough that extrapolating past 128 shows
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}


def run(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


def run_eval(*args: str) -> subprocess.CompletedProcess:
    return run([str(REPO / "launch" / "eval.py"), *args])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache):
    """A tiny base run (seq 128) and its extension (seq 512, YaRN s=4) started from it with init_from."""
    root = tmp_path_factory.mktemp("long_context")
    base, ext = root / "base", root / "ext"
    result = run_pretrain(base, data_cache, f"train.steps={BASE_STEPS}")
    assert result.returncode == 0, failure_report(result)
    result = run([str(REPO / "launch" / "pretrain.py"), "+conf=tiny_ext", f"run.dir={ext}",
                  f"data.cache_dir={data_cache}", *TINY_DATA, f"checkpoint.init_from={base}",
                  f"train.steps={EXT_STEPS}"])
    assert result.returncode == 0, failure_report(result)
    return base, ext, result.stdout


def model_cfg(run_dir: Path) -> ModelConfig:
    return ModelConfig(**checkpoint.read_meta(checkpoint.latest_checkpoint(run_dir))["model"])


def test_extension_starts_from_the_base_weights_at_step_zero(runs):
    base, ext, stdout = runs
    base_metrics, ext_metrics = read_metrics(base), read_metrics(ext)
    assert [m["step"] for m in ext_metrics] == list(range(1, EXT_STEPS + 1))  # a new run: step 1 first
    assert [p.name for p in checkpoint.list_checkpoints(ext)] == [f"step_{EXT_STEPS:08d}"]
    assert "initialised from" in stdout and "new run at step 0" in stdout
    assert "rope_factor 1.0 -> 4.0" in stdout and "max_seq_len 256 -> 512" in stdout
    # the weights came along: a fresh model starts at ln(2048) = 7.6, the base ends near 4.5. The first
    # extension batch (other documents, 512-token sequences: more context per token) lands within about
    # 0.6 of the base's end on either side (3.86 against 4.46 measured), so the check is which one it is
    # near: the trained base, not an untrained model
    base_end = sum(m["lm_loss"] for m in base_metrics[-5:]) / 5
    first = ext_metrics[0]["lm_loss"]
    untrained = math.log(2048)
    assert first < 6.5 and abs(first - base_end) < abs(first - untrained) / 2, (first, base_end)
    # the extension's schedule: constant LR, batch 4 x 512, lambda 0.1, gamma 0, no ramp
    for m in ext_metrics:
        assert (m["lr"], m["batch_size"], m["mtp_weight"], m["bias_update_speed"]) == (1e-4, 4, 0.1, 0.0)
    assert ext_metrics[-1]["tokens"] == EXT_STEPS * 4 * 512


def test_rope_tables_follow_the_yarn_formula(runs):
    base, ext, _ = runs
    b, e = model_cfg(base), model_cfg(ext)
    assert (b.rope_factor, e.rope_factor, e.original_seq_len, e.max_seq_len) == (1.0, 4.0, 128, 512)
    # YaRN by hand (NTK-by-parts, Peng et al. 2023): pair i keeps its frequency below the beta=32 rotations
    # boundary, is divided by s above the alpha=1 boundary, and blends linearly in between
    d, base_theta, s, length = e.qk_rope_head_dim, e.rope_theta, e.rope_factor, e.original_seq_len
    plain = [base_theta ** (-2 * i / d) for i in range(d // 2)]

    def boundary(rotations: float) -> float:
        return d * math.log(length / (rotations * 2 * math.pi)) / (2 * math.log(base_theta))

    low, high = max(math.floor(boundary(32.0)), 0), min(math.ceil(boundary(1.0)), d - 1)
    want = []
    for i, f in enumerate(plain):
        interpolated = min(max((i - low) / (high - low), 0.0), 1.0)
        want.append(f / s * interpolated + f * (1 - interpolated))
    assert rope_inv_freq(b).tolist() == pytest.approx(plain, rel=1e-6)
    assert rope_inv_freq(e).tolist() == pytest.approx(want, rel=1e-6)
    assert want[0] == pytest.approx(plain[0]) and want[-1] == pytest.approx(plain[-1] / 4)
    cos_b, _ = rope_tables(b)
    cos_e, sin_e = rope_tables(e)
    positions = torch.arange(512, dtype=torch.float64)[:, None]
    angles = positions * torch.tensor(want, dtype=torch.float64)
    assert torch.allclose(cos_e.double(), angles.cos(), atol=1e-4) and torch.allclose(sin_e.double(), angles.sin(),
                                                                                      atol=1e-4)
    assert not torch.allclose(cos_e[:256], cos_b[:256], atol=1e-2)  # the tables did change
    sqrt_t = 0.1 * math.log(4.0) + 1
    assert attention_softmax_scale(e) / attention_softmax_scale(b) == pytest.approx(sqrt_t**2, rel=1e-9)


def test_eval_perplexity_and_passkey_on_both(runs, tmp_path):
    base, ext, _ = runs
    outputs = {}
    for name, ckpt, extra in (("base", base, ["model.max_seq_len=512"]),  # the base beyond 128 without YaRN
                              ("ext", ext, [])):
        for task, args in (("ppl", ["lengths=[128,512]", "tokens=8192"]),
                           ("passkey", ["lengths=[128,512]", "samples=2", "depths=[0.0,0.5,1.0]"])):
            out = tmp_path / f"{name}_{task}.json"
            result = run_eval(f"task={task}", f"checkpoint={ckpt}", *args, *extra, "--json", str(out))
            assert result.returncode == 0, failure_report(result)
            print(result.stdout)  # the tables, for the log (pytest -s)
            outputs[name, task] = json.loads(out.read_text())
            assert f"wrote {out}" in result.stdout
    for name in ("base", "ext"):
        ppl = {r["length"]: r for r in outputs[name, "ppl"]["results"]}
        assert set(ppl) == {128, 512} and ppl[512]["windows"] == 16 and ppl[128]["windows"] == 64
        assert "held out" in outputs[name, "ppl"]["data"]
        passkey = outputs[name, "passkey"]
        cells = {(r["length"], r["depth"]) for r in passkey["results"]}
        assert cells == {(n, d) for n in (128, 512) for d in (0.0, 0.5, 1.0, None)}  # None: the no-needle control
        assert passkey["chance"] == 0.1 and all(0 <= r["accuracy"] <= 1 for r in passkey["results"])
    assert outputs["ext", "ppl"]["model"]["rope_factor"] == 4.0 and outputs["base", "ppl"]["model"]["rope_factor"] == 1
    # at 512 tokens the extended model beats the base run past its training length without YaRN
    base_512 = {r["length"]: r for r in outputs["base", "ppl"]["results"]}[512]
    ext_512 = {r["length"]: r for r in outputs["ext", "ppl"]["results"]}[512]
    assert ext_512["ppl"] < base_512["ppl"], (ext_512, base_512)
    assert ext_512["ppl_2nd_half"] < base_512["ppl_2nd_half"], (ext_512, base_512)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    return lines[0]


def test_eval_bad_input_is_one_line(runs, tmp_path):
    base, _, _ = runs
    line = one_error_line(run_eval("task=ppl", f"checkpoint={tmp_path}/nope"))
    assert f"{tmp_path}/nope" in line and "does not exist" in line
    line = one_error_line(run_eval("task=ppl", f"checkpoint={base}", "lengths=[1024]"))
    assert "1024 is above the model's max_seq_len (256)" in line and "model.max_seq_len=1024" in line
    line = one_error_line(run_eval("task=haystack", f"checkpoint={base}"))
    assert "task=ppl or task=passkey" in line
    line = one_error_line(run_eval("task=ppl", f"checkpoint={base}", "model.dim=64"))
    assert "model.dim" in line
