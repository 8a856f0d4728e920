"""Planner: parameters, FLOPs, per-GPU memory, all-to-all traffic and cost of a config on a cluster.

Pure functions over ``Config``; nothing is allocated. The formulas, their assumptions and the report's
layout against the report's numbers are in docs/planner.md (report sec 3.2 DualPipe and Table 2, 3.2.2
all-to-all, 3.2.3 memory, 3.3 FP8, 4.2 hyper-parameters, Table 1 cost).

- parameters: ``train.model.count_parameters`` (the analytic count tested against the built model);
- FLOPs per token: per component (MLA projections, causal attention, dense FFN, gate, shared and routed
  experts, head, MTP), forward x 3 for forward + backward;
- memory per GPU: FP32 weights (the master), their BF16 casts for one step, FP32 gradients, ZeRO-1-sharded
  AdamW moments, the cached activations of the micro-batches in flight under the pipeline schedule
  (counted on the schedule's own action lists, the ones the runtime executes), all-to-all and logits
  buffers, a reserve;
- all-to-all bytes per token under node-limited routing, their time against the compute of a chunk;
- step time from the pipeline simulator with costs from the FLOPs at an assumed MFU, GPU-hours per
  trillion tokens next to the report's 180K.

``check_plan(cfg, world_size, gpu_memory_bytes)`` is the trainer's start-up check; ``launch/plan.py``
prints a ``Plan``. This module is the public API (``Plan``, ``plan``, ``check_plan``) and re-exports the
building blocks of its parts: ``plan_cluster`` (machines, precision), ``plan_flops`` (parameters and FLOPs
per block), ``plan_activations`` (bytes cached per token), ``plan_stages`` (stage boundaries, schedules),
``plan_comm`` (all-to-all), ``plan_memory`` (memory per rank, the split), ``plan_time`` (step time, cost),
``plan_suggest`` (the nearest layout that fits), ``plan_report`` (the printed table).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from train.config import Config, ConfigError
from train.errors import UserError
from train.model import count_parameters
from train.plan_activations import activation_items, layer_activation_bytes
from train.plan_cluster import (
    REPORT_GPU_HOURS_PER_TRILLION, REPORT_PRETRAIN_GPU_HOURS, REPORT_PRETRAIN_TOKENS, Cluster, GiB, Precision,
    layout_for, precision,
)
from train.plan_comm import AllToAll, all_to_all
from train.plan_flops import (
    block_cost, forward_flops_per_token, layer_flops, layer_params, recompute_flops_per_token, tail_cost,
    training_flops_per_token,
)
from train.plan_memory import RankMemory, best_split, memory_fits, pipeline_boundaries
from train.plan_report import format_plan, largest_term, overflow_line
from train.plan_stages import (
    check_schedule, check_stage_boundaries, forward_boundaries, memory_micro_batches, micro_batches_per_step,
    shifted_boundaries, stage_layers, stage_plans, weighted_peaks,
)
from train.plan_suggest import fewest_gpus, suggest_layout
from train.plan_time import implied_mfu, step_time

__all__ = [
    "GiB", "Cluster", "Precision", "precision", "Plan", "plan", "check_plan", "format_plan", "suggest_layout",
    "fewest_gpus", "memory_fits", "forward_flops_per_token", "training_flops_per_token", "layer_flops",
    "layer_params", "block_cost", "tail_cost", "activation_items", "layer_activation_bytes", "all_to_all",
    "weighted_peaks", "memory_micro_batches", "forward_boundaries", "shifted_boundaries", "stage_layers",
    "stage_plans", "check_stage_boundaries", "best_split", "pipeline_boundaries",
]


@dataclass
class Plan:
    """Everything the planner computes for one config on one cluster (bytes, FLOPs, seconds)."""

    cluster: Cluster
    precision: Precision
    world_size: int
    pp: int
    dp: int
    ep: int
    edp: int
    schedule: str  # "none" when pp == 1
    n_stages: int
    stage_layers: list[tuple[int, int]]
    micro_batch_size: int
    seq_len: int
    micro_batches: int  # per optimizer step at train.batch_size
    tokens_per_step: int
    total_params: int
    active_params: int
    mtp_params: int  # MTP modules including the shared embedding and head
    mtp_unique_params: int
    flops_forward: dict[str, float]  # per token, by component (FLOP_KEYS)
    flops_per_token: float  # model FLOPs, forward + backward (3 x forward)
    hardware_flops_per_token: float  # + what memory.recompute runs again and flash attention's score recompute
    ranks: list[RankMemory]
    binding_rank: int  # the pipeline rank with the most memory
    memory: dict[str, float]  # its terms
    memory_total: float
    memory_capacity: float
    fits: bool
    a2a: AllToAll
    chunk_compute_s: float  # forward of one micro-batch through the stage with the most MoE blocks
    chunk_a2a_s: float  # its all-to-alls (dispatch + combine of each MoE block), forward
    p2p_s: float  # one activation between pipeline ranks
    step_s: float  # makespan of the schedule + data-parallel gradient/parameter exchange
    pipeline_s: float
    dp_comm_s: float
    bubble_fraction: float
    gpu_hours_per_trillion: float
    days_per_trillion: float
    implied_mfu: float  # the MFU at which this plan gives the report's 180K GPU-hours per trillion tokens
    boundaries: list[int] = field(default_factory=list)  # the cuts the pipeline runs with (pipeline_boundaries)
    boundaries_source: str = ""  # parallel.stage_boundaries | memory-balanced | forward-balanced
    forward_boundaries: list[int] = field(default_factory=list)  # the forward-balanced cuts
    forward_split_total: float = 0.0  # the fullest rank's bytes with the forward-balanced cuts
    overflow: str = ""  # one line when it does not fit
    suggestion: str = ""  # the nearest layout that fits (overrides), when it does not
    no_fit: str = ""  # when no layout fits at all: why (launch/plan.py, plan_report.no_fit_line)
    notes: list[str] = field(default_factory=list)

    @property
    def chunk_ratio(self) -> float:
        """All-to-all : compute of one forward chunk (the report's "approximately 1:1")."""
        return self.chunk_a2a_s / self.chunk_compute_s if self.chunk_compute_s else 0.0

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(fits=self.fits, chunk_ratio=self.chunk_ratio, memory_total_gib=self.memory_total / GiB,
                   memory_gib={k: v / GiB for k, v in self.memory.items()},
                   memory_capacity_gib=self.memory_capacity / GiB,
                   report_gpu_hours_per_trillion=REPORT_GPU_HOURS_PER_TRILLION,
                   report_pretrain_gpu_hours=REPORT_PRETRAIN_GPU_HOURS, report_pretrain_tokens=REPORT_PRETRAIN_TOKENS,
                   total_params_with_mtp=self.total_params + self.mtp_unique_params)
        return out


def plan(cfg: Config, cluster: Cluster | None = None, suggest: bool = True) -> Plan:
    """Plan ``cfg`` on ``cluster`` (world size = cluster.gpus). Raises ConfigError for an impossible layout."""
    cluster = cluster or Cluster()
    cluster.check()
    world = cluster.gpus
    layout = layout_for(cfg, world, cluster)
    notes = check_schedule(cfg, layout.dp)
    p = precision(cfg, cluster.device)
    m, t = cfg.model, cfg.train
    counts = count_parameters(m)
    split = best_split(cfg, cluster, layout, p)
    ranks, stages, worst = split.ranks, split.stages, split.worst
    capacity = cluster.memory_bytes
    fits = all(r.total <= capacity for r in ranks)
    a2a = all_to_all(cfg, layout, cluster, p)
    forward = forward_flops_per_token(m, t.seq_len)
    flops = 3.0 * sum(forward.values())
    hardware = flops + recompute_flops_per_token(m, t.seq_len, p)
    held = [[stages[s] for s in r.stages] for r in ranks]
    dense = max(sum(s.dense_params for s in h) for h in held)
    expert = max(sum(s.expert_params for s in h) for h in held) / layout.ep
    step, pipeline, dp_comm, bubble, chunk_f, chunk_comm, p2p = step_time(cfg, layout, split, cluster, a2a, p, dense,
                                                                           expert)
    tokens = t.batch_size * t.seq_len
    hours = step * world / 3600 / (tokens / 1e12)
    result = Plan(
        cluster=cluster, precision=p, world_size=world, pp=layout.pp, dp=layout.dp, ep=layout.ep, edp=layout.edp,
        schedule=cfg.parallel.schedule if layout.pp > 1 else "none", n_stages=len(stages),
        stage_layers=[s.layers for s in stages], micro_batch_size=t.micro_batch_size, seq_len=t.seq_len,
        micro_batches=micro_batches_per_step(cfg, layout.dp), tokens_per_step=tokens,
        total_params=counts.total, active_params=counts.active, mtp_params=counts.mtp,
        mtp_unique_params=counts.mtp_unique, flops_forward=forward, flops_per_token=flops,
        hardware_flops_per_token=hardware, ranks=ranks, binding_rank=worst.rank, memory=dict(worst.terms),
        memory_total=worst.total, memory_capacity=capacity, fits=fits, a2a=a2a, chunk_compute_s=chunk_f,
        chunk_a2a_s=chunk_comm, p2p_s=p2p, step_s=step, pipeline_s=pipeline, dp_comm_s=dp_comm,
        bubble_fraction=bubble, gpu_hours_per_trillion=hours, days_per_trillion=hours / world / 24,
        implied_mfu=implied_mfu(cfg, layout, split, cluster, a2a, p, dense, expert, tokens), notes=notes,
        boundaries=split.boundaries, boundaries_source=split.source, forward_boundaries=split.forward_boundaries,
        forward_split_total=split.forward_total,
    )
    if split.source == "memory-balanced":
        result.notes.insert(0, (
            f"the forward-balanced cuts {split.forward_boundaries} would need {split.forward_total / GiB:,.1f} GiB "
            f"on the fullest rank; the pipeline cuts at {split.boundaries} instead, "
            f"{split.forward_boundaries[0] - split.boundaries[0]} block(s) moved from the first stage to the last "
            f"(both on rank 0 under {cfg.parallel.schedule}, which holds many micro-batches of the first and few of "
            "the last)"))
    if not fits:
        result.overflow = overflow_line(cfg, ranks, capacity)
        if suggest:
            result.suggestion = suggest_layout(cfg, cluster) or ""
    return result


# --------------------------------------------------------------------------------------------------
# The trainer's start-up check


def check_plan(cfg: Config, world_size: int, gpu_memory_bytes: float, *, device: str = "cuda",
               ranks_per_node: int | None = None) -> Plan:
    """Plan ``cfg`` on ``world_size`` processes with ``gpu_memory_bytes`` each, before anything is
    allocated; raise ``UserError`` with one line saying what it needs when it does not fit.

    ``device``: "cuda" or "cpu" (what train.dtype=auto means). On a CPU, pass the memory one process may
    use (the machine's memory divided by the processes on it)."""
    cluster = Cluster(gpus=world_size, gpus_per_node=ranks_per_node or min(world_size, 8),
                      gpu_memory_gb=gpu_memory_bytes / GiB, device=device)
    where = "GPU" if device == "cuda" else "process"
    try:
        result = plan(cfg, cluster, suggest=False)
    except ConfigError as err:  # a layout this world cannot hold: judge the model on the simplest one first
        simple = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, pp=1, ep=1, micro_batches=0,
                                                                       stage_boundaries=[]))
        try:
            result = plan(simple, cluster, suggest=False)
        except ConfigError:
            raise err from None
        if result.fits:
            raise err from None
    if result.fits:
        return result
    counts = count_parameters(cfg.model)
    params = counts.total + counts.mtp_unique
    need = ", ".join(f"{k} {v / GiB:,.1f}" for k, v in result.memory.items() if v >= 0.05 * GiB)
    head = (f"model too large for this {where}: {params / 1e9:,.1f}B parameters need "
            f"{result.memory_total / GiB:,.1f} GiB per {where} ({need} GiB) with parallel.pp={result.pp} "
            f"parallel.ep={result.ep} over {world_size} process(es), but {gpu_memory_bytes / GiB:,.1f} GiB are "
            "available")
    fix = suggest_layout(cfg, cluster) if world_size > 1 else None
    if fix:
        worst = max(result.ranks, key=lambda r: r.total)
        raise UserError(f"{head}; {largest_term(worst)}; this fits: {fix}")
    gpus = fewest_gpus(cfg, Cluster())
    need_gpus = (f"it needs at least {gpus[0]:,} GPU{'s' if gpus[0] > 1 else ''} of 80 GiB ({gpus[1]}; the report trains 671B on 2048 H800 "
                 "with parallel.pp=16 parallel.ep=64 and ZeRO-1, docs/planner.md)") if gpus else \
        "no layout of up to 65,536 GPUs of 80 GiB holds it"
    small = "; on this machine use +conf=tiny or +conf=small" if device == "cpu" else ""
    raise UserError(f"{head}; {need_gpus}{small}")
