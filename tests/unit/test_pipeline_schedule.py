"""Pipeline schedule generators and the validator (report sec 3.2.1, Figure 5): pure Python, no torch."""

from __future__ import annotations

import copy
from collections import Counter

import pytest

from parallel.pipeline.actions import Action, Kind, Schedule
from parallel.pipeline.schedule import (
    SCHEDULES,
    ScheduleError,
    dualpipe,
    dualpipev,
    make_schedule,
    min_micro_batches,
    one_f_one_b,
    validate,
    zb1p,
)


def _cases():
    for name in SCHEDULES:
        for pp in (2, 3, 4, 6, 8, 16):
            if name == "dualpipe" and pp % 2:
                continue
            least = min_micro_batches(name, pp)
            counts = {least, least + 2, 2 * pp, 3 * pp + 2} | ({1, pp - 1} if least == 1 else set())
            for m in sorted(counts):
                if name == "dualpipe" and m % 2:
                    continue
                yield name, pp, m


@pytest.mark.parametrize("name,pp,m", list(_cases()))
def test_every_generator_validates(name, pp, m):
    s = make_schedule(name, pp, m)
    validate(s)
    assert (s.name, s.pp, s.micro_batches) == (name, pp, m)
    assert len(s.actions) == pp
    computed = Counter(kind for acts in s.actions for a in acts
                       for kind in ((Kind.F, Kind.B) if a.kind == Kind.FB else (a.kind,)))
    stages = s.n_stages
    assert computed[Kind.F] == computed[Kind.B] == stages * m
    assert computed[Kind.W] == (stages * m if s.split_backward else 0)


def test_layouts():
    s = one_f_one_b(4, 8)
    assert (s.n_stages, s.split_backward, s.placement) == (4, False, [[0], [1], [2], [3]])
    assert s.routes[5] == [(0, 0), (1, 0), (2, 0), (3, 0)]
    assert zb1p(4, 8).split_backward

    s = dualpipe(4, 8)  # rank r: stage r (chunk 0) and a copy of stage 3-r (chunk 1)
    assert (s.n_stages, s.split_backward, s.placement) == (4, True, [[0, 3], [1, 2], [2, 1], [3, 0]])
    assert s.routes[0] == [(0, 0), (1, 0), (2, 0), (3, 0)]  # micro-batches 0..3 enter at rank 0
    assert s.routes[4] == [(3, 1), (2, 1), (1, 1), (0, 1)]  # 4..7 at rank 3, on the copies

    s = dualpipev(4, 8)  # a V: down the ranks on chunk 0, back up on chunk 1
    assert (s.n_stages, s.split_backward, s.placement) == (8, True, [[0, 7], [1, 6], [2, 5], [3, 4]])
    assert s.routes[3] == [(0, 0), (1, 0), (2, 0), (3, 0), (3, 1), (2, 1), (1, 1), (0, 1)]


def test_one_f_one_b_order():
    s = one_f_one_b(4, 6)
    compute = [[str(a) for a in acts if a.kind in (Kind.F, Kind.B)] for acts in s.actions]
    assert compute[0] == ["F0.0", "F0.1", "F0.2", "F0.3", "B0.0", "F0.4", "B0.1", "F0.5", "B0.2", "B0.3",
                          "B0.4", "B0.5"]
    assert compute[3][:4] == ["F3.0", "B3.0", "F3.1", "B3.1"]
    # explicit messages: rank 1 receives mb 0's activation from rank 0 before its forward
    assert [str(a) for a in s.actions[1][:3]] == ["RECV_F0.0@0", "F1.0", "SEND_F1.0@2"]


def test_zb1p_defers_weight_gradients():
    s = zb1p(4, 8)
    kinds = [[a.kind for a in acts if a.kind in (Kind.F, Kind.B, Kind.W)] for acts in s.actions]
    assert kinds[0][4:7] == [Kind.B, Kind.W, Kind.F]  # rank 0 keeps no W pending
    last = [str(a) for a in s.actions[3] if a.kind in (Kind.F, Kind.B, Kind.W)]
    assert last[:7] == ["F3.0", "B3.0", "F3.1", "B3.1", "F3.2", "B3.2", "F3.3"]  # rank 3 keeps 3 pending
    assert last[-3:] == ["W3.5", "W3.6", "W3.7"]  # ... and runs them in the cool-down


