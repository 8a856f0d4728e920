"""train/profiling.py: which steps a profile window covers, and what it writes (real torch.profiler runs)."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from train.profiling import StepProfiler, profile_windows


def test_consecutive_steps_make_one_window():
    assert profile_windows([]) == []
    assert profile_windows([5, 6, 9]) == [(5, 6), (9, 9)]
    assert profile_windows([9, 6, 5, 6]) == [(5, 6), (9, 9)]  # order and repeats do not matter


def run_steps(profiler: StepProfiler, first: int, last: int) -> dict[int, list]:
    """A loop like the trainer's: a matmul per step, the profiler called around it; the files closed per step."""
    written = {}
    a = torch.randn(64, 64)
    for step in range(first, last + 1):
        profiler.before_step(step)
        (a @ a).sum().item()
        written[step] = profiler.after_step(step)
    return written


def trace_names(path) -> set[str]:
    with gzip.open(path, "rt") as f:
        return {event.get("name") for event in json.load(f)["traceEvents"]}


def test_a_window_writes_its_trace_and_table_after_its_last_step(tmp_path):
    profiler = StepProfiler([2, 3, 5], tmp_path, rank=1, device=torch.device("cpu"))
    written = run_steps(profiler, 1, 6)
    window = tmp_path / "profile" / "steps_2-3"
    assert {s: [p.name for p in files] for s, files in written.items() if files} == {
        3: ["rank1.trace.json.gz", "rank1.txt"], 5: ["rank1.trace.json.gz", "rank1.txt"]}
    assert written[3][0].parent == window
    assert "aten::mm" in trace_names(window / "rank1.trace.json.gz")
    table = (window / "rank1.txt").read_text()
    assert table.startswith("steps 2-3, rank 1, cpu") and "aten::mm" in table
    assert [profiler.profiling(s) for s in range(1, 7)] == [False, True, True, False, True, False]


def test_other_ranks_do_not_profile(tmp_path):
    profiler = StepProfiler([1], tmp_path, rank=3, device=torch.device("cpu"), ranks=[0, 1])
    assert run_steps(profiler, 1, 2) == {1: [], 2: []} and not (tmp_path / "profile").exists()
    assert not profiler.profiling(1)


def test_a_resume_inside_a_window_profiles_the_rest_and_an_early_end_still_writes(tmp_path):
    profiler = StepProfiler([4, 5, 6, 7], tmp_path, rank=0, device=torch.device("cpu"), record_memory=True)
    run_steps(profiler, 5, 6)  # resumed at step 5, stopped after step 6
    assert not (tmp_path / "profile").exists()
    files = profiler.close()
    assert [p.parent.name for p in files] == ["steps_5-7", "steps_5-7"]
    assert "Input Shapes" in files[1].read_text()  # record_memory adds the shapes
    assert profiler.close() == []  # nothing left open


@pytest.mark.parametrize("bad", ["logging.profile_steps=[0]", "logging.profile_ranks=[-1]"])
def test_bad_profile_settings_are_one_line_errors(bad):
    from train.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=bad.split("=")[0]):
        load_config(["+conf=tiny", bad])
