"""Scaling model: tokens/s per GPU and GPU-hours per trillion tokens of ``+conf=671b`` on 2048 H800s with the
report's layout (PP 16 DualPipe, EP 64 over 8 nodes, ZeRO-1 data parallel over the rest), next to the report's
figures (sec 1 and Table 1: 180K H800 GPU-hours per trillion tokens, 3.7 days per trillion on 2048 GPUs,
2.664M GPU-hours of pretraining for 14.8T tokens, 2.788M in all), with a sensitivity table.

How a step is predicted (every assumption printed with the table):
  * per-chunk compute: the planner's FLOPs of each pipeline stage (train/plan_flops.py) at an assumed MFU of
    the H800's dense peaks (989 TFLOPS BF16, 1979 FP8: each GEMM at the MFU of its own precision's peak);
    no GPU is available here, so no absolute GPU block time is measured: the MFU is the assumption;
  * F : B : W: the planner's, from FLOPs (B = input + weight gradients + recompute + flash attention's
    second pass; W = the weight-gradient GEMMs), or the ratios measured on one stage of our blocks by
    ``bench/pipeline.py --measure-ratios`` (CPU, fp32: the recorded 1 : 2.10 : 0.68, or live with
    ``--measure-ratios``), B and W then scaled from the planner's F;
  * all-to-all: the planner's bytes per token under node-limited routing (train/plan_comm.py) at IB 50 GB/s
    and NVLink 160 GB/s per GPU (report sec 3.2.2), one dispatch + combine per MoE block and direction;
  * the pipeline: DualPipe's action lists through the simulator (parallel/pipeline/simulate.py), bubble
    included, each rank's mean chunk costs, the slowest rank kept, as the planner (train/plan_time.step_time)
    does; overlap on:
    an F&B pair costs max(F + B, its two all-to-alls) (the report's full hiding), F-only and B-only chunks
    pay their all-to-all; overlap off: F&B = F + B + both all-to-alls;
  * ZeRO-1 gradient reduce-scatter + parameter all-gather: ring over IB, not overlapped (the planner's);
  * the steady-state batch, 15360 sequences of 4096 tokens (the first 469B tokens ramp up from 4096);
    optimizer step, data loading, stragglers and failures: free.
Checked in the same run: this assembly of the planner's pieces, at the planner's assumptions, gives the
planner's own pipeline time (``train.plan.plan``) to 1e-9.

    python bench/scaling.py                     # the table (seconds)
    python bench/scaling.py --measure-ratios    # F:B:W measured now on one +conf=small stage (~1 min)
    python bench/scaling.py --record            # and append it to docs/perf.md
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench.pipeline when run as a script

from train.config import Config, load_config  # noqa: E402
from train.plan import Cluster, all_to_all, best_split, plan  # noqa: E402
from train.plan_cluster import (  # noqa: E402
    REPORT_DAYS_PER_TRILLION, REPORT_GPU_HOURS_PER_TRILLION, REPORT_PRETRAIN_GPU_HOURS, REPORT_PRETRAIN_TOKENS,
    layout_for, precision,
)
from train.plan_stages import micro_batches_per_step  # noqa: E402
from train.plan_time import _chunk_costs, pipeline_time  # noqa: E402  (what step_time uses: the same functions)

ROOT = Path(__file__).resolve().parents[1]
PERF_MD = ROOT / "docs" / "perf.md"
REPORT_TOTAL_GPU_HOURS = 2_788_000  # Table 1: pretraining 2664K + context extension 119K + post-training 5K
REPORT_AFTER_PRETRAINING = REPORT_TOTAL_GPU_HOURS - REPORT_PRETRAIN_GPU_HOURS  # not modelled here: taken as is
# bench/pipeline.py --measure-ratios, recorded in docs/perf.md (2026-11-27): 2 MoE blocks of +conf=small,
# one micro-batch of 2 x 1024 tokens, fp32, CPU, one thread: F 510 ms, full B 1068 ms, W 345 ms
RECORDED_RATIOS = (2.10, 0.68)
RECORDED_SOURCE = "bench/pipeline.py --measure-ratios, docs/perf.md 2026-11-27 (+conf=small stage, CPU fp32)"


@dataclass(frozen=True)
class Scenario:
    mfu: float  # fraction of each GEMM's own peak (BF16 or FP8) while computing
    overlap: bool  # DualPipe's F&B hides the pair's all-to-alls
    ratios: tuple[float, float] | None = None  # (B/F, W/F); None: the planner's, from FLOPs
    all_to_all: bool = True  # False: no expert all-to-all at all (an upper bound)


@dataclass(frozen=True)
class Prediction:
    scenario: Scenario
    step_s: float
    pipeline_s: float
    dp_comm_s: float
    bubble_fraction: float
    tokens_per_step: int
    gpus: int
    flops_per_token: float  # model FLOPs, forward + backward
    bf16_peak: float  # FLOP/s per GPU

    @property
    def tokens_per_gpu_s(self) -> float:
        return self.tokens_per_step / self.step_s / self.gpus

    @property
    def gpu_hours_per_trillion(self) -> float:
        return 1e12 / self.tokens_per_gpu_s / 3600

    @property
    def days_per_trillion(self) -> float:
        return self.gpu_hours_per_trillion / self.gpus / 24

    @property
    def mfu_bf16(self) -> float:
        """Model FLOPs per second over the BF16 peak: the usual definition of MFU."""
        return self.flops_per_token * self.tokens_per_gpu_s / self.bf16_peak

    @property
    def total_gpu_hours(self) -> float:
        """14.8T tokens of pretraining at this rate + the report's context extension and post-training."""
        return self.gpu_hours_per_trillion * REPORT_PRETRAIN_TOKENS / 1e12 + REPORT_AFTER_PRETRAINING


