"""Planner: where the pipeline cuts the model (stage boundaries), what each stage holds, and the schedule's
action lists that say which stages a rank holds and how many micro-batches it keeps (report sec 3.2.1,
Table 2)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from train.config import Config, ConfigError, ModelConfig
from train.plan_activations import expert_padding_bytes, layer_activation_bytes, tail_activation_bytes
from train.plan_cluster import Precision
from train.plan_flops import block_cost, gemm_free_params, is_dense, layer_params, layer_time_split, tail_cost


@functools.lru_cache(maxsize=256)
def cached_boundaries(costs: tuple[int, ...], tail: int, n_stages: int) -> tuple[int, ...]:
    from parallel.pipeline.stages import balanced_boundaries

    return tuple(balanced_boundaries(list(costs), tail, n_stages))


def forward_boundaries(m: ModelConfig, n_stages: int) -> list[int]:
    """The forward-balanced cuts (``balanced_boundaries`` of the forward cost: ``split_model``'s default
    when it is given no boundaries)."""
    if n_stages == 1:
        return []
    costs = tuple(block_cost(m, i) for i in range(m.n_layers))
    return list(cached_boundaries(costs, tail_cost(m), n_stages))


def shifted_boundaries(m: ModelConfig, n_stages: int, shift: int) -> list[int] | None:
    """The forward-balanced cuts moved ``shift`` blocks towards the first layer: the first stage gives
    ``shift`` blocks, the last stage takes them, every middle stage keeps its count (None if the first
    stage would be left without a block). Under DualPipe and DualPipeV the first and last stages share
    a rank, which then keeps about the same parameters and work (exactly when the blocks that cross
    the middle stages are alike) and holds fewer activations: its first stage has the most micro-batches
    in flight, its last the fewest."""
    bounds = forward_boundaries(m, n_stages)
    if not bounds:
        return [] if shift == 0 else None
    if shift >= bounds[0]:
        return None
    return [b - shift for b in bounds]


def check_stage_boundaries(cfg: Config, n_stages: int) -> list[int]:
    """``parallel.stage_boundaries`` checked against the ``n_stages`` stages (ConfigError, one line): n_stages - 1
    increasing layer indices in 1..n_layers (stage 0 and the middle stages keep at least one block; the last
    may keep none, only the head and MTP). Returns it ([]: the planner chooses)."""
    p, n = cfg.parallel, cfg.model.n_layers
    if n_stages - 1 > n:
        raise ConfigError(f"parallel.pp={p.pp} under parallel.schedule={p.schedule} makes {n_stages} pipeline stages; "
                          f"model.n_layers ({n}) allows at most {n + 1} (every stage but the last needs a block): "
                          "lower parallel.pp")
    given = list(p.stage_boundaries)
    if not given:
        return []
    if n_stages == 1:
        raise ConfigError(f"parallel.stage_boundaries ({given}) cuts pipeline stages, but parallel.pp=1 has one "
                          "stage: set parallel.stage_boundaries=[] or parallel.pp > 1")
    increasing = all(a < b for a, b in zip(given, given[1:]))
    if len(given) != n_stages - 1 or not increasing or given[0] < 1 or given[-1] > n:
        raise ConfigError(
            f"parallel.stage_boundaries ({given}) must be {n_stages - 1} increasing layer indices in 1..{n} (the "
            f"first block of each of the {n_stages} stages of parallel.pp={p.pp} {p.schedule} after the first), "
            "or [] for the planner's cuts")
    return given


def stage_layers(m: ModelConfig, n_stages: int, boundaries: list[int] | None = None) -> list[tuple[int, int]]:
    """[lo, hi) layer range of each stage (default: the forward-balanced cuts)."""
    if n_stages == 1:
        return [(0, m.n_layers)]
    edges = [0, *(forward_boundaries(m, n_stages) if boundaries is None else boundaries), m.n_layers]
    return [(edges[k], edges[k + 1]) for k in range(n_stages)]


@dataclass
class StagePlan:
    index: int
    layers: tuple[int, int]  # [lo, hi) of the main model's blocks
    dense_params: int  # replicated over the data-parallel ranks (embedding, head, MTP, norms included)
    fp32_params: int  # of dense_params: the RMSNorm and gate weights, FP32 whatever train.param_dtype
    expert_params: int  # routed experts of the whole stage (a rank holds 1/ep of them)
    embed_params: int  # the embedding (stage 0; the last stage's copy for MTP): counted once per rank
    moe_layers: int  # MoE blocks, MTP included (all-to-alls per micro-batch and direction)
    activation_bytes: float  # cached per micro-batch
    flops: dict[str, float]  # forward FLOPs per micro-batch (layer_time_split's keys)
    has_head: bool
    recompute_bytes: float  # full recompute: one block's activations rebuilt in backward, per micro-batch
    cast_dense: int = 0  # parameters outside the routed experts that BF16 GEMMs read (cast once per step)
    cast_expert: int = 0  # routed-expert parameters that BF16 GEMMs read (the whole stage's; 1/ep per rank)
    fp8_dense: int = 0  # FP8 linears' weights (blocks, not experts): their FP8 blocks and transpose, per step
    fp8_expert: int = 0  # routed-expert weights under FP8 (the whole stage's): their FP8 blocks, per step



def stage_plans(cfg: Config, n_stages: int, p: Precision, boundaries: list[int] | None = None) -> list[StagePlan]:
    m, t = cfg.model, cfg.train
    tokens = t.micro_batch_size * t.seq_len
    plans = []
    for index, (lo, hi) in enumerate(stage_layers(m, n_stages, boundaries)):
        last, first = index == n_stages - 1, index == 0
        dense = expert = moe = 0
        act = working = fixed = 0.0
        flops = dict.fromkeys(("fp8", "bf16", "attention", "recompute_fp8", "recompute_bf16"), 0.0)
        ids = list(range(lo, hi)) + ([m.n_layers + k for k in range(m.mtp_depth)] if last else [])
        cast_dense = cast_expert = kept = fp8_dense = fp8_expert = 0
        for layer in ids:
            d, e = layer_params(m, layer)
            dense, expert = dense + d, expert + e
            free = gemm_free_params(m, layer)  # the norms and the gate: FP32 parameters that no GEMM reads
            kept += free
            if not p.fp8:  # the block's GEMM weights (not its norms or its FP32 gate): FP8 reads the FP32 ones
                cast_dense += d - free
                cast_expert += e
            else:  # quantized once per step and shared by the micro-batches (fp8/linear.py StepWeight)
                fp8_dense += d - free
                fp8_expert += e if cfg.fp8.expert_weight_cache else 0
            moe += not is_dense(m, layer)
            length = t.seq_len if layer < m.n_layers else t.seq_len - (layer - m.n_layers + 1)
            if layer < m.n_layers:  # MTP blocks: in tail_activation_bytes
                act += layer_activation_bytes(m, layer, p)
            if not is_dense(m, layer):  # per micro-batch, not per token
                fixed += expert_padding_bytes(m, p, t.micro_batch_size * length * m.n_activated_experts,
                                              m.n_routed_experts // cfg.parallel.ep)
            if p.recompute == "full":  # backward rebuilds one block's activations at a time
                working = max(working, layer_activation_bytes(m, layer, p, "none"))
            for key, value in layer_time_split(m, layer, length, p).items():
                flops[key] += value * length / t.seq_len
        embed = m.vocab_size * m.dim if (first or (last and m.mtp_depth)) else 0
        if first:
            act += 8  # the token ids, int64, kept by the embedding
        if last:
            dense += m.dim + m.vocab_size * m.dim + m.mtp_depth * (3 * m.dim + 2 * m.dim * m.dim)
            kept += m.dim + m.mtp_depth * 3 * m.dim  # the final norm, each MTP module's three
            cast_dense += m.vocab_size * m.dim + m.mtp_depth * 2 * m.dim * m.dim  # head and eh_proj stay BF16
            act += tail_activation_bytes(m, p, t.seq_len, holds_embedding=first)
            head = 2.0 * m.dim * m.vocab_size  # the head and MTP's eh_proj stay in BF16 (sec 3.3.1)
            flops["bf16"] += head + sum((head + 2.0 * 2 * m.dim * m.dim) * (t.seq_len - k) / t.seq_len
                                        for k in range(1, m.mtp_depth + 1))
        if p.act == 4 or p.weight == 2:  # FP32: no autocast, no casts; BF16 weights: they are the casts
            cast_dense = cast_expert = 0
        plans.append(StagePlan(index, (lo, hi), dense, kept, expert, embed, moe, act * tokens + fixed,
                               {k: v * tokens for k, v in flops.items()}, last, working * tokens,
                               cast_dense, cast_expert, fp8_dense, fp8_expert))
    return plans



# --------------------------------------------------------------------------------------------------
# Schedules: which stages a rank holds and how many micro-batches' activations it keeps


@functools.lru_cache(maxsize=64)
def cached_schedule(name: str, pp: int, micro_batches: int):
    from parallel.pipeline.schedule import make_schedule

    return make_schedule(name, pp, micro_batches)


def memory_micro_batches(name: str, pp: int, micro_batches: int) -> int:
    """Micro-batches to build the schedule with for its activation peak: the step's count, capped at
    2 x stages + 2 (no schedule here holds more past that: Table 2's peaks are reached from m = 2 PP
    and do not grow with m; tests/unit/test_plan.py checks the cap changes nothing)."""
    cap = 4 * pp + 2 if name == "dualpipev" else 2 * pp + 2
    return min(micro_batches, cap)


def weighted_peaks(schedule: Any, weights: list[float]) -> list[tuple[float, int]]:
    """Per rank: the most activation bytes held at once and the number of (stage, micro-batch) chunks
    held at that moment. A chunk holds ``weights[stage]`` from the start of its F to the end of its W
    (of its B when the backward is not split): ``simulate.activations_held`` with sizes."""
    from parallel.pipeline.actions import Kind

    frees = Kind.W if schedule.split_backward else Kind.B
    out = []
    for actions in schedule.actions:
        held, count, peak, peak_count = 0.0, 0, 0.0, 0
        for a in actions:
            if a.kind in (Kind.F, Kind.FB):
                held, count = held + weights[a.stage], count + 1
                if held > peak:
                    peak, peak_count = held, count
            if a.kind == frees:
                held, count = held - weights[a.stage], count - 1
            elif a.kind == Kind.FB and not schedule.split_backward:
                held, count = held - weights[a.back[0]], count - 1
        out.append((peak, peak_count))
    return out


def micro_batches_per_step(cfg: Config, dp: int, batch: int | None = None) -> int:
    return (cfg.train.batch_size if batch is None else batch) // (cfg.train.micro_batch_size * dp)


def schedule_error(name: str, pp: int, micro_batches: int) -> str | None:
    """Why ``name`` cannot run ``micro_batches`` at ``pp`` ranks (make_schedule's one line), or None;
    without building long schedules."""
    from parallel.pipeline.schedule import make_schedule, min_micro_batches

    ok = pp >= 2 and micro_batches >= min_micro_batches(name, pp) and not (
        name == "dualpipe" and (pp % 2 or micro_batches % 2))
    if ok:
        return None
    try:
        make_schedule(name, pp, micro_batches)  # fails in its argument check, before generating anything
    except ValueError as err:
        return str(err).rstrip(".")
    return None


def check_schedule(cfg: Config, dp: int) -> list[str]:
    """The step at ``train.batch_size`` must suit the schedule (ConfigError otherwise); returns a note when
    the batch ramp's start does not (the trainer refuses that config at start-up; the plan of the full
    batch still stands)."""
    p, t = cfg.parallel, cfg.train
    if p.pp == 1:
        return []
    from parallel.pipeline.schedule import min_micro_batches

    least = min_micro_batches(p.schedule, p.pp)
    least += least % 2 if p.schedule == "dualpipe" else 0
    notes = []
    for name, batch in (("batch_size", t.batch_size), ("batch_size_start", t.batch_size_start)):
        m = micro_batches_per_step(cfg, dp, batch)
        err = schedule_error(p.schedule, p.pp, m)
        if not err:
            continue
        if name == "batch_size":
            raise ConfigError(
                f"parallel.schedule={p.schedule} at parallel.pp={p.pp} cannot run train.{name} ({batch}) = {m} "
                f"micro-batches of {t.micro_batch_size} x {dp} data-parallel ranks: {err}")
        even = " (an even number)" if p.schedule == "dualpipe" else ""
        notes.append(f"train.batch_size_start ({batch}) = {m} micro-batches of {t.micro_batch_size} x {dp} "
                     f"data-parallel ranks, below the {least}{even} that {p.schedule} needs at parallel.pp={p.pp}: "
                     f"the trainer refuses this batch ramp; "
                     f"train.batch_size_start={least * t.micro_batch_size * dp} runs")
    return notes
