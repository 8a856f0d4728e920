"""The benchmark harness (bench/run.py): ``python -m bench --quick`` runs every benchmark with a ratio and a
passing check, and a perturbed output makes its check, and the run, fail."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.run import BENCHMARKS, check_close, format_table, Check, Row

ROOT = Path(__file__).resolve().parents[2]
ROW = re.compile(r"^\| (?P<bench>[a-z]+): .* \| (?P<ratio>[0-9.]+)x \| (?P<status>pass|FAIL|skip): ")


def run_bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def table_rows(stdout: str) -> list[re.Match]:
    return [m for m in map(ROW.match, stdout.splitlines()) if m]


def test_quick_run_has_a_passing_row_per_benchmark():
    proc = run_bench("--quick")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = table_rows(proc.stdout)
    assert {m["bench"] for m in rows} == set(BENCHMARKS), proc.stdout
    for m in rows:
        assert m["status"] == "pass", m.string
        assert float(m["ratio"]) > 0, m.string


def test_perturbed_output_fails_the_check_and_the_run():
    proc = run_bench("moe", "memory", "--quick", "--perturb", "0.01")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = table_rows(proc.stdout)
    assert {m["bench"] for m in rows} == {"moe", "memory"}
    assert all(m["status"] == "FAIL" for m in rows), proc.stdout
    assert "FAILED" in proc.stderr


def test_unknown_benchmark_is_refused():
    proc = run_bench("nosuch", "--quick")
    assert proc.returncode == 2 and "unknown benchmark" in proc.stderr


def test_check_close():
    a = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    assert check_close("same", a, a.clone(), 1e-6).passed
    assert check_close("float rounding", a, a.double() * (1 + 1e-9), 1e-6).passed
    assert not check_close("mismatched", a, a * 1.01, 1e-6).passed
    b = a.clone()
    b[3, 4] += 1.0
    assert not check_close("one element off", b, a, 1e-3).passed
    assert not check_close("nan", a * float("nan"), a, 1.0).passed
    with pytest.raises(ValueError, match="shapes differ"):
        check_close("shape", a, a.t(), 1.0)


def test_table_marks_a_failed_check():
    rows = [Row("x: a", "tokens/s ↑", 2.0, 1.0, Check(True, "ok")),
            Row("y: b", "ms ↓", 1.0, 2.0, Check(False, "diff 1 > 0"))]
    lines = format_table(rows).splitlines()
    assert "| 2.00x | pass: ok |" in lines[2] and "| 0.50x | FAIL: diff 1 > 0 |" in lines[3]


def test_scaling_model_reproduces_the_planner_and_overlap_helps():
    from bench.scaling import Scenario, predict
    from train.config import load_config
    from train.plan import Cluster, plan

    cfg, cluster = load_config(["+conf=671b"]), Cluster(gpus=2048)
    on = predict(cfg, cluster, Scenario(cluster.mfu, overlap=True))
    assert on.pipeline_s == pytest.approx(plan(cfg, cluster, suggest=False).pipeline_s, rel=1e-9)
    off = predict(cfg, cluster, Scenario(cluster.mfu, overlap=False))
    bound = predict(cfg, cluster, Scenario(cluster.mfu, overlap=True, all_to_all=False))
    assert bound.step_s < on.step_s < off.step_s
    assert on.gpu_hours_per_trillion == pytest.approx(1e12 / on.tokens_per_gpu_s / 3600)


def run_interpreted(script: str) -> str:
    """``bench/<script> --device cpu --quick`` (one timed call per case) with Triton's interpreter: stdout."""
    pytest.importorskip("triton", reason="Triton is not installed (the gpu extra)")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--device", "cpu", "--quick", "--repeats",
                             "1", "--warmup", "0"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


def test_fp8_quant_bench_runs_the_kernels_in_the_interpreter():
    """bench/fp8_quant.py's GPU path (the fused kernels, the bit comparison, the separate-kernel baselines)
    run in Triton's interpreter on the CPU, so a GPU call does not find its bugs: every case's bits agree."""
    out = run_interpreted("fp8_quant.py")
    rows = [line for line in out.splitlines() if line.startswith(("activation", "expert", "weight"))]
    assert len(rows) == 6 and all(" same" in row for row in rows), out
    assert sum("separate kernels:" in row for row in rows) == 2


def test_fp8_gemm_bench_runs_the_triton_kernels_in_the_interpreter():
    """bench/fp8_gemm.py's Triton rows (dense, the experts' Wgrad and its loop, grouped and the stacked
    gate+up shape) in Triton's interpreter on the CPU: each within 1e-5 of the exact product of its FP8
    operands (its kernel's bound on a GPU is 1.3e-4 at K = 7168; here K = 512, seen 7e-8)."""
    out = run_interpreted("fp8_gemm.py")
    rows = [line.split() for line in out.splitlines() if line.startswith("  triton")]
    assert len(rows) == 6, out
    assert all(float(row[-2]) < 1e-5 for row in rows), out  # err_ref, then err_fp32


def test_fp8_quant_bench_times_the_pytorch_operations_on_the_cpu(capsys):
    """bench/fp8_quant.py on the CPU: every case timed through the PyTorch operations (the fused kernel
    and the bit comparison need a GPU: bash bench/gpu_check.sh fp8)."""
    from bench.fp8_quant import main

    assert main(["--device", "cpu", "--quick", "--repeats", "1", "--warmup", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len([line for line in lines if line.startswith(("activation", "expert", "weight"))]) == 6
    assert any(line.startswith("activation 256 x 512, 128x1 (transposed)") for line in lines)
    assert any(line.startswith("expert rows 256 x 512, both, aligned layout") for line in lines)


def test_gpu_check_commands_match_the_scripts_they_call():
    """bash bench/gpu_check.sh, read as text: every test file it runs exists, every flag it passes a bench
    script is one that script's --help names, every benchmark name is the harness's, and every preset with
    its --set overrides loads: a renamed flag or a bad override would otherwise spend a GPU call."""
    import shlex

    from train.config import load_config

    text = (ROOT / "bench" / "gpu_check.sh").read_text().replace("\\\n", " ")
    commands = [shlex.split(m.group(1)) for m in re.finditer(r"^\s*step \d+ \S+ (.*)$", text, re.M)]
    assert len(commands) >= 10
    helps: dict[str, str] = {}
    for words in commands:
        if words[0] == "$PYTEST":
            assert all((ROOT / path).is_file() for path in words[1:]), words
            continue
        assert words[0] == "python3", words
        script = words[1:3] if words[1] == "-m" else words[1:2]
        if " ".join(script) not in helps:
            helps[" ".join(script)] = subprocess.run([sys.executable, *script, "--help"], cwd=ROOT, capture_output=True,
                                                     text=True, timeout=120).stdout
        usage = helps[" ".join(script)]
        args = words[len(script) + 1:]
        assert all(a.split("=")[0] in usage for a in args if a.startswith("--")), (words, usage)
        if script == ["-m", "bench"]:
            assert all(a in BENCHMARKS for a in args if not a.startswith("--") and a != "cuda"), words
        if "--preset" in args:
            sets = [args[i + 1] for i, a in enumerate(args) if a == "--set" and "$" not in args[i + 1]]
            load_config([f"+conf={args[args.index('--preset') + 1]}", *sets])
