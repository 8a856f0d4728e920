"""The parallel layout: rank arithmetic, divisibility errors, and the real process groups on 8 gloo ranks."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from parallel.mesh import build_process_groups, plan_layout
from parallel.local_ranks import run_ranks
from train.config import Config, ConfigError, ModelConfig, ParallelConfig


def config(ep: int = 1, pp: int = 1, ranks_per_node: int = 0, experts: int = 8, groups: int = 2) -> Config:
    model = ModelConfig(n_routed_experts=experts, n_expert_groups=groups, topk_groups=1)
    return Config(model=model, parallel=ParallelConfig(ep=ep, pp=pp, ranks_per_node=ranks_per_node))


def test_rank_arithmetic_with_ep_innermost():
    layout = plan_layout(config(ep=4, ranks_per_node=2), world_size=8, rank=6, local_world_size=8)
    assert (layout.dp, layout.edp, layout.ep_rank, layout.edp_rank) == (8, 2, 2, 1)
    assert layout.ep_group_ranks() == [4, 5, 6, 7]
    assert (layout.ep_nodes, layout.ep_per_node) == (2, 2)  # the ep group spans two emulated nodes
    assert [layout.node_of_ep_rank(r) for r in range(4)] == [0, 0, 1, 1]
    one_node = plan_layout(config(ep=2), world_size=8, rank=3, local_world_size=8)  # LOCAL_WORLD_SIZE
    assert (one_node.ranks_per_node, one_node.ep_nodes, one_node.ep_per_node) == (8, 1, 2)


@pytest.mark.parametrize("kwargs,world,message", [
    (dict(ep=3), 8, r"parallel.ep \(3\) must divide the data-parallel ranks \(8 = 8 processes"),
    (dict(ep=16), 8, r"parallel.ep \(16\) is larger than the data-parallel ranks \(8"),
    (dict(ep=2), 1, r"parallel.ep \(2\) is larger than the data-parallel ranks \(1"),
    (dict(pp=3), 8, r"parallel.pp \(3\) must divide the number of processes \(8\)"),
    (dict(ep=4, experts=6, groups=1), 8, r"model.n_routed_experts \(6\) must be divisible by parallel.ep \(4\)"),
    (dict(ep=4, ranks_per_node=3), 12, r"parallel.ranks_per_node \(3\) must divide .* multiple of parallel.ep \(4\)"),
    (dict(ep=8, ranks_per_node=2, experts=8, groups=2), 8,
     r"model.n_expert_groups \(2\) must be a multiple of the nodes an expert-parallel group spans \(4\)"),
])
def test_sizes_that_do_not_fit_are_one_clear_line(kwargs, world, message):
    with pytest.raises(ConfigError, match=message):
        plan_layout(config(**kwargs), world_size=world, rank=0, local_world_size=world)


def _group_ranks(rank: int, world: int) -> list[list[int]]:
    groups = build_process_groups(plan_layout(config(ep=4, ranks_per_node=2), world, rank, world), "cpu")
    return [dist.get_process_group_ranks(g) for g in (groups.dp, groups.ep, groups.edp, groups.ep_local,
                                                      groups.ep_node)]


def test_process_groups_on_eight_ranks_emulating_four_nodes():
    """8 ranks, 2 per node, ep 4: ep groups {0..3}, {4..7}; edp pairs; in-node and rail sub-groups."""
    results = run_ranks(_group_ranks, 8)
    dp, ep, edp, local, rail = results[5]
    assert dp == list(range(8))
    assert ep == [4, 5, 6, 7] and edp == [1, 5]
    assert local == [4, 5] and rail == [5, 7]  # same node / same in-node index on the other node
    assert results[0][1] == [0, 1, 2, 3] and results[0][3] == [0, 1] and results[0][4] == [0, 2]