def test_dualpipe_phases_figure5():
    """pp=8, 20 micro-batches as in Figure 5: rank 0 runs 7 forwards of its own direction (mbs 0..6),
    then the first forward of the other direction; the steady state is overlapped F&B pairs."""
    s = dualpipe(8, 20)
    compute = [a for a in s.actions[0] if a.kind in (Kind.F, Kind.B, Kind.W, Kind.FB)]
    assert [str(a) for a in compute[:8]] == [f"F0.{i}" for i in range(7)] + ["F7.10"]
    assert compute[8].kind == Kind.B and compute[8].mb == 10  # phase 3: B then W of the other direction
    fb = [a for a in compute if a.kind == Kind.FB]
    assert len(fb) > 0 and all(a.chunk != a.back[2] for a in fb)  # each pair mixes the two directions
    # symmetric: rank 7 mirrors rank 0 with the directions swapped
    mirror = [a for a in s.actions[7] if a.kind in (Kind.F, Kind.B, Kind.W, Kind.FB)]
    assert [str(a) for a in mirror[:8]] == [f"F0.{10 + i}" for i in range(7)] + ["F7.0"]


def test_dualpipev_goes_down_and_up():
    s = dualpipev(4, 10)
    last = s.actions[3]  # holds stages 3 and 4: its forward of stage 4 needs no message
    i = next(i for i, a in enumerate(last) if str(a) == "F4.0")
    assert all(a.kind != Kind.RECV_F for a in last[i - 1:i])
    assert not any(a.kind in (Kind.SEND_F, Kind.RECV_F) and a.stage == 3 for a in last)
    assert any(a.kind == Kind.FB for a in last)


@pytest.mark.parametrize("name,pp,m,needed", [
    ("dualpipe", 8, 5, "even number of micro-batches >= 14 at pp=8 (got 5); use parallel.micro_batches=14"),
    ("dualpipe", 8, 15, "(got 15); use parallel.micro_batches=16"),
    ("dualpipe", 8, 12, "(got 12); use parallel.micro_batches=14"),
    ("dualpipe", 6, 12, None),
    ("dualpipe", 7, 14, "needs an even parallel.pp (got 7)"),
    ("dualpipev", 4, 6, "needs at least 7 micro-batches at pp=4 (got 6); use parallel.micro_batches=7"),
    ("dualpipev", 3, 5, None),  # any pp >= 2 and any m >= 2pp-1
    ("1f1b", 1, 4, "needs parallel.pp >= 2"),
    ("zb1p", 4, 0, "needs at least 1 micro-batches"),
    ("gpipe", 4, 8, "not a schedule; choose one of 1f1b, zb1p, dualpipe, dualpipev"),
])
def test_impossible_inputs_one_clear_line(name, pp, m, needed):
    if needed is None:
        validate(make_schedule(name, pp, m))
        return
    with pytest.raises(ValueError) as err:
        make_schedule(name, pp, m)
    text = str(err.value)
    assert needed in text and "\n" not in text and "parallel.schedule=" in text


# ----------------------------------------------------------------------------------------------
# The validator rejects corrupted lists


def _small() -> Schedule:
    """1F1B on 2 ranks with 2 micro-batches:
    rank 0: F0.0 SEND_F0.0@1 F0.1 SEND_F0.1@1 RECV_B1.0@1 B0.0 RECV_B1.1@1 B0.1
    rank 1: RECV_F0.0@0 F1.0 B1.0 SEND_B1.0@0 RECV_F0.1@0 F1.1 B1.1 SEND_B1.1@0"""
    s = one_f_one_b(2, 2)
    assert [str(a) for a in s.actions[0]] == ["F0.0", "SEND_F0.0@1", "F0.1", "SEND_F0.1@1", "RECV_B1.0@1",
                                              "B0.0", "RECV_B1.1@1", "B0.1"]
    return s


def _index(s: Schedule, rank: int, text: str) -> int:
    return [str(a) for a in s.actions[rank]].index(text)


def _rejects(s: Schedule, *fragments: str) -> str:
    with pytest.raises(ScheduleError) as err:
        validate(s)
    for fragment in fragments:
        assert fragment in str(err.value), str(err.value)
    return str(err.value)


def test_validator_accepts_the_small_schedule():
    validate(_small())


def test_rejects_dropped_computation():
    s = _small()
    del s.actions[1][_index(s, 1, "B1.1")]
    _rejects(s, "rank 1", "SEND_B1.1@0", "send before the B1.1")
    s = _small()
    del s.actions[0][_index(s, 0, "B0.1")]
    _rejects(s, "rank 0", "B0.1", "never computed")


def test_rejects_dropped_weight_gradient():
    s = zb1p(2, 2)
    w = next(i for i, a in enumerate(s.actions[1]) if a.kind == Kind.W)
    del s.actions[1][w]
    _rejects(s, "rank 1", "never computed")


def test_rejects_dropped_recv():
    s = _small()
    del s.actions[1][_index(s, 1, "RECV_F0.1@0")]
    _rejects(s, "rank 1", "F1.1", "forward before its input", "RECV_F0.1")


