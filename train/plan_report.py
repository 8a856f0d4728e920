"""Planner output: the table launch/plan.py prints and the one-line verdicts."""

from __future__ import annotations

from typing import TYPE_CHECKING

from train.config import Config
from train.plan_cluster import (
    GiB, REPORT_DAYS_PER_TRILLION, REPORT_GPU_HOURS_PER_TRILLION, REPORT_PRETRAIN_GPU_HOURS, REPORT_PRETRAIN_TOKENS,
)
from train.plan_memory import MEMORY_TERMS, RankMemory

if TYPE_CHECKING:
    from train.plan import Plan


RECOMPUTE_TEXT = {"none": "nothing recomputed", "selective": "RMSNorms, MLA projections and attention recomputed",
                  "full": "whole blocks recomputed"}

TERM_NAMES = {
    "weights": "weights", "masters": "FP32 masters (ZeRO-1)", "casts": "weight casts (per step)",
    "gradients": "gradients",
    "moments": "AdamW moments (ZeRO-1)", "activations": "activations", "buffers": "all-to-all and logits buffers",
    "reserve": "reserve",
}


def largest_term(worst: RankMemory) -> str:
    term = max((k for k in worst.terms if k != "reserve"), key=lambda k: worst.terms[k])
    detail = f" ({worst.chunks_in_flight} micro-batch chunks in flight)" if term == "activations" else ""
    return f"largest term {TERM_NAMES[term]}: {worst.terms[term] / GiB:,.1f} GiB{detail}"


def overflow_line(cfg: Config, plan_ranks: list[RankMemory], capacity: float) -> str:
    worst = max(plan_ranks, key=lambda r: r.total)
    return (f"needs {worst.total / GiB:,.1f} GiB of {capacity / GiB:,.0f} GiB on pipeline rank {worst.rank}; "
            f"{largest_term(worst)}")


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
    if pl.pp > 1:
        why = {"parallel.stage_boundaries": "as given by parallel.stage_boundaries",
               "memory-balanced": "the planner's, balancing memory: the first and last stage share rank 0",
               "forward-balanced": "the planner's, balancing the forward cost per stage"}[pl.boundaries_source]
        lines.append(f"stages       cut before layers {pl.boundaries} ({why}); the pipeline runs with these cuts")
    if p.weight == 2:
        weights = "weights BF16 (norms and gates FP32), FP32 masters (ZeRO-1)"
    else:
        what = "head and eh_proj" if p.fp8 else "GEMMs"
        weights = "weights FP32, the masters" + (f" (cast to BF16 once per step for the {what})" if p.act < 4 else "")
    lines.append(f"precision    {weights}, gradients FP32, AdamW moments "
                 f"{'BF16' if p.moments == 4 else 'FP32'} (ZeRO-1); activations {p.name}"
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
                        f"; {pl.no_fit or 'no layout near this one fits on these GPUs'}"))
    return "\n".join(lines)


def no_fit_line(cfg: Config, gpus: int, least: tuple[float, str, RankMemory] | None) -> str:
    """Why nothing fits: the least memory a layout of these ``gpus`` needs (``plan_suggest.least_memory``) and,
    when activations or buffers dominate, that they grow with the micro-batch's tokens, which pipeline and
    expert parallelism do not divide."""
    text = f"no layout near this one fits on {gpus:,} GPUs, nor on up to 65,536"
    if least is None:
        return text
    total, changes, rank = least
    text += f"; the least memory on {gpus:,} GPUs is {total / GiB:,.1f} GiB ({changes}; {largest_term(rank)})"
    term = max((k for k in rank.terms if k != "reserve"), key=lambda k: rank.terms[k])
    if term in ("activations", "buffers"):
        tokens = cfg.train.micro_batch_size * cfg.train.seq_len
        text += (f": activations, logits and all-to-all buffers grow with the micro-batch's {tokens:,} tokens "
                 "(train.micro_batch_size x train.seq_len), which pipeline and expert parallelism do not divide; "
                 "it needs sequence parallelism, which this trainer does not have")
    return text
