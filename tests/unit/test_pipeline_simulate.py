"""Cost-model simulator against the report's Table 2 (bubble, activations, parameters), the timeline PNG
and launch/schedule.py. What "bubble" means here and when each formula holds: docs/pipeline.md."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from parallel.pipeline.actions import Kind
from parallel.pipeline.schedule import make_schedule, min_micro_batches, one_f_one_b
from parallel.pipeline.simulate import Costs, activations_held, plot, simulate

REPO = Path(__file__).resolve().parents[2]
PPS = (2, 4, 6, 8, 16)


def _counts(name: str, pp: int) -> list[int]:
    least = min_micro_batches(name, pp)
    counts = sorted({least, 2 * pp, 3 * pp + 2})
    return [m for m in counts if name != "dualpipe" or m % 2 == 0]


def test_timing_by_hand():
    """1F1B on 2 ranks, 1 micro-batch: F0 [0,1], F1 [1,2], B1 [2,4], B0 [4,6]; comm 0.5 adds two hops."""
    s = one_f_one_b(2, 1)
    r = simulate(s, Costs(F=1, B=2, W=0))
    assert r.makespan == 6 and r.compute == [3, 3] and r.bubble == [3, 3] and r.mean_bubble == 3
    r = simulate(s, Costs(F=1, B=2, W=0, comm=0.5))
    f1 = next(i for i, a in enumerate(s.actions[1]) if str(a) == "F1.0")
    assert (r.start[1][f1], r.end[1][f1]) == (1.5, 2.5)
    assert r.makespan == 7


def test_costs():
    c = Costs(F=1, B=2, W=0.5)
    assert c.fb == 3  # F&B defaults to F + B: no gain from the overlap
    assert Costs(F=1, B=2, W=0.5, FB=2).fb == 2
    with pytest.raises(ValueError, match="W <= B"):
        Costs(F=1, B=1, W=2)
    with pytest.raises(ValueError, match="cost F"):
        Costs(F=-1)


@pytest.mark.parametrize("pp", PPS)
@pytest.mark.parametrize("F,B", [(1, 2), (2, 3), (1, 1), (3, 1)])
def test_table2_1f1b_bubble(pp, F, B):
    """1F1B: every rank is idle (PP-1)(F+B), for any F, B and any number of micro-batches."""
    for m in (1, pp, 2 * pp + 1):
        r = simulate(make_schedule("1f1b", pp, m), Costs(F=F, B=B, W=0))
        assert r.bubble == pytest.approx([(pp - 1) * (F + B)] * pp)


@pytest.mark.parametrize("pp", PPS)
@pytest.mark.parametrize("F,B,W", [(1, 2, 1), (1, 1, 0.5), (1, 2, 0.5), (2, 3, 1), (1, 3, 1)])
def test_table2_zb1p_bubble(pp, F, B, W):
    """ZB1P: every rank is idle (PP-1)(F+B-2W) when W <= F, W <= B-W (a W fits each gap) and m >= PP."""
    for m in [m for m in _counts("zb1p", pp) if m >= pp]:
        r = simulate(make_schedule("zb1p", pp, m), Costs(F=F, B=B, W=W))
        assert r.bubble == pytest.approx([(pp - 1) * (F + B - 2 * W)] * pp)


def test_zb1p_formula_needs_small_w():
    r = simulate(make_schedule("zb1p", 4, 8), Costs(F=1, B=3, W=2))  # W > F: W's no longer fit the gaps
    assert min(r.bubble) > 3 * (1 + 3 - 2 * 2)


def _dualpipe_formula(pp: int, c: Costs) -> float:
    return (pp / 2 - 1) * (c.fb + c.B - 3 * c.W)


@pytest.mark.parametrize("pp", PPS)
@pytest.mark.parametrize("F,W", [(1, 1), (1, 0.5), (2, 1), (1, 0)])
def test_table2_dualpipe_bubble(pp, F, W):
    """DualPipe: the most idle rank is idle exactly (PP/2-1)(F&B+B-3W) when F = B-W (forward as long as
    the backward for input), W <= F and F&B = B (the overlapped pair costs what its backward costs);
    independent of the number of micro-batches (report: 'neither the bubbles nor activation memory will
    increase as the number of micro-batches grows')."""
    c = Costs(F=F, B=F + W, W=W, FB=F + W)
    for m in _counts("dualpipe", pp):
        r = simulate(make_schedule("dualpipe", pp, m), c)
        assert max(r.bubble) == pytest.approx(_dualpipe_formula(pp, c))


@pytest.mark.parametrize("pp", (4, 8, 16))
@pytest.mark.parametrize("F,B,W,FB", [(1, 3, 1, 3), (1, 3, 1, 4), (2, 5, 1, 6), (1, 2, 0.5, 3), (1, 2, 1, 3)])
def test_dualpipe_formula_bounds_when_backward_is_longer(pp, F, B, W, FB):
    """With F < B-W, W <= F and B <= F&B <= F+B the formula is an upper bound of every rank's bubble."""
    c = Costs(F=F, B=B, W=W, FB=FB)
    r = simulate(make_schedule("dualpipe", pp, 2 * pp + 2), c)
    assert max(r.bubble) <= _dualpipe_formula(pp, c) + 1e-9


@pytest.mark.parametrize("pp", (2, 3, 4, 8))
def test_dualpipev_matches_dualpipe_on_twice_the_ranks(pp):
    """DualPipeV on pp ranks (2pp stages) idles like DualPipe on 2pp ranks, per chunk: (pp-1)(F&B+B-3W)
    at the same conditions; a DualPipeV chunk is half a DualPipe chunk, hence '(PP-1)(F&B+B-3W)/2' in
    DualPipe's units."""
    c = Costs(F=1, B=2, W=1, FB=2)
    v = simulate(make_schedule("dualpipev", pp, 2 * pp + 2), c)
    d = simulate(make_schedule("dualpipe", 2 * pp, 2 * (2 * pp) + 2), c)
    assert max(v.bubble) == pytest.approx(max(d.bubble)) == pytest.approx((pp - 1) * (c.fb + c.B - 3 * c.W))


@pytest.mark.parametrize("pp", PPS)
def test_table2_activations_and_parameters(pp):
    """Peak activations on the first rank: 1F1B PP, ZB1P PP (from m = PP micro-batches on), DualPipe PP+1
    (DualPipeV 2PP+1 half-size chunks = PP+1/2) from m = 2PP on; parameters 1x, 1x, 2x, 1x."""
    for name, peak, memory, params, least in [("1f1b", pp, pp, 1, pp), ("zb1p", pp, pp, 1, pp),
                                              ("dualpipe", pp + 1, pp + 1, 2, 2 * pp),
                                              ("dualpipev", 2 * pp + 1, pp + 0.5, 1, 2 * pp)]:
        for m in [m for m in _counts(name, pp) if m >= least]:
            r = simulate(make_schedule(name, pp, m), Costs())
            assert r.peak_activations[0] == peak, (name, m)
            assert r.activation_memory[0] == pytest.approx(memory)
            assert r.param_copies == pytest.approx([params] * pp)
            assert max(r.peak_activations) <= peak


def test_below_the_table2_counts():
    """Fewer micro-batches than Table 2 assumes: ZB1P idles more with m < PP (like 1F1B it cannot fill
    the pipeline), DualPipe at its minimum m = 2PP-2 holds one activation less than PP+1."""
    c = Costs(F=1, B=2, W=1)
    assert simulate(make_schedule("zb1p", 8, 4), c).bubble[0] > 7 * (1 + 2 - 2)
    assert activations_held(make_schedule("dualpipe", 8, 14))[0] == 8


def test_activation_count_by_hand():
    s = one_f_one_b(2, 3)  # rank 0: F F B F B B -> 2 held; rank 1: F B F B F B -> 1
    assert activations_held(s) == [2, 1]
    s = make_schedule("zb1p", 2, 3)  # rank 1 keeps one W pending: F B F B W ... -> 2 held
    assert activations_held(s) == [2, 2]


def test_comm_latency_costs_time():
    s = make_schedule("dualpipe", 4, 8)
    base = simulate(s, Costs()).makespan
    assert simulate(s, Costs(comm=0.25)).makespan > base


@pytest.mark.parametrize("name", ["1f1b", "zb1p", "dualpipe", "dualpipev"])
def test_plot_writes_png(tmp_path, name):
    s = make_schedule(name, 4, 10)
    out = tmp_path / f"{name}.png"
    plot(s, simulate(s, Costs(FB=2)), str(out))
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and 5_000 < len(data) < 200_000


def _load(name: str, path: Path):
    """A script as a module (registered, so its dataclasses resolve their module)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _launcher():
    return _load("launch_schedule", REPO / "launch" / "schedule.py")


def test_launcher(tmp_path, capsys):
    launcher = _launcher()
    png = tmp_path / "out.png"
    assert launcher.main(["schedule=dualpipe", "pp=8", "micro_batches=20", f"png={png}", "fb=2"]) == 0
    out = capsys.readouterr().out
    assert "makespan           52" in out and "bubble per rank    1 2 3 3 3 3 2 1" in out
    assert "peak activations   9 9 9 9 9 9 9 9" in out and png.stat().st_size > 5_000
    for bad, fragment in [(["schedule=dualpipe", "micro_batches=5"], "use parallel.micro_batches=14"),
                          (["pp=two"], "pp='two' is not an integer"), (["speed=3"], "unknown argument"),
                          (["w=3"], "W <= B"), ([f"png={tmp_path}/missing/x.png"], "folder does not exist")]:
        assert launcher.main(bad) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and fragment in err and err.count("\n") == 1


def test_simulated_kinds_cost_what_table2_says():
    """Split schedules: a B costs B-W, an FB costs F&B-W (its W follows); 1F1B's B is the full B."""
    c = Costs(F=1, B=3, W=1, FB=3.5)
    s = make_schedule("dualpipe", 4, 8)
    r = simulate(s, c)
    durations = {}
    for acts, st, en in zip(s.actions, r.start, r.end):
        for a, t0, t1 in zip(acts, st, en):
            durations.setdefault(a.kind, set()).add(round(t1 - t0, 9))
    assert durations[Kind.B] == {2} and durations[Kind.W] == {1} and durations[Kind.FB] == {2.5}
    assert durations[Kind.F] == {1}


def test_bench_part_a_rows():
    bench = _load("bench_pipeline", REPO / "bench" / "pipeline.py")
    rows = bench.simulated_rows([8], [2], Costs(F=1, B=2, W=1, FB=2))
    assert [r.schedule for r in rows] == ["1f1b", "zb1p", "dualpipe", "dualpipev"]
    by = {r.schedule: r for r in rows}
    assert by["1f1b"].vs_1f1b == 1 and by["dualpipe"].vs_1f1b < by["zb1p"].vs_1f1b < 1
    assert by["dualpipe"].max_bubble == pytest.approx(by["dualpipe"].table2_bubble) == 3
    assert (by["dualpipe"].activations, by["dualpipe"].params) == (9, 2)
    assert (by["dualpipev"].activations, by["dualpipev"].params) == (8.5, 1)
    assert "dualpipev" in bench.format_rows(rows)
