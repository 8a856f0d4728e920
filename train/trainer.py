"""The training loop, readable top to bottom (report sec 4.2 hyper-parameters, sec 2.1.2 balancing).

One optimizer step: draw micro-batches until the scheduled global batch is reached (gradient
accumulation), back-propagate CE + lambda * MTP + alpha * balance, average gradients over data-parallel
ranks, clip, AdamW (FP32 master, BF16 moments), then update the gate biases once from the expert loads
of the whole step. Metrics go to RUN_DIR/metrics.jsonl, the console and wandb; checkpoints to
RUN_DIR/checkpoints (atomic, DCP).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from data.loader import TokenLoader
from data.prepare import prepare_data
from parallel.mesh import ProcessGroups
from parallel.pipeline.parallelize import check_micro_batches, micro_batch_quantum
from parallel.zero import ZeroAdamW
from train import checkpoint, schedules
from train.balance import update_gate_biases
from train.compile import compile_model
from train.config import Config, config_to_yaml
from train.ema import CpuEma
from train.errors import UserError
from train.guards import LossGuard, TrainingHalted
from train.losses import compute_losses
from train.metrics import MetricsLogger
from train.mfu import model_flops_utilization, peak_tflops
from train.model import Transformer, count_parameters, set_recompute
from train.observe import DeadExpertMonitor, moe_layer_ids, moe_layer_ids_from_names, moe_metrics
from train.plan import check_plan
from train.preempt import StopRequest
from train.profiling import StepProfiler
from train.runtime import (Runtime, all_reduce_max, all_reduce_sum, autocast, available_memory_bytes,
                           choose_device, keep_freed_host_memory, one_weight_cast_per_step, peak_memory_gib,
                           release_process_groups, rng_states, set_rng_states, setup_runtime)
from train.step_stats import (gather_stages, max_violation_over_stages, merged_monitor_state, traffic_totals,
                              verdict_line)



def build_meta_model(cfg: Config) -> Transformer:
    """The model on the meta device: shapes and parameter counts without allocating anything."""
    with torch.device("meta"):
        return Transformer(cfg.model)


def materialize(model: Transformer, cfg: Config, runtime: Runtime) -> Transformer:
    """After the parallelism steps (later: FP8 swap, pipeline split, expert sharding, recompute),
    allocate on the device and initialise the weights (std 0.006), identically on every rank."""
    model.to_empty(device=runtime.device)
    model.init_weights(seed=cfg.train.seed)
    return model


def print_model_summary(model: Transformer, log: MetricsLogger) -> None:
    c = count_parameters(model.cfg)
    built = sum(p.numel() for p in model.parameters())
    assert built == c.total + c.mtp_unique, (built, c)  # the analytic counts describe this model
    log.info(f"model: {c.total / 1e6:,.2f}M parameters, {c.active / 1e6:,.2f}M activated per token, "
             f"MTP {c.mtp / 1e6:,.2f}M ({c.mtp_unique / 1e6:,.2f}M unique)")


def resume_path(cfg: Config, warn: Callable[[str], None] | None = None) -> Path | None:
    """The checkpoint to resume: ``auto``, the newest that passes its integrity check (``checkpoint.verify``;
    a collective once the process group exists; newer bad ones are skipped, reported through ``warn``), or
    the given PATH (checked when it is loaded)."""
    choice = cfg.checkpoint.resume
    if choice == "none":
        return None
    if choice == "auto":
        if warn is None:  # the cheap question before set-up: is there a complete checkpoint at all?
            return checkpoint.latest_checkpoint(cfg.run.dir)
        return checkpoint.latest_good_checkpoint(cfg.run.dir, cfg.checkpoint.verify, warn=warn)
    return Path(choice)


def train(cfg: Config, hooks: TrainHooks | None = None) -> list[dict[str, Any]]:
    """Run (or resume) pretraining as configured; return the metrics of the steps run in this call."""
    log = MetricsLogger(cfg, is_main=int(os.environ.get("RANK", "0")) == 0)
    try:
        return _set_up_and_train(cfg, log, hooks)  # the model and the groups live in its frame only
    finally:
        log.close()
        release_process_groups()


def _set_up_and_train(cfg: Config, log: MetricsLogger, hooks: TrainHooks | None) -> list[dict[str, Any]]:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    model = build_meta_model(cfg)
    set_recompute(model, cfg.memory.recompute)
    print_model_summary(model, log)
    device = choose_device(cfg)
    if device.type == "cpu" and cfg.train.keep_freed_memory:
        keep_freed_host_memory()  # a process-wide malloc setting, made before the model's memory is allocated
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    per_process = available_memory_bytes(device) // (local if device.type == "cpu" else 1)  # CPU RAM is shared
    check_plan(cfg, world_size, per_process, device=device.type, ranks_per_node=cfg.parallel.ranks_per_node or local)
    if cfg.checkpoint.init_from and resume_path(cfg) is None:  # a wrong path fails now, not after set-up
        checkpoint.resolve_checkpoint(cfg.checkpoint.init_from)
    runtime = setup_runtime(cfg, device)
    return _train(cfg, runtime, model, log, hooks)


def _train(cfg: Config, runtime: Runtime, model: Transformer, log: MetricsLogger,
           hooks: TrainHooks | None) -> list[dict[str, Any]]:
    groups = runtime.groups
    layout = groups.layout
    log.info(f"layout: {layout.world_size} processes = dp {layout.dp} (ep {layout.ep} x edp {layout.edp}), "
             f"pp {layout.pp}{f' ({cfg.parallel.schedule})' if layout.pp > 1 else ''}; {layout.ranks_per_node} "
             f"per node; dispatch {cfg.parallel.dispatch}")
    if layout.pp > 1:
        check_micro_batches(cfg, layout.dp)
    run_dir = Path(cfg.run.dir)
    if runtime.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_to_yaml(cfg))

    prepared = prepare_data(cfg.data, vocab_size=cfg.model.vocab_size, seed=cfg.train.seed)
    log.info(f"data: {prepared.n_tokens:,} tokens in {prepared.n_documents:,} documents ({prepared.directory})")
    loader = TokenLoader(prepared.tokens_path, cfg.train.seq_len, cfg.train.micro_batch_size, cfg.train.seed,
                         dp_rank=layout.dp_rank, dp_size=layout.dp)

    quantizer = None
    if cfg.fp8.enabled:  # design order: the FP8 swap, then the pipeline split and the expert sharding
        from fp8.backend import BackendUnavailable
        from fp8.convert import convert_to_fp8
        from fp8.dispatch import Fp8DispatchQuantizer

        try:
            report = convert_to_fp8(model, cfg.fp8.backend, runtime.device, cfg.fp8.expert_weight_cache)
            log.info(f"fp8: {report.summary()}")
        except BackendUnavailable as err:  # a backend this machine cannot run: one line, what to use instead
            raise UserError(f"fp8.backend={cfg.fp8.backend}: {err}") from None
        if cfg.fp8.dispatch:
            quantizer = Fp8DispatchQuantizer(runtime.compute_dtype)
    if layout.ep > 1:
        from parallel.expert import parallelize_experts

        parallelize_experts(model, groups, cfg.parallel.dispatch, quantizer)
    pipeline = None
    if layout.pp > 1:  # this rank materializes only its stages
        from parallel.pipeline.parallelize import PipelinePart

        pipeline = PipelinePart(cfg, model, groups, runtime.device, lambda: autocast(runtime), runtime.compute_dtype)
        module, moe_layers = pipeline.module, pipeline.moe_layers()
        optimizer = ZeroAdamW(module, groups, cfg.optim, copies=pipeline.copies(), working_dtype=runtime.param_dtype)
    else:
        module = materialize(model, cfg, runtime)
        moe_layers = module.moe_layers()
        optimizer = ZeroAdamW(module, groups, cfg.optim, working_dtype=runtime.param_dtype)
    if runtime.param_dtype != torch.float32:
        log.info(f"weights: {str(runtime.param_dtype).removeprefix('torch.')} working copies, FP32 masters in ZeRO-1 "
                 "and FP32 gradients; norms and gates FP32 (train.param_dtype, docs/memory.md)")
    if cfg.train.compile:  # last: after the FP8 swap, the pipeline split and the expert sharding
        log.info(compile_model(module, cfg.memory.recompute))
    traffic = [m.traffic for m in module.modules() if hasattr(m, "traffic")]  # bytes of the expert all-to-alls
    state = TrainState(guard=LossGuard(cfg.train), dead_experts=DeadExpertMonitor(cfg.logging.dead_expert_window))
    start = resume_path(cfg, warn=lambda line: log.info(f"warning: {line}"))
    if start is not None:  # resume=auto verified it already
        restore(start, state, module, optimizer, loader, groups, cfg,
                verify="none" if cfg.checkpoint.resume == "auto" else cfg.checkpoint.verify)
        log.info(f"resumed from {start} at step {state.step:,} ({state.tokens:,} tokens)")
    elif cfg.checkpoint.init_from:  # a new stage from trained weights (sec 4.3): step 0, fresh optimizer
        origin = checkpoint.load_model_weights(cfg.checkpoint.init_from, weights_state(module, groups, optimizer),
                                               cfg.model, verify=cfg.checkpoint.verify)
        optimizer.params_from_masters()  # BF16 working weights from the FP32 masters just loaded
        changed = {k: (origin["model"].get(k), getattr(cfg.model, k)) for k in sorted(checkpoint.CONTEXT_FIELDS)
                   if origin["model"].get(k) != getattr(cfg.model, k)}
        log.info(f"initialised from {origin['path']} (step {origin['step']:,}); new run at step 0"
                 + (f"; context changed: {', '.join(f'{k} {a} -> {b}' for k, (a, b) in changed.items())}"
                    if changed else ""))
    ema = None
    if cfg.memory.ema:
        ema = CpuEma(module, cfg.memory.ema_decay)  # starts from the (resumed) parameters
        if start is not None:
            if not load_ema(start, ema, module, groups):
                log.info(f"memory.ema: {start} holds no EMA; it starts from the resumed parameters")
    log.start(first_step=state.step)

    writer = checkpoint.CheckpointWriter(cfg.run.dir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)

    def save() -> Path:
        """Checkpoint the current state (with checkpoint.async_save the files are written in the background;
        the directory appears under its final name only once complete)."""
        if ema is not None:
            ema.wait()
        path = writer.save(
            state.step, state.tokens, weights_state(module, groups, optimizer), optimizer.state_dict(), cfg.model,
            trainer_state={"loader": loader.state_dict(), "rng": rng_states(), "guard": state.guard.state_dict(),
                           "dead_experts": merged_monitor_state(state.dead_experts, groups),
                           "config": dataclasses.asdict(cfg)},
            ema_state=checkpoint.model_state(module, groups, tensors=ema.state()) if ema is not None else None,
            config=dataclasses.asdict(cfg),
        )
        state.last_saved = state.step
        return path

    def roll_back() -> bool:
        """After a spike with train.on_spike=rollback: reload the newest good checkpoint and remember to draw
        past the spiking batch; False if there is none (the update was skipped instead)."""
        spiked = state.step
        writer.wait()
        target = checkpoint.latest_good_checkpoint(cfg.run.dir, cfg.checkpoint.verify,
                                                   warn=lambda line: log.info(f"warning: {line}"))
        if target is None:
            log.info(f"step {spiked}: no checkpoint to roll back to; the update was skipped instead")
            return False
        if state.rollback_targets.get(target.name, 0) >= cfg.train.max_bad_steps:
            path = save()
            raise TrainingHalted(
                f"training stopped at step {spiked}: the loss spiked again after {cfg.train.max_bad_steps} "
                f"rollbacks to {target}; state saved in {path}; lower optim.lr, raise train.spike_zscore or use "
                "train.on_spike=log, then resume")
        state.rollback_targets[target.name] = state.rollback_targets.get(target.name, 0) + 1
        restore(target, state, module, optimizer, loader, groups, cfg, verify="none", keep_skips=True)
        state.guard.skip_batches.append(spiked)
        state.rollbacks += 1
        if ema is not None:
            load_ema(target, ema, module, groups)
        log.rewind(state.step)
        log.info(f"rolled back to {target} (step {state.step:,}); the batch of step {spiked} will be skipped")
        return True

    peak = peak_tflops(runtime.device, cfg.logging.peak_tflops)  # None: MFU not reported (docs/operations.md)
    per_micro = cfg.train.micro_batch_size * layout.dp  # sequences in one micro-batch of every dp rank
    quantum = micro_batch_quantum(cfg, layout.dp)  # the batch ramp rounds the global batch to a multiple
    state.last_saved = state.step
    history: list[dict[str, Any]] = []
    hooks = hooks or TrainHooks()
    profiler = StepProfiler(cfg.logging.profile_steps, cfg.run.dir, runtime.rank, runtime.device,
                            cfg.logging.profile_ranks, cfg.logging.profile_memory)
    try:
        with StopRequest() as stop:
            while not _finished(cfg, state.step, state.tokens):
                profiler.before_step(state.step + 1)
                t0 = time.perf_counter()
                lr = schedules.learning_rate(state.step, state.tokens, cfg.optim)
                batch = schedules.batch_size(state.tokens, cfg.train, quantum)
                lam = schedules.mtp_weight(state.tokens, cfg.train)
                gamma = schedules.bias_update_speed(state.tokens, cfg.train)
                n_micro = batch // per_micro

                for counter in traffic:
                    counter.reset()
                module.train()
                if state.step + 1 in state.guard.skip_batches:  # this step's batch spiked before the rollback
                    for _ in range(n_micro):
                        loader.next_windows()
                    log.info(f"step {state.step + 1}: drew past the batch that spiked before the rollback")
                t_data = time.perf_counter()
                windows = [w.to(runtime.device, non_blocking=True) for w in loader.next_batches(n_micro)]
                data_wait = time.perf_counter() - t_data
                if hooks.before_step is not None:
                    hooks.before_step(state.step + 1, module)
                if pipeline is not None:
                    result = pipeline.runtime(len(windows)).step(windows, lam, cfg.train.balance_alpha)
                    sums, load = result.sums.to(runtime.device), result.expert_load.to(runtime.device).float()
                    layer_ids = moe_layer_ids_from_names(result.moe_names, cfg.model.n_layers)
                else:
                    # hooks that read .grad after backward need the gradients there: no overlap for them
                    overlap = cfg.parallel.grad_overlap and hooks.after_backward is None
                    sums, load = forward_backward(module, windows, lam, cfg.train.balance_alpha, runtime,
                                                  optimizer.overlap_next_backward if overlap else None)
                    layer_ids = moe_layer_ids(module, cfg.model.n_layers)
                if hooks.after_backward is not None:
                    hooks.after_backward(state.step + 1, module)
                all_reduce_sum(sums, load, group=groups.dp)  # losses and expert loads of the whole global batch
                means = (sums / (n_micro * layout.dp)).tolist()

                # judged before the update; ZeRO-1 then reduce-scatters, clips by the global norm, steps AdamW on
                # this rank's shards and all-gathers (or drops everything: a skip or a non-finite gradient norm)
                verdict = state.guard.judge_loss(means[0])
                grad_norm = optimizer.step(lr, cfg.optim.grad_clip, skip=verdict.skip)
                verdict = state.guard.after_step(verdict, means[0], grad_norm)
                ema_wait = 0.0
                if not verdict.skip:
                    update_gate_biases(moe_layers, load, gamma)
                    if ema is not None:  # waits only for the previous step's blend, then blends in the background
                        t_ema = time.perf_counter()
                        ema.update()
                        ema_wait = time.perf_counter() - t_ema

                state.step += 1
                state.tokens += batch * cfg.train.seq_len
                vio_mean, vio_worst = max_violation_over_stages(load, groups)
                memory = all_reduce_max(peak_memory_gib(runtime.device), runtime.device)
                elapsed = time.perf_counter() - t0
                record = {
                    "step": state.step, "tokens": state.tokens, "loss": means[0], "lm_loss": means[1],
                    "mtp_loss": means[2], "balance_loss": means[3], "lr": lr, "grad_norm": grad_norm,
                    "tokens_per_s": batch * cfg.train.seq_len / elapsed, "max_vio": vio_mean,
                    "max_vio_worst": vio_worst, "batch_size": batch, "mtp_weight": lam,
                    "bias_update_speed": gamma, "step_time_s": elapsed, "loss_zscore": verdict.zscore,
                    "skipped": verdict.reason if verdict.skip else "", "nonfinite_steps": state.guard.nonfinite_steps,
                    "spikes": state.guard.spikes, "rollbacks": state.rollbacks, "memory_gib": memory,
                    "data_wait_s": data_wait,
                }
                if peak is not None:
                    record["mfu"] = model_flops_utilization(cfg.model, cfg.train.seq_len, record["tokens_per_s"],
                                                            peak, layout.world_size)
                if profiler.profiling(state.step):
                    record["profiled"] = True  # slower by the profiler's own cost
                if ema is not None:
                    record["ema_update_s"] = ema_wait  # time the step spent on the EMA (the blend runs behind it)
                if traffic:
                    record.update(traffic_totals(traffic, groups))
                warnings_ = state.dead_experts.update(load, layer_ids)
                per_layer = moe_metrics(state.step, load, layer_ids, moe_layers, cfg.logging.expert_load_every,
                                        state.dead_experts)
                per_layer, warnings_ = gather_stages((per_layer, warnings_), groups)
                record.update(per_layer)
                for line in warnings_:
                    log.info(f"warning: {line}")
                history.append(record)
                log.step(record)
                for path in profiler.after_step(state.step):
                    if path.suffix == ".txt" and runtime.is_main:
                        log.info(f"profile of steps {path.parent.name.removeprefix('steps_')}: {path.parent}")
                if verdict.reason:
                    log.info(verdict_line(verdict, record, cfg))

                if verdict.rollback and roll_back():
                    history = [r for r in history if r["step"] <= state.step]
                    continue
                if state.guard.must_halt():
                    path = save()
                    raise TrainingHalted(
                        f"training stopped at step {state.step}: {state.guard.bad_in_a_row} updates in a row were "
                        f"skipped for a non-finite loss or gradient or a loss spike (train.max_bad_steps="
                        f"{cfg.train.max_bad_steps}); the last good "
                        f"parameters are saved in {path}; lower optim.lr or check the data, then resume")
                if (cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0) or _finished(cfg, state.step,
                                                                                                  state.tokens):
                    save()
                if cfg.logging.plot_every and state.step % cfg.logging.plot_every == 0 and runtime.is_main:
                    _refresh_plots(cfg, state.step, log)
                if stop.agreed():
                    if state.last_saved != state.step:
                        save()
                    path = writer.wait() or checkpoint.latest_checkpoint(cfg.run.dir)  # published before exit
                    log.info(f"stopped by {stop.signal_name} after step {state.step:,}; checkpoint {path}; "
                             "run the same command to resume")
                    break
    finally:
        profiler.close()  # a window the loop ended inside (train.steps reached, a stop, an error)
        writer.close()  # waits for (and publishes) a checkpoint still being written in the background
    if ema is not None:
        ema.close()
    if not history and _finished(cfg, state.step, state.tokens):
        log.info(f"nothing to do: the run is already at step {state.step:,} (train.steps={cfg.train.steps}); "
                 "raise train.steps or use another run.dir")
    return history


@dataclass
class TrainState:
    """The loop's counters; with the loader, the RNG and the guard they make a checkpoint's trainer state."""

    guard: LossGuard
    step: int = 0
    tokens: int = 0
    last_saved: int = 0
    rollbacks: int = 0
    rollback_targets: dict[str, int] = dataclasses.field(default_factory=dict)  # checkpoint name -> rollbacks to it
    dead_experts: DeadExpertMonitor = dataclasses.field(default_factory=lambda: DeadExpertMonitor(0))


@dataclass
class TrainHooks:
    """Optional callbacks into the loop (inspection, fault injection in tests): called with the number of the
    step being run (1-based) and the rank's module (the pipeline part with pp > 1)."""

    before_step: Callable[[int, torch.nn.Module], None] | None = None  # before the forward passes
    after_backward: Callable[[int, torch.nn.Module], None] | None = None  # gradients complete, before the update


