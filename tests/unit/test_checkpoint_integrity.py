"""Checkpoint integrity (manifest.json, verify_checkpoint, latest_good_checkpoint), the pickle-free trainer
state, and CheckpointWriter's background saves against the synchronous ones (one rank; two ranks in
tests/distributed/test_checkpoint_async.py)."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

from tests.unit.test_checkpoint import CFG, make, one_rank, train_steps  # noqa: F401 (one_rank: a fixture)
from train import checkpoint
from train.errors import CheckpointError

pytestmark = pytest.mark.usefixtures("single_thread", "one_rank")

RUN_CONFIG = {"train": {"steps": 10, "seq_len": 16}, "model": {"dim": 32}, "run": {"dir": "x"}}


def trainer_state() -> dict:
    return {"loader": {"consumed": 12, "epoch": 0}, "rng": {"cpu": torch.get_rng_state()},
            "config": {"optim": {"betas": (0.9, 0.95)}, "name": "tiny"}}


def save(run_dir, step, model, optimizer, keep=3):
    return checkpoint.save_checkpoint(run_dir, step, step * 100, checkpoint.model_state(model), optimizer.state_dict(),
                                      CFG, trainer_state=trainer_state(), keep=keep, config=RUN_CONFIG)


def saved(tmp_path, one_rank, step=1):
    model, optimizer = make(one_rank)
    train_steps(model, optimizer, 1, seed=1)
    return save(tmp_path, step, model, optimizer)


def load(path, groups, verify="full"):
    """Load into a fresh model and optimizer: (model state dict, optimizer state, trainer state)."""
    model, optimizer = make(groups, seed=99)
    optim_state = optimizer.state_dict()
    state = checkpoint.load_checkpoint(path, checkpoint.model_state(model), optim_state, CFG, verify=verify)
    return {k: v.clone() for k, v in model.state_dict().items()}, _local(optim_state), state


def _local(optim_state: dict) -> dict:
    return {f"{name}.{k}": (v.to_local() if hasattr(v, "to_local") else v).clone()
            for name, entry in optim_state.items() for k, v in entry.items()}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# --------------------------------------------------------------------------------------------------
# manifest and verification


def test_manifest_lists_every_file_with_size_checksum_and_config_hash(tmp_path, one_rank):
    path = saved(tmp_path, one_rank, step=4)
    manifest = json.loads((path / checkpoint.MANIFEST_FILE).read_text())
    on_disk = {p.name for p in path.iterdir() if p.name != checkpoint.MANIFEST_FILE}
    assert set(manifest["files"]) == on_disk == {".metadata", "__0_0.distcp", checkpoint.META_FILE}
    for name, entry in manifest["files"].items():
        assert entry == {"bytes": (path / name).stat().st_size, "sha256": checkpoint.file_sha256(path / name)}
    assert (manifest["step"], manifest["tokens"]) == (4, 400)
    assert manifest["config_sha256"] == checkpoint.config_hash(RUN_CONFIG)
    assert checkpoint.config_hash({"b": 1, "a": [1, 2]}) == checkpoint.config_hash({"a": (1, 2), "b": 1})
    assert checkpoint.verify_checkpoint(path) == 3


def test_truncated_file_is_named(tmp_path, one_rank):
    path = saved(tmp_path, one_rank)
    shard = path / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-10])
    for level in ("size", "full"):
        with pytest.raises(CheckpointError, match=r"__0_0\.distcp: corrupt \(\d+ bytes, manifest\.json says \d+: "
                                                  r"truncated or overwritten\)"):
            checkpoint.verify_checkpoint(path, level)
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp: corrupt"):
        load(path, one_rank)
    assert checkpoint.verify_checkpoint(path, "none") == 0


def test_edited_byte_fails_the_checksum_only(tmp_path, one_rank):
    path = saved(tmp_path, one_rank)
    shard = path / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    assert checkpoint.verify_checkpoint(path, "size") == 3  # same size: only the checksum sees it
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp: corrupt \(sha256 differs from manifest\.json"):
        checkpoint.verify_checkpoint(path, "full")
    with pytest.raises(CheckpointError, match="sha256 differs"):
        load(path, one_rank)


def test_deleted_file_and_bad_manifest(tmp_path, one_rank):
    path = saved(tmp_path, one_rank)
    manifest = (path / checkpoint.MANIFEST_FILE).read_text()
    (path / "__0_0.distcp").unlink()
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp: missing \(listed in manifest\.json\)"):
        checkpoint.verify_checkpoint(path, "size")

    (path / checkpoint.MANIFEST_FILE).write_text(manifest[:40])
    with pytest.raises(CheckpointError, match=r"manifest\.json: corrupt"):
        checkpoint.verify_checkpoint(path)
    (path / checkpoint.MANIFEST_FILE).unlink()
    with pytest.raises(CheckpointError, match=r"no manifest\.json .*checkpoint\.verify=none"):
        checkpoint.verify_checkpoint(path, "size")
    with pytest.raises(CheckpointError, match="must be one of full, size, none"):
        checkpoint.verify_checkpoint(path, "fast")


def test_resume_auto_skips_a_corrupt_newest_checkpoint_with_a_warning(tmp_path, one_rank):
    model, optimizer = make(one_rank)
    train_steps(model, optimizer, 1, seed=1)
    first = save(tmp_path, 1, model, optimizer)
    train_steps(model, optimizer, 1, seed=2)
    second = save(tmp_path, 2, model, optimizer)
    third = save(tmp_path, 3, model, optimizer)
    shard = second / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    (third / checkpoint.MANIFEST_FILE).unlink()  # an older checkpoint format, say

    warnings: list[str] = []
    assert checkpoint.latest_good_checkpoint(tmp_path, "full", warnings.append) == first
    assert len(warnings) == 2
    assert warnings[0].startswith("skipping checkpoint step_00000003:") and "no manifest.json" in warnings[0]
    assert warnings[1].startswith("skipping checkpoint step_00000002:") and "__0_0.distcp: corrupt" in warnings[1]
    assert checkpoint.latest_good_checkpoint(tmp_path, "none", warnings.append) == third
    assert checkpoint.latest_good_checkpoint(tmp_path / "empty", "full", warnings.append) is None
    # resume=PATH to a bad checkpoint fails with the same error
    with pytest.raises(CheckpointError, match="__0_0.distcp: corrupt"):
        load(second, one_rank)
    _, _, state = load(first, one_rank)
    assert state["step"] == 1


def test_weights_only_load_verifies_too(tmp_path, one_rank):
    path = saved(tmp_path, one_rank)
    (path / checkpoint.META_FILE).write_text((path / checkpoint.META_FILE).read_text() + " ")
    model, _ = make(one_rank, seed=3)
    with pytest.raises(CheckpointError, match=r"meta\.json: corrupt"):
        checkpoint.load_model_weights(path, checkpoint.model_state(model), CFG)
    checkpoint.load_model_weights(path, checkpoint.model_state(model), CFG, verify="none")


# --------------------------------------------------------------------------------------------------
# no pickle in the trainer state, none loaded


def test_trainer_state_round_trips_as_json_with_tensors(tmp_path, one_rank):
    path = saved(tmp_path, one_rank)
    metadata = checkpoint.read_metadata(path).state_dict_metadata
    assert isinstance(metadata[checkpoint.TRAINER_KEY], TensorStorageMetadata)
    assert not [k for k, v in metadata.items() if isinstance(v, BytesStorageMetadata)]  # nothing DCP would unpickle
    expected = trainer_state()
    _, _, state = load(path, one_rank)
    rng = state.pop("rng")["cpu"]
    assert rng.dtype == torch.uint8 and torch.equal(rng, expected["rng"]["cpu"])
    assert state == {"step": 1, "tokens": 100, "loader": expected["loader"],
                     "config": {"optim": {"betas": [0.9, 0.95]}, "name": "tiny"}}  # tuples come back as lists
    for tensor in (torch.arange(6, dtype=torch.bfloat16).reshape(2, 3), torch.tensor(7.5), torch.empty(0, 4)):
        decoded = checkpoint.decode_trainer_state(checkpoint.encode_trainer_state({"t": tensor}), path)["t"]
        assert decoded.dtype == tensor.dtype and torch.equal(decoded, tensor)
    with pytest.raises(TypeError, match="a PosixPath cannot be stored"):
        checkpoint.encode_trainer_state({"where": Path("x")})


class Payload:
    """Unpickling this creates ``marker``: what a malicious checkpoint could run instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _rewrite_manifest(path: Path) -> None:
    """What an attacker (or a careless tool) would do: make the manifest match the edited files."""
    names = sorted(p.name for p in path.iterdir() if p.name != checkpoint.MANIFEST_FILE)
    checkpoint.write_manifest(path, checkpoint.describe_files(path, names), 1, 100, None)


