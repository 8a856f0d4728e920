"""Cost-model simulation of a pipeline schedule, and its timeline picture (report Figure 5, Table 2).

``simulate(schedule, Costs(...))`` runs the same action lists the runtime executes, with a fixed time
per kind of action and a fixed latency on every SEND -> RECV, and reports when each action ran, the
makespan, the idle time ("bubble") of each rank, the peak number of activations each rank holds
and its parameter copies. ``plot`` draws the timeline.

Costs use Table 2's notation, per chunk (one stage of one micro-batch):
- ``F`` forward; ``B`` the FULL backward (input and weight gradients); ``W`` the weight-gradient part
  of it. In a split-backward schedule a B action costs ``B - W`` and a W action ``W``; in 1F1B a B
  action is the full ``B``.
- ``FB`` ("F&B") a forward and a full backward of two micro-batches run overlapped on one rank.
  Default ``F + B``: no gain from the overlap, the conservative choice. The report's point is that
  the overlap hides the all-to-all and PP communication, so with communication F&B is far below
  F + B + comm; the Table 2 formulas keep F&B as a symbol. In a split schedule an FB action is
  followed by its own W action, so it costs ``FB - W``.
- ``comm`` the latency of one point-to-point transfer (SEND issued -> RECV may finish).

Definitions (see docs/pipeline.md for when Table 2's formulas hold):
- bubble of a rank = makespan - the rank's compute time (its idle time inside the makespan);
- activations held: a (stage, micro-batch) chunk holds its activations from the start of its F to the
  end of its W (of its B when the backward is not split); ``peak_activations[r]`` is the largest
  number held at once on rank r. ``activation_memory[r]`` rescales that to units of one micro-batch
  through 1/pp of the model (a DualPipeV chunk is half of that), the unit of Table 2's column;
- ``param_copies[r]``: the parameters rank r holds, in units of 1/pp of the model (Table 2's column).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from parallel.pipeline.actions import Action, Kind, Schedule
from parallel.pipeline.schedule import COMPUTE, run


@dataclass(frozen=True)
class Costs:
    F: float = 1.0
    B: float = 2.0  # full backward (input + weight gradients)
    W: float = 1.0  # weight-gradient part of B
    FB: float | None = None  # overlapped forward + full backward; None: F + B
    comm: float = 0.0  # SEND -> RECV latency

    def __post_init__(self) -> None:
        for name in ("F", "B", "W", "comm"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"cost {name} must be a finite number >= 0 (got {value!r})")
        if self.W > self.B:
            raise ValueError(f"cost W ({self.W}) is part of the full backward B ({self.B}), so W <= B")
        if self.FB is not None and not (math.isfinite(self.FB) and self.FB >= self.W):
            raise ValueError(f"cost FB ({self.FB}) must be a finite number >= W ({self.W})")

    def scaled(self, factor: float) -> "Costs":
        """The costs of a chunk ``factor`` times as large (e.g. 1/2 for a DualPipeV chunk, which holds half
        of a 1F1B/DualPipe stage); ``comm`` is unchanged (the same activation crosses)."""
        return Costs(F=self.F * factor, B=self.B * factor, W=self.W * factor,
                     FB=None if self.FB is None else self.FB * factor, comm=self.comm)

    @property
    def fb(self) -> float:
        return self.F + self.B if self.FB is None else self.FB

    def duration(self, action: Action, split_backward: bool) -> float:
        """Time of one action: SEND/RECV take no compute time (their latency is ``comm``)."""
        w = self.W if split_backward else 0.0
        return {Kind.F: self.F, Kind.B: self.B - w, Kind.W: self.W, Kind.FB: self.fb - w}.get(action.kind, 0.0)


@dataclass
class SimResult:
    schedule: Schedule
    costs: Costs
    start: list[list[float]]  # [rank][i] start time of schedule.actions[rank][i]
    end: list[list[float]]
    makespan: float
    compute: list[float]  # per rank: time spent computing
    bubble: list[float]  # per rank: makespan - compute
    peak_activations: list[int]  # per rank: most (stage, mb) chunks holding activations at once
    activation_memory: list[float]  # per rank: peak_activations in units of 1/pp of the model
    param_copies: list[float]  # per rank: parameters held, in units of 1/pp of the model

    @property
    def mean_bubble(self) -> float:
        return sum(self.bubble) / len(self.bubble)

    @property
    def bubble_fraction(self) -> float:
        """Share of the ranks' time spent idle: sum of bubbles / (pp * makespan)."""
        return sum(self.bubble) / (len(self.bubble) * self.makespan) if self.makespan else 0.0


