"""World size and config -> the parallel layout and its process groups (report sec 3.2).

DeepSeek-V3 trains with pipeline parallelism, expert parallelism inside the data-parallel dimension
and ZeRO-1; no tensor parallelism. Ranks are laid out with the expert dimension innermost, so an
expert-parallel group is a run of consecutive ranks and fills a node before it spans the next:

    rank = pp_rank * dp + edp_rank * ep + ep_rank,      dp = world / pp,   edp = dp / ep

- dp group: the dp ranks of one pipeline stage (dense parameters are replicated over it; ZeRO-1
  shards their optimizer state over it);
- ep group: ep consecutive ranks; each holds n_routed_experts / ep experts, and tokens are exchanged
  inside it (all-to-all);
- edp group: the ranks holding the same experts (one per ep group); expert gradients are reduced and
  expert optimizer state is sharded over it;
- pp group: the stages of one pipeline (used by the pipeline runtime).
Nodes come from LOCAL_WORLD_SIZE or ``parallel.ranks_per_node`` (so one machine can emulate several
nodes). An ep group spans ``ep_nodes`` nodes with ``ep_per_node`` ranks on each; the hierarchical
dispatch uses its in-node part (``ep_local``) and its across-node part with the same in-node index
(``ep_node``, the "rail").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from train.config import Config, ConfigError


@dataclass(frozen=True)
class Layout:
    """How the world is divided; pure arithmetic, no process groups."""

    world_size: int
    rank: int
    pp: int
    ep: int
    ranks_per_node: int

    @property
    def dp(self) -> int:
        return self.world_size // self.pp

    @property
    def edp(self) -> int:
        return self.dp // self.ep

    @property
    def pp_rank(self) -> int:
        return self.rank // self.dp

    @property
    def dp_rank(self) -> int:
        return self.rank % self.dp

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep

    @property
    def edp_rank(self) -> int:
        return self.dp_rank // self.ep

    @property
    def ep_per_node(self) -> int:
        """EP ranks of one ep group on one node."""
        return min(self.ep, self.ranks_per_node)

    @property
    def ep_nodes(self) -> int:
        """Nodes one ep group spans."""
        return self.ep // self.ep_per_node

    def node_of_ep_rank(self, ep_rank: int) -> int:
        """Index (0..ep_nodes-1) of the node, within this ep group, that holds ``ep_rank``."""
        return ep_rank // self.ep_per_node

    def ep_group_ranks(self) -> list[int]:
        first = self.rank - self.ep_rank
        return list(range(first, first + self.ep))


def plan_layout(cfg: Config, world_size: int, rank: int, local_world_size: int) -> Layout:
    """Check that the sizes divide and node-limited routing can hold; one clear line otherwise."""
    p, m = cfg.parallel, cfg.model
    rpn = p.ranks_per_node or local_world_size
    if world_size % p.pp:
        raise ConfigError(f"parallel.pp ({p.pp}) must divide the number of processes ({world_size})")
    dp = world_size // p.pp
    if p.ep > dp:
        raise ConfigError(f"parallel.ep ({p.ep}) is larger than the data-parallel ranks ({dp} = {world_size} "
                          f"processes / parallel.pp {p.pp}); lower parallel.ep or start more processes")
    if dp % p.ep:
        raise ConfigError(f"parallel.ep ({p.ep}) must divide the data-parallel ranks ({dp} = {world_size} processes / "
                          f"parallel.pp {p.pp})")
    if m.n_routed_experts % p.ep:
        raise ConfigError(f"model.n_routed_experts ({m.n_routed_experts}) must be divisible by parallel.ep ({p.ep})")
    if world_size % rpn or (p.ep > rpn and p.ep % rpn) or (p.ep < rpn and rpn % p.ep):
        raise ConfigError(f"parallel.ranks_per_node ({rpn}) must divide the processes ({world_size}) and divide or be "
                          f"a multiple of parallel.ep ({p.ep})")
    layout = Layout(world_size=world_size, rank=rank, pp=p.pp, ep=p.ep, ranks_per_node=rpn)
    if layout.ep_nodes > 1 and m.n_expert_groups % layout.ep_nodes:
        raise ConfigError(f"model.n_expert_groups ({m.n_expert_groups}) must be a multiple of the nodes an expert-"
                          f"parallel group spans ({layout.ep_nodes}) so that each group lies on one node and a token "
                          f"reaches at most model.topk_groups ({m.topk_groups}) nodes")
    return layout


@dataclass
class ProcessGroups:
    """The process groups of one rank (every rank creates all of them, in the same order)."""

    layout: Layout
    mesh: DeviceMesh  # dims (pp, edp, ep_node, ep_local)
    dp_mesh: DeviceMesh  # 1-D over the dp ranks of this stage
    # 3-D (edp, ep_node, ep_local): an expert parameter [E, ...] is (Replicate(), Shard(0), Shard(0)) on it,
    # i.e. split over the ep group in ep_rank order and replicated over edp
    expert_mesh: DeviceMesh
    dp: dist.ProcessGroup
    ep: dist.ProcessGroup
    edp: dist.ProcessGroup
    pp: dist.ProcessGroup
    ep_local: dist.ProcessGroup  # my ep group's ranks on my node
    ep_node: dist.ProcessGroup  # my ep group's ranks with my in-node index, one per node (the "rail")


def build_process_groups(layout: Layout, device_type: str) -> ProcessGroups:
    """Create the device mesh and its groups; torch.distributed must be initialized."""
    mesh = init_device_mesh(device_type, (layout.pp, layout.edp, layout.ep_nodes, layout.ep_per_node),
                            mesh_dim_names=("pp", "edp", "ep_node", "ep_local"))
    ep_mesh = mesh["ep_node", "ep_local"]._flatten("ep")
    dp_mesh = mesh["edp", "ep_node", "ep_local"]._flatten("dp")
    return ProcessGroups(
        layout=layout, mesh=mesh, dp_mesh=dp_mesh, expert_mesh=mesh["edp", "ep_node", "ep_local"],
        dp=dp_mesh.get_group(), ep=ep_mesh.get_group(), edp=mesh["edp"].get_group(), pp=mesh["pp"].get_group(),
        ep_local=mesh["ep_local"].get_group(), ep_node=mesh["ep_node"].get_group(),
    )
