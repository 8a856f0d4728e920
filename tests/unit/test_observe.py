"""Expert-load statistics, gate-bias drift, the dead-expert monitor, wandb flattening and write_plots'
robustness (train/observe.py, train/metrics.py, train/plots.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.image
import pytest
import torch

from train.balance import max_violation, update_gate_biases
from train.metrics import wandb_record
from train.model import Transformer
from train.observe import (
    DeadExpertMonitor,
    expert_load_matrix,
    expert_load_stats,
    gate_bias_stats,
    moe_layer_ids,
    moe_layer_ids_from_names,
    moe_metrics,
)
from train.plots import write_plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.usefixtures("single_thread")


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE and path.stat().st_size > 1000, path
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, (path, image.shape)


# ----- statistics


def test_expert_load_stats_by_hand():
    load = torch.tensor([[4, 0, 2, 2], [1, 1, 1, 1]])
    stats = expert_load_stats(load, [3, 4])
    # layer 3: mean 2, loads / mean = [2, 0, 1, 1]: MaxVio 1, min 0, max 2, std sqrt(((1+1+0+0)/4)) = sqrt(0.5)
    assert stats["max_vio_layers"] == {"3": 1.0, "4": 0.0}
    assert stats["load_min_layers"] == {"3": 0.0, "4": 1.0}
    assert stats["load_max_layers"] == {"3": 2.0, "4": 1.0}
    assert stats["load_std_layers"]["3"] == pytest.approx(math.sqrt(0.5), rel=1e-3)  # 4 significant digits
    assert stats["load_std_layers"]["4"] == 0.0
    assert list(stats["max_vio_layers"].values()) == pytest.approx(max_violation(load).tolist(), rel=1e-3)
    assert json.loads(json.dumps(stats)) == stats


def test_expert_load_stats_edge_cases():
    assert expert_load_stats(torch.zeros(1, 4), [1])["max_vio_layers"] == {"1": 0.0}  # no token at all: zeros
    assert expert_load_stats(torch.zeros(0, 4), []) == {
        "max_vio_layers": {}, "load_min_layers": {}, "load_max_layers": {}, "load_std_layers": {}}
    with pytest.raises(ValueError, match="does not match 1 layer ids"):
        expert_load_stats(torch.ones(2, 4), [1])


def test_expert_load_matrix_rows_are_fractions_of_the_mean():
    matrix = expert_load_matrix(torch.tensor([[3, 0, 1], [2, 2, 2]]), [5, 7])
    assert matrix == {"expert_load": {"5": [2.25, 0.0, 0.75], "7": [1.0, 1.0, 1.0]}}


def test_gate_bias_stats_by_hand(tiny_cfg):
    model = Transformer(tiny_cfg())  # 8 routed experts, MoE layers 1, 2 and MTP layer 3
    layers, ids = model.moe_layers(), moe_layer_ids(model, model.cfg.n_layers)
    for moe in layers:
        moe.gate.bias.zero_()
    layers[0].gate.bias.copy_(torch.tensor([0.1, -0.3, 0.2, 0, 0, 0, 0, 0]))
    stats = gate_bias_stats(layers, ids)
    assert stats["gate_bias_mean_layers"]["1"] == pytest.approx(0.0, abs=1e-7)
    assert stats["gate_bias_abs_mean_layers"]["1"] == pytest.approx(0.6 / 8)
    assert stats["gate_bias_abs_max_layers"]["1"] == pytest.approx(0.3)
    assert stats["gate_bias_std_layers"]["1"] == pytest.approx(math.sqrt(0.14 / 8), rel=1e-3)
    assert stats["gate_bias_std_layers"]["2"] == 0.0

    # one real bias update (sec 2.1.2): expert 0 got every token, so it drops by gamma, the others rise by gamma
    gamma = 0.001
    load = torch.zeros(3, 8)
    load[:, 0] = 9
    update_gate_biases(layers[1:], load[1:], gamma)
    stats = gate_bias_stats(layers[1:], ids[1:])
    assert stats["gate_bias_abs_mean_layers"]["2"] == pytest.approx(gamma)
    assert stats["gate_bias_abs_max_layers"]["2"] == pytest.approx(gamma)
    assert stats["gate_bias_mean_layers"]["2"] == pytest.approx(0.75 * gamma)  # (7 - 1) / 8
    assert stats["gate_bias_std_layers"]["2"] == pytest.approx(gamma * math.sqrt(1 - 0.75**2), rel=1e-3)


def test_moe_layer_ids():
    assert moe_layer_ids_from_names(["layers.3.ffn", "layers.60.ffn", "mtp.0.block.ffn"], 61) == [3, 60, 61]
    assert moe_layer_ids_from_names(["stages.1.layers.7.ffn"], 8) == [7]  # nested under a pipeline container
    with pytest.raises(ValueError, match="not the name of a MoE layer"):
        moe_layer_ids_from_names(["layers.3.attn"], 8)


def test_moe_layer_ids_follow_the_rows_of_expert_load(tiny_cfg):
    model = Transformer(tiny_cfg(n_layers=4, n_dense_layers=2, mtp_depth=2))
    assert moe_layer_ids(model, 4) == [2, 3, 4, 5]
    model.init_weights(0.05, seed=0)
    assert model(torch.randint(0, 96, (1, 8))).expert_load.shape[0] == 4


def test_moe_metrics_logs_the_matrix_every_n_steps(tiny_cfg):
    model = Transformer(tiny_cfg())
    model.init_weights(0.05, seed=0)
    load, layers = model(torch.randint(0, 96, (2, 16))).expert_load, model.moe_layers()
    ids = moe_layer_ids(model, model.cfg.n_layers)
    monitor = DeadExpertMonitor(5)
    monitor.update(load, ids)
    on = moe_metrics(10, load, ids, layers, expert_load_every=5, monitor=monitor)
    off = moe_metrics(11, load, ids, layers, expert_load_every=5)
    assert set(on["expert_load"]) == {"1", "2", "3"} and len(on["expert_load"]["1"]) == 8
    assert "expert_load" not in off and "dead_experts" not in off and on["dead_experts"] == 0
    assert "expert_load" not in moe_metrics(10, load, ids, layers, expert_load_every=0)
    assert set(on["max_vio_layers"]) == set(on["gate_bias_std_layers"]) == {"1", "2", "3"}


# ----- dead experts


def test_dead_expert_warned_once_then_revived_and_warned_again():
    monitor = DeadExpertMonitor(window=3)
    empty, full = torch.tensor([[5, 0, 5]]), torch.tensor([[5, 5, 5]])
    assert monitor.update(empty, [4]) == [] and monitor.update(empty, [4]) == []
    lines = monitor.update(empty, [4])
    assert lines == ["dead expert: layer 4 expert 1 has received no token for 3 steps"]
    assert monitor.n_dead() == 1
    assert monitor.update(empty, [4]) == [] and monitor.update(empty, [4]) == []  # once only
    lines = monitor.update(full, [4])
    assert lines == ["expert revived: layer 4 expert 1 receives tokens again after 5 steps without any"]
    assert monitor.n_dead() == 0
    for _ in range(2):
        assert monitor.update(empty, [4]) == []
    assert monitor.update(empty, [4]) == ["dead expert: layer 4 expert 1 has received no token for 3 steps"]


def test_dead_expert_needs_consecutive_empty_steps():
    monitor = DeadExpertMonitor(window=2)
    assert monitor.update(torch.tensor([[0, 1], [1, 1]]), [1, 2]) == []
    assert monitor.update(torch.tensor([[1, 1], [0, 1]]), [1, 2]) == []  # each expert idle 1 step only
    assert monitor.update(torch.tensor([[0, 0], [0, 1]]), [1, 2]) == [
        "dead expert: layer 2 expert 0 has received no token for 2 steps"]
    assert DeadExpertMonitor(window=0).update(torch.zeros(1, 4), [1]) == []  # window 0: off


def test_dead_expert_state_round_trips_through_json():
    steps = [torch.tensor([[3, 0, 0], [0, 2, 2]])] * 3 + [torch.tensor([[3, 1, 0], [1, 2, 2]])] * 2
    reference = DeadExpertMonitor(window=2)
    expected = [reference.update(load, [1, 2]) for load in steps]

    first = DeadExpertMonitor(window=2)
    got = [first.update(load, [1, 2]) for load in steps[:3]]
    state = json.loads(json.dumps(first.state_dict()))
    assert all(isinstance(n, int) for v in state["idle"].values() for n in v)
    second = DeadExpertMonitor(window=2)
    second.load_state_dict(state)
    got += [second.update(load, [1, 2]) for load in steps[3:]]
    assert got == expected
    assert any("revived" in line for lines in got for line in lines)
    assert second.state_dict() == reference.state_dict()


def test_dead_expert_states_of_pipeline_stages_merge():
    first, second = DeadExpertMonitor(window=1), DeadExpertMonitor(window=1)
    first.update(torch.tensor([[0, 1]]), [1])  # stage 0 holds layer 1, stage 1 holds layer 2
    second.update(torch.tensor([[0, 0]]), [2])
    merged = {"idle": {**first.state_dict()["idle"], **second.state_dict()["idle"]},
              "reported": {**first.state_dict()["reported"], **second.state_dict()["reported"]}}
    resumed = DeadExpertMonitor(window=1)
    resumed.load_state_dict(merged)
    assert resumed.n_dead() == 3 and resumed.n_dead([1]) == 1 and resumed.n_dead([2]) == 2
    assert resumed.update(torch.tensor([[0, 1]]), [1]) == []  # already reported before the resume


# ----- wandb


def test_wandb_record_flattens_layers_and_drops_the_matrix():
    record = {"step": 3, "loss": 2.5, "skipped": "", "loss_zscore": None, "max_vio_layers": {"1": 0.2, "3": 0.4},
              "gate_bias_std_layers": {"1": 0.01}, "expert_load": {"1": [1.0, 1.0]}, "note": [1, 2]}
    assert wandb_record(record) == {"step": 3, "loss": 2.5, "skipped": "", "loss_zscore": None,
                                    "max_vio/layer_1": 0.2, "max_vio/layer_3": 0.4, "gate_bias_std/layer_1": 0.01}


# ----- write_plots on hand-written files


def _write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))


def test_write_plots_skips_absent_series_and_a_truncated_line(tmp_path):
    records = [{"step": s, "loss": 8.0 - s, "lm_loss": 7.5 - s, "tokens_per_s": 1000.0 + s} for s in range(1, 4)]
    _write_lines(tmp_path / "metrics.jsonl", [json.dumps(r) for r in records] + ['{"step": 4, "loss": 3.'])
    written = write_plots(tmp_path)
    assert [p.name for p in written] == ["loss.png", "tokens_per_s.png"]
    for path in written:
        assert_png(path)
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["loss.png", "tokens_per_s.png"]  # no temps


def test_write_plots_on_one_record_and_on_none(tmp_path):
    _write_lines(tmp_path / "one" / "metrics.jsonl",
                 [json.dumps({"step": 1, "loss": 7.0, "lr": 1e-4, "batch_size": 8, "grad_norm": 0.5,
                              "max_vio_layers": {"1": 0.3}, "expert_load": {"1": [1.5, 0.5]}})])
    names = [p.name for p in write_plots(tmp_path / "one")]
    assert names == ["loss.png", "schedules.png", "grad_norm.png", "max_vio.png", "expert_load.png"]
    _write_lines(tmp_path / "empty" / "metrics.jsonl", ["", "not json"])
    assert write_plots(tmp_path / "empty") == []
    with pytest.raises(FileNotFoundError):
        write_plots(tmp_path / "missing")


def test_write_plots_many_layers_and_long_series(tmp_path):
    records = []
    for s in range(1, 1201):  # more than plots.MAX_POINTS: thinned
        r = {"step": s, "max_vio": 0.5, "max_vio_layers": {str(i): 0.1 * i + 1 / s for i in range(3, 20)},
             "gate_bias_std_layers": {str(i): 1e-5 * s for i in range(3, 20)}}
        if s % 400 == 0:
            r["expert_load"] = {str(i): [float((e + i + s) % 3) for e in range(64)] for i in range(3, 20)}
        records.append(r)
    _write_lines(tmp_path / "metrics.jsonl", [json.dumps(r) for r in records])
    written = write_plots(tmp_path)
    assert [p.name for p in written] == ["max_vio.png", "expert_load.png", "gate_bias.png"]
    for path in written:
        assert_png(path)
