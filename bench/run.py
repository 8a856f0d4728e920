"""Every benchmark in one run, each against its baseline measured in the same process, each with its
correctness check; one table: benchmark | metric | ours | baseline | ratio | check.

    python -m bench                         # all, full sizes (minutes on a CPU)
    python -m bench --quick                 # all at toy sizes, seconds (CI)
    python -m bench moe gemm --quick        # some of them
    python -m bench --device cuda --record  # on a GPU; append the table to docs/perf.md

Benchmarks (names for the command line), what "ours" and "baseline" are, and what is checked:

    train     a training step of ours vs HF transformers' DeepseekV3ForCausalLM (bench/train_throughput.py), same
              weights and batch; checked: both models' loss on the first batch agree
    gemm      FP8 GEMMs (emulation on CPU, Triton/torch._scaled_mm on GPU) vs bf16 torch.matmul / grouped_mm
              (bench/fp8_gemm.py); checked: against the fp64 reference on the same FP8 operands, and the
              quantization error against the unquantized product
    moe       RoutedExperts vs a plain loop over experts (bench/moe_experts.py); checked: outputs and gradients
    pipeline  DualPipe / DualPipeV / ZB1P vs 1F1B, simulated with F:B:W measured on one stage of our blocks
              (bench/pipeline.py); checked: every schedule validates, 1F1B's simulated bubble equals Table 2's
    ep        expert-parallel dispatch, hierarchical vs flat, and the MoE layer on 4 ranks vs one process
              (bench/ep_dispatch.py); checked: the EP layer's output equals the single-device layer's
    memory    activation memory and step time of selective / full recompute vs none (bench/memory.py); checked:
              the recomputing modes give the loss and gradients of mode none
    optimizer our AdamW step (BF16 moments), its fast path (fused on CPU, Triton on CUDA) vs its foreach
              reference and vs torch's AdamW as HF runs it (bench/optimizer.py); checked: fast and foreach
              parameters agree to FP32 rounding
    attention MLA's attention (d_v < d_qk): the native SDPA call and each forced backend vs the model's call
              (v padded to d_qk; bench/attention.py); checked: outputs and input gradients against FP32 math
    checkpoint the training stall of a background (async) checkpoint vs a synchronous one, and load vs save
              throughput (bench/checkpoint.py); checked: the loaded state equals the saved one bit for bit

ratio = ours / baseline of the metric; the metric's arrow says which way is better (↑ higher, ↓ lower).
``--device cuda`` moves train, gemm and moe to the GPU (ep needs 4 GPUs); pipeline's F:B:W and memory are
measured on the CPU in every case.
Timings are medians of rounds alternating between ours and the baseline; on a shared machine they are
noisy (the checks are not). A failed check, or a benchmark that raises, makes the exit status 1.
``--perturb P`` scales our side's compared output by (1 + P) before each check: the checks must then fail
(tests/unit/test_bench_harness.py).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import io
import math
import platform
import shlex
import statistics
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from bench import add_allocator_option, use_allocator

ROOT = Path(__file__).resolve().parents[1]
PERF_MD = ROOT / "docs" / "perf.md"


# --------------------------------------------------------------------------------------------------
# Rows, checks, options


@dataclass(frozen=True)
class Check:
    passed: bool
    detail: str  # what was compared, the value and the tolerance


@dataclass(frozen=True)
class Row:
    benchmark: str  # "name: what is compared"
    metric: str  # unit, with ↑ (higher is better) or ↓
    ours: float
    baseline: float
    check: Check

    @property
    def ratio(self) -> float:
        return self.ours / self.baseline if self.baseline else math.nan


@dataclass(frozen=True)
class Options:
    quick: bool
    device: str  # cpu | cuda
    perturb: float  # scale our compared outputs by 1 + perturb (0 in a real run)


def relative_difference(got: torch.Tensor | float, want: torch.Tensor | float) -> float:
    """||got - want|| / ||want|| (Frobenius, in float64); for numbers |got - want| / |want|."""
    got_t, want_t = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64)
    if got_t.shape != want_t.shape:
        raise ValueError(f"shapes differ: {tuple(got_t.shape)} vs {tuple(want_t.shape)}")
    return float((got_t - want_t).norm() / want_t.norm().clamp_min(1e-300))


def check_close(what: str, got: torch.Tensor | float, want: torch.Tensor | float, tolerance: float) -> Check:
    """Passes when the relative difference of ``got`` from ``want`` is at most ``tolerance`` (NaN fails)."""
    return check_at_most(what, relative_difference(got, want), tolerance)


def check_at_most(what: str, error: float, tolerance: float) -> Check:
    """Passes when an already computed relative difference is at most ``tolerance`` (NaN fails)."""
    passed = error <= tolerance
    return Check(passed, f"{what} rel. diff {error:.1e} {'<=' if passed else '>'} {tolerance:g}")


def check_all(*checks: Check) -> Check:
    return Check(all(c.passed for c in checks), "; ".join(c.detail for c in checks))


# --------------------------------------------------------------------------------------------------
# The benchmarks: each returns its rows


def bench_train(opt: Options) -> list[Row]:
    from bench import train_throughput as tt

    device = torch.device(opt.device)
    if opt.quick:
        cfg = dataclasses.replace(
            tt.BENCH_MODEL, vocab_size=512, dim=64, inter_dim=128, moe_inter_dim=32, n_layers=2, n_heads=2,
            q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
            n_routed_experts=8, n_activated_experts=2, n_expert_groups=2, topk_groups=1)
        batch, seq, rounds, steps = 2, 64, 3, 1
    elif device.type == "cuda":
        cfg, batch, seq, rounds, steps = tt.SMALL_MODEL, 8, 1024, 5, 3
    else:
        cfg, batch, seq, rounds, steps = tt.BENCH_MODEL, 4, 512, 8, 1
    impls = ["default", "grouped_mm"] if device.type == "cuda" and not opt.quick else ["default"]
    r = tt.compare(cfg, device, batch, seq, rounds, steps, impls)
    tolerance = 1e-5 if r.dtype == torch.float32 else 2e-2
    rows = []
    for impl in impls:
        name = f"hf[{impl}]"
        check = check_close("first-batch loss vs HF", r.initial_loss["ours"] * (1 + opt.perturb),
                            r.initial_loss[name], tolerance)
        rows.append(Row(f"train: step vs HF [{impl}] ({batch}x{seq} tok)", "tokens/s ↑", r.speeds["ours"],
                        r.speeds[name], check))
    return rows


def bench_gemm(opt: Options) -> list[Row]:
    from bench import fp8_gemm as fg

    device = torch.device(opt.device)
    backends, missing = fg.available_backends(device, ["triton", "torch", "emulate"], sweep=False, quick=opt.quick)
    if device.type == "cuda":  # the emulation is a reference, not a contender, on a GPU
        backends = [b for b in backends if b.name != "emulate"] or backends
    if opt.perturb:  # only then: the extra product would be timed with ours
        backends = [fg.Backend(b.name, lambda a, w, f=b.dense: f(a, w) * (1 + opt.perturb),
                               lambda a, w, c, f=b.grouped: f(a, w, c) * (1 + opt.perturb)) for b in backends]
    if opt.quick or device.type != "cuda":
        q = fg.QUICK
        dense = (q["tokens"][0], q["dense_n"][0], q["dense_k"])
        grouped = (q["tokens"][0], q["experts"], q["top_k"], q["expert_n"], q["expert_k"])
        rounds, repeats = (3, 3) if opt.quick else (5, 10)
    else:
        dense = (4096, fg.DENSE_N[0], fg.DENSE_K)
        grouped = (4096, fg.EXPERTS, fg.TOP_K, fg.EXPERT_N, fg.EXPERT_K)
        rounds, repeats = 3, 10
    args = argparse.Namespace(warmup=1, repeats=repeats, check_rows=128)
    cases: dict[str, tuple[float, Callable[[], list]]] = {  # name: (FLOPs, one round)
        f"dense {dense[0]}x{dense[2]}x{dense[1]}": (
            2.0 * dense[0] * dense[1] * dense[2], lambda: fg.bench_dense(*dense, backends, device, args)),
        f"grouped {grouped[1]} experts top-{grouped[2]}": (  # tokens x top_k rows
            2.0 * grouped[0] * grouped[2] * grouped[3] * grouped[4],
            lambda: fg.bench_grouped(*grouped, backends, device, args)),
    }
    rows = []
    for case, (flops, run) in cases.items():
        rounds_rows = [run() for _ in range(rounds)]  # each round times the baseline, then every backend
        first = rounds_rows[0]
        base_ms = statistics.median([rr[0][1] for rr in rounds_rows])
        for i, (name, _, err_ref, err_fp32, note) in enumerate(first[1:], start=1):
            times = [rr[i][1] for rr in rounds_rows if rr[i][1] is not None]
            if not times:
                rows.append(Row(f"gemm: {case} {name}", "TFLOPS ↑", math.nan, flops / base_ms / 1e9,
                                Check(True, f"skipped: {note}")))
                continue
            check = check_all(check_at_most("vs fp64 on the same FP8 operands", err_ref, 1e-4),
                              check_at_most("FP8 quantization vs unquantized", err_fp32, 0.06))
            rows.append(Row(f"gemm: {case}, fp8 {name} vs bf16", "TFLOPS ↑", flops / statistics.median(times) / 1e9,
                            flops / base_ms / 1e9, check))
    for line in missing:
        print(f"unavailable: {line}")
    return rows


def bench_moe(opt: Options) -> list[Row]:
    from bench import moe_experts

    if opt.quick:
        r = moe_experts.compare(tokens=512, dim=128, inter=64, experts=16, topk=4, device=opt.device, rounds=3,
                                perturb=opt.perturb)
    else:
        r = moe_experts.compare(device=opt.device, rounds=5, perturb=opt.perturb)
    return [Row(f"moe: RoutedExperts[{impl}] vs plain loop ({r.tokens} tok)", "tokens/s ↑",
                r.tokens / r.seconds[impl], r.tokens / r.seconds["baseline"],
                check_at_most("output and gradients", err, r.tolerance)) for impl, err in r.rel_err.items()]


def bench_attention(opt: Options) -> list[Row]:
    from bench import attention

    shape = attention.QUICK if opt.quick else attention.V3 if opt.device == "cuda" else attention.SMALL
    r = attention.compare(shape, opt.device, rounds=3 if opt.quick else 5, perturb=opt.perturb)
    baseline = check_at_most(f"{attention.BASELINE} vs FP32 math", r.rel_err[attention.BASELINE], r.tolerance)
    return [Row(f"attention: {name} vs {attention.BASELINE} (MLA d_qk {shape.d_qk}, d_v {shape.d_v}, T {shape.seq})",
                "calls/s ↑", 1 / seconds, 1 / r.seconds[attention.BASELINE],
                check_all(check_at_most(f"{name} vs FP32 math", r.rel_err[name], r.tolerance), baseline))
            for name, seconds in r.seconds.items() if name != attention.BASELINE]


def bench_pipeline(opt: Options) -> list[Row]:
    from bench import pipeline as bp
    from parallel.pipeline.simulate import Costs

    if opt.quick:
        ratios = bp.measure_stage_ratios("tiny", blocks=2, mb_size=2, seq=256, repeats=3,
                                         threads=torch.get_num_threads())
        pps = [8]
    else:
        ratios = bp.measure_stage_ratios("small", blocks=2, mb_size=2, seq=1024, repeats=5,
                                         threads=torch.get_num_threads())
        pps = [8, 16]
    q = ratios["ratios"]
    costs = Costs(F=1.0, B=q["B"], W=min(q["W"], q["B"]))
    print(bp.format_ratios(ratios))
    rows = []
    for pp in pps:
        sim = {r.schedule: r for r in bp.simulated_rows([pp], [2], costs)}  # validates every schedule
        base = sim["1f1b"]
        bubble = base.mean_bubble * (1 + opt.perturb)
        check = check_close("1F1B simulated bubble vs Table 2", bubble, base.table2_bubble, 1e-9)
        for name, r in sim.items():
            if name != "1f1b":
                rows.append(Row(f"pipeline: {name} vs 1F1B, pp {pp} m {r.micro_batches} (simulated)",
                                f"makespan ↓ (F:B:W 1:{q['B']:.2f}:{q['W']:.2f} measured)", r.makespan,
                                base.makespan, check))
    return rows


def bench_ep(opt: Options) -> list[Row]:
    from bench import ep_dispatch as ep

    if opt.device == "cuda" and torch.cuda.device_count() < ep.WORLD:
        reason = f"skipped: {torch.cuda.device_count()} GPU(s), EP over {ep.WORLD} ranks needs {ep.WORLD}"
        return [Row("ep: dispatch hierarchical vs flat", "tokens/s ↑", math.nan, math.nan, Check(True, reason))]
    if opt.quick:
        cfg = dataclasses.replace(ep.BENCH_MOE, dim=128, inter_dim=256, moe_inter_dim=64, kv_lora_rank=32,
                                  qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_heads=2)
        r = ep.measure(tokens=ep.SEQ_LEN, iters=2, device=opt.device, cfg=cfg, perturb=opt.perturb)
    else:
        r = ep.measure(device=opt.device, perturb=opt.perturb)
    check = check_all(*(check_at_most(f"{mode} EP output vs one device", r.rel_err[mode], 1e-5)
                        for mode in ep.MODES))
    hier, flat = "hierarchical", "flat"
    return [
        Row("ep: dispatch+combine, hierarchical vs flat", "inter-node B/token ↓",
            r.inter_node_bytes_per_token[hier], r.inter_node_bytes_per_token[flat], check),
        Row("ep: dispatch+combine, hierarchical vs flat", "tokens/s ↑",
            r.exchange_tokens_per_s[hier], r.exchange_tokens_per_s[flat], check),
        Row(f"ep: MoE layer fwd+bwd, EP {ep.WORLD} flat vs 1 process", "tokens/s ↑",
            r.tokens / r.layer_s[flat], r.tokens / r.single_s, check),
    ]


def bench_memory(opt: Options) -> list[Row]:
    from bench import memory
    from train.config import load_config
    from train.model import Transformer

    shape, (batch, seq), repeats = ("tiny", (1, 64), 3) if opt.quick else ("small", (1, 1024), 3)
    cfg = load_config([f"+conf={shape}"]).model
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    window = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
    results = memory.measure_recompute(model, window, repeats, perturb=opt.perturb)
    none, tokens = results[0], batch * seq
    rows = []
    for r in results[1:]:
        # fp32; the recomputed forward may round differently (1.2e-6 seen on +conf=small's worst tensor)
        check = check_all(check_at_most("loss vs none", r.loss_rel_err, 1e-5),
                          check_at_most("gradients vs none", r.grad_rel_err, 1e-5))
        rows.append(Row(f"memory: recompute={r.mode} vs none (+conf={shape}, {tokens} tok)", "saved KiB/token ↓",
                        r.saved_bytes / tokens / 1024, none.saved_bytes / tokens / 1024, check))
        rows.append(Row(f"memory: recompute={r.mode} vs none (+conf={shape}, {tokens} tok)", "fwd+bwd ms ↓",
                        r.seconds * 1e3, none.seconds * 1e3, check))
    return rows


def bench_optimizer(opt: Options) -> list[Row]:
    from bench import optimizer, train_throughput

    cfg = train_throughput.SMALL_MODEL if opt.device == "cuda" and not opt.quick else train_throughput.BENCH_MODEL
    if opt.quick:
        cfg = dataclasses.replace(cfg, vocab_size=1024, n_layers=2)
    # DeepSpeed's CPU Adam (where installed) compiles its kernel on first use: not in the quick run
    r = optimizer.compare(cfg, opt.device, rounds=3 if opt.quick else 7, perturb=opt.perturb,
                          with_deepspeed=not opt.quick)
    check = check_at_most(f"{r.fast} vs foreach parameters", r.rel_err, optimizer.tolerance(opt.device))
    what = f"{r.params / 1e6:.1f}M params"
    ours = 1 / r.seconds[f"ours {r.fast}"]
    rows = [Row(f"optimizer: AdamW step, {r.fast} vs foreach ({what})", "steps/s ↑", ours,
                1 / r.seconds["ours foreach"], check),
            Row(f"optimizer: AdamW step, {r.fast} vs torch AdamW as HF ({what})", "steps/s ↑",
                ours, 1 / r.seconds["torch AdamW (HF)"], check)]
    if "DeepSpeedCPUAdam fp32" in r.seconds:
        rows.append(Row(f"optimizer: AdamW step, {r.fast} vs DeepSpeedCPUAdam ({what})", "steps/s ↑",
                        ours, 1 / r.seconds["DeepSpeedCPUAdam fp32"], check))
    return rows


def bench_checkpoint(opt: Options) -> list[Row]:
    from bench import checkpoint as bc

    r = bc.measure("tiny" if opt.quick else "small", reps=1 if opt.quick else 2, perturb=opt.perturb)
    check = check_at_most("loaded vs saved parameters (bit for bit)", r.rel_err, 0.0)
    what = f"{r.size / 1e9:.3f} GB"
    return [Row(f"checkpoint: async vs sync save, training stall ({what})", "s ↓", r.medians["async_stall"],
                r.medians["sync_stall"], check),
            Row(f"checkpoint: load vs sync save ({what})", "GB/s ↑", r.size / r.medians["load"] / 1e9,
                r.size / r.medians["save"] / 1e9, check)]


BENCHMARKS: dict[str, Callable[[Options], list[Row]]] = {
    "train": bench_train, "gemm": bench_gemm, "moe": bench_moe, "pipeline": bench_pipeline, "ep": bench_ep,
    "memory": bench_memory, "optimizer": bench_optimizer, "checkpoint": bench_checkpoint,
    "attention": bench_attention,
}


# --------------------------------------------------------------------------------------------------
# Running, the table, the record


def run_benchmark(name: str, opt: Options, verbose: bool) -> tuple[list[Row], str]:
    """The benchmark's rows and its captured output; an exception becomes one failed row."""
    buffer = io.StringIO()
    threads = torch.get_num_threads()  # a benchmark may change it (ep's one-process baseline): restore it after
    try:
        with contextlib.redirect_stdout(buffer if not verbose else sys.stdout):
            rows = BENCHMARKS[name](opt)
    except Exception as exc:  # a benchmark that raises is a failure of the run, shown in the table
        buffer.write(traceback.format_exc())
        rows = [Row(name, "-", math.nan, math.nan, Check(False, f"ERROR {type(exc).__name__}: {exc}".splitlines()[0]))]
    finally:
        torch.set_num_threads(threads)
    return rows, buffer.getvalue()


