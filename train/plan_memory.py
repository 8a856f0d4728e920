"""Planner: memory per pipeline rank (weights, gradients, ZeRO-1 optimizer state, activations held under
the schedule, buffers, reserve) and the stage split that minimises the fullest rank (report sec 3.2,
Table 2: DualPipe's 2x parameters and PP+1 activations)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from train.config import Config
from train.model import count_parameters
from train.plan_cluster import RESERVE, Cluster, Precision, layout_for, precision
from train.plan_comm import all_to_all
from train.plan_stages import (
    StagePlan, cached_schedule, check_schedule, check_stage_boundaries, forward_boundaries, memory_micro_batches,
    micro_batches_per_step, shifted_boundaries, stage_plans, weighted_peaks,
)

MEMORY_TERMS = ("weights", "masters", "casts", "gradients", "moments", "activations", "buffers", "reserve")


@dataclass
class RankMemory:
    rank: int  # pipeline rank
    stages: list[int]
    params: int  # parameters held (routed experts: this rank's 1/ep)
    terms: dict[str, float]  # MEMORY_TERMS -> bytes
    chunks_in_flight: int  # (stage, micro-batch) chunks whose activations are held at the peak

    @property
    def total(self) -> float:
        return sum(self.terms.values())



def rank_placement(cfg: Config, dp: int) -> tuple[list[list[int]], int, Any]:
    """(stages of each pipeline rank, n_stages, the schedule built for the activation peak or None)."""
    p = cfg.parallel
    if p.pp == 1:
        return [[0]], 1, None
    m = memory_micro_batches(p.schedule, p.pp, micro_batches_per_step(cfg, dp))
    schedule = cached_schedule(p.schedule, p.pp, m)
    return [list(stages) for stages in schedule.placement], schedule.n_stages, schedule


def rank_memory(cfg: Config, cluster: Cluster, layout: Any, p: Precision,
                 boundaries: list[int] | None = None) -> tuple[list[RankMemory], list[StagePlan]]:
    placement, n_stages, schedule = rank_placement(cfg, layout.dp)
    stages = stage_plans(cfg, n_stages, p, boundaries)
    m, t = cfg.model, cfg.train
    tokens = t.micro_batch_size * t.seq_len
    if schedule is None:
        peaks = [(stages[0].activation_bytes, 1)]
    else:
        peaks = weighted_peaks(schedule, [s.activation_bytes for s in stages])
    a2a = all_to_all(cfg, layout, cluster, p)
    ranks = []
    for r, held in enumerate(placement):
        mine = [stages[s] for s in held]
        embed = max(s.embed_params for s in mine)  # one embedding per rank (physically shared)
        dense = sum(s.dense_params for s in mine) + embed
        expert = sum(s.expert_params for s in mine) / layout.ep
        params = dense + expert
        buffers = 0.0
        if layout.ep > 1 and any(s.moe_layers for s in mine):
            # receive buffers of one layer's dispatch and combine, for the two micro-batches of an F&B
            buffers += 2 * tokens * a2a.target_gpus * (a2a.dispatch_row + a2a.combine_row)
        if any(s.has_head for s in mine):
            # the logits' gradient in their dtype (train/losses.py), one at a time: each head's cross-entropy is
            # made right after the head (Transformer.forward with the window), so backward consumes one before
            # making the next; made after all the heads, all 1 + D would be alive together
            buffers += tokens * m.vocab_size * p.act
        buffers += max(s.recompute_bytes for s in mine)  # full recompute: one block rebuilt at a time
        casts = sum(s.cast_dense for s in mine) + sum(s.cast_expert for s in mine) / layout.ep
        # FP8 blocks of W and of W^T, 1 byte each; the routed experts keep W's only (fp8/experts.py)
        fp8_copies = 2 * sum(s.fp8_dense for s in mine) + sum(s.fp8_expert for s in mine) / layout.ep
        kept = sum(s.fp32_params for s in mine)  # norms and gates: FP32 parameters, their own masters
        terms = {
            "weights": kept * 4 + (params - kept) * p.weight,  # on every data-parallel rank
            "masters": p.master * ((dense - kept) / layout.dp + expert / layout.edp),  # ZeRO-1, of BF16 weights
            # one BF16 copy of the weights BF16 GEMMs read (FP32 weights), the FP8 linears' FP8 blocks: for the step
            "casts": casts * p.act + fp8_copies,
            "gradients": params * p.grad,
            "moments": p.moments * (dense / layout.dp + expert / layout.edp),  # ZeRO-1
            "activations": peaks[r][0],
            "buffers": buffers,
            "reserve": float(RESERVE[cluster.device]),
        }
        ranks.append(RankMemory(r, list(held), int(params), terms, peaks[r][1]))
    return ranks, stages


@dataclass
class Split:
    """Where the pipeline cuts the model and what each rank then holds."""

    boundaries: list[int]  # first layer of each stage after the first (``split_model``'s argument)
    ranks: list[RankMemory]
    stages: list[StagePlan]
    forward_boundaries: list[int]  # the forward-balanced cuts (split_model's default without boundaries)
    forward_total: float  # the fullest rank's bytes with the forward-balanced cuts
    source: str  # why these cuts: "parallel.stage_boundaries", "memory-balanced" or "forward-balanced"

    @property
    def worst(self) -> RankMemory:
        return max(self.ranks, key=lambda r: r.total)


def best_split(cfg: Config, cluster: Cluster, layout: Any, p: Precision) -> Split:
    """The cuts the pipeline runs with (``pipeline_boundaries``) and what each rank then holds.

    ``parallel.stage_boundaries`` when given (checked, ``check_stage_boundaries``); else the forward-balanced
    cuts or, under DualPipe / DualPipeV (first and last stage on one rank, report sec 3.2.1, Table 2), those
    with blocks moved from the first stage to the last when it lowers the fullest rank's memory
    (``shifted_boundaries``), the fewest blocks moved among equals."""
    _, n_stages, _ = rank_placement(cfg, layout.dp)
    given = check_stage_boundaries(cfg, n_stages)
    default = forward_boundaries(cfg.model, n_stages)
    ranks, stages = rank_memory(cfg, cluster, layout, p, default)
    forward_total = max(r.total for r in ranks)
    best = Split(default, ranks, stages, default, forward_total, "forward-balanced")
    if given:
        ranks, stages = rank_memory(cfg, cluster, layout, p, given)
        return Split(given, ranks, stages, default, forward_total, "parallel.stage_boundaries")
    if cfg.parallel.pp > 1 and cfg.parallel.schedule in ("dualpipe", "dualpipev"):
        shift = 1
        while (bounds := shifted_boundaries(cfg.model, n_stages, shift)) is not None:
            ranks, stages = rank_memory(cfg, cluster, layout, p, bounds)
            if max(r.total for r in ranks) < best.worst.total:
                best = Split(bounds, ranks, stages, default, forward_total, "memory-balanced")
            shift += 1
    return best


def pipeline_boundaries(cfg: Config, layout: Any, device: str = "cuda") -> list[int]:
    """The cuts ``parallel.pipeline.parallelize.PipelinePart`` passes to ``split_model``: ``best_split``'s for
    this config and ``layout`` (a ``parallel.mesh.Layout``), exactly what ``plan`` reports as ``Plan.boundaries``.
    Pure arithmetic on the config, so every rank computes the same list; ConfigError for a bad
    ``parallel.stage_boundaries``. ``device``: "cuda" or "cpu" (what train.dtype=auto means)."""
    cluster = Cluster(gpus=layout.world_size, gpus_per_node=layout.ranks_per_node, device=device)
    return best_split(cfg, cluster, layout, precision(cfg, device)).boundaries


def memory_lower_bound(cfg: Config, cluster: Cluster) -> float:
    """Bytes the fullest rank needs at least: the mean rank's weights and gradients (no activations)."""
    m, p = cfg.model, cfg.parallel
    counts = count_parameters(m)
    experts = 3 * m.dim * m.moe_inter_dim * m.n_routed_experts * (m.n_layers - m.n_dense_layers + m.mtp_depth)
    dense = counts.total + counts.mtp_unique - experts
    copies = 2 if p.pp > 1 and p.schedule == "dualpipe" else 1
    prec = precision(cfg, cluster.device)
    return copies * (dense / p.pp + experts / (p.pp * p.ep)) * (prec.weight + prec.grad)


def memory_fits(cfg: Config, cluster: Cluster, world: int | None = None) -> tuple[bool, list[RankMemory]]:
    """Quick check (no FLOPs, no timing): does every pipeline rank's memory fit? Raises ConfigError for an
    impossible layout; ([]) when a lower bound already exceeds the GPU."""
    world = cluster.gpus if world is None else world
    layout = layout_for(cfg, world, cluster)
    check_schedule(cfg, layout.dp)
    if memory_lower_bound(cfg, cluster) > cluster.memory_bytes:
        return False, []
    ranks = best_split(cfg, cluster, layout, precision(cfg, cluster.device)).ranks
    return all(r.total <= cluster.memory_bytes for r in ranks), ranks
