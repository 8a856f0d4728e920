"""CheckpointWriter on 2 real gloo ranks with expert parallelism (experts as DTensors over ep, ZeRO-1 shards over
dp): a background save holds the state of the moment ``save`` returned, equals the synchronous save, lists both
ranks' files in its manifest, and every rank takes the same resume decision when one rank's file is corrupt."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from parallel.expert import parallelize_experts
from parallel.local_ranks import run_ranks
from parallel.mesh import build_process_groups, plan_layout
from parallel.zero import ZeroAdamW
from tests.unit.test_checkpoint import CFG, train_steps
from train import checkpoint
from train.config import Config, OptimConfig


def _build(rank: int, world: int, seed: int):
    config = Config(model=CFG)
    config.parallel.ep = world
    groups = build_process_groups(plan_layout(config, world, rank, world), "cpu")
    torch.manual_seed(seed)
    from train.model import Transformer

    model = Transformer(CFG)
    model.init_weights(std=0.05)
    parallelize_experts(model, groups)
    return model, ZeroAdamW(model, groups, OptimConfig(lr=1e-2, warmup_steps=0)), groups


def _local_state(model, optimizer) -> dict[str, torch.Tensor]:
    state = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    for name, entry in optimizer.state_dict().items():
        for key, value in entry.items():
            state[f"optim.{name}.{key}"] = (value.to_local() if hasattr(value, "to_local") else value).clone()
    return state


def _load(path: Path, rank: int, world: int, verify: str = "full") -> tuple[dict[str, torch.Tensor], dict]:
    model, optimizer, groups = _build(rank, world, seed=77)
    optim_state = optimizer.state_dict()
    trainer = checkpoint.load_checkpoint(path, checkpoint.model_state(model, groups), optim_state, CFG, verify=verify)
    optimizer.load_state_dict(optim_state)
    return _local_state(model, optimizer), trainer


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _async_rank(rank: int, world: int, run_dir: str) -> dict:
    torch.manual_seed(0)
    model, optimizer, groups = _build(rank, world, seed=0)
    train_steps(model, optimizer, 2, seed=10)  # the same data on both ranks: replicated tensors (gate biases) agree
    expected = _local_state(model, optimizer)
    trainer_state = {"loader": {"consumed": 4}, "rng": {"cpu": torch.get_rng_state()}}
    root = Path(run_dir)
    sync = checkpoint.CheckpointWriter(root / "sync", keep=2, async_save=False)
    writer = checkpoint.CheckpointWriter(root / "async", keep=2, async_save=True)
    sync_path = sync.save(2, 200, checkpoint.model_state(model, groups), optimizer.state_dict(), CFG, trainer_state)
    first = writer.save(2, 200, checkpoint.model_state(model, groups), optimizer.state_dict(), CFG, trainer_state,
                        config={"run": "x"})
    train_steps(model, optimizer, 1, seed=20)  # training goes on (its collectives on the training groups)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(2.0)
    writer.wait()
    second = writer.save(3, 300, checkpoint.model_state(model, groups), optimizer.state_dict(), CFG, trainer_state)
    writer.close()

    loaded_async, trainer = _load(first, rank, world)
    loaded_sync, _ = _load(sync_path, rank, world)
    result = {"async_is_moment_of_save": _same(loaded_async, expected),
              "async_equals_sync": _same(loaded_async, loaded_sync),
              "step": trainer["step"], "rng_equal": torch.equal(trainer["rng"]["cpu"], trainer_state["rng"]["cpu"]),
              "files": sorted(json.loads((first / checkpoint.MANIFEST_FILE).read_text())["files"])}

    if rank == 0:  # rank 1's shard of the newest checkpoint is damaged: both ranks must skip it alike
        shard = second / "__1_0.distcp"
        data = bytearray(shard.read_bytes())
        data[-1] ^= 0xFF
        shard.write_bytes(bytes(data))
    torch.distributed.barrier()
    warnings: list[str] = []
    result["resume_auto"] = checkpoint.latest_good_checkpoint(root / "async", "full", warnings.append).name
    result["warnings"] = warnings
    return result


def test_async_save_on_two_ranks_with_expert_parallelism(tmp_path):
    results = run_ranks(_async_rank, 2, str(tmp_path))
    for result in results:
        assert result["async_is_moment_of_save"] and result["async_equals_sync"]
        assert result["step"] == 2 and result["rng_equal"]
        assert result["files"] == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.json"]
        assert result["resume_auto"] == "step_00000002"
        assert len(result["warnings"]) == 1 and "step_00000003" in result["warnings"][0]
        assert "__1_0.distcp: corrupt (sha256 differs" in result["warnings"][0]