def _number(x: float) -> str:
    if math.isnan(x):
        return "-"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def format_table(rows: list[Row]) -> str:
    lines = ["| benchmark | metric | ours | baseline | ratio | check |", "|---|---|---|---|---|---|"]
    for r in rows:
        status = "pass" if r.check.passed else "FAIL"
        if r.check.detail.startswith("skipped"):
            status = "skip"
        ratio = "-" if math.isnan(r.ratio) else f"{r.ratio:.2f}x"
        lines.append(f"| {r.benchmark} | {r.metric} | {_number(r.ours)} | {_number(r.baseline)} | {ratio} | "
                     f"{status}: {r.check.detail} |")
    return "\n".join(lines)


def device_description(device: str) -> str:
    """torch version, and the GPU's name or the CPU's model and core count."""
    if device == "cuda" and torch.cuda.is_available():
        where = f"1x {torch.cuda.get_device_name(0)} (of {torch.cuda.device_count()})"
    else:
        model = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        where = f"CPU {model}, {torch.get_num_threads()} threads"
    return f"{where}; torch {torch.__version__}"


def record(table: str, command: str, device: str, perf_md: Path = PERF_MD) -> None:
    """Append the table with its command, device and date to docs/perf.md."""
    date = datetime.date.today().isoformat()
    with open(perf_md, "a") as f:
        f.write(f"\n## Harness run {date}: `{command}`\n{device}. Timings: medians of alternating rounds on a "
                "machine shared with other jobs (noisy); ratio = ours / baseline, the arrow says which way is "
                f"better; every check ran in the same run.\n\n{table}\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                 epilog="benchmarks: " + ", ".join(BENCHMARKS))
    ap.add_argument("names", nargs="*", metavar="NAME",
                    help=f"benchmarks to run (default: all): {', '.join(BENCHMARKS)}")
    ap.add_argument("--quick", action="store_true", help="toy sizes, seconds (CI)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--record", action="store_true", help="append the table, command, device and date to docs/perf.md")
    ap.add_argument("--verbose", "-v", action="store_true", help="show each benchmark's own output")
    ap.add_argument("--perturb", type=float, default=0.0, metavar="P",
                    help="scale our compared outputs by 1 + P before each check (to see the checks fail)")
    add_allocator_option(ap)
    args = ap.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        ap.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    use_allocator(args.allocator)
    opt = Options(quick=args.quick, device=args.device, perturb=args.perturb)
    rows: list[Row] = []
    for name in args.names or list(BENCHMARKS):
        got, output = run_benchmark(name, opt, args.verbose)
        rows += got
        if not all(r.check.passed for r in got) and output and not args.verbose:
            print(f"--- output of {name} ---\n{output.rstrip()}\n---", file=sys.stderr)
    table = format_table(rows)
    device = device_description(args.device)
    print(f"{device}; {'quick' if args.quick else 'full'} sizes; allocator {args.allocator}\n{table}")
    failed = list(dict.fromkeys(r.benchmark for r in rows if not r.check.passed))
    if args.record:
        record(table, shlex.join(["python", "-m", "bench", *argv]), f"{device}; allocator {args.allocator}")
        print(f"appended to {PERF_MD.relative_to(ROOT)}")
    if failed:
        print(f"FAILED: {len(failed)} check(s): {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
