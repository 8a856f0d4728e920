"""Pipeline schedules compared: 1F1B, ZB1P, DualPipe and DualPipeV at PP 8 and 16 (report Table 2).

(a) Simulated: each schedule's action lists run through the cost model of
    ``parallel/pipeline/simulate.py`` with the F : B : W (: F&B) ratios given on the command line, or
    measured for one stage of our blocks (``--measure-ratios``). Prints, per schedule, the makespan
    against 1F1B's (the baseline, same run), the bubble (mean and most idle rank, and Table 2's formula),
    the bubble fraction, the peak activation memory of the most loaded rank and the parameters per rank.
(b) Measured (``--measure``): pp gloo processes (forked, one thread each) run ``PipelineRuntime.step``
    of each schedule on a small model; the median step time per schedule is printed next to the
    simulated makespan ratio against 1F1B at the same pp and micro-batches.
(c) Peer baseline, in the same run as (b): the same stages (same layer split, micro-batches and loss)
    under ``torch.distributed.pipelining`` ``ScheduleDualPipeV`` and ``Schedule1F1B``; prints the ratio
    ours / theirs and checks that the losses (and gradients) agree.

All costs are for a chunk holding 1/pp of the model; a DualPipeV chunk holds half of that, so its costs
are halved (the same model on the same ranks). Micro-batches: ``--per-rank K`` runs m = K x pp.

    python bench/pipeline.py                                  # F=1 B=2 W=1, F&B = F+B (no overlap gain)
    python bench/pipeline.py --f 1 --b 2.1 --w 0.9 --fb 2.4   # given ratios; F&B from the overlap
    python bench/pipeline.py --measure-ratios                 # time F, B, B-input, W of a +conf=small stage
    python bench/pipeline.py --measure-ratios --measure       # and (b) + (c) at pp 2 and 4 on CPU processes
    python bench/pipeline.py --json runs/pipeline_bench.json   # also write the rows

Measured rows use the same keys as the simulated ones (``source`` "measured" for ours, "torch" for
torch.distributed.pipelining; ``makespan`` is then the median step time in seconds and the bubble
columns are not measured: nan).

(b)/(c) on CPU: one thread per rank; 4 ranks on a 2-core machine oversubscribe it (the script says so),
and the cores may be shared with other jobs: the step times are noisy, compare medians of one run only.
torch's schedules take one loss on the last stage's output (``loss_fn(output, target)``): they cannot
carry our MTP loss (the last stage also needs the window and the embedding) nor the balance losses of
the middle stages, so (b) and (c) use a model with ``mtp_depth=0`` and ``balance_alpha=0`` for BOTH.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from parallel.local_ranks import run_ranks
from parallel.pipeline.schedule import SCHEDULES, make_schedule, validate
from parallel.pipeline.simulate import Costs, simulate

ROOT = Path(__file__).resolve().parents[1]
NAN = float("nan")


def table2_bubble(name: str, pp: int, c: Costs) -> float:
    """Table 2's bubble for 1/pp-of-the-model chunk costs (DualPipeV: ours, DualPipe's on 2pp half chunks)."""
    return {"1f1b": (pp - 1) * (c.F + c.B),
            "zb1p": (pp - 1) * (c.F + c.B - 2 * c.W),
            "dualpipe": (pp / 2 - 1) * (c.fb + c.B - 3 * c.W),
            "dualpipev": (pp - 1) * (c.fb + c.B - 3 * c.W) / 2}[name]


@dataclass
class Row:
    schedule: str
    pp: int
    micro_batches: int
    source: str  # "simulated" here; measured rows use the same keys
    makespan: float
    vs_1f1b: float  # makespan / 1F1B's makespan at the same pp and micro-batches
    mean_bubble: float
    max_bubble: float
    table2_bubble: float
    bubble_fraction: float  # idle share of pp x makespan
    activations: float  # peak of the most loaded rank, in micro-batches through 1/pp of the model
    params: float  # per rank, in units of 1/pp of the model


def simulated_rows(pps: list[int], per_rank: list[int], costs: Costs) -> list[Row]:
    rows = []
    for pp in pps:
        for k in per_rank:
            m = k * pp
            baseline = None
            for name in SCHEDULES:
                schedule = make_schedule(name, pp, m)
                validate(schedule)
                r = simulate(schedule, costs.scaled(pp / schedule.n_stages))
                baseline = baseline or r.makespan  # 1F1B comes first
                rows.append(Row(schedule=name, pp=pp, micro_batches=m, source="simulated", makespan=r.makespan,
                                vs_1f1b=r.makespan / baseline, mean_bubble=r.mean_bubble,
                                max_bubble=max(r.bubble), table2_bubble=table2_bubble(name, pp, costs),
                                bubble_fraction=r.bubble_fraction, activations=max(r.activation_memory),
                                params=max(r.param_copies)))
    return rows


def format_rows(rows: list[Row]) -> str:
    head = (f"{'schedule':<10} {'pp':>3} {'m':>4} {'source':<10} {'makespan':>9} {'vs 1F1B':>8} "
            f"{'bubble':>7} {'max':>7} {'Table 2':>8} {'idle %':>7} {'activ.':>7} {'params':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.schedule:<10} {r.pp:>3} {r.micro_batches:>4} {r.source:<10} {r.makespan:>9.2f} "
                     f"{r.vs_1f1b:>8.3f} {r.mean_bubble:>7.2f} {r.max_bubble:>7.2f} {r.table2_bubble:>8.2f} "
                     f"{100 * r.bubble_fraction:>6.1f}% {r.activations:>7.1f} {r.params:>5.0f}x")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# F : B : W of one stage of our blocks (--measure-ratios)


def preset_model_config(shape: str):
    """``model:`` of ``conf/<shape>.yaml`` (the ``+conf=<shape>`` preset) as a ModelConfig."""
    import yaml

    from train.config import ModelConfig

    with open(ROOT / "conf" / f"{shape}.yaml") as f:
        return ModelConfig(**yaml.safe_load(f)["model"])


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else NAN


def measure_stage_ratios(shape: str = "small", blocks: int = 2, mb_size: int = 2, seq: int = 1024,
                         repeats: int = 5, threads: int = 1, balance_alpha: float = 1e-4, seed: int = 0) -> dict:
    """Time one middle pipeline stage of ``blocks`` MoE blocks of the preset's shape (fp32, CPU) on one
    micro-batch [mb_size, seq]: its forward (F), its full backward (B, ``runtime.backward_full``), the
    input-gradient-only backward (B_in, ``runtime.backward_input``: torch's stage_backward_input) and the
    weight gradient (W, the closure it returns: stage_backward_weight), as the runtime runs them.
    Medians of ``repeats`` (after one warm-up), seconds; gradients accumulate as in a step."""
    import torch

    from parallel.pipeline.runtime import _Saved, backward_full, backward_input
    from parallel.pipeline.stages import split_model
    from train.model import Transformer

    torch.set_num_threads(threads)
    cfg = preset_model_config(shape)
    cfg = replace(cfg, n_layers=cfg.n_dense_layers + blocks, max_seq_len=max(cfg.max_seq_len, seq))
    torch.manual_seed(seed)
    model = Transformer(cfg)
    model.init_weights(seed=seed)
    model.train()
    stage = split_model(model, 3, [cfg.n_dense_layers, cfg.n_layers])[1]  # the MoE blocks, a middle stage
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(mb_size, seq, cfg.dim, generator=g)
    dy = torch.randn(mb_size, seq, cfg.dim, generator=g) * 1e-3

    def forward() -> tuple[_Saved, list, list]:
        x = x0.detach().requires_grad_(True)
        out = stage.body(x, None, 0.0, balance_alpha)
        saved = _Saved(stage, x, None, out.hidden, out.loss if out.loss.requires_grad else None)
        outputs, grads = [out.hidden], [dy]
        if saved.loss is not None:
            outputs.append(saved.loss)
            grads.append(torch.ones_like(saved.loss))
        return saved, outputs, grads

    times: dict[str, list[float]] = {"F": [], "B": [], "B_in": [], "W": []}
    for rep in range(repeats + 1):
        t0 = time.perf_counter()
        saved, outputs, grads = forward()
        t1 = time.perf_counter()
        backward_full(saved, outputs, grads)
        t2 = time.perf_counter()
        saved, outputs, grads = forward()
        t3 = time.perf_counter()
        _, weight_grad = backward_input(saved, outputs, grads)
        t4 = time.perf_counter()
        weight_grad()
        t5 = time.perf_counter()
        if rep:  # the first round warms up
            for key, dt in (("F", t1 - t0), ("B", t2 - t1), ("F", t3 - t2), ("B_in", t4 - t3), ("W", t5 - t4)):
                times[key].append(dt)
    med = {k: _median(v) for k, v in times.items()}
    active = sum(p.numel() for p in stage.parameters())
    return {"shape": shape, "blocks": blocks, "tokens": [mb_size, seq], "threads": threads, "repeats": repeats,
            "stage_params": active, "seconds": med, "all": times,
            "ratios": {k: med[k] / med["F"] for k in med}}


def format_ratios(r: dict) -> str:
    s, q = r["seconds"], r["ratios"]
    mb, seq = r["tokens"]
    return (f"measured stage: {r['blocks']} MoE blocks of +conf={r['shape']} "
            f"({r['stage_params'] / 1e6:.1f}M parameters, all experts), one micro-batch {mb} x {seq} tokens, fp32 CPU, {r['threads']} thread(s), median of {r['repeats']}\n"
            f"  F {1e3 * s['F']:.0f} ms, B (full) {1e3 * s['B']:.0f} ms, B input-only {1e3 * s['B_in']:.0f} ms, "
            f"W {1e3 * s['W']:.0f} ms\n"
            f"  F : B : W = 1 : {q['B']:.2f} : {q['W']:.2f}   (B input-only {q['B_in']:.2f}; split B_in + W = "
            f"{(s['B_in'] + s['W']) / s['B']:.2f} x full B; F&B = F + B on CPU: no overlap)")


# --------------------------------------------------------------------------------------------------
# (b) + (c): measured steps on gloo processes (--measure)

OURS = list(SCHEDULES)  # 1f1b, zb1p, dualpipe, dualpipev
THEIRS = ["1f1b", "dualpipev"]


@dataclass
class MeasureOptions:
    pps: list[int]
    n_layers: int
    mb_size: int
    seq: int
    per_rank: int  # micro-batches = per_rank x pp (2: valid for every schedule, torch's DualPipeV included)
    warmup: int
    rounds: int
    steps: int  # timed steps per schedule per round
    peer: bool
    seed: int = 0


def bench_model_config(n_layers: int, seq: int):
    """The tiny preset's shape with ``n_layers`` blocks, no MTP (see the module docstring)."""
    return replace(preset_model_config("tiny"), n_layers=n_layers, mtp_depth=0, max_seq_len=max(256, seq))


class _TorchStage:
    """Adapter of our Stage for torch.distributed.pipelining: forward(x) -> a tensor (hidden, or the last
    stage's logits; the loss is torch's loss_fn(logits, targets)). Same modules, same arithmetic as
    Stage.body with mtp_depth=0 (the balance statistics are computed and dropped: alpha = 0)."""

    @staticmethod
    def make(stage):
        from torch import nn

        class Adapter(nn.Module):
            def __init__(self):
                super().__init__()
                self.stage = stage

            def forward(self, x):
                s = self.stage
                if s.is_first:
                    x = s.embed_tokens(x)
                if not s.is_last:
                    return s.body(x).hidden
                seqlen = x.shape[1]
                cos, sin = s.rope_cos[:seqlen], s.rope_sin[:seqlen]
                for layer in s.layers.values():
                    x, _ = layer(x, cos, sin)
                return s.head(s.norm(x))

        return Adapter()


def _measure_rank(rank: int, world: int, opt: MeasureOptions) -> dict:
    import torch
    import torch.distributed as dist

    from parallel.mesh import Layout, build_process_groups
    from parallel.pipeline.runtime import PipelineRuntime
    from parallel.pipeline.stages import rank_module, split_model
    from train.losses import cross_entropy
    from train.model import Transformer

    pp, m = world, opt.per_rank * world
    layout = Layout(world_size=world, rank=rank, pp=pp, ep=1, ranks_per_node=world)
    groups = build_process_groups(layout, "cpu")
    cfg = bench_model_config(opt.n_layers, opt.seq)
    torch.manual_seed(opt.seed)
    model = Transformer(cfg)
    model.init_weights(0.02, seed=opt.seed)
    model.train()
    g = torch.Generator().manual_seed(opt.seed + 1)
    windows = [torch.randint(0, cfg.vocab_size, (opt.mb_size, opt.seq + 1), generator=g) for _ in range(m)]
    batch = torch.cat(windows)

    runners, params, splits = {}, {}, {}
    for name in OURS:
        schedule = make_schedule(name, pp, m)
        stages = split_model(model, schedule.n_stages)
        splits[name] = [s.layer_ids for s in stages]
        mine = {c: stages[s] for c, s in enumerate(schedule.placement[rank])}
        runtime = PipelineRuntime(schedule, mine, groups)
        runners["measured", name] = (lambda rt=runtime: rt.step(windows, 0.0, 0.0).sums[0].item() / m)
        params["measured", name] = dict(rank_module(list(mine.values())).named_parameters())
    if opt.peer:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleDualPipeV

        def loss_fn(logits, targets):
            return cross_entropy(logits, targets)

        for name in THEIRS:
            n_stages = 2 * pp if name == "dualpipev" else pp
            stages = split_model(model, n_stages)  # the same split as ours (split_model's balanced cut)
            ids = [rank, n_stages - 1 - rank] if name == "dualpipev" else [rank]
            pstages = [PipelineStage(_TorchStage.make(stages[i]), i, n_stages, torch.device("cpu"), group=groups.pp)
                       for i in ids]
            if name == "dualpipev":
                sched = ScheduleDualPipeV(pstages, m, loss_fn=loss_fn, scale_grads=True)
            else:
                sched = Schedule1F1B(pstages[0], m, loss_fn=loss_fn, scale_grads=True)
            first, last = 0 in ids, n_stages - 1 in ids

            def step(sched=sched, first=first, last=last):
                losses: list = []
                sched.step(*((batch[:, :-1],) if first else ()), target=batch[:, 1:] if last else None,
                           losses=losses)
                out = torch.tensor([sum(x.item() for x in losses) if last else 0.0], dtype=torch.float64)
                dist.all_reduce(out, group=groups.pp)  # only the last stage's rank has the losses
                return out.item() / m

            runners["torch", name] = step
            params["torch", name] = dict(rank_module([stages[i] for i in ids]).named_parameters())

    def run(key) -> tuple[float, float]:
        model.zero_grad(set_to_none=True)
        dist.barrier(group=groups.pp)
        t0 = time.perf_counter()
        loss = runners[key]()
        dist.barrier(group=groups.pp)
        return time.perf_counter() - t0, loss

    # warm-up (torch's stages infer shapes on their first step); the loss and the gradients of each
    # torch schedule against ours for the same schedule, on the same parameters and micro-batches
    losses, grad_err = {}, {}
    for key in runners:
        for _ in range(opt.warmup):
            _, losses[key] = run(key)
        if key[0] == "torch":
            run(("measured", key[1]))
            ours = {n: p.grad.clone() for n, p in params["measured", key[1]].items() if p.grad is not None}
            run(key)
            worst = 0.0
            for n, p in params[key].items():
                ref = ours.get(n)
                if ref is None or p.grad is None:
                    worst = math.inf if (ref is None) != (p.grad is None) else worst
                    continue
                worst = max(worst, ((p.grad - ref).norm() / ref.norm().clamp_min(1e-30)).item())
            grad_err[key] = worst
    times: dict = {key: [] for key in runners}
    keys = list(runners)
    for r in range(opt.rounds):  # rounds alternate the schedules (rotated start), so drifts hit all of them
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:
            for _ in range(opt.steps):
                times[key].append(run(key)[0])
    return {"times": times, "losses": losses, "grad_err": grad_err, "splits": splits, "m": m}


def measured_rows(opt: MeasureOptions, costs: Costs) -> tuple[list[Row], list[str]]:
    """Per pp: the simulated rows at the same pp and micro-batches, ours measured and torch's; and notes."""
    rows, notes = [], []
    cores = os.cpu_count() or 1
    for pp in opt.pps:
        results = run_ranks(_measure_rank, pp, opt, env={"OMP_NUM_THREADS": "1"}, timeout=1200)
        r0 = results[0]  # timed between barriers: every rank's step is within rank 0's interval
        m = r0["m"]
        sim = {r.schedule: r for r in simulated_rows([pp], [opt.per_rank], costs)}
        rows += sim.values()
        med = {key: _median(ts) for key, ts in r0["times"].items()}
        for source in ("measured", "torch"):
            base = med.get((source, "1f1b"))
            for name in (OURS if source == "measured" else THEIRS):
                if (source, name) not in med:
                    continue
                s = sim[name]
                rows.append(Row(schedule=name, pp=pp, micro_batches=m, source=source, makespan=med[source, name],
                                vs_1f1b=med[source, name] / base if base else NAN, mean_bubble=NAN, max_bubble=NAN,
                                table2_bubble=NAN, bubble_fraction=NAN,
                                activations=s.activations if source == "measured" else NAN,
                                params=s.params if source == "measured" else 1.0))
        n_steps = len(next(iter(r0["times"].values())))
        notes.append(f"pp {pp}: {pp} processes x 1 thread on {cores} cores"
                     + (" (OVERSUBSCRIBED)" if pp > cores else "") + f"; m = {m} micro-batches of "
                     f"{opt.mb_size} x {opt.seq} tokens; median of {n_steps} steps per schedule "
                     f"({opt.rounds} rounds x {opt.steps}, after {opt.warmup} warm-up); layer split "
                     f"1F1B {r0['splits']['1f1b']}, DualPipeV {r0['splits']['dualpipev']}")
        for name in THEIRS:
            if ("torch", name) in med:
                ours, theirs = med["measured", name], med["torch", name]
                lo, lt = r0["losses"]["measured", name], r0["losses"]["torch", name]
                notes.append(f"pp {pp} {name}: ours / torch = {ours:.3f} s / {theirs:.3f} s = {ours / theirs:.2f}x; "
                             f"mean loss ours {lo:.6f} torch {lt:.6f} (rel. diff {abs(lo - lt) / abs(lt):.1e}); "
                             f"max relative gradient difference over the ranks "
                             f"{max(r['grad_err']['torch', name] for r in results):.1e}")
        spread = {key: (min(ts), max(ts)) for key, ts in r0["times"].items()}
        notes.append(f"pp {pp} step-time range (min..max s): " + ", ".join(
            f"{'torch ' if src == 'torch' else ''}{n} {lo:.3f}..{hi:.3f}" for (src, n), (lo, hi) in spread.items()))
    return rows, notes


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--f", type=float, default=1.0, help="forward of one chunk (1/pp of the model)")
    ap.add_argument("--b", type=float, default=2.0, help="full backward (input + weight gradients)")
    ap.add_argument("--w", type=float, default=1.0, help="the weight-gradient part of --b")
    ap.add_argument("--fb", type=float, default=None, help="overlapped forward + full backward (default f+b)")
    ap.add_argument("--comm", type=float, default=0.0, help="latency of one point-to-point transfer")
    ap.add_argument("--pp", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--per-rank", type=int, nargs="+", default=[2, 4], help="micro-batches = K x pp")
    ap.add_argument("--json", default="", help="also write the rows to this file")
    g = ap.add_argument_group("--measure-ratios: F, B, B-input, W of one stage of our blocks (replace --f --b --w)")
    g.add_argument("--measure-ratios", action="store_true")
    g.add_argument("--ratio-shape", default="small", help="conf/<shape>.yaml's model (the +conf= preset)")
    g.add_argument("--ratio-blocks", type=int, default=2, help="MoE blocks in the timed stage")
    g.add_argument("--ratio-tokens", type=int, nargs=2, default=[2, 1024], metavar=("MB", "SEQ"))
    g.add_argument("--ratio-repeats", type=int, default=5)
    g.add_argument("--ratio-threads", type=int, default=1)
    g = ap.add_argument_group("--measure: (b) our runtime's steps and (c) torch.distributed.pipelining, CPU gloo")
    g.add_argument("--measure", action="store_true")
    g.add_argument("--measure-pp", type=int, nargs="+", default=[2, 4])
    g.add_argument("--measure-layers", type=int, default=8, help="blocks of the tiny-shaped model (no MTP)")
    g.add_argument("--measure-tokens", type=int, nargs=2, default=[4, 128], metavar=("MB", "SEQ"))
    g.add_argument("--measure-per-rank", type=int, default=2, help="micro-batches = K x pp (K >= 2 for DualPipeV)")
    g.add_argument("--warmup", type=int, default=2)
    g.add_argument("--rounds", type=int, default=4)
    g.add_argument("--steps", type=int, default=2, help="timed steps per schedule per round")
    g.add_argument("--no-peer", action="store_true", help="skip (c), torch.distributed.pipelining")
    args = ap.parse_args(argv)
    out: dict = {}
    try:
        if args.measure_ratios:
            ratios = measure_stage_ratios(args.ratio_shape, args.ratio_blocks, *args.ratio_tokens,
                                          repeats=args.ratio_repeats, threads=args.ratio_threads)
            print(format_ratios(ratios))
            q = ratios["ratios"]
            costs = Costs(F=1.0, B=q["B"], W=q["W"], FB=None, comm=args.comm)
            out["ratios"] = ratios
        else:
            costs = Costs(F=args.f, B=args.b, W=args.w, FB=args.fb, comm=args.comm)
        rows = simulated_rows(args.pp, args.per_rank, costs)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"(a) simulated, chunk costs F={costs.F:g} B={costs.B:.3g} W={costs.W:.3g} F&B={costs.fb:.3g} "
          f"comm={costs.comm:g} (DualPipeV: halved); bubble = makespan - compute per rank; "
          "activations = peak of the most loaded rank, x one micro-batch through 1/pp of the model")
    print(format_rows(rows))
    if args.measure:
        opt = MeasureOptions(pps=args.measure_pp, n_layers=args.measure_layers, mb_size=args.measure_tokens[0],
                             seq=args.measure_tokens[1], per_rank=args.measure_per_rank, warmup=args.warmup,
                             rounds=args.rounds, steps=args.steps, peer=not args.no_peer)
        print(f"\n(b) measured: PipelineRuntime.step on pp forked gloo processes (OMP_NUM_THREADS=1 each), "
              f"tiny shape with {opt.n_layers} blocks, mtp_depth=0, balance_alpha=0, fp32; "
              f"{platform.node()}, {os.cpu_count()} CPU cores (shared with other jobs: noisy)")
        if not args.no_peer:
            print("(c) torch: the same stages under torch.distributed.pipelining (ScheduleDualPipeV, Schedule1F1B), "
                  "loss_fn = our cross-entropy on the last stage's logits, scale_grads=True")
        print("simulated rows: costs above; measured/torch rows: makespan = median step seconds, vs 1F1B = "
              "against the same source's 1F1B")
        measured, notes = measured_rows(opt, costs)
        print(format_rows(measured))
        for note in notes:
            print("  " + note)
        rows += measured
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"costs": asdict(costs), **out, "rows": [asdict(r) for r in rows]}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
