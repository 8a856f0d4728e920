"""Draw a run's plots: ``python launch/report.py RUN_DIR``.

Reads RUN_DIR/metrics.jsonl and writes RUN_DIR/plots/*.png (loss, schedules, grad norm, throughput,
MaxVio per MoE layer, the expert-load heatmap, gate-bias drift; see train/plots.py), printing each path
written. Safe while the run is still training: the file is only read and each PNG is replaced
atomically. A missing directory or metrics file: one line ``error: ...`` on stderr and exit status 1.
"""

from __future__ import annotations

import sys
from pathlib import Path

from train.plots import write_plots

USAGE = "usage: python launch/report.py RUN_DIR"


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr if len(argv) != 1 else sys.stdout)
        return 0 if argv in (["-h"], ["--help"]) else 1
    run_dir = Path(argv[0])
    if not run_dir.is_dir():
        print(f"error: run directory {run_dir} does not exist", file=sys.stderr)
        return 1
    if not (run_dir / "metrics.jsonl").is_file():
        print(f"error: {run_dir / 'metrics.jsonl'} not found (has the run logged a step yet?)", file=sys.stderr)
        return 1
    written = write_plots(run_dir)
    if not written:
        print(f"no plots: {run_dir / 'metrics.jsonl'} holds no complete record yet")
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
