"""Checkpoints: exact round trip through DCP, atomicity, keep-K, and clear errors on bad checkpoints."""

from __future__ import annotations

import dataclasses
import json
import pickle
import shutil

import pytest
import torch
import torch.distributed as dist

from parallel.mesh import build_process_groups, plan_layout
from parallel.zero import ZeroAdamW
from train import checkpoint
from train.config import Config, ModelConfig, OptimConfig
from train.errors import CheckpointError
from train.losses import compute_losses
from train.model import Transformer
from train.runtime import release_process_groups

pytestmark = pytest.mark.usefixtures("single_thread", "one_rank")

CFG = ModelConfig(vocab_size=64, dim=32, inter_dim=48, moe_inter_dim=16, n_layers=2, n_dense_layers=1, n_heads=2,
                  q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                  n_routed_experts=4, n_activated_experts=2, max_seq_len=32, original_seq_len=32)


@pytest.fixture(scope="module")
def one_rank():
    """A one-process gloo group, as the trainer starts for a plain `python` run."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield build_process_groups(plan_layout(Config(model=CFG), 1, 0, 1), "cpu")
    release_process_groups()  # destroyed and freed now: tests that fork later must not inherit its threads' state


def make(groups, seed: int = 0) -> tuple[Transformer, ZeroAdamW]:
    torch.manual_seed(seed)
    model = Transformer(CFG)
    model.init_weights(std=0.05)
    return model, ZeroAdamW(model, groups, OptimConfig(lr=1e-2, warmup_steps=0))


def train_steps(model, optimizer, n: int, seed: int) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(n):
        window = torch.randint(0, CFG.vocab_size, (2, 17), generator=gen)
        out = model(window[:, :-1])
        loss = compute_losses(out, window, 0.3, 1e-4).loss
        loss.backward()
        optimizer.step(1e-2, 1.0)
        model.moe_layers()[0].gate.bias.add_(0.01 * torch.sign(out.expert_load[0].float().mean() - out.expert_load[0]))
        losses.append(loss.item())
    return losses


def save(run_dir, step, model, optimizer, keep=3, extra=None):
    return checkpoint.save_checkpoint(run_dir, step, step * 100, checkpoint.model_state(model),
                                      optimizer.state_dict(), CFG, trainer_state=extra or {}, keep=keep)


def load(path, model, optimizer, cfg=CFG):
    optim_state = optimizer.state_dict()
    trainer_state = checkpoint.load_checkpoint(path, checkpoint.model_state(model), optim_state, cfg)
    optimizer.load_state_dict(optim_state)
    return trainer_state


def test_round_trip_continues_bitwise(tmp_path, one_rank):
    model, optimizer = make(one_rank)
    train_steps(model, optimizer, 3, seed=1)
    path = save(tmp_path, 3, model, optimizer, extra={"note": "x", "loader": {"consumed": 3}})
    expected = train_steps(model, optimizer, 3, seed=2)

    fresh, fresh_opt = make(one_rank, seed=123)  # different weights, zero moments
    trainer_state = load(path, fresh, fresh_opt)
    assert trainer_state == {"step": 3, "tokens": 300, "note": "x", "loader": {"consumed": 3}}
    assert fresh.moe_layers()[0].gate.bias.abs().sum() > 0  # gate biases are part of the checkpoint
    moments = [entry["exp_avg"].to_local() for entry in fresh_opt.state_dict().values()]
    assert moments and all(m.dtype == torch.bfloat16 for m in moments) and any(m.abs().sum() > 0 for m in moments)
    assert train_steps(fresh, fresh_opt, 3, seed=2) == expected  # bitwise on CPU


def test_resume_auto_ignores_half_written(tmp_path, one_rank):
    model, optimizer = make(one_rank)
    train_steps(model, optimizer, 1, seed=1)
    good = save(tmp_path, 5, model, optimizer)
    root = checkpoint.checkpoint_root(tmp_path)
    # a crash during the DCP write: only the temporary directory exists
    shutil.copytree(good, root / ".tmp-step_00000009")
    # a crash between rename and... (cannot happen, but a copied directory without meta.json must not count)
    partial = root / "step_00000007"
    shutil.copytree(good, partial)
    (partial / checkpoint.META_FILE).unlink()
    assert checkpoint.latest_checkpoint(tmp_path) == good
    # the next save of step 9 replaces the stale temporary directory
    newer = save(tmp_path, 9, model, optimizer)
    assert checkpoint.latest_checkpoint(tmp_path) == newer
    assert not (root / ".tmp-step_00000009").exists()


def test_keep_last_k(tmp_path, one_rank):
    model, optimizer = make(one_rank)
    train_steps(model, optimizer, 1, seed=1)
    for step in (1, 2, 3, 4):
        save(tmp_path, step, model, optimizer, keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, one_rank):
    model, optimizer = make(one_rank)
    train_steps(model, optimizer, 1, seed=1)
    path = save(tmp_path, 1, model, optimizer)
    shard = next(path.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    with pytest.raises(CheckpointError, match="cannot be loaded"):
        load(path, *make(one_rank, seed=1))

    (path / checkpoint.META_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="meta.json: corrupt"):
        load(path, *make(one_rank, seed=1))

    with pytest.raises(CheckpointError, match="not found"):
        load(tmp_path / "nope", *make(one_rank, seed=1))


def test_mismatched_model_config_names_the_fields(tmp_path, one_rank):
    model, optimizer = make(one_rank)
    train_steps(model, optimizer, 1, seed=1)
    path = save(tmp_path, 1, model, optimizer)
    meta = json.loads((path / checkpoint.META_FILE).read_text())
    other = dataclasses.replace(CFG, dim=48, n_heads=4)
    with pytest.raises(CheckpointError, match=r"model\.dim \(checkpoint 32, run 48\).*model\.n_heads"):
        checkpoint.check_model_config(path, meta, other)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError):
        load(path, model, optimizer, other)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing overwritten


def test_an_expert_tensor_stored_twice_or_partly_is_refused(tmp_path, one_rank):
    """The exactly-once check reads DCP's metadata: a checkpoint whose expert chunks overlap or leave a gap
    (what a wrong layout would write) is refused before anything is loaded."""
    import torch.distributed.checkpoint as dcp

    model, optimizer = make(one_rank)
    train_steps(model, optimizer, 1, seed=1)
    path = save(tmp_path, 1, model, optimizer)
    assert checkpoint.check_experts_complete(path) == 3 * len(model.moe_layers())
    reader = dcp.FileSystemReader(str(path))
    metadata = reader.read_metadata()
    key = "model.layers.1.ffn.experts.w1"
    chunk = metadata.state_dict_metadata[key].chunks[0]
    half = type(chunk)(offsets=chunk.offsets, sizes=torch.Size([chunk.sizes[0] // 2, *chunk.sizes[1:]]))
    metadata.state_dict_metadata[key].chunks[0] = half  # only the first half of the experts
    with open(path / ".metadata", "wb") as f:
        pickle.dump(metadata, f)
    with pytest.raises(CheckpointError, match=r"experts\.w1 of shape \[4, 16, 32\] is not stored exactly once "
                                              r"\(1 chunks covering 1024 of 2048 elements, overlapping: False\)"):
        load(path, *make(one_rank, seed=1))
    metadata.state_dict_metadata[key].chunks[:] = [chunk, half]  # the first half stored twice
    with open(path / ".metadata", "wb") as f:
        pickle.dump(metadata, f)
    with pytest.raises(CheckpointError, match=r"2 chunks covering 3072 of 2048 elements, overlapping: True"):
        load(path, *make(one_rank, seed=1))