def restore(path: Path, state: TrainState, module: torch.nn.Module, optimizer: ZeroAdamW, loader: TokenLoader,
            groups: ProcessGroups, cfg: Config, verify: str, keep_skips: bool = False) -> None:
    """Load a checkpoint into the live model, optimizer, loader, RNG and guard (resume, or a rollback), after
    checking its files at level ``verify``."""
    optim_state = optimizer.state_dict()
    saved = checkpoint.load_checkpoint(path, weights_state(module, groups, optimizer), optim_state, cfg.model,
                                       verify=verify)
    optimizer.load_state_dict(optim_state)
    optimizer.params_from_masters()  # BF16 working weights from the FP32 masters just loaded
    state.step, state.tokens, state.last_saved = saved["step"], saved["tokens"], saved["step"]
    loader.load_state_dict(saved["loader"])
    set_rng_states(saved["rng"])
    skips = state.guard.skip_batches
    state.guard.load_state_dict(saved.get("guard", {}))
    state.dead_experts.load_state_dict(saved.get("dead_experts", {}))
    if keep_skips:
        state.guard.skip_batches = sorted(set(state.guard.skip_batches) | set(skips))


def weights_state(module: torch.nn.Module, groups: ProcessGroups, optimizer: ZeroAdamW) -> dict[str, Any]:
    """The model's section of a checkpoint: its tensors, the FP32 masters in place of BF16 working weights."""
    return checkpoint.model_state(module, groups, masters=optimizer.master_tensors())


