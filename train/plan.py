"""Planner: parameters, FLOPs, per-GPU memory, all-to-all traffic and cost of a config on a cluster.

Pure functions over ``Config``; nothing is allocated. The formulas, their assumptions and the report's
layout against the report's numbers are in docs/planner.md (report sec 3.2 DualPipe and Table 2, 3.2.2
all-to-all, 3.2.3 memory, 3.3 FP8, 4.2 hyper-parameters, Table 1 cost).

- parameters: ``train.model.count_parameters`` (the analytic count tested against the built model);
- FLOPs per token: per component (MLA projections, causal attention, dense FFN, gate, shared and routed
  experts, head, MTP), forward x 3 for forward + backward;
- memory per GPU: weights, FP32 gradients, ZeRO-1-sharded FP32 master and AdamW moments, the cached
  activations of the micro-batches in flight under the pipeline schedule (counted on the schedule's own
  action lists, the ones the runtime executes), all-to-all and logits buffers, a reserve;
- all-to-all bytes per token under node-limited routing, their time against the compute of a chunk;
- step time from the pipeline simulator with costs from the FLOPs at an assumed MFU, GPU-hours per
  trillion tokens next to the report's 180K.

``check_plan(cfg, world_size, gpu_memory_bytes)`` is the trainer's start-up check; ``launch/plan.py``
prints a ``Plan``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Any

from train.config import Config, ConfigError, ModelConfig, validate
from train.errors import UserError
from train.model import count_parameters

GiB = 2**30
FP8_TILE = 128  # 1x128 activation tiles, one fp32 scale each (sec 3.3.2)
FP8_BYTES = 1 + 4 / FP8_TILE  # an E4M3 element with its share of the scale
E5M6_BYTES = 1.5 + 4 / FP8_TILE  # the input of the Linear after attention (sec 3.3.3), 12 bits
REPORT_GPU_HOURS_PER_TRILLION = 180_000  # sec 1: 180K H800 GPU-hours per trillion tokens
REPORT_PRETRAIN_GPU_HOURS = 2_664_000  # Table 1: 2664K GPU-hours ...
REPORT_PRETRAIN_TOKENS = 14.8e12  # ... for 14.8T tokens
REPORT_DAYS_PER_TRILLION = 3.7  # on 2048 H800
RESERVE = {"cuda": 2 * GiB, "cpu": GiB // 2}  # per process: CUDA context, cuBLAS and NCCL workspaces / the
# interpreter and libraries on a CPU (allocator fragmentation is not modelled)


@dataclass(frozen=True)
class Cluster:
    """The machines (``cluster.*`` keys of launch/plan.py). Defaults: the report's H800 cluster."""

    gpus: int = 2048  # GPUs (processes) in all
    gpus_per_node: int = 8
    gpu_memory_gb: float = 80.0  # per GPU, in GiB (an "80 GB" H800 has 79.6 GiB)
    peak_tflops: float = 989.0  # dense BF16 peak per GPU (H800)
    fp8_peak_tflops: float = 1979.0  # dense FP8 peak per GPU (H800)
    nvlink_gbps: float = 160.0  # GB/s per GPU inside a node (report sec 3.2.2)
    ib_gbps: float = 50.0  # GB/s per GPU between nodes (400 Gb/s InfiniBand, sec 3.2.2)
    mfu: float = 0.40  # assumed fraction of each GEMM's peak reached while computing
    device: str = "cuda"  # cuda | cpu: what train.dtype=auto means (bf16 autocast on GPUs, fp32 on CPUs)

    def check(self) -> None:
        for name in ("gpus", "gpus_per_node"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ConfigError(f"cluster.{name} ({getattr(self, name)}) must be an integer >= 1")
        for name in ("gpu_memory_gb", "peak_tflops", "fp8_peak_tflops", "nvlink_gbps", "ib_gbps"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"cluster.{name} ({value}) must be > 0")
        if not 0 < self.mfu <= 1:
            raise ConfigError(f"cluster.mfu ({self.mfu}) must be in (0, 1]")
        if self.device not in ("cuda", "cpu"):
            raise ConfigError(f"cluster.device ({self.device!r}) must be cuda or cpu")

    @property
    def memory_bytes(self) -> float:
        return self.gpu_memory_gb * GiB

    @property
    def ranks_per_node(self) -> int:
        return min(self.gpus, self.gpus_per_node)


@dataclass(frozen=True)
class Precision:
    """Bytes per element of each kind of state (report sec 3.3.1, 3.3.3)."""

    weight: int  # the working copy the GEMMs read: BF16 (the report) or FP32
    grad: int  # weight gradients: FP32 (sec 3.3.3: "retained in FP32")
    master: int  # FP32 master weights held by the optimizer
    moments: int  # both AdamW moments together: 2 x optim.moment_dtype
    act: int  # activations cached for backward where FP8 does not apply: BF16 or FP32
    fp8: bool  # fp8.enabled: GEMM inputs cached in FP8, FP8 dispatch, FP8 GEMM peak
    fp8_dispatch: bool
    recompute: str  # memory.recompute: none | selective | full

    @property
    def name(self) -> str:
        return "BF16" if self.act == 2 else "FP32"


def precision(cfg: Config, device: str = "cuda") -> Precision:
    """``train.dtype``: bfloat16, or auto on a GPU -> BF16 weights and activations (the report's mixed
    precision, FP32 master in the optimizer); float32, or auto on a CPU -> FP32."""
    low = cfg.train.dtype == "bfloat16" or (cfg.train.dtype == "auto" and device == "cuda")
    width = 2 if low else 4
    moment = 2 if cfg.optim.moment_dtype == "bfloat16" else 4
    return Precision(weight=width, grad=4, master=4, moments=2 * moment, act=width, fp8=cfg.fp8.enabled,
                     fp8_dispatch=cfg.fp8.enabled and cfg.fp8.dispatch, recompute=cfg.memory.recompute)


# --------------------------------------------------------------------------------------------------
# Parameters and FLOPs per layer (the same arithmetic as count_parameters, split by layer)


def _mla_params(m: ModelConfig) -> tuple[int, int]:
    """(MLA matrices, of which up-projections) of one block; RMSNorm vectors not included."""
    h, qk = m.n_heads, m.qk_nope_head_dim + m.qk_rope_head_dim
    if m.q_lora_rank:
        q_down, q_up = m.dim * m.q_lora_rank, m.q_lora_rank * h * qk
    else:
        q_down, q_up = 0, m.dim * h * qk  # no compression: wq is the query up-projection
    kv_down = m.dim * (m.kv_lora_rank + m.qk_rope_head_dim)
    kv_up = m.kv_lora_rank * h * (m.qk_nope_head_dim + m.v_head_dim)
    out = h * m.v_head_dim * m.dim
    return q_down + q_up + kv_down + kv_up + out, q_up + kv_up


def _is_dense(m: ModelConfig, layer_id: int) -> bool:
    return layer_id < m.n_dense_layers  # MTP blocks (layer_id >= n_layers) are MoE blocks


def layer_params(m: ModelConfig, layer_id: int) -> tuple[int, int]:
    """(parameters outside the routed experts, routed-expert parameters) of block ``layer_id``."""
    mla, _ = _mla_params(m)
    vectors = 2 * m.dim + m.kv_lora_rank + (m.q_lora_rank if m.q_lora_rank else 0)  # RMSNorm weights
    if _is_dense(m, layer_id):
        return mla + vectors + 3 * m.dim * m.inter_dim, 0
    expert = 3 * m.dim * m.moe_inter_dim
    return mla + vectors + m.n_routed_experts * m.dim + m.n_shared_experts * expert, m.n_routed_experts * expert


def block_cost(m: ModelConfig, layer_id: int) -> int:
    """Parameters a token passes through in block ``layer_id`` (``parallel.pipeline.stages.stage_costs``)."""
    dense, _ = layer_params(m, layer_id)
    return dense + (0 if _is_dense(m, layer_id) else m.n_activated_experts * 3 * m.dim * m.moe_inter_dim)


def tail_cost(m: ModelConfig) -> int:
    """The last stage's fixed part: final norm, head, and each MTP module with its use of the head."""
    mtp = 2 * m.dim + 2 * m.dim * m.dim + block_cost(m, m.n_layers) + m.dim + m.vocab_size * m.dim
    return m.dim + m.vocab_size * m.dim + m.mtp_depth * mtp


def layer_flops(m: ModelConfig, layer_id: int, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token of one block (2 per multiply-add) on sequences of ``seq_len`` tokens.

    Causal attention: query i attends to i+1 keys, (T+1)/2 on average, with q.k over the qk head dim
    (nope + rope) and p.v over the v head dim."""
    h = m.n_heads
    mla, up = _mla_params(m)
    keys = (seq_len + 1) / 2
    out = {
        "mla_proj": 2.0 * mla,
        "mla_up": 2.0 * up,  # part of mla_proj; recomputed in backward (sec 3.2.3)
        "attention": 2.0 * h * keys * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim),
        "dense_ffn": 0.0, "gate": 0.0, "shared_experts": 0.0, "routed_experts": 0.0,
    }
    if _is_dense(m, layer_id):
        out["dense_ffn"] = 2.0 * 3 * m.dim * m.inter_dim
    else:
        expert = 2.0 * 3 * m.dim * m.moe_inter_dim
        out["gate"] = 2.0 * m.dim * m.n_routed_experts
        out["shared_experts"] = m.n_shared_experts * expert
        out["routed_experts"] = m.n_activated_experts * expert
    return out


FLOP_KEYS = ("mla_proj", "attention", "dense_ffn", "gate", "shared_experts", "routed_experts", "head", "mtp")


def _mtp_flops(m: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token (of the main sequence) of the MTP modules: depth k sees T-k positions."""
    total = 0.0
    for k in range(1, m.mtp_depth + 1):
        length = seq_len - k
        block = layer_flops(m, m.n_layers + k - 1, length)
        per_token = sum(v for key, v in block.items() if key != "mla_up") + 2.0 * 2 * m.dim * m.dim \
            + 2.0 * m.dim * m.vocab_size
        total += per_token * length / seq_len
    return total


def forward_flops_per_token(m: ModelConfig, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token by component (``FLOP_KEYS``); the embedding lookup costs none."""
    out = dict.fromkeys(FLOP_KEYS, 0.0)
    for layer in range(m.n_layers):
        for key, value in layer_flops(m, layer, seq_len).items():
            if key in out:
                out[key] += value
    out["head"] = 2.0 * m.dim * m.vocab_size
    out["mtp"] = _mtp_flops(m, seq_len)
    return out


def training_flops_per_token(m: ModelConfig, seq_len: int) -> float:
    """Model FLOPs per token for forward + backward: 3 x forward (backward = input and weight gradients)."""
    return 3.0 * sum(forward_flops_per_token(m, seq_len).values())


# --------------------------------------------------------------------------------------------------
# Cached activations per token, by recompute mode (memory.recompute; report sec 3.2.3, 3.3.3)

# How an element is stored: "act" in the activation dtype (BF16 / FP32); "gemm" as the input of a GEMM
# whose Wgrad runs in FP8 (E4M3 with 1x128 scales under fp8.enabled, else "act"); "e5m6" the input of
# the Linear after attention (E5M6 under fp8.enabled); "fp32" always FP32.
# Which modes keep it: N = none, S = selective (report: every RMSNorm and the MLA up-projections
# recomputed, the attention core's q, k, v with them; flash attention keeps only its output and
# log-sum-exp). Under full recompute a block keeps only its input.


def activation_items(m: ModelConfig, layer_id: int, p: Precision) -> list[tuple[str, float, str, str]]:
    """(tensor, elements per token, storage kind, modes "NS" that keep it) for block ``layer_id``."""
    h, qk, dv = m.n_heads, m.qk_nope_head_dim + m.qk_rope_head_dim, m.v_head_dim
    items = [("block input x (attn_norm input)", m.dim, "act", "NS"),
             ("attn_norm output (wq/wq_a, wkv_a input)", m.dim, "gemm", "N")]
    if m.q_lora_rank:
        items += [("c_q (q_norm input)", m.q_lora_rank, "act", "NS"),
                  ("q_norm output (wq_b input)", m.q_lora_rank, "gemm", "N")]
    items += [("c_kv and k_rope (kv_norm input)", m.kv_lora_rank + m.qk_rope_head_dim, "act", "NS"),
              ("kv_norm output (wkv_b input)", m.kv_lora_rank, "gemm", "N"),
              ("attention q, k, v", h * (2 * qk + dv), "act", "N"),
              ("attention output (wo input)", h * dv, "e5m6", "NS"),
              ("softmax log-sum-exp", h, "fp32", "NS"),
              ("residual after attention (ffn_norm input)", m.dim, "act", "NS"),
              ("ffn_norm output (FFN, gate and dispatch input)", m.dim, "gemm", "N")]
    fp8_moe = p.fp8  # MoE SwiGLU inputs cached in FP8, its output recomputed (sec 3.3.3)
    if _is_dense(m, layer_id):
        items += [("dense FFN w1, w3 outputs (SwiGLU input)", 2 * m.inter_dim, "act", "NS"),
                  ("dense FFN SwiGLU output (w2 input)", m.inter_dim, "gemm", "NS")]
        return items
    inter, k, s = m.moe_inter_dim, m.n_activated_experts, m.n_shared_experts
    items += [("gate scores", m.n_routed_experts, "fp32", "NS"),
              ("top-k expert ids and weights", k * 3, "fp32", "NS"),  # int64 ids + fp32 weights = 12 bytes
              ("shared experts' SwiGLU inputs", s * 2 * inter, "gemm" if fp8_moe else "act", "NS"),
              ("shared experts' SwiGLU output", 0 if fp8_moe else s * inter, "gemm", "NS"),
              ("routed: dispatched token per expert slot", k * m.dim, "gemm", "NS"),
              ("routed: SwiGLU inputs", k * 2 * inter, "gemm" if fp8_moe else "act", "NS"),
              ("routed: SwiGLU output", 0 if fp8_moe else k * inter, "gemm", "NS")]
    return items


def element_bytes(kind: str, p: Precision) -> float:
    if kind == "fp32":
        return 4.0
    if kind == "gemm" and p.fp8:
        return FP8_BYTES
    if kind == "e5m6" and p.fp8:
        return E5M6_BYTES
    return float(p.act)


def layer_activation_bytes(m: ModelConfig, layer_id: int, p: Precision, mode: str | None = None) -> float:
    """Bytes one token leaves cached for backward in block ``layer_id`` under recompute ``mode``
    (default: the precision's). Routed weights are applied to the SwiGLU output, so no expert output is
    kept for the gate's gradient."""
    mode = p.recompute if mode is None else mode
    if mode == "full":
        return p.act * m.dim  # the block input; the rest is rebuilt in backward (StagePlan.recompute_bytes)
    keep = "N" if mode == "none" else "S"
    return sum(n * element_bytes(kind, p) for _, n, kind, modes in activation_items(m, layer_id, p) if keep in modes)


def tail_activation_bytes(m: ModelConfig, p: Precision, seq_len: int) -> float:
    """Per token of the last stage's fixed part: final-norm input, FP32 log-softmax of each head use
    (cross-entropy in FP32), and each MTP module (its two norm inputs, its block, its output norm input)
    on T-k positions."""
    a = p.act
    total = a * m.dim + 4 * m.vocab_size
    for k in range(1, m.mtp_depth + 1):
        per = 2 * a * m.dim + layer_activation_bytes(m, m.n_layers + k - 1, p) + a * m.dim + 4 * m.vocab_size
        total += per * (seq_len - k) / seq_len
    return total


# --------------------------------------------------------------------------------------------------
# Pipeline stages


@functools.lru_cache(maxsize=256)
def _boundaries(costs: tuple[int, ...], tail: int, n_stages: int) -> tuple[int, ...]:
    from parallel.pipeline.stages import balanced_boundaries

    return tuple(balanced_boundaries(list(costs), tail, n_stages))


def runtime_boundaries(m: ModelConfig, n_stages: int) -> list[int]:
    """The boundaries ``split_model`` uses by default (``balanced_boundaries`` of the forward cost)."""
    if n_stages == 1:
        return []
    costs = tuple(block_cost(m, i) for i in range(m.n_layers))
    return list(_boundaries(costs, tail_cost(m), n_stages))


def shifted_boundaries(m: ModelConfig, n_stages: int, shift: int) -> list[int] | None:
    """The runtime's boundaries moved ``shift`` blocks towards the first layer: the first stage gives
    ``shift`` blocks, the last stage takes them, every middle stage keeps its count (None if the first
    stage would be left without a block). Under DualPipe and DualPipeV the first and last stages share
    a rank, which then keeps about the same parameters and work (exactly when the blocks that cross
    the middle stages are alike) and holds fewer activations: its first stage has the most micro-batches
    in flight, its last the fewest."""
    bounds = runtime_boundaries(m, n_stages)
    if not bounds:
        return [] if shift == 0 else None
    if shift >= bounds[0]:
        return None
    return [b - shift for b in bounds]


def stage_layers(m: ModelConfig, n_stages: int, boundaries: list[int] | None = None) -> list[tuple[int, int]]:
    """[lo, hi) layer range of each stage (default: as ``split_model`` cuts them, balanced forward cost)."""
    if n_stages == 1:
        return [(0, m.n_layers)]
    edges = [0, *(runtime_boundaries(m, n_stages) if boundaries is None else boundaries), m.n_layers]
    return [(edges[k], edges[k + 1]) for k in range(n_stages)]


@dataclass
class StagePlan:
    index: int
    layers: tuple[int, int]  # [lo, hi) of the main model's blocks
    dense_params: int  # replicated over the data-parallel ranks (embedding, head, MTP, norms included)
    expert_params: int  # routed experts of the whole stage (a rank holds 1/ep of them)
    embed_params: int  # the embedding (stage 0; the last stage's copy for MTP): counted once per rank
    moe_layers: int  # MoE blocks, MTP included (all-to-alls per micro-batch and direction)
    activation_bytes: float  # cached per micro-batch
    flops: dict[str, float]  # forward FLOPs per micro-batch (layer_time_split's keys)
    has_head: bool
    recompute_bytes: float  # full recompute: one block's activations rebuilt in backward, per micro-batch


def layer_time_split(m: ModelConfig, layer_id: int, seq_len: int, p: Precision) -> dict[str, float]:
    """Forward FLOPs per token of a block by the peak they run at ("fp8" GEMMs under fp8.enabled, "bf16"
    GEMMs: the gate always, "attention" the core), and what its recompute mode adds in backward
    ("recompute_fp8", "recompute_bf16")."""
    f = layer_flops(m, layer_id, seq_len)
    gemm = f["mla_proj"] + f["dense_ffn"] + f["shared_experts"] + f["routed_experts"]
    out = {"fp8": gemm if p.fp8 else 0.0, "bf16": f["gate"] + (0.0 if p.fp8 else gemm), "attention": f["attention"],
           "recompute_fp8": 0.0, "recompute_bf16": 0.0}
    if p.recompute == "selective":  # the MLA up-projections (the RMSNorms cost no GEMM FLOPs)
        out["recompute_fp8" if p.fp8 else "recompute_bf16"] = f["mla_up"]
    elif p.recompute == "full":  # the whole block's forward again
        out["recompute_fp8"], out["recompute_bf16"] = out["fp8"], out["bf16"] + out["attention"]
    return out


def recompute_flops_per_token(m: ModelConfig, seq_len: int, p: Precision) -> float:
    """Forward FLOPs per token run again in backward (recompute mode), plus flash attention's second
    computation of the scores in its backward (half the attention forward)."""
    total = 0.0
    for layer in range(m.n_layers + m.mtp_depth):
        length = seq_len if layer < m.n_layers else seq_len - (layer - m.n_layers + 1)
        split = layer_time_split(m, layer, length, p)
        total += (split["recompute_fp8"] + split["recompute_bf16"] + 0.5 * split["attention"]) * length / seq_len
    return total


def _stage_plans(cfg: Config, n_stages: int, p: Precision, boundaries: list[int] | None = None) -> list[StagePlan]:
    m, t = cfg.model, cfg.train
    tokens = t.micro_batch_size * t.seq_len
    plans = []
    for index, (lo, hi) in enumerate(stage_layers(m, n_stages, boundaries)):
        last, first = index == n_stages - 1, index == 0
        dense = expert = moe = 0
        act = working = 0.0
        flops = dict.fromkeys(("fp8", "bf16", "attention", "recompute_fp8", "recompute_bf16"), 0.0)
        ids = list(range(lo, hi)) + ([m.n_layers + k for k in range(m.mtp_depth)] if last else [])
        for layer in ids:
            d, e = layer_params(m, layer)
            dense, expert = dense + d, expert + e
            moe += not _is_dense(m, layer)
            length = t.seq_len if layer < m.n_layers else t.seq_len - (layer - m.n_layers + 1)
            if layer < m.n_layers:  # MTP blocks: in tail_activation_bytes
                act += layer_activation_bytes(m, layer, p)
            if p.recompute == "full":  # backward rebuilds one block's activations at a time
                working = max(working, layer_activation_bytes(m, layer, p, "none"))
            for key, value in layer_time_split(m, layer, length, p).items():
                flops[key] += value * length / t.seq_len
        embed = m.vocab_size * m.dim if (first or (last and m.mtp_depth)) else 0
        if last:
            dense += m.dim + m.vocab_size * m.dim + m.mtp_depth * (3 * m.dim + 2 * m.dim * m.dim)
            act += tail_activation_bytes(m, p, t.seq_len)
            head = 2.0 * m.dim * m.vocab_size  # the head and MTP's eh_proj stay in BF16 (sec 3.3.1)
            flops["bf16"] += head + sum((head + 2.0 * 2 * m.dim * m.dim) * (t.seq_len - k) / t.seq_len
                                        for k in range(1, m.mtp_depth + 1))
        plans.append(StagePlan(index, (lo, hi), dense, expert, embed, moe, act * tokens,
                               {k: v * tokens for k, v in flops.items()}, last, working * tokens))
    return plans


# --------------------------------------------------------------------------------------------------
# Schedules: which stages a rank holds and how many micro-batches' activations it keeps


@functools.lru_cache(maxsize=64)
def _schedule(name: str, pp: int, micro_batches: int):
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


# --------------------------------------------------------------------------------------------------
# All-to-all traffic (sec 3.2.2): node-limited routing, IB to the same in-node index, then NVLink


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


# --------------------------------------------------------------------------------------------------
# The plan


MEMORY_TERMS = ("weights", "gradients", "master", "moments", "activations", "buffers", "reserve")


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
    boundaries: list[int] = field(default_factory=list)  # split_model(model, n_stages, boundaries) for this memory
    runtime_boundaries: list[int] = field(default_factory=list)  # split_model's default (forward-balanced)
    runtime_split_total: float = 0.0  # the fullest rank's bytes with the default boundaries
    overflow: str = ""  # one line when it does not fit
    suggestion: str = ""  # the nearest layout that fits (overrides), when it does not
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


def _layout(cfg: Config, world: int, cluster: Cluster):
    from parallel.mesh import plan_layout

    rpn = cfg.parallel.ranks_per_node or cluster.ranks_per_node
    return plan_layout(cfg, world, 0, rpn)


def _placement(cfg: Config, dp: int) -> tuple[list[list[int]], int, Any]:
    """(stages of each pipeline rank, n_stages, the schedule built for the activation peak or None)."""
    p = cfg.parallel
    if p.pp == 1:
        return [[0]], 1, None
    m = memory_micro_batches(p.schedule, p.pp, micro_batches_per_step(cfg, dp))
    schedule = _schedule(p.schedule, p.pp, m)
    return [list(stages) for stages in schedule.placement], schedule.n_stages, schedule


def _rank_memory(cfg: Config, cluster: Cluster, layout: Any, p: Precision,
                 boundaries: list[int] | None = None) -> tuple[list[RankMemory], list[StagePlan]]:
    placement, n_stages, schedule = _placement(cfg, layout.dp)
    stages = _stage_plans(cfg, n_stages, p, boundaries)
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
        if any(s.has_head for s in mine):  # the head's logits and their FP32 gradient, one micro-batch
            buffers += tokens * m.vocab_size * (p.act + 4)
        buffers += max(s.recompute_bytes for s in mine)  # full recompute: one block rebuilt at a time
        terms = {
            "weights": params * p.weight,
            "gradients": params * p.grad,
            "master": p.master * (dense / layout.dp + expert / layout.edp),
            "moments": p.moments * (dense / layout.dp + expert / layout.edp),
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
    runtime_boundaries: list[int]  # split_model's default
    runtime_total: float  # the fullest rank's bytes with the default boundaries

    @property
    def worst(self) -> RankMemory:
        return max(self.ranks, key=lambda r: r.total)


def best_split(cfg: Config, cluster: Cluster, layout: Any, p: Precision) -> Split:
    """The runtime's forward-balanced split, or, under DualPipe / DualPipeV (first and last stage on one
    rank), that split with blocks moved from the first stage to the last when it lowers the fullest
    rank's memory (``shifted_boundaries``); the fewest blocks moved among equals."""
    _, n_stages, _ = _placement(cfg, layout.dp)
    default = runtime_boundaries(cfg.model, n_stages)
    ranks, stages = _rank_memory(cfg, cluster, layout, p, default)
    runtime_total = max(r.total for r in ranks)
    best = Split(default, ranks, stages, default, runtime_total)
    if cfg.parallel.pp > 1 and cfg.parallel.schedule in ("dualpipe", "dualpipev"):
        shift = 1
        while (bounds := shifted_boundaries(cfg.model, n_stages, shift)) is not None:
            ranks, stages = _rank_memory(cfg, cluster, layout, p, bounds)
            if max(r.total for r in ranks) < best.worst.total:
                best = Split(bounds, ranks, stages, default, runtime_total)
            shift += 1
    return best


RECOMPUTE_TEXT = {"none": "nothing recomputed", "selective": "RMSNorms and MLA up-projections recomputed",
                  "full": "whole blocks recomputed"}

TERM_NAMES = {
    "weights": "weights", "gradients": "gradients", "master": "FP32 master weights (ZeRO-1)",
    "moments": "AdamW moments (ZeRO-1)", "activations": "activations", "buffers": "all-to-all and logits buffers",
    "reserve": "reserve",
}


def _largest_term(worst: RankMemory) -> str:
    term = max((k for k in worst.terms if k != "reserve"), key=lambda k: worst.terms[k])
    detail = f" ({worst.chunks_in_flight} micro-batch chunks in flight)" if term == "activations" else ""
    return f"largest term {TERM_NAMES[term]}: {worst.terms[term] / GiB:,.1f} GiB{detail}"


def _overflow_line(cfg: Config, plan_ranks: list[RankMemory], capacity: float) -> str:
    worst = max(plan_ranks, key=lambda r: r.total)
    return (f"needs {worst.total / GiB:,.1f} GiB of {capacity / GiB:,.0f} GiB on pipeline rank {worst.rank}; "
            f"{_largest_term(worst)}")


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
    layout = _layout(cfg, world, cluster)
    check_schedule(cfg, layout.dp)
    if memory_lower_bound(cfg, cluster) > cluster.memory_bytes:
        return False, []
    ranks = best_split(cfg, cluster, layout, precision(cfg, cluster.device)).ranks
    return all(r.total <= cluster.memory_bytes for r in ranks), ranks


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


def _step_time(cfg: Config, layout: Any, split: Split, cluster: Cluster, a2a: AllToAll, p: Precision,
               params_dense: float, params_expert: float) -> tuple[float, float, float, float, float, float, float]:
    """(step, pipeline makespan, dp exchange, bubble fraction, forward compute and all-to-all of the chunk
    with the most MoE blocks, one pipeline transfer)."""
    from parallel.pipeline.simulate import Costs, simulate

    # the simulator takes one cost per chunk: the busiest rank's mean over its stages (a rank runs every
    # micro-batch through each of its stages; under DualPipe its two stages' work adds up)
    costs = _chunk_costs(cfg, split.stages, cluster, a2a, p)
    busiest = max(split.ranks, key=lambda r: sum(sum(costs[s][:2]) + 2 * costs[s][3] for s in r.stages))
    forward, backward, weight, comm = (sum(costs[s][i] for s in busiest.stages) / len(busiest.stages)
                                       for i in range(4))
    pp, sched = cfg.parallel.pp, cfg.parallel.schedule
    m = micro_batches_per_step(cfg, layout.dp)
    hop_bw = (cluster.ib_gbps if layout.dp >= layout.ranks_per_node else cluster.nvlink_gbps) * 1e9
    p2p = cfg.train.micro_batch_size * cfg.train.seq_len * cfg.model.dim * p.act / hop_bw
    if pp == 1:
        pipeline, bubble = m * (forward + backward + 2 * comm), 0.0
    else:
        overlapped = sched in ("dualpipe", "dualpipev")
        # F&B: one chunk's all-to-all hides behind the other's compute
        fb = max(forward + backward, 2 * comm) if overlapped else None
        c = Costs(F=forward + comm, B=backward + comm, W=min(weight, backward + comm), FB=fb, comm=p2p)
        result = simulate(_schedule(sched, pp, m), c)
        pipeline, bubble = result.makespan, result.bubble_fraction
    # ZeRO-1: reduce-scatter FP32 gradients and all-gather the updated parameters (ring), not overlapped;
    # the dp and edp groups leave the node when the dp ranks of a stage fill more than one node
    dp_bw = (cluster.ib_gbps if layout.dp > layout.ranks_per_node else cluster.nvlink_gbps) * 1e9

    def ring(numel: float, ranks: int) -> float:
        return 2 * numel * 4 * (ranks - 1) / ranks / dp_bw

    dp_comm = ring(params_dense, layout.dp) + ring(params_expert, layout.edp)
    typical = max(range(len(costs)), key=lambda s: (split.stages[s].moe_layers, -s))  # most MoE blocks
    return pipeline + dp_comm, pipeline, dp_comm, bubble, costs[typical][0], costs[typical][3], p2p


def plan(cfg: Config, cluster: Cluster | None = None, suggest: bool = True) -> Plan:
    """Plan ``cfg`` on ``cluster`` (world size = cluster.gpus). Raises ConfigError for an impossible layout."""
    cluster = cluster or Cluster()
    cluster.check()
    world = cluster.gpus
    layout = _layout(cfg, world, cluster)
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
    step, pipeline, dp_comm, bubble, chunk_f, chunk_comm, p2p = _step_time(cfg, layout, split, cluster, a2a, p, dense,
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
        implied_mfu=_implied_mfu(cfg, layout, split, cluster, a2a, p, dense, expert, tokens), notes=notes,
        boundaries=split.boundaries, runtime_boundaries=split.runtime_boundaries,
        runtime_split_total=split.runtime_total,
    )
    if split.boundaries != split.runtime_boundaries:
        result.notes.insert(0, (
            f"split_model's default boundaries {split.runtime_boundaries} (forward-balanced) need "
            f"{split.runtime_total / GiB:,.1f} GiB on the fullest rank; these, {split.boundaries}, move "
            f"{split.runtime_boundaries[0] - split.boundaries[0]} block(s) from the first stage to the last "
            f"(both on rank 0 under {cfg.parallel.schedule}, which holds many micro-batches of the first and few of "
            "the last): pass Plan.boundaries to split_model"))
    if not fits:
        result.overflow = _overflow_line(cfg, ranks, capacity)
        if suggest:
            result.suggestion = suggest_layout(cfg, cluster) or ""
    return result


def _implied_mfu(cfg, layout, split, cluster, a2a, p, dense, expert, tokens) -> float:
    """The MFU at which the step time gives the report's 180K GPU-hours per trillion tokens: secant steps
    on 1/mfu over the same simulation (the step time is close to linear in it); 0 when even MFU 1 is
    slower (exposed communication)."""
    target = REPORT_GPU_HOURS_PER_TRILLION * 3600 * (tokens / 1e12) / layout.world_size  # seconds per step

    def excess(x: float) -> float:  # x = 1 / mfu
        c = dataclasses.replace(cluster, mfu=1 / x)
        return _step_time(cfg, layout, split, c, a2a, p, dense, expert)[0] - target

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


# --------------------------------------------------------------------------------------------------
# The nearest layout that fits


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


RECOMPUTE_ORDER = ("none", "selective", "full")


def _candidates(cfg: Config, world: int) -> list[tuple[tuple, Config, list[str]]]:
    """Configs of ``world`` GPUs near ``cfg``, nearest first, with the overrides that make each: pp, ep and
    the micro-batch size first; then more recomputation (memory.recompute, costs time); FP8 last (it
    changes the numerics). Within a group: fewest changed knobs, then fewest log2 steps, larger ep."""
    p, t, m = cfg.parallel, cfg.train, cfg.model
    pps = [d for d in _divisors(world) if d <= m.n_layers + 1 and (d == 1 or p.schedule != "dualpipe" or d % 2 == 0)]
    mbss = [b for b in _divisors(t.micro_batch_size)]
    recomputes = RECOMPUTE_ORDER[RECOMPUTE_ORDER.index(cfg.memory.recompute):]
    out = []
    for fp8 in sorted({cfg.fp8.enabled, True}):
        for recompute in recomputes:
            for pp in pps:
                eps = [e for e in _divisors(world // pp) if m.n_routed_experts % e == 0]
                for ep in eps:
                    for mbs in mbss:
                        changes = [f"{key}={new}" for key, new, old in (
                            ("parallel.pp", pp, p.pp), ("parallel.ep", ep, p.ep),
                            ("train.micro_batch_size", mbs, t.micro_batch_size),
                            ("memory.recompute", recompute, cfg.memory.recompute),
                            ("fp8.enabled", "true" if fp8 else "false", "true" if cfg.fp8.enabled else "false"),
                        ) if new != old]
                        if not changes:
                            continue
                        steps = sum(abs(math.log2(new / old)) for new, old in
                                    ((pp, p.pp), (ep, p.ep), (mbs, t.micro_batch_size)))
                        key = (fp8 != cfg.fp8.enabled, RECOMPUTE_ORDER.index(recompute), len(changes), steps, -ep, pp)
                        new_cfg = dataclasses.replace(
                            cfg, parallel=dataclasses.replace(p, pp=pp, ep=ep, micro_batches=0),
                            train=dataclasses.replace(t, micro_batch_size=mbs),
                            memory=dataclasses.replace(cfg.memory, recompute=recompute),
                            fp8=dataclasses.replace(cfg.fp8, enabled=fp8))
                        out.append((key, new_cfg, changes))
    out.sort(key=lambda c: c[0])
    return out


def suggest_layout(cfg: Config, cluster: Cluster, limit: int = 1000) -> str | None:
    """The overrides of the nearest layout on ``cluster.gpus`` GPUs that fits (None if none of the
    ``limit`` nearest does)."""
    for _, new, changes in _candidates(cfg, cluster.gpus)[:limit]:
        try:
            validate(new, cluster.gpus)
            fits, _ = memory_fits(new, cluster)
        except ConfigError:
            continue
        if fits:
            return " ".join(changes)
    return None


def fewest_gpus(cfg: Config, cluster: Cluster, max_gpus: int = 65536) -> tuple[int, str] | None:
    """The smallest power-of-two multiple of a node (up to ``max_gpus``) on which some layout near
    ``cfg`` fits ``cluster``'s GPUs, and that layout's overrides (largest ep: it only shrinks memory)."""
    gpus = cluster.gpus_per_node
    while gpus <= max_gpus:
        c = dataclasses.replace(cluster, gpus=gpus)
        for _, new, changes in [((), cfg, [])] + _candidates(cfg, gpus):
            try:
                validate(new, gpus)
                fits, _ = memory_fits(new, c)
            except ConfigError:
                continue
            if fits:
                return gpus, " ".join(changes) or "as configured"
        gpus *= 2
    return None


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
        simple = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, pp=1, ep=1, micro_batches=0))
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
        raise UserError(f"{head}; {_largest_term(worst)}; this fits: {fix}")
    gpus = fewest_gpus(cfg, Cluster())
    need_gpus = (f"it needs at least {gpus[0]:,} GPUs of 80 GiB ({gpus[1]}; the report trains 671B on 2048 H800 "
                 "with parallel.pp=16 parallel.ep=64 and ZeRO-1, docs/planner.md)") if gpus else \
        "no layout of up to 65,536 GPUs of 80 GiB holds it"
    small = "; on this machine use +conf=tiny or +conf=small" if device == "cpu" else ""
    raise UserError(f"{head}; {need_gpus}{small}")


# --------------------------------------------------------------------------------------------------
# Output


def _si(x: float, unit: str = "") -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= scale:
            return f"{x / scale:,.2f}{prefix}{unit}"
    return f"{x:,.0f}{unit}"


def _seconds(x: float) -> str:
    return f"{x:,.2f} s" if x >= 0.1 else f"{x * 1e3:,.2f} ms"


def format_plan(pl: Plan, title: str = "") -> str:
    """The human table launch/plan.py prints."""
    c, p = pl.cluster, pl.precision
    lines = []
    nodes = max(1, c.gpus // c.ranks_per_node)
    lines.append(f"plan{(' ' + title) if title else ''}: {c.gpus:,} GPUs ({nodes:,} nodes x {c.ranks_per_node}), "
                 f"{c.gpu_memory_gb:g} GiB, {c.peak_tflops:g} TFLOPS BF16 / {c.fp8_peak_tflops:g} FP8, "
                 f"NVLink {c.nvlink_gbps:g} GB/s, IB {c.ib_gbps:g} GB/s")
    sched = f"{pl.schedule}, {pl.n_stages} stages" if pl.pp > 1 else "no pipeline"
    layers = " ".join(f"{hi - lo}" for lo, hi in pl.stage_layers)
    lines.append(f"layout       pp {pl.pp} ({sched}; blocks per stage {layers} + head/MTP on the last), "
                 f"dp {pl.dp} = ep {pl.ep} x edp {pl.edp}, ep spans {pl.a2a.nodes} node(s); micro-batch "
                 f"{pl.micro_batch_size} x {pl.seq_len} tokens, {pl.micro_batches} micro-batches per step")
    lines.append(f"precision    weights {p.name}, gradients FP32, master FP32, AdamW moments "
                 f"{'BF16' if p.moments == 4 else 'FP32'}; activations {p.name}"
                 f"{' with FP8 GEMM inputs (E5M6 after attention)' if p.fp8 else ''}; memory.recompute="
                 f"{p.recompute} ({RECOMPUTE_TEXT[p.recompute]}{'; MoE SwiGLU outputs' if p.fp8 else ''})")
    lines.append(f"parameters   total {pl.total_params / 1e9:,.2f}B, activated {pl.active_params / 1e9:,.2f}B per "
                 f"token, MTP {pl.mtp_params / 1e9:,.2f}B ({pl.mtp_unique_params / 1e9:,.2f}B unique; with MTP "
                 f"{(pl.total_params + pl.mtp_unique_params) / 1e9:,.2f}B)")
    f = pl.flops_forward
    parts = ", ".join(f"{k.replace('_', ' ')} {_si(v)}" for k, v in f.items() if v)
    recompute = pl.hardware_flops_per_token / pl.flops_per_token - 1
    lines.append(f"FLOPs/token  {_si(pl.flops_per_token)} forward+backward (3 x forward; the hardware runs "
                 f"+{recompute:.1%}: recompute and flash attention's scores); forward: {parts}")
    lines.append(f"memory       pipeline rank {pl.binding_rank} (the fullest; stages "
                 f"{', '.join(map(str, pl.ranks[pl.binding_rank].stages))}, "
                 f"{pl.ranks[pl.binding_rank].params / 1e9:,.2f}B parameters held):")
    for k in MEMORY_TERMS:
        extra = ""
        if k == "activations":
            extra = f"  ({pl.ranks[pl.binding_rank].chunks_in_flight} stage x micro-batch chunks in flight)"
        lines.append(f"  {TERM_NAMES[k]:<34} {pl.memory[k] / GiB:>9,.2f} GiB{extra}")
    verdict = "FITS" if pl.fits else "DOES NOT FIT"
    lines.append(f"  {'total':<34} {pl.memory_total / GiB:>9,.2f} GiB of {pl.memory_capacity / GiB:,.0f}  {verdict}")
    others = ", ".join(f"{r.total / GiB:.1f}" for r in pl.ranks)
    lines.append(f"  per pipeline rank (GiB): {others}")
    a = pl.a2a
    if pl.ep > 1:
        lines.append(f"all-to-all   per token per MoE layer (forward; backward the same): {a.target_nodes:g} target "
                     f"nodes ({a.ib_nodes:.2f} over IB), {a.target_gpus:.2f} GPUs; dispatch "
                     f"{a.dispatch_row:,.0f} B/row: IB {a.dispatch_ib / 1e3:,.1f} KB + NVLink "
                     f"{a.dispatch_nvlink / 1e3:,.1f} KB; "
                     f"combine {a.combine_row:,.0f} B/row: IB {a.combine_ib / 1e3:,.1f} KB + NVLink "
                     f"{a.combine_nvlink / 1e3:,.1f} KB")
        lines.append(f"             per forward chunk: all-to-all {pl.chunk_a2a_s * 1e3:,.1f} ms vs compute "
                     f"{pl.chunk_compute_s * 1e3:,.1f} ms = {pl.chunk_ratio:.2f} : 1 (report: about 1 : 1)")
    else:
        lines.append("all-to-all   none (parallel.ep=1)")
    lines.append(f"time         step {_seconds(pl.step_s)} at mfu {c.mfu:g} (pipeline {_seconds(pl.pipeline_s)}, "
                 f"bubble {pl.bubble_fraction:.1%}; ZeRO-1 exchange {_seconds(pl.dp_comm_s)}); "
                 f"{_si(pl.tokens_per_step)} tokens per step")
    implied = (f"; at mfu {pl.implied_mfu:.2f} this plan costs the report's 180K"
               if 0.01 <= pl.implied_mfu <= 1 else "")
    lines.append(f"cost         {_si(pl.gpu_hours_per_trillion)} GPU-hours per trillion tokens "
                 f"({pl.days_per_trillion:,.2f} days per trillion on {c.gpus:,} GPUs); report: "
                 f"{REPORT_GPU_HOURS_PER_TRILLION / 1e3:,.0f}K H800 GPU-hours per trillion "
                 f"({REPORT_PRETRAIN_GPU_HOURS / 1e6:.3f}M for {REPORT_PRETRAIN_TOKENS / 1e12:g}T tokens, "
                 f"{REPORT_DAYS_PER_TRILLION:g} days on 2048){implied}")
    lines.extend(f"note: {n}" for n in pl.notes)
    if pl.fits:  # the verdict comes last, on one line
        lines.append(f"FITS: {pl.memory_total / GiB:,.1f} GiB of {pl.memory_capacity / GiB:,.0f} GiB per GPU")
    else:
        lines.append(f"DOES NOT FIT: {pl.overflow}"
                     + (f"; nearest layout that fits: {pl.suggestion}" if pl.suggestion else
                        "; no layout near this one fits on these GPUs"))
    return "\n".join(lines)