@pytest.mark.filterwarnings("ignore:Detected an existing checkpoint")
def test_a_pickled_trainer_entry_is_never_unpickled(tmp_path, one_rank):
    model, optimizer = make(one_rank)
    path = save(tmp_path, 1, model, optimizer)
    marker = tmp_path / "payload_ran"
    # the same checkpoint, its trainer entry replaced by a pickle (DCP stores non-tensors with torch.save)
    dcp.save({"model": checkpoint.model_state(model), "optim": optimizer.state_dict(),
              checkpoint.TRAINER_KEY: Payload(marker)}, checkpoint_id=str(path))
    _rewrite_manifest(path)
    assert isinstance(checkpoint.read_metadata(path).state_dict_metadata[checkpoint.TRAINER_KEY], BytesStorageMetadata)
    with pytest.raises(CheckpointError, match="no JSON trainer state"):
        load(path, one_rank)
    with pytest.raises(CheckpointError, match=r"stored as pickled bytes, which are never loaded"):
        checkpoint._load(path, {checkpoint.TRAINER_KEY: torch.empty(4, dtype=torch.uint8)}, "", "fix")
    assert not marker.exists()
    dcp.load({checkpoint.TRAINER_KEY: torch.empty(4, dtype=torch.uint8)}, checkpoint_id=str(path))
    assert marker.exists()  # DCP's own load would have run it: the guard matters