def load_ema(path: Path, ema: CpuEma, module: torch.nn.Module, groups: ProcessGroups) -> bool:
    """The parameter EMA of checkpoint ``path`` into ``ema`` (resume, rollback); False if it holds none."""
    if not checkpoint.has_ema(path):
        return False
    ema.wait()  # a blend still running in the background would overwrite what is loaded
    checkpoint.load_ema(path, checkpoint.model_state(module, groups, tensors=ema.state()), verify="none")
    return True


def _refresh_plots(cfg: Config, step: int, log: MetricsLogger) -> None:
    """Rewrite RUN_DIR/plots (and send them to wandb); a plotting failure is reported, never fatal."""
    from train.plots import write_plots

    try:
        log.log_plots(write_plots(cfg.run.dir), step)
    except (OSError, ValueError, RuntimeError) as err:
        log.info(f"warning: could not refresh the plots in {cfg.run.dir}/plots ({err}); training goes on")


def forward_backward(model: Transformer, windows: list[torch.Tensor], mtp_weight: float, balance_alpha: float,
                     runtime: Runtime, before_last_backward: Callable[[], None] | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient accumulation over the micro-batches without a pipeline: summed [loss, lm, mtp, balance]
    and the expert loads [n_moe_layers, E] of this rank's share of the batch. ``before_last_backward``:
    called before the backward that completes the gradients (ZeroAdamW.overlap_next_backward)."""
    sums = torch.zeros(4, device=runtime.device, dtype=torch.float64)
    load = torch.zeros(len(model.moe_layers()), model.cfg.n_routed_experts, device=runtime.device)
    with one_weight_cast_per_step(lambda: autocast(runtime), runtime.device.type):
        for window in windows:
            with autocast(runtime):
                out = model(window[:, :-1], window)  # each head's cross-entropy right after it
            losses = compute_losses(out, window, mtp_weight, balance_alpha)
            if before_last_backward is not None and window is windows[-1]:
                before_last_backward()
            (losses.loss / len(windows)).backward()
            sums += torch.stack([losses.loss, losses.lm_loss, losses.mtp_loss, losses.balance_loss]).detach().double()
            load += out.expert_load.float()
    return sums, load


def _finished(cfg: Config, step: int, tokens: int) -> bool:
    if cfg.train.steps > 0:
        return step >= cfg.train.steps
    return tokens >= cfg.train.total_tokens


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
