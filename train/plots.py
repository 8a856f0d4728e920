"""PNG plots of a run from RUN_DIR/metrics.jsonl: ``write_plots(run_dir)`` writes RUN_DIR/plots/*.png.

Figures are built with matplotlib's object API on an Agg canvas (no pyplot, so no global figure
registry to leak into and no backend switch in the training process) and each PNG is written to a
temporary name and renamed, so a reader never sees half a file. A plot whose series is absent from
the records is skipped. The file is read line by line; a line that is not a JSON object (the last one
of a crashed run) is ignored. Cheap enough to call every few hundred steps: long series are thinned
to at most ``MAX_POINTS`` points per line.

Plots: ``loss.png`` (loss, lm_loss, mtp_loss), ``schedules.png`` (lr, batch_size), ``grad_norm.png``,
``tokens_per_s.png``, ``max_vio.png`` (MaxVio per MoE layer, report sec 4.5.3, with the mean and worst
over layers), ``expert_load.png`` (layers x experts heatmap of the load as a fraction of the layer's mean:
the latest logged matrix and the mean of all logged ones), ``gate_bias.png`` (per-layer drift of the
aux-loss-free gate biases, sec 2.1.2). The record keys are described in ``train/observe.py``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize, TwoSlopeNorm
from matplotlib.figure import Figure

MAX_POINTS = 1000  # per plotted line (a plot is 800 pixels wide)
LEGEND_LAYERS = 8  # up to this many layers get a legend, more get a colour bar


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a metrics.jsonl, skipping lines that do not parse (a truncated last line)."""
    records = []
    with Path(path).open() as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and _is_number(record.get("step")):
                records.append(record)
    return records


def write_plots(run_dir: str | Path) -> list[Path]:
    """Write RUN_DIR/plots/*.png from RUN_DIR/metrics.jsonl; return the paths written.

    Raises FileNotFoundError when the metrics file is missing.
    """
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics} not found")
    records = read_records(metrics)
    out_dir = run_dir / "plots"
    makers: dict[str, Callable[[list[dict[str, Any]]], Figure | None]] = {
        "loss": _loss, "schedules": _schedules, "grad_norm": _grad_norm, "tokens_per_s": _tokens_per_s,
        "max_vio": _max_vio, "expert_load": _expert_load, "gate_bias": _gate_bias,
    }
    written = []
    for name, make in makers.items():
        fig = make(records)
        if fig is None:
            continue
        out_dir.mkdir(parents=True, exist_ok=True)
        written.append(_save(fig, out_dir / f"{name}.png"))
    return written


