"""Observability of the MoE layers: per-layer expert-load statistics, gate-bias drift, dead experts.

DeepSeek-V3 balances its routed experts without an auxiliary loss (report sec 2.1.2): every step each
expert's gate bias moves by gamma toward the mean load. Whether that works shows in the per-layer
Maximal Violation (MaxVio = max_i load_i / mean_load - 1, report sec 4.5.3), in the spread of the
loads, in how far the biases drift, and in experts that stop receiving tokens altogether.

Record keys (JSON-friendly; every per-layer value is a dict keyed by the layer id as a string, the
index of the transformer block the MoE layer sits in, MTP depth k counted as ``n_layers + k - 1``):

- ``max_vio_layers``: MaxVio of each layer (0 = perfectly balanced);
- ``load_min_layers`` / ``load_max_layers`` / ``load_std_layers``: the least and most loaded expert and
  the standard deviation of the loads, as fractions of the layer's mean load (1.0 = an even share), so
  runs with different batch sizes and expert counts compare directly;
- ``expert_load``: the whole [layers x experts] load matrix, each row divided by its mean (the heatmap),
  written only every ``logging.expert_load_every`` steps;
- ``gate_bias_mean_layers`` / ``gate_bias_abs_mean_layers`` / ``gate_bias_abs_max_layers`` /
  ``gate_bias_std_layers``: the aux-loss-free biases b_i of each layer. Only their spread (std) changes
  routing: adding one constant to every b_i leaves the top-k and the group ranking unchanged;
- ``dead_experts``: how many experts have received no token for ``logging.dead_expert_window`` steps.

With pipeline parallelism each rank holds only its stages' layers: these functions describe the rows
they are given, and per-layer dicts of several ranks merge with ``dict.update``.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor, nn

from train.balance import max_violation
from train.model import MoE


def _num(x: float) -> float:
    """A float rounded to 4 significant digits: metrics.jsonl stays readable and small."""
    return float(f"{x:.4g}")


def moe_layer_ids_from_names(names: list[str], n_layers: int) -> list[int]:
    """Layer ids of MoE modules from their qualified names (``layers.3.ffn`` -> 3, ``mtp.0.block.ffn`` ->
    n_layers). Works on the names of a Transformer and of pipeline stages (``PipelineRuntime.moe_names``),
    which keep the model's names."""
    ids = []
    for name in names:
        main = re.search(r"(?:^|\.)layers\.(\d+)\.ffn$", name)
        mtp = re.search(r"(?:^|\.)mtp\.(\d+)\.block\.ffn$", name)
        if main:
            ids.append(int(main.group(1)))
        elif mtp:
            ids.append(n_layers + int(mtp.group(1)))
        else:
            raise ValueError(f"{name!r} is not the name of a MoE layer (layers.N.ffn or mtp.K.block.ffn)")
    return ids


def moe_layer_ids(module: nn.Module, n_layers: int) -> list[int]:
    """Layer ids of ``module``'s MoE layers in the order of its ``moe_layers()`` (the rows of expert_load)."""
    return moe_layer_ids_from_names([n for n, m in module.named_modules() if isinstance(m, MoE)], n_layers)


def _check_rows(load: Tensor, layer_ids: list[int]) -> None:
    if load.dim() != 2 or load.shape[0] != len(layer_ids):
        raise ValueError(f"expert load of shape {tuple(load.shape)} does not match {len(layer_ids)} layer ids")


def expert_load_stats(load: Tensor, layer_ids: list[int]) -> dict[str, dict[str, float]]:
    """Per-layer balance of one step's expert loads.

    load: [L, E] tokens per routed expert, summed over the step's global batch (the tensor the gate-bias
    update uses). Returns ``max_vio_layers`` (as train.balance.max_violation, sec 4.5.3) and
    ``load_min_layers``, ``load_max_layers``, ``load_std_layers`` as fractions of each layer's mean load
    (population std). A layer that routed no token reports zeros.
    """
    _check_rows(load, layer_ids)
    if not layer_ids:  # a pipeline stage without MoE layers
        return {"max_vio_layers": {}, "load_min_layers": {}, "load_max_layers": {}, "load_std_layers": {}}
    load = load.detach().float().cpu()
    vio = max_violation(load)
    vio = torch.where(load.sum(dim=-1) > 0, vio, torch.zeros_like(vio))  # no token: 0, not -1
    frac = load / load.mean(dim=-1, keepdim=True).clamp_min(1e-9)
    keys = [str(i) for i in layer_ids]
    return {
        "max_vio_layers": {k: _num(v) for k, v in zip(keys, vio.tolist())},
        "load_min_layers": {k: _num(v) for k, v in zip(keys, frac.min(dim=-1).values.tolist())},
        "load_max_layers": {k: _num(v) for k, v in zip(keys, frac.max(dim=-1).values.tolist())},
        "load_std_layers": {k: _num(v) for k, v in zip(keys, frac.std(dim=-1, correction=0).tolist())},
    }


def expert_load_matrix(load: Tensor, layer_ids: list[int]) -> dict[str, dict[str, list[float]]]:
    """``{"expert_load": {layer_id: [load_e / mean_load for each expert]}}``: the heatmap's rows (1.0 = an
    even share). At 256 experts x 59 layers (671B with MTP) this is ~110 KB per record,
    so log it every ``logging.expert_load_every`` steps, not every step."""
    _check_rows(load, layer_ids)
    load = load.detach().float().cpu()
    frac = load / load.mean(dim=-1, keepdim=True).clamp_min(1e-9)
    return {"expert_load": {str(i): [_num(v) for v in row] for i, row in zip(layer_ids, frac.tolist())}}


