"""The training loop, readable top to bottom (report sec 4.2 hyper-parameters, sec 2.1.2 balancing).

One optimizer step: draw micro-batches until the scheduled global batch is reached (gradient
accumulation), back-propagate CE + lambda * MTP + alpha * balance, average gradients over data-parallel
ranks, clip, AdamW (FP32 master, BF16 moments), then update the gate biases once from the expert loads
of the whole step. Metrics go to RUN_DIR/metrics.jsonl, the console and wandb; checkpoints to
RUN_DIR/checkpoints (atomic, DCP).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from data.loader import TokenLoader
from data.prepare import prepare_data
from parallel.data_parallel import all_reduce_gradients, all_reduce_sum
from train import checkpoint, schedules
from train.balance import max_violation, update_gate_biases
from train.config import Config, config_to_yaml, pipeline_and_experts_supported
from train.errors import UserError
from train.losses import compute_losses
from train.metrics import MetricsLogger
from train.model import Transformer, count_parameters
from train.optim import build_optimizer

BYTES_PER_PARAM = 4 + 4 + 2 + 2  # fp32 weight (master), fp32 gradient, bf16 first and second moments


@dataclass
class Runtime:
    """Where this process runs: its rank among the data-parallel processes and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    compute_dtype: torch.dtype  # autocast dtype (float32 = no autocast)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_runtime(cfg: Config) -> Runtime:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK; NCCL on GPUs, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want = cfg.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but CUDA is not available; use train.device=cpu or auto")
    use_cuda = want == "cuda" or (want == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(cfg.train.dtype)
    if dtype is None:  # auto: bf16 autocast on GPUs (FP32 master weights stay in the optimizer), fp32 on CPU
        dtype = torch.bfloat16 if use_cuda else torch.float32
    return Runtime(rank, world_size, local_rank, device, dtype)


def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(cfg: Config, runtime: Runtime) -> None:
    """Refuse, before allocating anything, a model whose weights and optimizer state cannot fit here."""
    counts = count_parameters(cfg.model)
    params = counts.total + counts.mtp_unique
    need = params * BYTES_PER_PARAM
    have = available_memory_bytes(runtime.device)
    if need > 0.8 * have:
        where = "GPU" if runtime.device.type == "cuda" else "machine"
        gpus = -(-need // (60 * 2**30))  # GPUs of 80 GB leaving ~20 GB for activations, before ZeRO-1
        raise UserError(
            f"model too large for this {where}: {params / 1e9:.1f}B parameters need {need / 2**30:,.0f} GiB for "
            f"weights, gradients and AdamW state ({BYTES_PER_PARAM} B/param) but {have / 2**30:,.0f} GiB are "
            f"available. It needs at least {gpus:,} GPUs of 80 GB with pipeline and expert parallelism (the report "
            f"trains 671B on 2048 H800 with parallel.pp=16 parallel.ep=64 and ZeRO-1; see docs/configs.md); "
            f"on this machine use +conf=tiny or +conf=small")


def build_meta_model(cfg: Config) -> Transformer:
    """The model on the meta device: shapes and parameter counts without allocating anything."""
    with torch.device("meta"):
        return Transformer(cfg.model)


def materialize(model: Transformer, cfg: Config, runtime: Runtime) -> Transformer:
    """After the parallelism steps (later: FP8 swap, pipeline split, expert sharding, recompute),
    allocate on the device and initialise the weights (std 0.006), identically on every rank."""
    model.to_empty(device=runtime.device)
    torch.manual_seed(cfg.train.seed)
    model.init_weights()
    return model


def print_model_summary(model: Transformer, log: MetricsLogger) -> None:
    c = count_parameters(model.cfg)
    built = sum(p.numel() for p in model.parameters())
    assert built == c.total + c.mtp_unique, (built, c)  # the analytic counts describe this model
    log.info(f"model: {c.total / 1e6:,.2f}M parameters, {c.active / 1e6:,.2f}M activated per token, "
             f"MTP {c.mtp / 1e6:,.2f}M ({c.mtp_unique / 1e6:,.2f}M unique)")


def resume_path(cfg: Config) -> Path | None:
    choice = cfg.checkpoint.resume
    if choice == "none":
        return None
    if choice == "auto":
        return checkpoint.latest_checkpoint(cfg.run.dir)
    return Path(choice)


def autocast(runtime: Runtime) -> contextlib.AbstractContextManager:
    if runtime.compute_dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=runtime.device.type, dtype=runtime.compute_dtype)


def train(cfg: Config) -> list[dict[str, Any]]:
    """Run (or resume) pretraining as configured; return the metrics of the steps run in this call."""
    runtime = setup_runtime(cfg)
    log = MetricsLogger(cfg, is_main=runtime.is_main)
    try:
        return _train(cfg, runtime, log)
    finally:
        log.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: Config, runtime: Runtime, log: MetricsLogger) -> list[dict[str, Any]]:
    model = build_meta_model(cfg)
    print_model_summary(model, log)
    check_fits(cfg, runtime)
    pipeline_and_experts_supported(cfg)
    run_dir = Path(cfg.run.dir)
    if runtime.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_to_yaml(cfg))

    prepared = prepare_data(cfg.data, vocab_size=cfg.model.vocab_size, seed=cfg.train.seed)
    log.info(f"data: {prepared.n_tokens:,} tokens in {prepared.n_documents:,} documents ({prepared.directory})")
    loader = TokenLoader(prepared.tokens_path, cfg.train.seq_len, cfg.train.micro_batch_size, cfg.train.seed,
                         dp_rank=runtime.rank, dp_size=runtime.world_size)

    model = materialize(model, cfg, runtime)
    optimizer = build_optimizer(model, cfg.optim)
    moe_layers = model.moe_layers()
    step, tokens = 0, 0
    start = resume_path(cfg)
    if start is not None:
        trainer_state, rank_state = checkpoint.load_checkpoint(start, model, optimizer, cfg.model)
        step, tokens = trainer_state["step"], trainer_state["tokens"]
        loader.load_state_dict(rank_state["loader"])
        set_rng_states(rank_state["rng"])
        log.info(f"resumed from {start} at step {step:,} ({tokens:,} tokens)")
    log.start(first_step=step)

    quantum = cfg.train.micro_batch_size * runtime.world_size
    last_saved = step
    history: list[dict[str, Any]] = []
    while not _finished(cfg, step, tokens):
        t0 = time.perf_counter()
        lr = schedules.learning_rate(step, tokens, cfg.optim)
        batch = schedules.batch_size(tokens, cfg.train, quantum)
        lam = schedules.mtp_weight(tokens, cfg.train)
        gamma = schedules.bias_update_speed(tokens, cfg.train)
        n_micro = batch // quantum

        sums = torch.zeros(4, device=runtime.device, dtype=torch.float64)  # loss, lm, mtp, balance
        load = torch.zeros(len(moe_layers), cfg.model.n_routed_experts, device=runtime.device)
        model.train()
        for _ in range(n_micro):
            window = loader.next_batch().to(runtime.device, non_blocking=True)
            with autocast(runtime):
                out = model(window[:, :-1])
            losses = compute_losses(out, window, lam, cfg.train.balance_alpha)
            (losses.loss / n_micro).backward()
            sums += torch.stack([losses.loss, losses.lm_loss, losses.mtp_loss, losses.balance_loss]).detach().double()
            load += out.expert_load.float()

        if runtime.world_size > 1:
            all_reduce_gradients(model)
            all_reduce_sum(sums, load)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float("inf"))
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_gate_biases(moe_layers, load, gamma)

        step += 1
        tokens += batch * cfg.train.seq_len
        means = (sums / (n_micro * runtime.world_size)).tolist()
        vio = max_violation(load) if len(moe_layers) else torch.zeros(1)
        elapsed = time.perf_counter() - t0
        record = {
            "step": step, "tokens": tokens, "loss": means[0], "lm_loss": means[1], "mtp_loss": means[2],
            "balance_loss": means[3], "lr": lr, "grad_norm": grad_norm.item(),
            "tokens_per_s": batch * cfg.train.seq_len / elapsed, "max_vio": vio.mean().item(),
            "max_vio_worst": vio.max().item(), "batch_size": batch, "mtp_weight": lam,
            "bias_update_speed": gamma, "step_time_s": elapsed,
        }
        history.append(record)
        log.step(record)

        if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or _finished(cfg, step, tokens):
            _save(cfg, runtime, model, optimizer, loader, step, tokens)
            last_saved = step
    if step == last_saved and not history:
        log.info(f"nothing to do: the run is already at step {step:,} (train.steps={cfg.train.steps}); "
                 "raise train.steps or use another run.dir")
    return history


def _finished(cfg: Config, step: int, tokens: int) -> bool:
    if cfg.train.steps > 0:
        return step >= cfg.train.steps
    return tokens >= cfg.train.total_tokens


def _save(cfg: Config, runtime: Runtime, model, optimizer, loader, step: int, tokens: int) -> None:
    checkpoint.save_checkpoint(
        cfg.run.dir, step, tokens, model, optimizer, cfg.model,
        trainer_state={"config": dataclasses.asdict(cfg)},
        per_rank_state={"loader": loader.state_dict(), "rng": rng_states()},
        keep=cfg.checkpoint.keep,
    )


def rng_states() -> dict[str, Any]:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