def test_rejects_swap_that_breaks_a_dependency():
    s = _small()
    i, j = _index(s, 1, "F1.0"), _index(s, 1, "B1.0")
    s.actions[1][i], s.actions[1][j] = s.actions[1][j], s.actions[1][i]
    _rejects(s, "rank 1", "B1.0", "backward before its forward")
    s = _small()
    i, j = _index(s, 0, "RECV_B1.0@1"), _index(s, 0, "B0.0")
    s.actions[0][i], s.actions[0][j] = s.actions[0][j], s.actions[0][i]
    _rejects(s, "rank 0", "B0.0", "output gradient", "RECV_B1.0")
    s = zb1p(2, 2)
    w = next(i for i, a in enumerate(s.actions[0]) if a.kind == Kind.W)
    s.actions[0].insert(0, s.actions[0].pop(w))
    _rejects(s, "rank 0", "W before its B")


def test_rejects_duplicate_forward():
    s = _small()
    s.actions[0].insert(1, Action(Kind.F, 0, 0))
    _rejects(s, "rank 0", "F0.0 is computed twice")


def test_rejects_computation_off_its_route():
    s = _small()
    s.actions[0].append(Action(Kind.F, 1, 0))  # stage 1 lives on rank 1
    _rejects(s, "rank 0", "must run on (rank, chunk) (1, 0)")


def test_rejects_mismatched_send():
    s = _small()
    i = _index(s, 0, "SEND_F0.1@1")
    s.actions[0][i] = Action(Kind.SEND_F, 0, 0, peer=1)  # sends mb 0 twice, never mb 1
    _rejects(s, "rank 0", "duplicate SEND_F")
    s = _small()
    s.actions[0].append(Action(Kind.SEND_B, 0, 1, peer=1))  # stage 0 has no previous stage
    _rejects(s, "rank 0", "no previous stage")
    s = _small()
    s.actions[1].append(Action(Kind.RECV_F, 0, 1, peer=0))  # a second RECV of a tensor sent once
    _rejects(s, "rank 1", "duplicate RECV_F")
    s = _small()
    del s.actions[0][_index(s, 0, "SEND_F0.1@1")]
    _rejects(s, "rank 1", "RECV_F0.1@0", "no matching SEND_F0.1 on rank 0")


def test_rejects_wrong_peer():
    s = dualpipe(4, 6)
    r, i = next((r, i) for r, acts in enumerate(s.actions) for i, a in enumerate(acts) if a.kind == Kind.SEND_F)
    a = s.actions[r][i]
    s.actions[r][i] = Action(a.kind, a.stage, a.mb, a.chunk, peer=(a.peer + 2) % 4)
    _rejects(s, f"rank {r}", "goes from rank")


def test_rejects_deadlock():
    s = _small()  # rank 0 waits for a gradient before sending the activation that produces it
    i, j = _index(s, 0, "SEND_F0.0@1"), _index(s, 0, "RECV_B1.0@1")
    s.actions[0].insert(i, s.actions[0].pop(j))
    msg = _rejects(s, "deadlock", "rank 0 waits at action 1 (RECV_B1.0@1)", "rank 1 waits at action 0 (RECV_F0.0@0)")
    assert "\n" not in msg


def test_rejects_out_of_order_channel():
    """Rank 1 takes mb 1 before mb 0 while rank 0 sends 0 then 1: fine with tagged messages, but a runtime
    without tags (NCCL) would hand rank 1 the wrong tensor."""
    s = _small()
    s.actions[1] = s.actions[1][4:] + s.actions[1][:4]
    _rejects(s, "rank 1", "first in, first out")


def test_rejects_bad_fields():
    s = _small()
    s.actions[0].append(Action(Kind.W, 0, 0))
    _rejects(s, "rank 0", "W in a schedule without split backward")
    s = _small()
    s.actions[1].insert(0, Action(Kind.RECV_F, 0, 0, peer=1))
    _rejects(s, "rank 1", "peer rank other than its own")
    s = _small()
    s.actions[0].append(Action(Kind.F, 0, 9))
    _rejects(s, "micro-batch 9 out of range")
    s = copy.deepcopy(_small())
    s.placement[1] = [0]
    _rejects(s, "route of micro-batch 0")


def test_rejects_bad_overlapped_pair():
    s = dualpipe(4, 8)
    r, i = next((r, i) for r, acts in enumerate(s.actions) for i, a in enumerate(acts) if a.kind == Kind.FB)
    a = s.actions[r][i]
    s.actions[r][i] = Action(Kind.FB, a.stage, a.mb, a.chunk, back=(a.stage, a.mb, a.chunk))  # its own backward
    _rejects(s, f"rank {r}", "backward before its forward")
    s = dualpipe(4, 8)
    s.actions[r][i] = Action(Kind.FB, a.stage, a.mb, a.chunk, back=a.back[:2])
    _rejects(s, f"rank {r}", "back must be (stage, mb, chunk)")
