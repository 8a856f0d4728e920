"""Planner: expert all-to-all traffic per token and MoE layer (report sec 3.2.2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from train.config import Config
from train.plan_cluster import Cluster, Precision


@dataclass
class AllToAll:
    """Bytes one token sends per MoE layer and direction (forward; the backward mirrors it)."""

    nodes: int  # nodes an expert-parallel group spans
    target_nodes: float  # nodes a token's experts lie on: min(topk_groups, nodes, K)
    ib_nodes: float  # of them, other than the token's own node (expected, uniform routing)
    target_gpus: float  # distinct GPUs holding a token's experts (expected)
    nvlink_hops: float  # NVLink forwards from the landing GPU to the expert GPUs (expected)
    dispatch_row: float  # bytes of one dispatched row (FP8 + scales + routing metadata, or BF16)
    combine_row: float  # bytes of one combined row (BF16 partial sums)
    dispatch_ib: float
    dispatch_nvlink: float
    combine_ib: float
    combine_nvlink: float
    seconds_per_token: float  # dispatch + combine of one layer, IB and NVLink overlapped

    @property
    def bytes_per_token(self) -> float:
        return self.dispatch_ib + self.dispatch_nvlink + self.combine_ib + self.combine_nvlink


def all_to_all(cfg: Config, layout: Any, cluster: Cluster, p: Precision) -> AllToAll:
    """Expected traffic of one token through one MoE layer (docs/planner.md, "All-to-all").

    A token's K experts lie on M' = min(topk_groups, nodes, K) nodes (node-limited routing, M = 4);
    it crosses IB once per target node other than its own (expected M'(N-1)/N), landing on the GPU
    with its in-node index, which forwards it over NVLink to each other GPU holding one of its
    experts: G(1-(1-1/G)^(K/M')) distinct GPUs per node, of G = ep GPUs per node, less the landing one.
    Dispatch rows are FP8 with 1x128 scales when fp8.enabled and fp8.dispatch (plus K ids and weights),
    else the activation dtype; combine rows are BF16 partial sums, accumulated per node before IB."""
    m = cfg.model
    if layout.ep == 1:
        return AllToAll(1, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0.0)
    from fp8.dispatch import dispatch_row_bytes

    nodes, g = layout.ep_nodes, layout.ep_per_node
    target_nodes = float(min(m.topk_groups, nodes, m.n_activated_experts))
    ib_nodes = target_nodes * (nodes - 1) / nodes
    per_node = m.n_activated_experts / target_nodes
    gpus_per_node = g * (1 - (1 - 1 / g) ** per_node)
    hops = target_nodes * gpus_per_node * (1 - 1 / g)
    drow = dispatch_row_bytes(m.dim, m.n_activated_experts, p.fp8_dispatch, p.act)
    crow = p.act * m.dim
    ib, nv = cluster.ib_gbps * 1e9, cluster.nvlink_gbps * 1e9
    d_ib, d_nv, c_ib, c_nv = ib_nodes * drow, hops * drow, ib_nodes * crow, hops * crow
    seconds = max(d_ib / ib, d_nv / nv) + max(c_ib / ib, c_nv / nv)
    return AllToAll(nodes, target_nodes, ib_nodes, target_nodes * gpus_per_node, hops, drow, crow,
                    d_ib, d_nv, c_ib, c_nv, seconds)
