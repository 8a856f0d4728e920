"""bench/profile_step.py: the step's profile runs on the CPU; the memory-peak analysis of the allocator's
trace (used on CUDA) finds the peak and the allocations live at it, by the innermost site in our code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bench.profile_step import allocation_site, live_at_peak

REPO = Path(__file__).resolve().parents[2]


def frame(path: str, line: int, name: str) -> dict:
    return {"filename": path, "line": line, "name": name}


OURS = frame(str(REPO / "train" / "model.py"), 10, "forward")
TORCH = frame("/site-packages/torch/nn/functional.py", 99, "linear")


def test_allocation_site_is_the_innermost_frame_of_ours():
    assert allocation_site([TORCH, OURS, frame(str(REPO / "train" / "trainer.py"), 5, "step")]) \
        == "train/model.py:10 (forward)"
    assert allocation_site([TORCH]) == "/site-packages/torch/nn/functional.py:99 (linear)"
    assert allocation_site([]) == "?"


def test_live_at_peak_replays_allocs_and_frees():
    a = frame(str(REPO / "train" / "model.py"), 1, "a")
    b = frame(str(REPO / "fp8" / "linear.py"), 2, "b")
    events = [
        {"action": "segment_alloc", "addr": 0, "size": 1 << 30},  # not an allocation of a tensor
        {"action": "alloc", "addr": 1, "size": 100, "frames": [TORCH, a]},
        {"action": "alloc", "addr": 2, "size": 50, "frames": [b]},
        {"action": "free_requested", "addr": 9, "size": 70},  # allocated before the trace: ignored
        {"action": "alloc", "addr": 3, "size": 30, "frames": [b]},  # peak: 180
        {"action": "free_requested", "addr": 1, "size": 100},
        {"action": "free_completed", "addr": 1, "size": 100},
        {"action": "alloc", "addr": 4, "size": 120, "frames": [a]},  # 200: the new peak
        {"action": "free_requested", "addr": 4, "size": 120},
    ]
    peak, by_site = live_at_peak(events)
    assert peak == 200
    assert by_site == {"train/model.py:1 (a)": 120, "fp8/linear.py:2 (b)": 80}
    assert live_at_peak(events[:5]) == (180, {"train/model.py:1 (a)": 100, "fp8/linear.py:2 (b)": 80})
    assert live_at_peak([]) == (0, {})


def test_profile_runs_on_the_cpu():
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "profile_step.py"), "--device", "cpu", "--preset",
                           "tiny", "--steps", "1", "--micro-batches", "1", "--rows", "5"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step " in proc.stdout and "aten::mm" in proc.stdout


def test_live_tensors_on_the_cpu_finds_the_peak_and_what_was_live_then():
    """``LiveTensors`` (--memory on a CPU): storages made under it count from their operation until they are
    freed; the peak and the bytes live at it, by site and operation; small tensors are left out."""
    import torch

    from bench.profile_step import LiveTensors

    mib = 1 << 20
    with LiveTensors() as tracker:
        a = torch.empty(2 * mib, dtype=torch.uint8)
        b = torch.zeros(3 * mib, dtype=torch.uint8)
        view = b[:10]  # a view: no new storage
        del a
        c = torch.empty(1 * mib, dtype=torch.uint8)
        torch.empty(100)  # under 1 MiB: not followed
    assert tracker.peak == 5 * mib and tracker.current == 4 * mib
    sites = {site.split(" ")[-1]: size for site, size in tracker.at_peak.items()}
    assert sites == {"[empty.memory_format]": 2 * mib, "[zeros.default]": 3 * mib}
    assert all("test_profile_step.py" in site for site in tracker.at_peak)
    del b, view, c
    assert tracker.current == 0