def predict(cfg: Config, cluster: Cluster, scenario: Scenario) -> Prediction:
    """One scenario: the planner's per-stage costs at the scenario's MFU, its ratios and overlap, through the
    pipeline simulator, plus the planner's ZeRO-1 exchange."""
    cluster = dataclasses.replace(cluster, mfu=scenario.mfu)
    reference = plan(cfg, cluster, suggest=False)
    layout = layout_for(cfg, cluster.gpus, cluster)
    p = precision(cfg, cluster.device)
    split = best_split(cfg, cluster, layout, p)
    a2a = all_to_all(cfg, layout, cluster, p)
    costs = _chunk_costs(cfg, split.stages, cluster, a2a, p)  # per stage: forward, backward, weight, all-to-all
    if scenario.ratios is not None:
        b, w = scenario.ratios
        costs = [(f, b * f, w * f, comm) for f, _, _, comm in costs]
    if not scenario.all_to_all:
        costs = [(f, bwd, w, 0.0) for f, bwd, w, _ in costs]
    m = micro_batches_per_step(cfg, layout.dp)
    pipeline, bubble = pipeline_time(cfg, split, costs, m, reference.p2p_s, overlap=scenario.overlap)
    return Prediction(scenario=scenario, step_s=pipeline + reference.dp_comm_s, pipeline_s=pipeline,
                      dp_comm_s=reference.dp_comm_s, bubble_fraction=bubble,
                      tokens_per_step=reference.tokens_per_step, gpus=cluster.gpus,
                      flops_per_token=reference.flops_per_token, bf16_peak=cluster.peak_tflops * 1e12)


def sensitivity(ratios: tuple[float, float], implied_mfu: float) -> list[tuple[str, Scenario]]:
    rows = [(f"MFU {mfu:.2f}, F:B:W from FLOPs, overlap {'on' if overlap else 'off'}", Scenario(mfu, overlap))
            for mfu in (0.30, 0.40, 0.50) for overlap in (True, False)]
    rows += [(f"MFU 0.40, F:B:W measured 1:{ratios[0]:.2f}:{ratios[1]:.2f}, overlap {'on' if overlap else 'off'}",
              Scenario(0.40, overlap, ratios)) for overlap in (True, False)]
    rows.append(("MFU 0.40, no expert all-to-all at all (bound)", Scenario(0.40, True, all_to_all=False)))
    rows.append((f"MFU {implied_mfu:.3f} (the planner's fit to 180K), overlap on", Scenario(implied_mfu, True)))
    return rows


