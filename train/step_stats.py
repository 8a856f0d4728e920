"""Per-step statistics that need the other ranks: per-layer MoE metrics merged over pipeline stages,
MaxVio across stages, all-to-all traffic totals, and the guard's one-line verdicts (train/trainer.py)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from parallel.mesh import ProcessGroups
from train.balance import max_violation
from train.config import Config
from train.guards import Verdict
from train.observe import DeadExpertMonitor


def gather_stages(part: tuple[dict[str, Any], list[str]], groups: ProcessGroups) -> tuple[dict[str, Any], list[str]]:
    """The per-layer statistics of every pipeline stage (each holds its own layers): dicts keyed by layer
    id are merged, ``dead_experts`` counts summed, warning lines concatenated. Without a pipeline: as is."""
    if groups.layout.pp == 1:
        return part
    parts: list[Any] = [None] * groups.layout.pp
    dist.all_gather_object(parts, part, group=groups.pp)
    merged: dict[str, Any] = {}
    lines: list[str] = []
    for stats, stage_lines in parts:
        lines += stage_lines
        for key, value in stats.items():
            if isinstance(value, dict):
                merged.setdefault(key, {}).update(value)
            elif key == "dead_experts":
                merged[key] = merged.get(key, 0) + value
            else:
                merged[key] = value
    for key, value in merged.items():  # layer order, whatever stage they came from
        if isinstance(value, dict):
            merged[key] = dict(sorted(value.items(), key=lambda kv: int(kv[0])))
    return merged, lines


def merged_monitor_state(monitor: DeadExpertMonitor, groups: ProcessGroups) -> dict[str, Any]:
    """The dead-expert counts of all stages' layers, equal on every rank (it goes into the checkpoint)."""
    state = monitor.state_dict()
    if groups.layout.pp == 1:
        return state
    parts: list[Any] = [None] * groups.layout.pp
    dist.all_gather_object(parts, state, group=groups.pp)
    for other in parts:
        state["idle"].update(other["idle"])
        state["reported"].update(other["reported"])
    return state


def max_violation_over_stages(load: torch.Tensor, groups: ProcessGroups) -> tuple[float, float]:
    """MaxVio averaged over all MoE layers of the model and its worst layer, across pipeline stages."""
    vio = max_violation(load) if load.shape[0] else torch.zeros(0, device=load.device)
    stats = torch.tensor([vio.sum().item(), vio.numel()], dtype=torch.float64)
    worst = torch.tensor([vio.max().item() if vio.numel() else 0.0], dtype=torch.float64)
    if groups.layout.pp > 1:
        dist.all_reduce(stats, group=groups.pp)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=groups.pp)
    return (stats[0] / stats[1].clamp_min(1)).item(), worst.item()


def traffic_totals(counters: list, groups: ProcessGroups) -> dict[str, float]:
    """All-to-all bytes of this step summed over layers and ranks (between and inside nodes), and the
    most nodes any token reached (node-limited routing keeps it <= model.topk_groups)."""
    totals: dict[str, float] = {}
    for counter in counters:
        for key, value in counter.as_dict().items():
            if key.endswith("_bytes"):
                totals[key] = totals.get(key, 0.0) + float(value)
    keys = sorted(totals)
    summed = torch.tensor([totals[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(summed)  # every rank: all data-parallel ranks and pipeline stages
    most_nodes = torch.tensor([max(c.max_nodes_per_token for c in counters)], dtype=torch.float64)
    dist.all_reduce(most_nodes, op=dist.ReduceOp.MAX)
    return {**{f"a2a_{k}": v for k, v in zip(keys, summed.tolist())}, "a2a_max_nodes_per_token": most_nodes.item()}


def verdict_line(verdict: Verdict, record: dict[str, Any], cfg: Config) -> str:
    if verdict.reason == "nonfinite":
        return (f"step {record['step']}: non-finite loss ({record['loss']}) or gradient norm ({record['grad_norm']});"
                f" update skipped ({record['nonfinite_steps']} so far, train.max_bad_steps={cfg.train.max_bad_steps}"
                " in a row stop the run)")
    action = {"log": "logged only", "skip": "update skipped", "rollback": "rolling back"}[cfg.train.on_spike]
    return (f"step {record['step']}: loss spike {record['loss']:.4f} (z-score {verdict.zscore:.1f} > "
            f"{cfg.train.spike_zscore} over the last {cfg.train.spike_window} steps); {action}")