def activations_held(schedule: Schedule) -> list[int]:
    """Peak number of (stage, mb) chunks whose F has started and whose W (B if not split) has not ended,
    per rank. Depends only on the order of each rank's list, not on the costs."""
    peaks = []
    frees = Kind.W if schedule.split_backward else Kind.B
    for actions in schedule.actions:
        held = peak = 0
        for a in actions:
            if a.kind in (Kind.F, Kind.FB):
                held += 1
                peak = max(peak, held)
            if a.kind == frees or (a.kind == Kind.FB and not schedule.split_backward):
                held -= 1
        peaks.append(peak)
    return peaks


def simulate(schedule: Schedule, costs: Costs) -> SimResult:
    """Event simulation of ``schedule`` (which should pass ``validate``) under ``costs``: each rank
    runs its list in order; a RECV waits for its SEND + ``costs.comm``; SENDs never wait."""
    start, end = run(schedule, lambda a: costs.duration(a, schedule.split_backward), costs.comm)
    makespan = max((e[-1] for e in end if e), default=0.0)
    compute = [sum(e - s for s, e, a in zip(st, en, acts) if a.kind in COMPUTE)
               for st, en, acts in zip(start, end, schedule.actions)]
    peaks = activations_held(schedule)
    unit = schedule.pp / schedule.n_stages  # a chunk's share of 1/pp of the model
    return SimResult(
        schedule=schedule, costs=costs, start=start, end=end, makespan=makespan, compute=compute,
        bubble=[makespan - c for c in compute], peak_activations=peaks,
        activation_memory=[p * unit for p in peaks],
        param_copies=[len(chunks) * unit for chunks in schedule.placement],
    )


# ----------------------------------------------------------------------------------------------
# Timeline picture

_COLORS = {  # kind -> (direction 0 / chunk 0, direction 1 / chunk 1)
    Kind.F: ("#f4a259", "#c8702a"),
    Kind.B: ("#5b9bd5", "#2e6aa3"),
    Kind.W: ("#8cc084", "#4f8a46"),
    Kind.FB: ("#b784c9", "#7d4f91"),
}
_NAMES = {Kind.F: "forward", Kind.B: "backward", Kind.W: "weight grad", Kind.FB: "overlapped F&B"}


def _direction(schedule: Schedule, a: Action) -> int:
    """Shade: DualPipe's two feeding directions (chunk), or DualPipeV's way down (0) and back up (1)."""
    return min(a.chunk, 1)


def plot(schedule: Schedule, result: SimResult, path: str, title: str | None = None) -> None:
    """Write a timeline PNG like the report's Figure 5: one row per rank, one box per computation,
    labelled with its micro-batch (FB: forward mb / backward mb), dark shades for chunk 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    s = schedule
    span = result.makespan or 1.0
    n_boxes = max(sum(a.kind in COMPUTE for a in acts) for acts in s.actions)
    width = min(24.0, max(8.0, 0.22 * n_boxes + 2))
    height = 0.42 * s.pp + 1.6
    fig, ax = plt.subplots(figsize=(width, height), dpi=80)
    font = max(4.0, min(8.0, 0.55 * width * 72 / max(n_boxes, 1) / 2))
    for rank, acts in enumerate(s.actions):
        for a, t0, t1 in zip(acts, result.start[rank], result.end[rank]):
            if a.kind not in COMPUTE or t1 <= t0:
                continue
            color = _COLORS[a.kind][_direction(s, a)]
            ax.add_patch(plt.Rectangle((t0, rank - 0.4), t1 - t0, 0.8, facecolor=color,
                                       edgecolor="black", linewidth=0.4))
            label = f"{a.mb}/{a.back[1]}" if a.kind == Kind.FB else str(a.mb)
            ax.text((t0 + t1) / 2, rank, label, ha="center", va="center", fontsize=font)
    ax.set_xlim(0, span)
    ax.set_ylim(s.pp - 0.5, -0.5)
    ax.set_yticks(range(s.pp), [f"rank {r}" for r in range(s.pp)])
    ax.set_xlabel("time")
    c = result.costs
    ax.set_title(title or (f"{s.name}: pp={s.pp}, {s.micro_batches} micro-batches; F={c.F:g} B={c.B:g} "
                           f"W={c.W:g} F&B={c.fb:g} comm={c.comm:g}; makespan {result.makespan:g}, "
                           f"mean bubble {result.mean_bubble:g}"), fontsize=9)
    used = {(a.kind, _direction(s, a)) for acts in s.actions for a in acts if a.kind in COMPUTE}
    handles = [Patch(facecolor=_COLORS[k][d], edgecolor="black",
                     label=f"{_NAMES[k]}{' (chunk 1)' if d else ''}")
               for k in COMPUTE for d in (0, 1) if (k, d) in used]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.35 / height, 1, 1))
    fig.savefig(path)
    plt.close(fig)