# ----- series


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of a scalar key, over the records that have it."""
    pairs = [(r["step"], r[key]) for r in records if _is_number(r.get(key))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _layer_series(records: list[dict[str, Any]], key: str) -> dict[int, tuple[list[float], list[float]]]:
    """{layer id: (steps, values)} of a per-layer dict key (``{"3": 0.12, ...}``), by layer id."""
    out: dict[int, tuple[list[float], list[float]]] = {}
    for r in records:
        layers = r.get(key)
        if not isinstance(layers, dict):
            continue
        for layer, value in layers.items():
            if _is_number(value) and str(layer).lstrip("-").isdigit():
                steps, values = out.setdefault(int(layer), ([], []))
                steps.append(r["step"])
                values.append(value)
    return dict(sorted(out.items()))


def _thin(steps: list[float], values: list[float]) -> tuple[list[float], list[float]]:
    stride = max(1, math.ceil(len(steps) / MAX_POINTS))
    if stride == 1:
        return steps, values
    keep = list(range(0, len(steps), stride))
    if keep[-1] != len(steps) - 1:
        keep.append(len(steps) - 1)  # always show the latest point
    return [steps[i] for i in keep], [values[i] for i in keep]


# ----- drawing


def _figure(n_rows: int = 1, title: str = "") -> tuple[Figure, list]:
    fig = Figure(figsize=(8, 3.2 * n_rows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(n_rows, 1, i + 1) for i in range(n_rows)]
    if title:
        fig.suptitle(title)
    for ax in axes:
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("step")
    return fig, axes


def _save(fig: Figure, path: Path) -> Path:
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _lines(ax, records: list[dict[str, Any]], keys: list[str]) -> bool:
    """Plot the scalar keys present on one axis (with a legend when several); False if none is."""
    drawn = 0
    for key in keys:
        steps, values = _series(records, key)
        if steps:
            ax.plot(*_thin(steps, values), label=key, linewidth=1.2)
            drawn += 1
    if drawn > 1:
        ax.legend()
    return drawn > 0


def _layer_lines(fig: Figure, ax, layers: dict[int, tuple[list[float], list[float]]], legend: bool = True) -> None:
    """One line per MoE layer coloured by depth; a legend for a few layers (if ``legend``), a colour bar
    for many."""
    ids = list(layers)
    norm = Normalize(min(ids), max(ids) if max(ids) > min(ids) else min(ids) + 1)
    cmap = colormaps["viridis"]
    few = len(ids) <= LEGEND_LAYERS
    for layer, (steps, values) in layers.items():  # a label starting with "_" stays out of legends
        ax.plot(*_thin(steps, values), color=cmap(norm(layer)), linewidth=1.0,
                label=f"layer {layer}" if few else f"_layer {layer}")
    if few and legend:
        ax.legend(fontsize="small", ncol=2)
    else:
        fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="layer")


def _loss(records: list[dict[str, Any]]) -> Figure | None:
    if not any(_series(records, k)[0] for k in ("loss", "lm_loss", "mtp_loss")):
        return None
    fig, (ax,) = _figure(title="training loss")
    _lines(ax, records, ["loss", "lm_loss", "mtp_loss"])
    ax.set_ylabel("nats per token")
    return fig


def _schedules(records: list[dict[str, Any]]) -> Figure | None:
    present = [k for k in ("lr", "batch_size") if _series(records, k)[0]]
    if not present:
        return None
    fig, axes = _figure(len(present), title="schedules")
    for ax, key in zip(axes, present):
        _lines(ax, records, [key])
        ax.set_ylabel({"lr": "learning rate", "batch_size": "batch size (sequences)"}[key])
    return fig


def _single(records: list[dict[str, Any]], key: str, title: str, ylabel: str, log: bool = False) -> Figure | None:
    steps, values = _series(records, key)
    if not steps:
        return None
    fig, (ax,) = _figure(title=title)
    ax.plot(*_thin(steps, values), linewidth=1.2)
    ax.set_ylabel(ylabel)
    if log and all(v > 0 for v in values if math.isfinite(v)):
        ax.set_yscale("log")
    return fig


def _grad_norm(records: list[dict[str, Any]]) -> Figure | None:
    return _single(records, "grad_norm", "gradient norm (before clipping)", "grad norm", log=True)


def _tokens_per_s(records: list[dict[str, Any]]) -> Figure | None:
    return _single(records, "tokens_per_s", "throughput", "tokens / s")


def _max_vio(records: list[dict[str, Any]]) -> Figure | None:
    layers = _layer_series(records, "max_vio_layers")
    if not layers and not _series(records, "max_vio")[0]:
        return None
    fig, (ax,) = _figure(title="MaxVio = max load / mean load - 1 (0 = balanced)")
    if layers:
        _layer_lines(fig, ax, layers)
    for key, style in (("max_vio", "-"), ("max_vio_worst", ":")):
        steps, values = _series(records, key)
        if steps:
            label = "mean over layers" if key == "max_vio" else "worst layer"
            ax.plot(*_thin(steps, values), color="black", linestyle=style, linewidth=1.4, label=label)
    ax.legend(fontsize="small", ncol=2)
    ax.set_ylabel("MaxVio")
    return fig


def _load_matrices(records: list[dict[str, Any]]) -> list[tuple[float, dict[int, np.ndarray]]]:
    """(step, {layer id: row}) of every record holding a well-formed ``expert_load``."""
    out = []
    for r in records:
        matrix = r.get("expert_load")
        if not isinstance(matrix, dict):
            continue
        rows = {}
        for layer, row in matrix.items():
            try:
                values = np.asarray(row, dtype=np.float64)
            except (TypeError, ValueError):
                continue
            if str(layer).lstrip("-").isdigit() and values.ndim == 1 and values.size:
                rows[int(layer)] = values
        if rows:
            out.append((r["step"], rows))
    return out


def _expert_load(records: list[dict[str, Any]]) -> Figure | None:
    logged = _load_matrices(records)
    if not logged:
        return None
    latest_step, latest = logged[-1]
    n_experts = next(iter(latest.values())).size
    layer_ids = sorted({i for _, rows in logged for i, row in rows.items() if row.size == n_experts})
    index = {layer: k for k, layer in enumerate(layer_ids)}
    total = np.zeros((len(layer_ids), n_experts))
    count = np.zeros((len(layer_ids), 1))
    for _, rows in logged:
        for layer, row in rows.items():
            if row.size == n_experts:
                total[index[layer]] += row
                count[index[layer]] += 1
    last = np.full((len(layer_ids), n_experts), np.nan)
    for layer, row in latest.items():
        if row.size == n_experts:
            last[index[layer]] = row
    panels = [(f"step {latest_step:g}", last), (f"mean of {len(logged)} logged steps", total / count)]
    top = max(float(np.nanmax(grid)) for _, grid in panels)
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(2.0, top))
    fig = Figure(figsize=(10, min(14.0, 3 + 0.5 * len(layer_ids))), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle("expert load / layer mean (1 = even share)")
    for k, (title, grid) in enumerate(panels):
        ax = fig.add_subplot(2, 1, k + 1)
        image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="coolwarm", norm=norm)
        ax.set_title(title)
        ax.set_ylabel("layer")
        stride = max(1, math.ceil(len(layer_ids) / 32))
        ax.set_yticks(range(0, len(layer_ids), stride), [str(i) for i in layer_ids[::stride]])
        ax.set_xlabel("expert")
        fig.colorbar(image, ax=ax)
    return fig


def _gate_bias(records: list[dict[str, Any]]) -> Figure | None:
    panels = [(key, label) for key, label in (("gate_bias_std_layers", "std of b (changes routing)"),
                                              ("gate_bias_abs_mean_layers", "mean |b|"),
                                              ("gate_bias_abs_max_layers", "max |b|"))
              if _layer_series(records, key)]
    if not panels:
        return None
    fig, axes = _figure(len(panels), title="aux-loss-free gate biases per layer")
    for k, (ax, (key, label)) in enumerate(zip(axes, panels)):
        _layer_lines(fig, ax, _layer_series(records, key), legend=k == 0)
        ax.set_ylabel(label)
    return fig
