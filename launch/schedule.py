"""Simulate and draw a pipeline schedule: ``python launch/schedule.py [key=value ...]``.

    python launch/schedule.py schedule=dualpipe pp=8 micro_batches=20 png=out.png
    python launch/schedule.py schedule=zb1p pp=4 micro_batches=8 f=1 b=2 w=1 comm=0.1

Keys: ``schedule`` (1f1b | zb1p | dualpipe | dualpipev, default dualpipe), ``pp`` (default 8),
``micro_batches`` (default 20, the report's Figure 5), ``png`` (write the timeline there), and the
costs of one chunk in Table 2's notation (``parallel/pipeline/simulate.py``): ``f`` forward (1),
``b`` full backward (2), ``w`` its weight-gradient part (1), ``fb`` an overlapped forward + full
backward (default f+b), ``comm`` the latency of one point-to-point transfer (0).

Prints the makespan, each rank's bubble and peak activations; validates the schedule first. Bad
arguments: one line ``error: ...`` on stderr and exit status 1.
"""

from __future__ import annotations

import os
import sys

from parallel.pipeline.schedule import ScheduleError, make_schedule, validate
from parallel.pipeline.simulate import Costs, SimResult, plot, simulate

DEFAULTS = {"schedule": "dualpipe", "pp": "8", "micro_batches": "20", "png": "",
            "f": "1", "b": "2", "w": "1", "fb": "", "comm": "0"}


def parse(argv: list[str]) -> dict[str, str]:
    """``key=value`` arguments over ``DEFAULTS``; ``ValueError`` with one line on anything else."""
    args = dict(DEFAULTS)
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in DEFAULTS:
            raise ValueError(f"unknown argument {arg!r}; use key=value with keys {', '.join(DEFAULTS)}")
        args[key] = value
    return args


def _number(args: dict[str, str], key: str, kind=float):
    try:
        return kind(args[key])
    except ValueError:
        raise ValueError(f"{key}={args[key]!r} is not {'an integer' if kind is int else 'a number'}") from None


def report(result: SimResult) -> str:
    """The lines the command prints."""
    s, c = result.schedule, result.costs
    row = lambda values: " ".join(f"{v:g}" for v in values)  # noqa: E731
    return "\n".join([
        f"{s.name}: pp={s.pp}, {s.micro_batches} micro-batches, {s.n_stages} stages; "
        f"costs F={c.F:g} B={c.B:g} W={c.W:g} F&B={c.fb:g} comm={c.comm:g}",
        f"makespan           {result.makespan:g}",
        f"bubble per rank    {row(result.bubble)}  (mean {result.mean_bubble:g}, max {max(result.bubble):g}; "
        f"{result.bubble_fraction:.1%} of pp x makespan)",
        f"peak activations   {row(result.peak_activations)}  chunks held per rank "
        f"(= {row(result.activation_memory)} x one micro-batch through 1/pp of the model)",
        f"parameter copies   {row(result.param_copies)}  (x 1/pp of the model)",
    ])


def main(argv: list[str]) -> int:
    try:
        args = parse(argv)
        if args["png"] and not os.path.isdir(os.path.dirname(os.path.abspath(args["png"]))):
            raise ValueError(f"png={args['png']}: its folder does not exist")
        schedule = make_schedule(args["schedule"], _number(args, "pp", int), _number(args, "micro_batches", int))
        validate(schedule)
        costs = Costs(F=_number(args, "f"), B=_number(args, "b"), W=_number(args, "w"),
                      FB=_number(args, "fb") if args["fb"] else None, comm=_number(args, "comm"))
        result = simulate(schedule, costs)
        print(report(result))
        if args["png"]:
            try:
                plot(schedule, result, args["png"])
            except OSError as e:
                raise ValueError(f"png={args['png']}: cannot write it ({e.strerror or e})") from None
            print(f"wrote {args['png']}")
    except (ValueError, ScheduleError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
