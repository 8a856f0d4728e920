"""Pipeline schedules compared: 1F1B, ZB1P, DualPipe and DualPipeV at PP 8 and 16 (report Table 2).

(a) Simulated (this part): each schedule's action lists run through the cost model of
    ``parallel/pipeline/simulate.py`` with the F : B : W (: F&B) ratios given on the command line, as
    measured for one stage of our blocks. Prints, per schedule, the makespan against 1F1B's (the
    baseline, same run), the bubble (mean and most idle rank, and Table 2's formula), the bubble
    fraction, the peak activation memory of the most loaded rank and the parameters per rank.

All costs are for a chunk holding 1/pp of the model; a DualPipeV chunk holds half of that, so its costs
are halved (the same model on the same ranks). Micro-batches: ``--per-rank K`` runs m = K x pp.

    python bench/pipeline.py                                  # F=1 B=2 W=1, F&B = F+B (no overlap gain)
    python bench/pipeline.py --f 1 --b 2.1 --w 0.9 --fb 2.4   # measured ratios; F&B from the overlap
    python bench/pipeline.py --json runs/pipeline_bench.json   # also write the rows

Another part (measured step times of the runtime on the same schedules) adds its rows with the same
keys next to these, so that simulated and measured numbers print side by side.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

from parallel.pipeline.schedule import SCHEDULES, make_schedule, validate
from parallel.pipeline.simulate import Costs, simulate


def table2_bubble(name: str, pp: int, c: Costs) -> float:
    """Table 2's bubble for 1/pp-of-the-model chunk costs (DualPipeV: ours, DualPipe's on 2pp half chunks)."""
    return {"1f1b": (pp - 1) * (c.F + c.B),
            "zb1p": (pp - 1) * (c.F + c.B - 2 * c.W),
            "dualpipe": (pp / 2 - 1) * (c.fb + c.B - 3 * c.W),
            "dualpipev": (pp - 1) * (c.fb + c.B - 3 * c.W) / 2}[name]


@dataclass
class Row:
    schedule: str
    pp: int
    micro_batches: int
    source: str  # "simulated" here; measured rows use the same keys
    makespan: float
    vs_1f1b: float  # makespan / 1F1B's makespan at the same pp and micro-batches
    mean_bubble: float
    max_bubble: float
    table2_bubble: float
    bubble_fraction: float  # idle share of pp x makespan
    activations: float  # peak of the most loaded rank, in micro-batches through 1/pp of the model
    params: float  # per rank, in units of 1/pp of the model


def simulated_rows(pps: list[int], per_rank: list[int], costs: Costs) -> list[Row]:
    rows = []
    for pp in pps:
        for k in per_rank:
            m = k * pp
            baseline = None
            for name in SCHEDULES:
                schedule = make_schedule(name, pp, m)
                validate(schedule)
                r = simulate(schedule, costs.scaled(pp / schedule.n_stages))
                baseline = baseline or r.makespan  # 1F1B comes first
                rows.append(Row(schedule=name, pp=pp, micro_batches=m, source="simulated", makespan=r.makespan,
                                vs_1f1b=r.makespan / baseline, mean_bubble=r.mean_bubble,
                                max_bubble=max(r.bubble), table2_bubble=table2_bubble(name, pp, costs),
                                bubble_fraction=r.bubble_fraction, activations=max(r.activation_memory),
                                params=max(r.param_copies)))
    return rows


def format_rows(rows: list[Row]) -> str:
    head = (f"{'schedule':<10} {'pp':>3} {'m':>4} {'source':<10} {'makespan':>9} {'vs 1F1B':>8} "
            f"{'bubble':>7} {'max':>7} {'Table 2':>8} {'idle %':>7} {'activ.':>7} {'params':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.schedule:<10} {r.pp:>3} {r.micro_batches:>4} {r.source:<10} {r.makespan:>9.2f} "
                     f"{r.vs_1f1b:>8.3f} {r.mean_bubble:>7.2f} {r.max_bubble:>7.2f} {r.table2_bubble:>8.2f} "
                     f"{100 * r.bubble_fraction:>6.1f}% {r.activations:>7.1f} {r.params:>5.0f}x")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--f", type=float, default=1.0, help="forward of one chunk (1/pp of the model)")
    ap.add_argument("--b", type=float, default=2.0, help="full backward (input + weight gradients)")
    ap.add_argument("--w", type=float, default=1.0, help="the weight-gradient part of --b")
    ap.add_argument("--fb", type=float, default=None, help="overlapped forward + full backward (default f+b)")
    ap.add_argument("--comm", type=float, default=0.0, help="latency of one point-to-point transfer")
    ap.add_argument("--pp", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--per-rank", type=int, nargs="+", default=[2, 4], help="micro-batches = K x pp")
    ap.add_argument("--json", default="", help="also write the rows to this file")
    args = ap.parse_args(argv)
    try:
        costs = Costs(F=args.f, B=args.b, W=args.w, FB=args.fb, comm=args.comm)
        rows = simulated_rows(args.pp, args.per_rank, costs)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"(a) simulated, chunk costs F={costs.F:g} B={costs.B:g} W={costs.W:g} F&B={costs.fb:g} "
          f"comm={costs.comm:g} (DualPipeV: halved); bubble = makespan - compute per rank; "
          "activations = peak of the most loaded rank, x one micro-batch through 1/pp of the model")
    print(format_rows(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"costs": asdict(costs), "rows": [asdict(r) for r in rows]}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
