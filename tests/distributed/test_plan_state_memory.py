"""The planner's parameter-state terms (weights, FP32 masters, gradients, AdamW moments: docs/planner.md)
against what a real rank allocates: the model's parameters, their gradients after a backward, and
``ZeroAdamW``'s state (moments, and the FP32 master copies of BF16 working weights), with FP32 and with
BF16 weights (train/precision.py). Exact byte counts: the only difference allowed is ZeRO's uneven
slices (a dimension that does not divide by the group's size gives some ranks a row more), below 1%."""

from __future__ import annotations

import pytest
import torch

from parallel.local_ranks import run_ranks
from parallel.mesh import build_process_groups, plan_layout
from parallel.zero import ZeroAdamW
from train.config import load_config
from train.losses import compute_losses
from train.model import Transformer
from train.plan import plan
from train.plan_cluster import Cluster


def overrides(ep: int, dtype: str) -> list[str]:
    return ["+conf=tiny", f"parallel.ep={ep}", f"train.dtype={dtype}", f"train.param_dtype={dtype}",
            "train.micro_batch_size=1"]


def _allocated(rank: int, world: int, ep: int, dtype: str) -> dict[str, int]:
    cfg = load_config(overrides(ep, dtype), world_size=world)
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    model.init_weights(seed=0)
    groups = build_process_groups(plan_layout(cfg, world, rank, world), "cpu")
    if ep > 1:
        from parallel.expert import parallelize_experts

        parallelize_experts(model, groups, cfg.parallel.dispatch)
    working = getattr(torch, dtype)
    optimizer = ZeroAdamW(model, groups, cfg.optim, working_dtype=working)
    window = torch.randint(0, cfg.model.vocab_size, (2, 33), generator=torch.Generator().manual_seed(rank))
    with torch.autocast("cpu", dtype=working, enabled=working != torch.float32):
        out = model(window[:, :-1])
    compute_losses(out, window, 0.3, 1e-4).loss.backward()
    params = list(model.parameters())
    assert all(p.grad is not None for p in params)
    state = [t for s in optimizer.inner.state.values() for key, t in s.items() if key != "step"]
    return {
        "weights": sum(p.numel() * p.element_size() for p in params),
        "gradients": sum(p.grad.numel() * p.grad.element_size() for p in params),
        "moments": sum(t.numel() * t.element_size() for t in state),
        # the FP32 masters where they are copies (an FP32 parameter is its own master)
        "masters": sum(b.masters.numel() * b.masters.element_size() for b in optimizer.buckets),
    }


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("world,ep", [(1, 1), (2, 1), (4, 2)])
def test_parameter_state_is_what_a_rank_allocates(world, ep, dtype):
    planned = plan(load_config(overrides(ep, dtype), world_size=world), Cluster(gpus=world, gpus_per_node=world,
                                                                                 device="cpu")).memory
    for rank, allocated in enumerate(run_ranks(_allocated, world, ep, dtype)):
        for term, value in allocated.items():
            assert value == pytest.approx(planned[term], rel=1e-2), (rank, term)