def format_table(rows: list[tuple[str, Prediction]]) -> str:
    lines = ["| scenario | bubble | step s | tokens/s per GPU | MFU of BF16 peak | GPU-h per 1T tokens | "
             "days per 1T (2048 GPUs) | total GPU-h (14.8T + 124K) | vs report's 180K |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, r in rows:
        lines.append(f"| {label} | {100 * r.bubble_fraction:.1f}% | {r.step_s:.2f} | {r.tokens_per_gpu_s:,.0f} | "
                     f"{100 * r.mfu_bf16:.1f}% | {r.gpu_hours_per_trillion / 1e3:,.1f}K | {r.days_per_trillion:.2f} | "
                     f"{r.total_gpu_hours / 1e6:.3f}M | "
                     f"{r.gpu_hours_per_trillion / REPORT_GPU_HOURS_PER_TRILLION:.2f}x |")
    report_tps = 1e12 / REPORT_GPU_HOURS_PER_TRILLION / 3600
    first = rows[0][1]
    lines.append(f"| **report** (sec 1, Table 1) | - | - | {report_tps:,.0f} | "
                 f"{100 * first.flops_per_token * report_tps / first.bf16_peak:.1f}% | "
                 f"{REPORT_GPU_HOURS_PER_TRILLION / 1e3:,.0f}K | {REPORT_DAYS_PER_TRILLION} | "
                 f"{REPORT_TOTAL_GPU_HOURS / 1e6:.3f}M | 1.00x |")
    return "\n".join(lines)


def assumptions(cfg: Config, cluster: Cluster, ratios_source: str, ratios: tuple[float, float]) -> list[str]:
    ref = plan(cfg, cluster, suggest=False)
    a = ref.a2a
    return [
        f"+conf=671b: {ref.total_params / 1e9:.1f}B parameters, {ref.active_params / 1e9:.1f}B active; "
        f"{ref.flops_per_token / 1e9:.1f} GFLOPs per token (model, fwd+bwd), "
        f"{ref.hardware_flops_per_token / 1e9:.1f} with selective recompute and flash attention's recompute; FP8 GEMMs",
        f"layout: {cluster.gpus} GPUs, {cluster.gpus_per_node} per node; PP {ref.pp} {ref.schedule}, EP {ref.ep}, "
        f"DP {ref.dp} (ZeRO-1; experts over EDP {ref.edp}); {ref.micro_batches} micro-batches of "
        f"{ref.micro_batch_size} x {ref.seq_len} tokens per step ({ref.tokens_per_step / 1e6:.1f}M tokens)",
        f"H800: {cluster.peak_tflops:g} TFLOPS BF16, {cluster.fp8_peak_tflops:g} TFLOPS FP8 dense peaks; "
        "MFU = fraction of each GEMM's own peak (assumed: no GPU here to measure block times)",
        f"all-to-all: IB {cluster.ib_gbps:g} GB/s, NVLink {cluster.nvlink_gbps:g} GB/s per GPU (report 3.2.2); "
        f"{a.target_nodes:g} target nodes per token ({a.ib_nodes:g} over IB), {a.seconds_per_token * 1e6:.2f} us "
        f"per token per MoE block (dispatch + combine); all-to-all : compute of a forward chunk at MFU 0.40 "
        f"{ref.chunk_ratio:.2f} : 1 (report: about 1 : 1)",
        f"measured F:B:W = 1 : {ratios[0]:.2f} : {ratios[1]:.2f} ({ratios_source})",
        f"ZeRO-1 exchange {ref.dp_comm_s:.2f} s per step, exposed; pipeline P2P {ref.p2p_s * 1e3:.2f} ms per transfer",
        f"report's context extension + post-training ({REPORT_AFTER_PRETRAINING / 1e3:.0f}K GPU-hours) added as is "
        "to the total",
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--measure-ratios", action="store_true",
                    help="measure F:B:W now on one +conf=small stage (bench/pipeline.py) instead of the recorded ones")
    ap.add_argument("--record", action="store_true", help="append the table to docs/perf.md")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    cfg = load_config(["+conf=671b"])
    cluster = Cluster(gpus=2048)
    ratios, source = RECORDED_RATIOS, RECORDED_SOURCE
    if args.measure_ratios:
        from bench.pipeline import format_ratios, measure_stage_ratios

        measured = measure_stage_ratios("small", blocks=2, mb_size=2, seq=1024, repeats=3)
        print(format_ratios(measured))
        ratios = (measured["ratios"]["B"], measured["ratios"]["W"])
        source = "measured in this run: 2 MoE blocks of +conf=small, 2 x 1024 tokens, CPU fp32"

    # the check: this assembly at the planner's own assumptions reproduces the planner's pipeline time
    planner = plan(cfg, cluster, suggest=False)
    ours = predict(cfg, cluster, Scenario(cluster.mfu, overlap=True))
    error = abs(ours.pipeline_s - planner.pipeline_s) / planner.pipeline_s
    rows = [(label, predict(cfg, cluster, s)) for label, s in sensitivity(ratios, planner.implied_mfu)]
    table = format_table(rows)
    notes = assumptions(cfg, cluster, source, ratios)
    check = (f"check: pipeline time of this model at the planner's assumptions {ours.pipeline_s:.4f} s vs "
             f"train.plan.plan {planner.pipeline_s:.4f} s (relative difference {error:.1e}, tolerance 1e-9)")
    print("\n".join(f"- {n}" for n in notes))
    print(table)
    print(check)
    if args.record:
        command = shlex.join(["python", "bench/scaling.py", *(sys.argv[1:] if argv is None else argv)])
        with open(PERF_MD, "a") as f:
            f.write(f"\n## Scaling model (671B on 2048 H800s)\n`{command}` ({datetime.date.today().isoformat()}; "
                    "a model, not a measurement: no GPU here).\n\n" + "\n".join(f"- {n}" for n in notes) +
                    f"\n\n{table}\n\n{check}.\n")
        print(f"appended to {PERF_MD.relative_to(ROOT)}")
    if error > 1e-9:
        print("error: the scaling model disagrees with the planner", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
