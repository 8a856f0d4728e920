"""Per-step metrics: RUN_DIR/metrics.jsonl, a console line (and a progress bar on a terminal), wandb.

The progress bar shows the ETA, loss, tokens/s and MaxVio. wandb gets the same series as
metrics.jsonl (``wandb_record``): scalars as they are, per-layer dicts (``max_vio_layers``: ``{"3": ...}``,
see train/observe.py) as ``max_vio/layer_3`` keys; the load matrix (``expert_load``) reaches wandb only
as the heatmap image of ``log_plots``.

Only the main process writes. On resume, lines of metrics.jsonl past the resumed step (written by a run
that crashed before its next checkpoint) are dropped, so the file always describes one history.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from train.config import Config

REQUIRED_KEYS = ("step", "tokens", "loss", "lm_loss", "mtp_loss", "balance_loss", "lr", "grad_norm",
                 "tokens_per_s", "max_vio", "memory_gib")


class MetricsLogger:
    def __init__(self, cfg: Config, is_main: bool):
        self.cfg = cfg
        self.is_main = is_main
        self.path = Path(cfg.run.dir) / "metrics.jsonl"
        self.console = Console(highlight=False, soft_wrap=True)
        self.progress: Progress | None = None
        self.task = None
        self.wandb_run = None
        self.file = None

    def info(self, message: str) -> None:
        if self.is_main:
            self.console.print(message, markup=False)

    def start(self, first_step: int) -> None:
        """Open metrics.jsonl (keeping the history up to first_step), wandb and the progress bar."""
        if not self.is_main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _truncate_after(self.path, first_step)
        self.file = self.path.open("a")
        if self.cfg.logging.wandb != "disabled":
            import wandb

            self.wandb_run = wandb.init(
                project=self.cfg.logging.project, name=self.cfg.run.name or Path(self.cfg.run.dir).name,
                dir=str(self.path.parent), mode=self.cfg.logging.wandb, config=dataclasses.asdict(self.cfg),
                resume="allow", id=_wandb_id(self.path.parent),
            )
        if self.console.is_terminal and self.cfg.train.steps > 0:
            self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), TextColumn("{task.description}"), console=self.console)
            self.task = self.progress.add_task("", total=self.cfg.train.steps, completed=first_step)
            self.progress.start()

    def step(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(wandb_record(record), step=record["step"])
        line = (f"step {record['step']:>6} | loss {record['loss']:.4f} | lm {record['lm_loss']:.4f} | "
                f"mtp {record['mtp_loss']:.4f} | lr {record['lr']:.2e} | bs {record['batch_size']} | "
                f"gnorm {record['grad_norm']:.2f} | maxvio {record['max_vio']:.2f} | "
                f"{record['tokens_per_s']:,.0f} tok/s" + (f" | mfu {record['mfu']:.1%}" if "mfu" in record else "")
                + (f" | mem {record['memory_gib']:.1f} GiB" if "memory_gib" in record else ""))
        if self.progress is not None:
            self.progress.update(self.task, completed=record["step"], description=(
                f"loss {record['loss']:.4f} | {record['tokens_per_s']:,.0f} tok/s | maxvio {record['max_vio']:.2f}"))
        if record["step"] % self.cfg.logging.every == 0:
            self.console.print(line, markup=False)

    def rewind(self, step: int) -> None:
        """Drop the records after ``step`` (a rollback to the checkpoint of that step replays them)."""
        if not self.is_main or self.file is None:
            return
        self.file.close()
        _truncate_after(self.path, step)
        self.file = self.path.open("a")

    def log_plots(self, paths: list[Path], step: int) -> None:
        """Send PNGs written by train.plots.write_plots to wandb as images (``plots/<name>``), if enabled."""
        if not self.is_main or self.wandb_run is None or not paths:
            return
        import wandb

        self.wandb_run.log({f"plots/{Path(p).stem}": wandb.Image(str(p)) for p in paths}, step=step)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.file is not None:
            self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def wandb_record(record: dict[str, Any]) -> dict[str, Any]:
    """The record as wandb series: scalars (numbers, strings, None) as they are, per-layer dicts
    ``X_layers = {"3": v}`` as ``X/layer_3``; lists and other nested values (the ``expert_load`` matrix)
    are left out."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        if value is None or isinstance(value, (int, float, str)):
            out[key] = value
        elif isinstance(value, dict) and key.endswith("_layers"):
            prefix = key[: -len("_layers")]
            for layer, v in value.items():
                if isinstance(v, (int, float)):
                    out[f"{prefix}/layer_{layer}"] = v
    return out


def _truncate_after(path: Path, step: int) -> None:
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut short by a crash
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def _wandb_id(run_dir: Path) -> str:
    """One wandb run per RUN_DIR, stable across resumes."""
    id_file = run_dir / "wandb_id.txt"
    if not id_file.exists():
        id_file.write_text(os.urandom(6).hex())
    return id_file.read_text().strip()
