"""Planner: step time from the pipeline simulator with per-chunk costs from the FLOPs at an assumed MFU,
and the MFU at which a plan costs the report's 180K GPU-hours per trillion tokens (sec 1, Table 1)."""

from __future__ import annotations

import dataclasses
from typing import Any

from train.config import Config
from train.plan_cluster import REPORT_GPU_HOURS_PER_TRILLION, Cluster, Precision
from train.plan_comm import AllToAll
from train.plan_memory import Split
from train.plan_stages import StagePlan, cached_schedule, micro_batches_per_step


def _chunk_costs(cfg: Config, stages: list[StagePlan], cluster: Cluster, a2a: AllToAll, p: Precision):
    """Per-stage forward time, full backward, weight-gradient part, and all-to-all time of one micro-batch."""
    bf16 = cluster.peak_tflops * 1e12 * cluster.mfu
    fp8 = cluster.fp8_peak_tflops * 1e12 * cluster.mfu
    tokens = cfg.train.micro_batch_size * cfg.train.seq_len
    out = []
    for s in stages:
        f = s.flops
        gemm = f["fp8"] / fp8 + f["bf16"] / bf16
        attn = f["attention"] / bf16
        recompute = f["recompute_fp8"] / fp8 + f["recompute_bf16"] / bf16
        forward = gemm + attn
        weight = gemm  # W: the weight-gradient GEMMs, as large as the forward ones
        backward = 2 * gemm + 2.5 * attn + recompute  # + input gradients; flash attention recomputes the scores
        comm = s.moe_layers * tokens * a2a.seconds_per_token
        out.append((forward, backward, weight, comm))
    return out


def pipeline_time(cfg: Config, split: Split, costs: list[tuple[float, float, float, float]], micro_batches: int,
                  p2p: float, overlap: bool) -> tuple[float, float]:
    """(makespan, bubble fraction) of the step's pipeline from per-stage (forward, backward, weight,
    all-to-all) costs. The simulator takes one cost per chunk for every rank: a rank's mean over its stages
    (it runs every micro-batch through each of them; under DualPipe its two stages' work adds up). Each
    distinct rank's costs are simulated and the slowest kept (choosing one rank by a weighted sum of its
    costs instead made the step time jump where that choice switched ranks). ``overlap``: an F&B hides
    one chunk's all-to-all behind the other's compute."""
    from parallel.pipeline.simulate import Costs, simulate

    pp, m = cfg.parallel.pp, micro_batches

    def simulated(forward: float, backward: float, weight: float, comm: float) -> tuple[float, float]:
        if pp == 1:
            return m * (forward + backward + 2 * comm), 0.0
        fb = max(forward + backward, 2 * comm) if overlap else None
        c = Costs(F=forward + comm, B=backward + comm, W=min(weight, backward + comm), FB=fb, comm=p2p)
        result = simulate(cached_schedule(cfg.parallel.schedule, pp, m), c)
        return result.makespan, result.bubble_fraction

    per_rank = {tuple(sum(costs[s][i] for s in r.stages) / len(r.stages) for i in range(4)) for r in split.ranks}
    return max(simulated(*rank_costs) for rank_costs in sorted(per_rank))


def step_time(cfg: Config, layout: Any, split: Split, cluster: Cluster, a2a: AllToAll, p: Precision,
               params_dense: float, params_expert: float) -> tuple[float, float, float, float, float, float, float]:
    """(step, pipeline makespan, dp exchange, bubble fraction, forward compute and all-to-all of the chunk
    with the most MoE blocks, one pipeline transfer)."""
    costs = _chunk_costs(cfg, split.stages, cluster, a2a, p)
    sched = cfg.parallel.schedule
    m = micro_batches_per_step(cfg, layout.dp)
    hop_bw = (cluster.ib_gbps if layout.dp >= layout.ranks_per_node else cluster.nvlink_gbps) * 1e9
    p2p = cfg.train.micro_batch_size * cfg.train.seq_len * cfg.model.dim * p.act / hop_bw
    pipeline, bubble = pipeline_time(cfg, split, costs, m, p2p, overlap=sched in ("dualpipe", "dualpipev"))
    # ZeRO-1: reduce-scatter FP32 gradients and all-gather the updated parameters in their dtype (ring), not
    # overlapped; the dp and edp groups leave the node when the dp ranks of a stage fill more than one node
    dp_bw = (cluster.ib_gbps if layout.dp > layout.ranks_per_node else cluster.nvlink_gbps) * 1e9

    def ring(numel: float, ranks: int) -> float:
        return numel * (p.grad + p.weight) * (ranks - 1) / ranks / dp_bw

    dp_comm = ring(params_dense, layout.dp) + ring(params_expert, layout.edp)
    typical = max(range(len(costs)), key=lambda s: (split.stages[s].moe_layers, -s))  # most MoE blocks
    return pipeline + dp_comm, pipeline, dp_comm, bubble, costs[typical][0], costs[typical][3], p2p



def implied_mfu(cfg, layout, split, cluster, a2a, p, dense, expert, tokens) -> float:
    """The MFU at which the step time gives the report's 180K GPU-hours per trillion tokens: secant steps
    on 1/mfu over the same simulation (the step time is close to linear in it); 0 when even MFU 1 is
    slower (exposed communication)."""
    target = REPORT_GPU_HOURS_PER_TRILLION * 3600 * (tokens / 1e12) / layout.world_size  # seconds per step

    def excess(x: float) -> float:  # x = 1 / mfu
        c = dataclasses.replace(cluster, mfu=1 / x)
        return step_time(cfg, layout, split, c, a2a, p, dense, expert)[0] - target

    if excess(1.0) > 0:
        return 0.0
    x0, x1 = 1.0, 1 / cluster.mfu
    f0, f1 = excess(x0), excess(x1)
    for _ in range(8):
        if abs(f1) <= 1e-4 * target or f1 == f0:
            break
        x0, f0, x1 = x1, f1, max(1.0, x1 - f1 * (x1 - x0) / (f1 - f0))
        f1 = excess(x1)
    return 1 / x1
