"""Pipeline schedule generators and their validator (report sec 3.2.1, Figure 5, Table 2).

Each generator is a pure function ``(pp, micro_batches) -> Schedule`` (see ``actions.py``): per rank,
the instructions in execution order, with an explicit SEND/RECV pair for every tensor that crosses
ranks. They are written in two steps: a short per-rank list of computations (F, B, W, FB) that reads
like the schedule's description, then ``_with_comm`` adds the point-to-point messages: a RECV just
before the computation that needs the tensor, a SEND just after the one that produced it.

- ``one_f_one_b``: classic 1F1B (PipeDream-flush): ``pp-1-r`` warm-up forwards on rank r, then one
  forward / one full backward, then the cool-down backwards. ``split_backward=False``.
- ``zb1p``: ZB-H1 (Qi et al. 2023, "Zero Bubble Pipeline Parallelism"): 1F1B's order with the backward
  split into B (input gradient, on the critical path) and W (weight gradient); rank r keeps up to r
  W's pending and runs them in the cool-down, where 1F1B waits. Same activation memory as 1F1B.
- ``dualpipe``: DeepSeek's DualPipe: half of the micro-batches enter at rank 0 (chunk 0, stage s on
  rank s), half at rank pp-1 (chunk 1, stage s on rank pp-1-s); 8 phases per rank (warm-up
  forwards, forward pairs, zero-bubble B/W, the overlapped forward+backward steady state, cool-down).
- ``dualpipev``: the V ("cut-in-half") variant: pp ranks, 2*pp stages, rank d holds stages d and
  2*pp-1-d; every micro-batch goes down the ranks and back up; same 8 phases, one parameter copy.

Conventions of the lists (what ``validate`` checks and the runtime may rely on):
- micro-batches are numbered 0..micro_batches-1; in DualPipe 0..m/2-1 enter at rank 0 and m/2..m-1
  at rank pp-1 (``routes`` says it);
- ``chunk`` of a SEND is the local chunk that produced the tensor, of a RECV the local chunk that
  consumes it; ``stage`` of SEND_F/RECV_F is the stage whose output travels, of SEND_B/RECV_B the
  stage whose input gradient travels (so RECV_B(s) feeds B(s-1));
- an ``FB`` is its forward and its backward half; in the split-backward schedules the backward half
  is B (input gradient) and the W of that (stage, mb) is a separate action. Where DeepSeek's code runs
  a full (unsplit) backward, our lists have the B immediately followed by its W: a runtime may fuse
  such an adjacent pair into one full backward.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

from parallel.pipeline.actions import Action, Kind, Schedule

COMPUTE = (Kind.F, Kind.B, Kind.W, Kind.FB)


class ScheduleError(ValueError):
    """A schedule that breaks a rule: names the rank, the action and the rule."""


# ----------------------------------------------------------------------------------------------
# Layouts: placement[rank][chunk] -> stage and routes[mb][stage] -> (rank, chunk)


def _linear_layout(pp: int, m: int):
    placement = [[r] for r in range(pp)]
    routes = [[(s, 0) for s in range(pp)] for _ in range(m)]
    return pp, placement, routes


def _dualpipe_layout(pp: int, m: int):
    placement = [[r, pp - 1 - r] for r in range(pp)]
    half = m // 2
    routes = [[(s, 0) if mb < half else (pp - 1 - s, 1) for s in range(pp)] for mb in range(m)]
    return pp, placement, routes


def _v_layout(pp: int, m: int):
    n = 2 * pp
    placement = [[r, n - 1 - r] for r in range(pp)]
    routes = [[(s, 0) if s < pp else (n - 1 - s, 1) for s in range(n)] for _ in range(m)]
    return n, placement, routes


class _Rank:
    """Builds one rank's computations. Each chunk runs its micro-batches' F's in order and their B's
    in order (as DeepSeek's code does with per-chunk counters); deferred W's wait in a FIFO queue
    (its WeightGradStore)."""

    def __init__(self, rank: int, placement: list[list[int]], mbs: list[list[int]]):
        self.stage = placement[rank]
        self.mbs = mbs  # [chunk] -> the micro-batches this chunk sees, in order
        self.next_f = [0] * len(mbs)
        self.next_b = [0] * len(mbs)
        self.pending_w: deque[tuple[int, int, int]] = deque()
        self.out: list[Action] = []

    def _take(self, counter: list[int], chunk: int) -> tuple[int, int, int]:
        mb = self.mbs[chunk][counter[chunk]]
        counter[chunk] += 1
        return self.stage[chunk], mb, chunk

    def f(self, chunk: int) -> None:
        stage, mb, chunk = self._take(self.next_f, chunk)
        self.out.append(Action(Kind.F, stage, mb, chunk))

    def b(self, chunk: int, defer_w: bool | None = None) -> None:
        """Backward of the next micro-batch of ``chunk``. ``defer_w=None``: a full backward (no W);
        False: B then its W at once; True: B now, its W queued for a later ``w()``."""
        key = self._take(self.next_b, chunk)
        self.out.append(Action(Kind.B, *key))
        if defer_w is False:
            self.out.append(Action(Kind.W, *key))
        elif defer_w:
            self.pending_w.append(key)

    def w(self) -> None:
        self.out.append(Action(Kind.W, *self.pending_w.popleft()))

    def fb(self, f_chunk: int, b_chunk: int) -> None:
        """Forward of ``f_chunk`` overlapped with a backward of ``b_chunk`` (full in DeepSeek's code:
        its W follows at once)."""
        stage, mb, chunk = self._take(self.next_f, f_chunk)
        back = self._take(self.next_b, b_chunk)
        self.out.append(Action(Kind.FB, stage, mb, chunk, back=back))
        self.out.append(Action(Kind.W, *back))


def _with_comm(name: str, pp: int, m: int, layout, split: bool, compute: list[list[Action]]) -> Schedule:
    """The schedule with a RECV before every computation whose input lives on another rank and a SEND
    after every computation whose output is needed on another rank."""
    n_stages, placement, routes = layout

    def rank_of(mb: int, stage: int) -> int:
        return routes[mb][stage][0]

    actions: list[list[Action]] = []
    for rank, ops in enumerate(compute):
        out: list[Action] = []
        for a in ops:
            fwd = (a.stage, a.mb, a.chunk) if a.kind in (Kind.F, Kind.FB) else None
            bwd = a.back if a.kind == Kind.FB else (a.stage, a.mb, a.chunk) if a.kind == Kind.B else None
            if fwd and fwd[0] > 0 and (src := rank_of(fwd[1], fwd[0] - 1)) != rank:
                out.append(Action(Kind.RECV_F, fwd[0] - 1, fwd[1], fwd[2], peer=src))
            if bwd and bwd[0] < n_stages - 1 and (src := rank_of(bwd[1], bwd[0] + 1)) != rank:
                out.append(Action(Kind.RECV_B, bwd[0] + 1, bwd[1], bwd[2], peer=src))
            out.append(a)
            if fwd and fwd[0] < n_stages - 1 and (dst := rank_of(fwd[1], fwd[0] + 1)) != rank:
                out.append(Action(Kind.SEND_F, fwd[0], fwd[1], fwd[2], peer=dst))
            if bwd and bwd[0] > 0 and (dst := rank_of(bwd[1], bwd[0] - 1)) != rank:
                out.append(Action(Kind.SEND_B, bwd[0], bwd[1], bwd[2], peer=dst))
        actions.append(out)
    return Schedule(name=name, pp=pp, n_stages=n_stages, micro_batches=m, placement=placement,
                    routes=routes, split_backward=split, actions=actions)


# ----------------------------------------------------------------------------------------------
# Generators


def one_f_one_b(pp: int, micro_batches: int) -> Schedule:
    """Classic 1F1B: rank r runs min(pp-1-r, m) warm-up forwards, then alternates one forward and one
    full backward, then the remaining backwards. Peak activations: min(pp, m) micro-batches on rank 0."""
    _check("1f1b", pp, micro_batches)
    m = micro_batches
    layout = _linear_layout(pp, m)
    compute = []
    for r in range(pp):
        rk = _Rank(r, layout[1], [list(range(m))])
        warmup = min(pp - 1 - r, m)
        for _ in range(warmup):
            rk.f(0)
        for _ in range(m - warmup):
            rk.f(0)
            rk.b(0)
        for _ in range(warmup):
            rk.b(0)
        compute.append(rk.out)
    return _with_comm("1f1b", pp, m, layout, False, compute)


def zb1p(pp: int, micro_batches: int) -> Schedule:
    """ZB-H1: 1F1B's forwards and B's in 1F1B's order; after each B, rank r runs the oldest pending W
    only when more than r are pending, and the last r W's after the cool-down. In the steady state rank
    r runs F(x), B(x-(pp-1-r)), W(x-(pp-1)): the W's that 1F1B ran early fill its cool-down bubble."""
    _check("zb1p", pp, micro_batches)
    m = micro_batches
    layout = _linear_layout(pp, m)
    compute = []
    for r in range(pp):
        rk = _Rank(r, layout[1], [list(range(m))])

        def backward() -> None:
            rk.b(0, defer_w=True)
            if len(rk.pending_w) > r:
                rk.w()

        warmup = min(pp - 1 - r, m)
        for _ in range(warmup):
            rk.f(0)
        for _ in range(m - warmup):
            rk.f(0)
            backward()
        for _ in range(warmup):
            backward()
        while rk.pending_w:
            rk.w()
        compute.append(rk.out)
    return _with_comm("zb1p", pp, m, layout, True, compute)


def _eight_phases(rk: _Rank, half_ranks: int, h: int, steady: int, middle: bool,
                  chunk: Callable[[int], int]) -> None:
    """DualPipe's eight phases on one rank (DeepSeek's ``DualPipe.step``), shared by both variants.

    ``phase`` 0 is the direction in which this rank is early in the pipeline (stage h), phase 1 the one
    in which it is late; ``chunk(phase)`` maps it to the local chunk. ``h`` is the rank's distance
    from the entry rank(s), ``half_ranks`` the number of such distances, ``steady`` the number of
    steady-state iterations, ``middle`` whether the rank is where the two phases meet (its phase-0
    output feeds its own phase-1 neighbour side)."""
    f = lambda p: rk.f(chunk(p))  # noqa: E731
    b = lambda p, defer=False: rk.b(chunk(p), defer_w=defer)  # noqa: E731
    fb = lambda p0, p1: rk.fb(chunk(p0), chunk(p1))  # noqa: E731
    # 1. warm-up forwards of phase 0 while the first phase-1 micro-batch travels here
    for _ in range(2 * (half_ranks - h - 1)):
        f(0)
    # 2. forwards of both phases
    for _ in range(h + 1):
        f(0)
        f(1)
    # 3. zero-bubble: B of phase 1, its W at once, the next phase-1 forward
    for _ in range(half_ranks - h - 1):
        b(1, defer=True)
        rk.w()
        f(1)
    # 4. steady state: F0 overlapped with B1, F1 overlapped with B0
    for i in range(steady):
        if i == 0 and middle:  # not overlapped: the backward is needed at once by the neighbour
            f(0)
            b(1)
        else:
            fb(0, 1)
        fb(1, 0)
    # 5. phase-0 forwards are done: B1 alone, F1 overlapped with B0
    for _ in range(half_ranks - h - 1):
        b(1)
        fb(1, 0)
    # 6. backwards of both phases; the second half defer their W's
    defer = False
    for i in range(h + 1):
        if i == (h + 1) // 2 and h % 2 == 1:
            defer = True
        b(1, defer)
        if i == (h + 1) // 2 and h % 2 == 0:
            defer = True
        b(0, defer)
    # 7. a pending W fills each wait for the next phase-0 gradient
    for _ in range(half_ranks - h - 1):
        rk.w()
        b(0, defer=True)
    # 8. the remaining W's
    while rk.pending_w:
        rk.w()


def dualpipe(pp: int, micro_batches: int) -> Schedule:
    """DualPipe (report Figure 5): micro-batches 0..m/2-1 enter at rank 0 (chunk 0, stage s on rank s),
    m/2..m-1 at rank pp-1 (chunk 1, stage s on rank pp-1-s). Needs an even pp and an even m >= 2pp-2."""
    _check("dualpipe", pp, micro_batches)
    m, half = micro_batches, micro_batches // 2
    layout = _dualpipe_layout(pp, m)
    compute = []
    for r in range(pp):
        second = r >= pp // 2
        h = min(r, pp - 1 - r)
        rk = _Rank(r, layout[1], [list(range(half)), list(range(half, m))])
        _eight_phases(rk, pp // 2, h, steady=half - pp + h + 1, middle=h == pp // 2 - 1,
                      chunk=lambda p, second=second: p ^ second)
        compute.append(rk.out)
    return _with_comm("dualpipe", pp, m, layout, True, compute)


def dualpipev(pp: int, micro_batches: int) -> Schedule:
    """DualPipeV: 2*pp stages on pp ranks, rank d holds stage d (chunk 0) and 2*pp-1-d (chunk 1); each
    micro-batch goes down the ranks and back up. Needs m >= 2pp-1."""
    _check("dualpipev", pp, micro_batches)
    m = micro_batches
    layout = _v_layout(pp, m)
    compute = []
    for r in range(pp):
        rk = _Rank(r, layout[1], [list(range(m)), list(range(m))])
        _eight_phases(rk, pp, r, steady=m - 2 * pp + r + 1, middle=r == pp - 1, chunk=lambda p: p)
        compute.append(rk.out)
    return _with_comm("dualpipev", pp, m, layout, True, compute)


SCHEDULES: dict[str, Callable[[int, int], Schedule]] = {
    "1f1b": one_f_one_b,
    "zb1p": zb1p,
    "dualpipe": dualpipe,
    "dualpipev": dualpipev,
}


def min_micro_batches(name: str, pp: int) -> int:
    """The fewest micro-batches schedule ``name`` accepts at ``pp`` ranks."""
    return {"1f1b": 1, "zb1p": 1, "dualpipe": 2 * pp - 2, "dualpipev": 2 * pp - 1}[name]


def _check(name: str, pp: int, m: int) -> None:
    """One line saying what is needed, for inputs the generator cannot schedule."""
    key = f"parallel.schedule={name}"
    if not isinstance(pp, int) or pp < 2:
        raise ValueError(f"{key} needs parallel.pp >= 2 pipeline ranks (got {pp}); with pp=1 no schedule is used")
    if name == "dualpipe" and pp % 2:
        raise ValueError(f"{key} needs an even parallel.pp (got {pp}); use parallel.pp={pp + 1} "
                         "or parallel.schedule=dualpipev")
    least = min_micro_batches(name, pp)
    if name == "dualpipe":
        if not isinstance(m, int) or m < least or m % 2:
            fix = max(least, m + 1 if isinstance(m, int) and m % 2 else least)
            raise ValueError(f"{key} needs an even number of micro-batches >= {least} at pp={pp} "
                             f"(got {m}); use parallel.micro_batches={fix}")
    elif not isinstance(m, int) or m < least:
        raise ValueError(f"{key} needs at least {least} micro-batches at pp={pp} (got {m}); "
                         f"use parallel.micro_batches={least}")


def make_schedule(name: str, pp: int, micro_batches: int) -> Schedule:
    """The schedule ``name`` (a key of ``SCHEDULES``) for ``pp`` ranks and ``micro_batches``; a
    ``ValueError`` with one line saying what is needed for impossible inputs."""
    if name not in SCHEDULES:
        raise ValueError(f"parallel.schedule={name!r} is not a schedule; choose one of {', '.join(SCHEDULES)}")
    return SCHEDULES[name](pp, micro_batches)


# ----------------------------------------------------------------------------------------------
# Validator


def _halves(a: Action) -> list[tuple[Kind, int, int, int]]:
    """The computations an action performs, as (kind, stage, mb, chunk): an FB is its F and its B."""
    if a.kind == Kind.FB:
        return [(Kind.F, a.stage, a.mb, a.chunk), (Kind.B, *a.back)]
    if a.kind in COMPUTE:
        return [(a.kind, a.stage, a.mb, a.chunk)]
    return []


_MATCH = {Kind.SEND_F: Kind.RECV_F, Kind.RECV_F: Kind.SEND_F, Kind.SEND_B: Kind.RECV_B, Kind.RECV_B: Kind.SEND_B}
_SENT = {Kind.SEND_F: Kind.F, Kind.RECV_F: Kind.F, Kind.SEND_B: Kind.B, Kind.RECV_B: Kind.B}  # what travels


def _where(rank: int, i: int, a: Action) -> str:
    return f"rank {rank}, action {i} ({a})"


def _check_layout(s: Schedule) -> None:
    if s.pp < 1 or len(s.actions) != s.pp or len(s.placement) != s.pp:
        raise ScheduleError(f"schedule {s.name!r}: pp={s.pp} but {len(s.actions)} action lists and "
                            f"{len(s.placement)} placement rows")
    if len(s.routes) != s.micro_batches:
        raise ScheduleError(f"schedule {s.name!r}: {s.micro_batches} micro-batches but {len(s.routes)} routes")
    for mb, route in enumerate(s.routes):
        if len(route) != s.n_stages:
            raise ScheduleError(f"route of micro-batch {mb} has {len(route)} stages, not {s.n_stages}")
        for stage, (rank, chunk) in enumerate(route):
            if not (0 <= rank < s.pp and 0 <= chunk < len(s.placement[rank])) \
                    or s.placement[rank][chunk] != stage:
                raise ScheduleError(f"route of micro-batch {mb}: stage {stage} -> (rank {rank}, chunk {chunk}), "
                                    f"which does not hold that stage (placement {s.placement})")


def _check_fields(s: Schedule, rank: int, i: int, a: Action) -> None:
    where = _where(rank, i, a)
    if not isinstance(a.kind, Kind):
        raise ScheduleError(f"{where}: unknown kind {a.kind!r}")
    if not 0 <= a.mb < s.micro_batches:
        raise ScheduleError(f"{where}: micro-batch {a.mb} out of range 0..{s.micro_batches - 1}")
    if not 0 <= a.stage < s.n_stages:
        raise ScheduleError(f"{where}: stage {a.stage} out of range 0..{s.n_stages - 1}")
    if not 0 <= a.chunk < len(s.placement[rank]):
        raise ScheduleError(f"{where}: rank {rank} has no chunk {a.chunk}")
    comm = a.kind in _MATCH
    if comm and (a.peer is None or not 0 <= a.peer < s.pp or a.peer == rank):
        raise ScheduleError(f"{where}: a SEND/RECV needs a peer rank other than its own (got {a.peer})")
    if not comm and a.peer is not None:
        raise ScheduleError(f"{where}: only SEND/RECV have a peer")
    if (a.kind == Kind.FB) != (a.back is not None):
        raise ScheduleError(f"{where}: an FB, and only an FB, names its backward half (back=)")
    if a.back is not None and (len(a.back) != 3 or not 0 <= a.back[2] < len(s.placement[rank])):
        raise ScheduleError(f"{where}: back must be (stage, mb, chunk) of a chunk of rank {rank}, not {a.back}")
    if a.kind == Kind.W and not s.split_backward:
        raise ScheduleError(f"{where}: W in a schedule without split backward (split_backward=False)")


def validate(schedule: Schedule) -> None:
    """Raise ``ScheduleError`` naming the rank, the action and the rule it breaks, else return None.

    Rules: every (stage, mb) has exactly one F, one B and (if ``split_backward``) one W (an FB counts
    as its F and its B), on the (rank, chunk) of its route; per rank, in list order, F(s, mb) comes
    after its input (RECV_F of (s-1, mb), or F(s-1, mb) when stage s-1 is on the same rank), B(s, mb)
    after F(s, mb) and its output gradient (RECV_B of (s+1, mb), or B(s+1, mb) on the same rank; the
    last stage needs only its F), W after B; a SEND_F (SEND_B) after the F (B) that produced it, sent
    from the rank of its stage to the rank of the next (previous) stage; every SEND has exactly one
    matching RECV on its peer and vice versa; per channel (sender, receiver, F or B) the RECVs come in
    the order of the SENDs (so a runtime without message tags, like NCCL, receives the right tensor);
    and no deadlock with blocking RECVs and buffered (non-blocking) SENDs.
    """
    s = schedule
    _check_layout(s)
    n = s.n_stages
    seen: dict[tuple[Kind, int, int], tuple[int, int, Action]] = {}  # (kind, stage, mb) -> where
    comms: dict[tuple[Kind, int, int, int, int], tuple[int, Action]] = {}  # (kind, stage, mb, rank, peer)

    def rank_of(mb: int, stage: int) -> int:
        return s.routes[mb][stage][0]

    for rank, actions in enumerate(s.actions):
        done: set[tuple[Kind, int, int]] = set()  # (F|B|W|RECV_F|RECV_B|SEND_F|SEND_B, stage, mb) on this rank
        for i, a in enumerate(actions):
            _check_fields(s, rank, i, a)
            where = _where(rank, i, a)
            halves = _halves(a)
            for kind, stage, mb, chunk in halves:
                if not (0 <= stage < n and 0 <= mb < s.micro_batches):
                    raise ScheduleError(f"{where}: {kind.value}{stage}.{mb} out of range")
                if s.routes[mb][stage] != (rank, chunk):
                    raise ScheduleError(f"{where}: {kind.value}{stage}.{mb} must run on (rank, chunk) "
                                        f"{s.routes[mb][stage]} of its route, not ({rank}, {chunk})")
                if (kind, stage, mb) in seen:
                    r0, i0, a0 = seen[kind, stage, mb]
                    raise ScheduleError(f"{where}: {kind.value}{stage}.{mb} is computed twice "
                                        f"(also rank {r0}, action {i0} ({a0}))")
                seen[kind, stage, mb] = (rank, i, a)
                # dependencies, against what this rank did strictly before this action
                if kind == Kind.F and stage > 0:
                    if rank_of(mb, stage - 1) == rank:
                        need, what = (Kind.F, stage - 1, mb), f"F{stage - 1}.{mb} (same rank)"
                    else:
                        need, what = (Kind.RECV_F, stage - 1, mb), f"RECV_F{stage - 1}.{mb}"
                    if need not in done:
                        raise ScheduleError(f"{where}: forward before its input: needs {what} earlier on rank {rank}")
                if kind == Kind.B:
                    if (Kind.F, stage, mb) not in done:
                        raise ScheduleError(f"{where}: backward before its forward F{stage}.{mb} on rank {rank}")
                    if stage < n - 1:
                        if rank_of(mb, stage + 1) == rank:
                            need, what = (Kind.B, stage + 1, mb), f"B{stage + 1}.{mb} (same rank)"
                        else:
                            need, what = (Kind.RECV_B, stage + 1, mb), f"RECV_B{stage + 1}.{mb}"
                        if need not in done:
                            raise ScheduleError(f"{where}: backward before its output gradient: needs {what} "
                                                f"earlier on rank {rank}")
                if kind == Kind.W and (Kind.B, stage, mb) not in done:
                    raise ScheduleError(f"{where}: W before its B{stage}.{mb} on rank {rank}")
            for kind, stage, mb, _ in halves:
                done.add((kind, stage, mb))
            if a.kind in _MATCH:
                fwd = a.kind in (Kind.SEND_F, Kind.RECV_F)
                nxt = a.stage + 1 if fwd else a.stage - 1  # the stage that consumes the tensor
                if not 0 <= nxt < n:
                    raise ScheduleError(f"{where}: stage {a.stage} has no {'next' if fwd else 'previous'} stage "
                                        "to exchange with")
                producer, consumer = rank_of(a.mb, a.stage), rank_of(a.mb, nxt)
                sender, receiver = (rank, a.peer) if a.kind in (Kind.SEND_F, Kind.SEND_B) else (a.peer, rank)
                if (sender, receiver) != (producer, consumer):
                    raise ScheduleError(f"{where}: the tensor of stage {a.stage}, mb {a.mb} goes from rank "
                                        f"{producer} to rank {consumer}, not {sender} -> {receiver}")
                if a.kind in (Kind.SEND_F, Kind.SEND_B):
                    src = Kind.F if fwd else Kind.B
                    if (src, a.stage, a.mb) not in done:
                        raise ScheduleError(f"{where}: send before the {src.value}{a.stage}.{a.mb} that produces it")
                key = (a.kind, a.stage, a.mb, rank, a.peer)
                if key in comms:
                    raise ScheduleError(f"{where}: duplicate {a.kind.value} (also action {comms[key][0]})")
                comms[key] = (i, a)
                done.add((a.kind, a.stage, a.mb))

    # exactly once
    kinds = (Kind.F, Kind.B, Kind.W) if s.split_backward else (Kind.F, Kind.B)
    for mb in range(s.micro_batches):
        for stage in range(n):
            for kind in kinds:
                if (kind, stage, mb) not in seen:
                    rank, chunk = s.routes[mb][stage]
                    raise ScheduleError(f"rank {rank}: {kind.value}{stage}.{mb} (chunk {chunk}) is never computed")
    # every SEND has its RECV and vice versa
    for (kind, stage, mb, rank, peer), (i, a) in comms.items():
        if (_MATCH[kind], stage, mb, peer, rank) not in comms:
            raise ScheduleError(f"{_where(rank, i, a)}: no matching {_MATCH[kind].value}{stage}.{mb} on rank {peer}")
    # per channel (sender, receiver, F or B), the receiver takes the tensors in the order they were sent
    channels: dict[tuple[int, int, Kind], list[list[tuple[int, int]]]] = {}
    for rank, actions in enumerate(s.actions):
        for a in actions:
            if a.kind in _MATCH:
                sending = a.kind in (Kind.SEND_F, Kind.SEND_B)
                key = (rank, a.peer, _SENT[a.kind]) if sending else (a.peer, rank, _SENT[a.kind])
                channels.setdefault(key, [[], []])[0 if sending else 1].append((a.stage, a.mb))
    for (src, dst, kind), (sends, recvs) in channels.items():
        for k, (sent, taken) in enumerate(zip(sends, recvs)):
            if sent != taken:
                raise ScheduleError(f"rank {dst}: its RECV_{kind.value} from rank {src} number {k} is "
                                    f"{kind.value}{taken[0]}.{taken[1]} but rank {src} sends {kind.value}"
                                    f"{sent[0]}.{sent[1]} as its number {k}: a channel must be first in, first out")
    # no deadlock
    run(s, lambda a: 0.0)


def run(schedule: Schedule, duration: Callable[[Action], float], comm: float = 0.0):
    """Execute the lists with blocking RECVs and buffered (non-blocking) SENDs: a rank runs its actions
    in order, each starting when the previous one ended; a RECV ends at the later of that time and its
    SEND's time + ``comm``. Returns ``(start, end)``: per rank, per action. Raises ``ScheduleError`` on
    a deadlock, naming each blocked rank and the RECV it waits for, or on a RECV without a SEND."""
    s = schedule
    sent: dict[tuple[Kind, int, int, int, int], float] = {}  # (kind, stage, mb, sender, receiver) -> time
    pos = [0] * s.pp
    clock = [0.0] * s.pp
    start = [[0.0] * len(a) for a in s.actions]
    end = [[0.0] * len(a) for a in s.actions]
    progress = True
    while progress:
        progress = False
        for rank, actions in enumerate(s.actions):
            while pos[rank] < len(actions):
                i, a = pos[rank], actions[pos[rank]]
                t = clock[rank]
                if a.kind in (Kind.RECV_F, Kind.RECV_B):
                    key = (_MATCH[a.kind], a.stage, a.mb, a.peer, rank)
                    if key not in sent:
                        break
                    t_end = max(t, sent[key] + comm)
                else:
                    t_end = t + duration(a)
                    if a.kind in (Kind.SEND_F, Kind.SEND_B):
                        sent[a.kind, a.stage, a.mb, rank, a.peer] = t_end
                start[rank][i], end[rank][i] = t, t_end
                clock[rank] = t_end
                pos[rank] += 1
                progress = True
    blocked = [r for r in range(s.pp) if pos[r] < len(s.actions[r])]
    if blocked:
        waits = "; ".join(f"rank {r} waits at action {pos[r]} ({s.actions[r][pos[r]]})" for r in blocked)
        raise ScheduleError(f"deadlock: {waits}")
    return start, end