@torch.no_grad()
def gate_bias_stats(moe_layers: list[MoE], layer_ids: list[int]) -> dict[str, dict[str, float]]:
    """Drift of the aux-loss-free gate biases (the ``bias`` buffer of each layer's Gate, moved by
    ``train.balance.update_gate_biases``; report sec 2.1.2): per layer the mean, mean |b|, max |b| and
    the std of b. The mean is a common shift that does not change routing; the std is what does."""
    if len(moe_layers) != len(layer_ids):
        raise ValueError(f"{len(moe_layers)} MoE layers but {len(layer_ids)} layer ids")
    out: dict[str, dict[str, float]] = {"gate_bias_mean_layers": {}, "gate_bias_abs_mean_layers": {},
                                        "gate_bias_abs_max_layers": {}, "gate_bias_std_layers": {}}
    for layer_id, moe in zip(layer_ids, moe_layers):
        b = moe.gate.bias.detach().float().cpu()
        key = str(layer_id)
        out["gate_bias_mean_layers"][key] = _num(b.mean().item())
        out["gate_bias_abs_mean_layers"][key] = _num(b.abs().mean().item())
        out["gate_bias_abs_max_layers"][key] = _num(b.abs().max().item())
        out["gate_bias_std_layers"][key] = _num(b.std(correction=0).item())
    return out


class DeadExpertMonitor:
    """Warns once when an expert has received no token for ``window`` consecutive steps.

    ``update`` counts, per (layer id, expert), the steps in a row without a token; it returns one line for
    each expert that reaches ``window`` this step and one when a dead expert receives tokens again (after
    which it may be reported again). ``window = 0`` turns the monitor off. The state is plain ints, keyed
    by layer id, so it fits a JSON file in a checkpoint and ranks holding other layers can be merged.
    """

    def __init__(self, window: int):
        if window < 0:
            raise ValueError(f"window ({window}) must be >= 0")
        self.window = window
        self.idle: dict[str, list[int]] = {}  # layer id -> steps in a row without a token, per expert
        self.reported: dict[str, list[int]] = {}  # layer id -> experts reported dead and not yet revived

    def update(self, load: Tensor, layer_ids: list[int]) -> list[str]:
        """Count one step of expert loads [L, E]; return the lines to print (deaths and revivals)."""
        if self.window == 0:
            return []
        _check_rows(load, layer_ids)
        lines = []
        for layer_id, row in zip(layer_ids, (load.detach().cpu() > 0).tolist()):
            key = str(layer_id)
            idle = self.idle.get(key)
            if idle is None or len(idle) != len(row):
                idle = [0] * len(row)
            reported = set(self.reported.get(key, []))
            for expert, got_tokens in enumerate(row):
                if got_tokens:
                    if expert in reported:
                        lines.append(f"expert revived: layer {layer_id} expert {expert} receives tokens again "
                                     f"after {idle[expert]} steps without any")
                        reported.discard(expert)
                    idle[expert] = 0
                else:
                    idle[expert] += 1
                    if idle[expert] >= self.window and expert not in reported:
                        lines.append(f"dead expert: layer {layer_id} expert {expert} has received no token "
                                     f"for {idle[expert]} steps")
                        reported.add(expert)
            self.idle[key] = idle
            self.reported[key] = sorted(reported)
        return lines

    def n_dead(self, layer_ids: list[int] | None = None) -> int:
        """Experts currently dead (no token for at least ``window`` steps) in ``layer_ids`` (default: every
        layer in the state, which after loading a merged state includes other pipeline stages' layers)."""
        if self.window == 0:
            return 0
        keys = self.idle.keys() if layer_ids is None else [str(i) for i in layer_ids]
        return sum(n >= self.window for k in keys for n in self.idle.get(k, []))

    def state_dict(self) -> dict[str, Any]:
        return {"window": self.window, "idle": {k: list(v) for k, v in self.idle.items()},
                "reported": {k: list(v) for k, v in self.reported.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore counts (the window stays this monitor's own: it comes from the config)."""
        self.idle = {str(k): [int(n) for n in v] for k, v in state.get("idle", {}).items()}
        self.reported = {str(k): [int(n) for n in v] for k, v in state.get("reported", {}).items()}


def moe_metrics(step: int, load: Tensor, layer_ids: list[int], moe_layers: list[MoE],
                expert_load_every: int, monitor: DeadExpertMonitor | None = None) -> dict[str, Any]:
    """Everything above for one step's record: load statistics and gate biases every step, the load
    matrix when ``step % expert_load_every == 0`` (0 = never), ``dead_experts`` when a monitor is given
    (call ``monitor.update`` first)."""
    record: dict[str, Any] = {**expert_load_stats(load, layer_ids), **gate_bias_stats(moe_layers, layer_ids)}
    if expert_load_every and step % expert_load_every == 0:
        record.update(expert_load_matrix(load, layer_ids))
    if monitor is not None:
        record["dead_experts"] = monitor.n_dead(layer_ids)
    return record