def test_a_malicious_dcp_metadata_is_not_unpickled(tmp_path, one_rank):
    path = saved(tmp_path, one_rank)
    marker = tmp_path / "payload_ran"
    (path / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    _rewrite_manifest(path)
    with pytest.raises(CheckpointError, match=r"unreadable checkpoint metadata \(UnpicklingError: pathlib\.Path\.touch "
                                              r"is not allowed in DCP metadata\)"):
        load(path, one_rank)
    with pytest.raises(pickle.UnpicklingError):
        checkpoint.has_ema(path)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------
# CheckpointWriter: background saves


def test_async_save_equals_sync_save_and_is_not_changed_by_later_training(tmp_path, one_rank):
    model, optimizer = make(one_rank)
    train_steps(model, optimizer, 2, seed=1)
    expected_model = {k: v.clone() for k, v in model.state_dict().items()}
    expected_optim = _local(optimizer.state_dict())
    state = trainer_state()
    sync = checkpoint.CheckpointWriter(tmp_path / "sync", keep=2, async_save=False)
    background = checkpoint.CheckpointWriter(tmp_path / "async", keep=2, async_save=True)
    sync_path = sync.save(2, 200, checkpoint.model_state(model), optimizer.state_dict(), CFG, state, config=RUN_CONFIG)
    async_path = background.save(2, 200, checkpoint.model_state(model), optimizer.state_dict(), CFG, state,
                                 config=RUN_CONFIG)
    train_steps(model, optimizer, 1, seed=2)  # parameters and moments change while the save may still run
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    assert background.wait() == async_path and background.wait() is None
    assert checkpoint.verify_checkpoint(async_path) == 3
    a_model, a_optim, a_state = load(async_path, one_rank)
    s_model, s_optim, s_state = load(sync_path, one_rank)
    assert_same(a_model, expected_model)
    assert_same(a_optim, expected_optim)
    assert_same(s_model, a_model)
    assert_same(s_optim, a_optim)
    assert torch.equal(a_state.pop("rng")["cpu"], s_state.pop("rng")["cpu"]) and a_state == s_state
    manifests = [json.loads((p / checkpoint.MANIFEST_FILE).read_text()) for p in (sync_path, async_path)]
    assert manifests[0]["config_sha256"] == manifests[1]["config_sha256"] == checkpoint.config_hash(RUN_CONFIG)

    for step in (3, 4, 5):  # each save waits for the previous one; pruning keeps the newest 2
        background.save(step, step * 100, checkpoint.model_state(model), optimizer.state_dict(), CFG, state)
    background.close()
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "async")] == ["step_00000004", "step_00000005"]
    assert not list((tmp_path / "async" / "checkpoints").glob(".tmp-*"))


def _crash_during_async_save(run_dir: str) -> None:
    """In a fresh process: one complete checkpoint, then exit while the next one is written in the background."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    from parallel.mesh import build_process_groups, plan_layout
    from train.config import Config

    groups = build_process_groups(plan_layout(Config(model=CFG), 1, 0, 1), "cpu")
    model, optimizer = make(groups)
    writer = checkpoint.CheckpointWriter(run_dir, keep=1, async_save=True)
    writer.save(1, 100, checkpoint.model_state(model), optimizer.state_dict(), CFG, {})
    writer.wait()
    writer.save(2, 200, checkpoint.model_state(model), optimizer.state_dict(), CFG, {})
    os._exit(0)  # no wait(), no clean-up: the background threads die wherever they are


def test_a_crash_during_a_background_save_leaves_a_loadable_checkpoint(tmp_path, one_rank):
    process = multiprocessing.get_context("spawn").Process(target=_crash_during_async_save, args=(str(tmp_path),))
    process.start()
    process.join(timeout=120)
    assert process.exitcode == 0
    found = checkpoint.list_checkpoints(tmp_path)
    assert [p.name for p in found] in (["step_00000001"], ["step_00000002"])  # never a partial one
    warnings: list[str] = []
    path = checkpoint.latest_good_checkpoint(tmp_path, "full", warnings.append)
    assert path == found[-1] and not warnings
    assert load(path, one_rank)[2]["step"] in (1, 2)
