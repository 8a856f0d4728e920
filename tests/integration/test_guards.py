"""Numerical guards in real tiny training runs (train/guards.py, the trainer's loop): a non-finite gradient
or a loss spike is injected through the trainer's hooks at one step, as a bad batch or a hardware fault
would, and the run must skip it (nothing changes), stop cleanly after too many, or roll back.

The runs are in-process (``train(cfg, hooks)``) so that the hooks can reach the model; the data is the
tiny preset's real prepared corpus.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp

from tests.integration.pretrain_runs import TINY_DATA
from train import checkpoint
from train.config import load_config
from train.guards import TrainingHalted
from train.trainer import TrainHooks, read_metrics, train

pytestmark = pytest.mark.usefixtures("single_thread")

# steps of 8 sequences of 64 tokens; the batch ramp and warm-up of the preset keep moving
FAST = ["train.seq_len=64", "train.micro_batch_size=8", "train.batch_size=8", "train.batch_size_start=8",
        "checkpoint.keep=10"]


def config(run_dir, data_cache, *overrides):
    return load_config(["+conf=tiny", f"run.dir={run_dir}", f"data.cache_dir={data_cache}", *TINY_DATA, *FAST,
                        *overrides])


class Recorder:
    """Hooks that copy the model's state (parameters and gate biases) before each step, and corrupt one step."""

    def __init__(self, corrupt_step: int = 0, how: str = "", restore_after_backward: bool = False):
        self.before: dict[int, dict[str, torch.Tensor]] = {}
        self.corrupt_step, self.how, self.restore_after_backward = corrupt_step, how, restore_after_backward
        self.saved: torch.Tensor | None = None
        self.fired = 0

    def hooks(self) -> TrainHooks:
        return TrainHooks(before_step=self.before_step, after_backward=self.after_backward)

    def before_step(self, step: int, module: torch.nn.Module) -> None:
        self.before[step] = {k: v.detach().clone() for k, v in module.state_dict().items()}
        if step == self.corrupt_step and self.how == "scale_head" and not self.fired:
            self.fired += 1
            head = module.head.weight
            self.saved = head.detach().clone()
            with torch.no_grad():
                head.mul_(40.0)  # a fault that blows the loss up (a spike), not to NaN

    def after_backward(self, step: int, module: torch.nn.Module) -> None:
        if step >= self.corrupt_step and self.how == "nan_grad":
            module.layers[0].attn.wkv_a.weight.grad[0, 0] = float("nan")
        if self.saved is not None and self.restore_after_backward:
            with torch.no_grad():
                module.head.weight.copy_(self.saved)
            self.saved = None


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_nonfinite_gradient_skips_the_step_and_training_goes_on(tmp_path, data_cache):
    rec = Recorder(corrupt_step=3, how="nan_grad")
    hooks = rec.hooks()
    original = hooks.after_backward
    hooks.after_backward = lambda step, m: original(step, m) if step == 3 else None  # one bad step
    history = train(config(tmp_path / "run", data_cache, "train.steps=6"), hooks)
    assert [r["step"] for r in history] == [1, 2, 3, 4, 5, 6]
    bad = history[2]
    assert bad["skipped"] == "nonfinite" and bad["grad_norm"] != bad["grad_norm"]  # NaN norm logged
    assert [r["skipped"] for r in history if r["step"] != 3] == [""] * 5
    assert history[-1]["nonfinite_steps"] == 1
    # parameters, gate biases (buffers of the state dict) as before step 3; steps 2 and 4 did change them
    assert_same_state(rec.before[3], rec.before[4])
    assert not torch.equal(rec.before[2]["head.weight"], rec.before[3]["head.weight"])
    assert not torch.equal(rec.before[4]["head.weight"], rec.before[5]["head.weight"])
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in history)
    assert [r["tokens"] for r in history] == [512 * k for k in range(1, 7)]  # the data position moved on


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # the test reads the checkpoint in one process
def test_too_many_nonfinite_steps_stop_with_a_checkpoint_of_the_last_good_state(tmp_path, data_cache):
    rec = Recorder(corrupt_step=3, how="nan_grad")
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingHalted, match=r"stopped at step 4: 2 updates in a row were skipped.*max_bad_steps=2"):
        train(config(run_dir, data_cache, "train.steps=10", "train.max_bad_steps=2"), rec.hooks())
    saved = checkpoint.latest_checkpoint(run_dir)
    assert saved.name == "step_00000004"
    records = read_metrics(run_dir)
    assert [r["skipped"] for r in records] == ["", "", "nonfinite", "nonfinite"]
    # the checkpoint holds the parameters after step 2, the last good update
    saved_model = {k: torch.empty_like(v) for k, v in rec.before[3].items()}
    dcp.load({"model": saved_model}, checkpoint_id=str(saved), no_dist=True)
    assert_same_state(saved_model, rec.before[3])


def test_spike_is_logged_skipped_or_rolled_back(tmp_path, data_cache):
    window = ["train.spike_window=3", "train.spike_zscore=6"]
    # log: the spike is recorded, the update happens
    rec = Recorder(corrupt_step=5, how="scale_head", restore_after_backward=True)
    history = train(config(tmp_path / "log", data_cache, "train.steps=6", *window), rec.hooks())
    spike = history[4]
    assert spike["loss_zscore"] > 6 and spike["skipped"] == "" and spike["spikes"] == 1
    assert all(r["loss_zscore"] is None for r in history[:3])  # judged once the window is full
    assert all(r["loss_zscore"] < 6 for r in history[3:4] + history[5:])

    # skip: the same spike, and the state after the step is the state before it (the fault undone by the hook)
    rec = Recorder(corrupt_step=5, how="scale_head", restore_after_backward=True)
    history = train(config(tmp_path / "skip", data_cache, "train.steps=7", "train.on_spike=skip", *window),
                    rec.hooks())
    assert history[4]["skipped"] == "spike" and [r["skipped"] for r in history[5:]] == ["", ""]
    assert_same_state(rec.before[5], rec.before[6])

    # rollback: the fault stays in the weights; the run goes back to the step-4 checkpoint and replays
    # steps 5.. with the next batches, so the faulty state is gone
    run_dir = tmp_path / "rollback"
    rec = Recorder(corrupt_step=5, how="scale_head")
    history = train(config(run_dir, data_cache, "train.steps=7", "checkpoint.every=2", "train.on_spike=rollback",
                           *window), rec.hooks())
    assert [r["step"] for r in history] == [1, 2, 3, 4, 5, 6, 7]
    assert [r["rollbacks"] for r in history] == [0, 0, 0, 0, 1, 1, 1]
    assert all(r["skipped"] == "" for r in history) and max(r["loss_zscore"] or 0 for r in history) < 6
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4, 5, 6, 7]  # one history in the file
    first_pass = rec.before[5]
    assert not torch.equal(first_pass["head.weight"], rec.before[6]["head.weight"])
    # the loader drew one extra batch (the spiking one) beyond the 7 trained
    saved = checkpoint.latest_checkpoint(run_dir)
    assert saved.name == "step_00000007"
    reference = train(config(tmp_path / "reference", data_cache, "train.steps=4"))
    assert [r["loss"] for r in history[:4]] == [r["loss"] for r in reference]  # the replay starts from step 4
