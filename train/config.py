"""Configuration schema: typed dataclasses with the defaults and the validation.

YAML files in ``conf/`` only hold values; a preset is chosen with ``+conf=NAME`` and any field is
overridden with ``section.field=value``. A wrong value fails at start-up with the field's dotted
name and the fix (``ConfigError``). Numbers of the report are in ``conf/671b.yaml``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from train.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = REPO_ROOT / "conf"


class ConfigError(UserError, ValueError):
    """A configuration value is wrong; the message names the field and the fix."""


@dataclass
class ModelConfig:
    """DeepSeek-V3 architecture (report sec 2; spec.md, Model). Defaults: a toy shape."""

    vocab_size: int = 4096  # embedding rows / head outputs (>= the tokenizer's vocab)
    dim: int = 128  # hidden size d
    inter_dim: int = 384  # dense FFN hidden size (first n_dense_layers blocks)
    moe_inter_dim: int = 64  # hidden size of each routed / shared expert
    n_layers: int = 3  # transformer blocks of the main model
    n_dense_layers: int = 1  # the first blocks use a dense FFN instead of MoE
    n_heads: int = 4  # attention heads n_h
    q_lora_rank: int = 0  # 0 = no query compression (V2-Lite style)
    kv_lora_rank: int = 64  # KV compression rank d_c
    qk_nope_head_dim: int = 32  # per-head non-rotary query/key dim d_h
    qk_rope_head_dim: int = 16  # per-head decoupled rotary dim d_h^R (one shared rotary key)
    v_head_dim: int = 32  # per-head value dim
    n_routed_experts: int = 8  # N_r fine-grained routed experts per MoE layer
    n_shared_experts: int = 1  # N_s always-on experts
    n_activated_experts: int = 2  # K_r routed experts per token
    n_expert_groups: int = 1  # groups of experts (one per node in the report)
    topk_groups: int = 1  # groups a token may use (node limit M)
    route_scale: float = 1.0  # routed gate weights are multiplied by this after normalisation
    mtp_depth: int = 1  # D, number of sequential MTP modules (0 = none)
    max_seq_len: int = 4096  # longest sequence the rotary tables cover
    rope_theta: float = 10000.0  # rotary base
    rope_factor: float = 1.0  # YaRN scale s (sec 4.3); 1 = no extension
    original_seq_len: int = 4096  # pretraining context that YaRN extends
    beta_fast: float = 32.0  # YaRN beta (high-frequency boundary)
    beta_slow: float = 1.0  # YaRN alpha (low-frequency boundary)
    mscale: float = 1.0  # YaRN: cos/sin scaled by mscale(s, mscale) / mscale(s, mscale_all_dim)
    mscale_all_dim: float = 1.0  # YaRN: softmax scale times mscale(s, mscale_all_dim)^2
    norm_eps: float = 1e-6  # RMSNorm epsilon
    init_std: float = 0.006  # normal init of every matrix (report: 0.006)
    expert_impl: str = "auto"  # auto | loop | loop_padded (auto: half precision on a CPU) | grouped_mm (auto: BF16 on CUDA)


@dataclass
class DataConfig:
    """Corpus, tokenizer, FIM and loader (report sec 4.1)."""

    source: str = "stdlib"  # "stdlib" = Python standard library sources, or a path / glob / datasets dir
    text_field: str = "text"  # field of jsonl / parquet / datasets records
    tokenizer: str = ""  # path to a tokenizer.json; "" = train byte-level BPE on the corpus
    tokenizer_train_bytes: int = 32_000_000  # at most this much text trains the BPE
    fim_rate: float = 0.1
    max_bytes: int = 0  # use at most this many bytes of the corpus (0 = all)
    cache_dir: str = "~/.cache/dsv3"
    workers: int = 0  # tokenizer processes for preparation (0 = all cores)


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule (report sec 3.3.3, 4.2)."""

    lr: float = 2.2e-4  # peak
    warmup_steps: int = 2000
    lr_hold_tokens: float = 10.0e12  # constant peak LR until this many tokens
    lr_decay_tokens: float = 4.3e12  # then cosine decay to lr_min over this many tokens
    lr_min: float = 2.2e-5
    lr_tail_tokens: list[float] = field(default_factory=lambda: [333.0e9, 167.0e9])  # then constants
    lr_tail_values: list[float] = field(default_factory=lambda: [2.2e-5, 7.3e-6])
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.1  # on matrices; not on norms, biases or gate biases
    grad_clip: float = 1.0  # global gradient-norm clipping (0 = off)
    moment_dtype: str = "bfloat16"  # AdamW first and second moments
    update: str = "auto"  # AdamW kernel: fused (torch's), triton (one pass, CUDA), foreach (the reference), auto


@dataclass
class TrainConfig:
    """Steps, batch ramp and the loss-weight schedules (report sec 2.1.2, 2.2, 4.2)."""

    steps: int = 100  # optimizer steps to run in this launch (counting from step 0 of the run)
    seed: int = 0
    seq_len: int = 4096
    micro_batch_size: int = 1  # sequences per forward pass per data-parallel rank
    batch_size: int = 15360  # global sequences per optimizer step after the ramp
    batch_size_start: int = 3072  # global sequences per step at token 0
    batch_ramp_tokens: float = 469.0e9  # tokens over which the batch grows linearly
    total_tokens: float = 14.8e12  # the run's token budget: with train.steps=0 training stops here
    mtp_weight: float = 0.3  # lambda
    mtp_weight_late: float = 0.1  # lambda after mtp_weight_switch_tokens
    mtp_weight_switch_tokens: float = 10.0e12
    bias_update_speed: float = 0.001  # gamma
    bias_update_stop_tokens: float = 14.3e12  # gamma = 0 afterwards
    balance_alpha: float = 0.0001  # alpha of the sequence-wise balance loss
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | float32 | bfloat16
    # the weights the model computes with: auto (bfloat16 under bf16 autocast: BF16 working weights, the FP32
    # masters sharded in ZeRO-1, report sec 3.3) | float32 (the parameters are the masters) | bfloat16
    param_dtype: str = "auto"
    device: str = "auto"  # auto | cpu | cuda
    # on the CPU, glibc's malloc keeps freed memory for reuse (no page faults for each step's activations; ~5%)
    keep_freed_memory: bool = True
    compile: bool = False  # torch.compile the attention and dense/shared MLPs (train/compile.py); FP8 GEMMs stay eager
    max_bad_steps: int = 5  # stop (with a checkpoint of the last good state) after K non-finite steps in a row
    on_spike: str = "log"  # a loss spike: log | skip (skip the update) | rollback (to the last checkpoint, skip the batch)
    spike_window: int = 50  # steps of loss history the spike z-score is measured against
    spike_zscore: float = 6.0  # a loss more than this many standard deviations above the window's mean is a spike


@dataclass
class CheckpointConfig:
    every: int = 0  # save every N optimizer steps (0 = only at the end)
    keep: int = 3  # keep the newest K complete checkpoints
    resume: str = "auto"  # auto (newest complete one in run.dir) | none | PATH
    init_from: str = ""  # new run from the model weights of PATH (checkpoint or run dir): step 0, fresh optimizer
    async_save: bool = False  # write checkpoints in the background while training goes on (also: checkpoint.async)
    verify: str = "full"  # check a checkpoint's manifest on load: full (sizes and checksums) | size | none


@dataclass
class LoggingConfig:
    wandb: str = "disabled"  # disabled | offline | online
    project: str = "dsv3"  # wandb project
    every: int = 1  # console line every N steps
    plot_every: int = 0  # refresh the PNG plots in RUN_DIR/plots every N steps (0: only by launch/report.py)
    expert_load_every: int = 10  # log the full layers x experts load matrix every N steps (for the heatmap)
    dead_expert_window: int = 100  # warn about an expert that received no token for N steps in a row
    peak_tflops: float = 0.0  # dense BF16 peak per device for the MFU metric (0: known GPUs looked up, else no MFU)
    # torch.profiler over these optimizer steps ([5,6]: one window), trace and table in RUN_DIR/profile (train/profiling.py)
    profile_steps: list[int] = field(default_factory=list)
    profile_ranks: list[int] = field(default_factory=list)  # the ranks that profile ([]: all)
    profile_memory: bool = False  # the profiler also records allocations and input shapes (slower, larger traces)


@dataclass
class ParallelConfig:
    pp: int = 1  # pipeline ranks (stages: pp, or 2*pp for dualpipev)
    ep: int = 1  # expert-parallel ranks: the routed experts are split over ep consecutive processes
    schedule: str = "dualpipe"  # pipeline schedule: 1f1b | zb1p | dualpipe | dualpipev
    ranks_per_node: int = 0  # processes per node for the layout (0 = LOCAL_WORLD_SIZE); emulate nodes on one machine
    dispatch: str = "flat"  # expert-parallel all-to-all: flat (one hop) | hierarchical (across nodes, then inside)
    micro_batches: int = 0  # micro-batches per step at train.batch_size; sets train.micro_batch_size (0: keep it)
    stage_boundaries: list[int] = field(default_factory=list)  # first layer of each stage after the first ([]: the planner's)
    overlap: bool = True  # pipeline F&B chunks overlap one micro-batch's all-to-all with another's compute (ep > 1)
    grad_overlap: bool = True  # dp > 1, no pipeline: ZeRO-1 reduce-scatters start during the last backward


@dataclass
class FP8Config:
    enabled: bool = False  # FP8 GEMMs for attention projections, dense FFNs and experts (report sec 3.3; docs/fp8.md)
    backend: str = "auto"  # auto | emulate | reference | triton | torch | te (auto: triton on CUDA, else emulate)
    dispatch: bool = True  # with fp8.enabled and ep > 1: FP8 activations in the expert dispatch (combine stays BF16)
    expert_weight_cache: bool = True  # routed experts' FP8 weight blocks made once per step (1 byte per expert weight)


@dataclass
class MemoryConfig:
    recompute: str = "none"  # none | selective (RMSNorm and MLA projections, report sec 3.2.3) | full (whole blocks)
    ema: bool = False  # keep an EMA of the parameters in CPU memory, updated in a background thread (sec 3.2.3)
    ema_decay: float = 0.999  # EMA weight of the past: ema = decay * ema + (1 - decay) * parameters


@dataclass
class RunConfig:
    dir: str = "runs/default"  # RUN_DIR: config.yaml, metrics.jsonl, checkpoints/
    name: str = ""  # free text, shown in wandb


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    fp8: FP8Config = field(default_factory=FP8Config)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    run: RunConfig = field(default_factory=RunConfig)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: Config, world_size: int = 1) -> Config:
    """Check cross-field constraints; raise ConfigError naming the field and the fix."""
    m, t, o = cfg.model, cfg.train, cfg.optim
    _require(world_size >= 1, f"the number of processes ({world_size}) must be >= 1")
    _require(cfg.parallel.pp >= 1 and cfg.parallel.ep >= 1,
             f"parallel.pp ({cfg.parallel.pp}) and parallel.ep ({cfg.parallel.ep}) must be >= 1")
    for name in ("vocab_size", "dim", "inter_dim", "moe_inter_dim", "n_layers", "n_heads", "kv_lora_rank",
                 "qk_nope_head_dim", "v_head_dim", "n_routed_experts", "n_activated_experts",
                 "n_expert_groups", "topk_groups", "max_seq_len", "original_seq_len"):
        _require(getattr(m, name) > 0, f"model.{name} ({getattr(m, name)}) must be > 0")
    for name in ("q_lora_rank", "n_shared_experts", "mtp_depth", "n_dense_layers"):
        _require(getattr(m, name) >= 0, f"model.{name} ({getattr(m, name)}) must be >= 0")
    _require(m.qk_rope_head_dim > 0 and m.qk_rope_head_dim % 2 == 0,
             f"model.qk_rope_head_dim ({m.qk_rope_head_dim}) must be a positive even number (rotary pairs)")
    _require(m.n_dense_layers <= m.n_layers,
             f"model.n_dense_layers ({m.n_dense_layers}) must be <= model.n_layers ({m.n_layers})")
    _require(m.n_routed_experts % m.n_expert_groups == 0,
             f"model.n_routed_experts ({m.n_routed_experts}) must be divisible by model.n_expert_groups "
             f"({m.n_expert_groups})")
    _require(m.topk_groups <= m.n_expert_groups,
             f"model.topk_groups ({m.topk_groups}) must be <= model.n_expert_groups ({m.n_expert_groups})")
    per_group = m.n_routed_experts // m.n_expert_groups
    _require(m.n_activated_experts <= m.topk_groups * per_group,
             f"model.n_activated_experts ({m.n_activated_experts}) must be <= model.topk_groups x experts per "
             f"group ({m.topk_groups} x {per_group}); raise model.topk_groups or lower n_activated_experts")
    _require(m.n_expert_groups == 1 or per_group >= 2,
             f"model.n_expert_groups ({m.n_expert_groups}) leaves fewer than 2 experts per group; group scores "
             "sum the top-2 experts of a group")
    _require(m.rope_factor >= 1.0, f"model.rope_factor ({m.rope_factor}) must be >= 1 (1 = no YaRN)")
    _require(m.expert_impl in ("auto", "loop", "loop_padded", "grouped_mm"),
             f"model.expert_impl ({m.expert_impl!r}) must be auto, loop, loop_padded or grouped_mm")
    _require(m.init_std > 0, f"model.init_std ({m.init_std}) must be > 0")

    _require(t.seq_len > 0, f"train.seq_len ({t.seq_len}) must be > 0")
    _require(t.seq_len <= m.max_seq_len,
             f"train.seq_len ({t.seq_len}) must be <= model.max_seq_len ({m.max_seq_len})")
    _require(t.seq_len > m.mtp_depth,
             f"train.seq_len ({t.seq_len}) must exceed model.mtp_depth ({m.mtp_depth})")
    _require(t.steps >= 0, f"train.steps ({t.steps}) must be >= 0")
    _require(t.micro_batch_size > 0, f"train.micro_batch_size ({t.micro_batch_size}) must be > 0")
    dp = max(1, world_size // cfg.parallel.pp)
    doubled = 2 if cfg.parallel.pp > 1 and cfg.parallel.schedule == "dualpipe" else 1  # half fed from each end
    quantum = t.micro_batch_size * dp * doubled
    for name in ("batch_size", "batch_size_start"):
        value = getattr(t, name)
        _require(value > 0 and value % quantum == 0,
                 f"train.{name} ({value}) must be a positive multiple of train.micro_batch_size x data-parallel "
                 f"ranks{' x 2 (DualPipe)' if doubled == 2 else ''} ({quantum})")
    _require(t.batch_size_start <= t.batch_size,
             f"train.batch_size_start ({t.batch_size_start}) must be <= train.batch_size ({t.batch_size})")
    _require(t.dtype in ("auto", "float32", "bfloat16"), f"train.dtype ({t.dtype!r}) must be auto, float32 or bfloat16")
    _require(t.param_dtype in ("auto", "float32", "bfloat16"),
             f"train.param_dtype ({t.param_dtype!r}) must be auto, float32 or bfloat16")
    _require(not (t.param_dtype == "bfloat16" and t.dtype == "float32"),
             "train.param_dtype=bfloat16 needs BF16 compute: set train.dtype=bfloat16 (or auto on a GPU), "
             "or train.param_dtype=float32")
    _require(t.device in ("auto", "cpu", "cuda"), f"train.device ({t.device!r}) must be auto, cpu or cuda")
    for name in ("mtp_weight", "mtp_weight_late", "bias_update_speed", "balance_alpha"):
        _require(getattr(t, name) >= 0, f"train.{name} ({getattr(t, name)}) must be >= 0")

    _require(cfg.memory.recompute in ("none", "selective", "full"),
             f"memory.recompute ({cfg.memory.recompute!r}) must be none, selective or full")
    _require(0.0 < cfg.memory.ema_decay < 1.0, f"memory.ema_decay ({cfg.memory.ema_decay}) must be in (0, 1)")
    backends = ("auto", "emulate", "reference", "triton", "torch", "te")
    _require(cfg.fp8.backend in backends, f"fp8.backend ({cfg.fp8.backend!r}) must be one of {', '.join(backends)}")

    _require(o.lr > 0, f"optim.lr ({o.lr}) must be > 0")
    _require(0 <= o.lr_min <= o.lr, f"optim.lr_min ({o.lr_min}) must be within [0, optim.lr ({o.lr})]")
    _require(o.warmup_steps >= 0, f"optim.warmup_steps ({o.warmup_steps}) must be >= 0")
    _require(len(o.lr_tail_tokens) == len(o.lr_tail_values),
             f"optim.lr_tail_tokens ({len(o.lr_tail_tokens)} entries) and optim.lr_tail_values "
             f"({len(o.lr_tail_values)} entries) must have the same length")
    _require(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, f"optim.beta1/beta2 ({o.beta1}, {o.beta2}) must be in [0, 1)")
    _require(o.moment_dtype in ("bfloat16", "float32"),
             f"optim.moment_dtype ({o.moment_dtype!r}) must be bfloat16 or float32")
    _require(o.update in ("auto", "fused", "foreach", "triton"),
             f"optim.update ({o.update!r}) must be auto, fused, foreach or triton")
    _require(o.grad_clip >= 0, f"optim.grad_clip ({o.grad_clip}) must be >= 0 (0 = off)")
    _require(math.isfinite(o.weight_decay) and o.weight_decay >= 0,
             f"optim.weight_decay ({o.weight_decay}) must be >= 0")
    _require(o.eps >= 0, f"optim.eps ({o.eps}) must be >= 0")
    for name in ("lr_hold_tokens", "lr_decay_tokens"):
        _require(getattr(o, name) >= 0, f"optim.{name} ({getattr(o, name)}) must be >= 0")
    _require(all(n >= 0 for n in o.lr_tail_tokens), f"optim.lr_tail_tokens ({o.lr_tail_tokens}) must all be >= 0")
    _require(all(v >= 0 for v in o.lr_tail_values), f"optim.lr_tail_values ({o.lr_tail_values}) must all be >= 0")
    for name in ("batch_ramp_tokens", "mtp_weight_switch_tokens", "bias_update_stop_tokens"):
        _require(getattr(t, name) >= 0, f"train.{name} ({getattr(t, name)}) must be >= 0")

    d = cfg.data
    _require(0.0 <= d.fim_rate <= 1.0, f"data.fim_rate ({d.fim_rate}) must be within [0, 1]")
    _require(cfg.checkpoint.every >= 0, f"checkpoint.every ({cfg.checkpoint.every}) must be >= 0")
    _require(cfg.checkpoint.keep >= 1, f"checkpoint.keep ({cfg.checkpoint.keep}) must be >= 1")
    _require(cfg.logging.wandb in ("disabled", "offline", "online"),
             f"logging.wandb ({cfg.logging.wandb!r}) must be disabled, offline or online")
    _require(cfg.logging.every >= 1, f"logging.every ({cfg.logging.every}) must be >= 1")
    _require(cfg.logging.peak_tflops >= 0, f"logging.peak_tflops ({cfg.logging.peak_tflops}) must be >= 0 "
             "(0: look the GPU up)")
    for name in ("plot_every", "expert_load_every", "dead_expert_window"):
        _require(getattr(cfg.logging, name) >= 0, f"logging.{name} ({getattr(cfg.logging, name)}) must be >= 0")
    _require(all(s >= 1 for s in cfg.logging.profile_steps),
             f"logging.profile_steps ({list(cfg.logging.profile_steps)}) must be optimizer steps >= 1")
    _require(all(r >= 0 for r in cfg.logging.profile_ranks),
             f"logging.profile_ranks ({list(cfg.logging.profile_ranks)}) must be ranks >= 0")
    _require(cfg.checkpoint.verify in ("full", "size", "none"),
             f"checkpoint.verify ({cfg.checkpoint.verify!r}) must be full, size or none")
    _require(t.max_bad_steps >= 1, f"train.max_bad_steps ({t.max_bad_steps}) must be >= 1")
    _require(t.on_spike in ("log", "skip", "rollback"),
             f"train.on_spike ({t.on_spike!r}) must be log, skip or rollback")
    _require(t.spike_window >= 2, f"train.spike_window ({t.spike_window}) must be >= 2")
    _require(t.spike_zscore > 0, f"train.spike_zscore ({t.spike_zscore}) must be > 0")
    p = cfg.parallel
    _require(p.schedule in ("1f1b", "zb1p", "dualpipe", "dualpipev"),
             f"parallel.schedule ({p.schedule!r}) must be 1f1b, zb1p, dualpipe or dualpipev")
    _require(p.pp >= 1 and p.ep >= 1, f"parallel.pp ({p.pp}) and parallel.ep ({p.ep}) must be >= 1")
    _require(p.ranks_per_node >= 0, f"parallel.ranks_per_node ({p.ranks_per_node}) must be >= 0 (0 = LOCAL_WORLD_SIZE)")
    _require(p.dispatch in ("flat", "hierarchical"), f"parallel.dispatch ({p.dispatch!r}) must be flat or hierarchical")
    return cfg


# ---------------------------------------------------------------------------------------------
# Hydra glue: the schema is the primary config; conf/NAME.yaml presets are the group "conf".

SCHEMA_NAME = "dsv3"
_HYDRA_DEFAULTS: list[Any] = [
    "_self_",
    {"override hydra/job_logging": "none"},
    {"override hydra/hydra_logging": "none"},
]


@dataclass
class _HydraRoot(Config):
    defaults: list[Any] = field(default_factory=lambda: list(_HYDRA_DEFAULTS))


def register_schema() -> None:
    """Store the schema in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=_HydraRoot)


def presets() -> list[str]:
    return sorted(p.stem for p in CONF_DIR.glob("*.yaml"))


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    """' did you mean X?' for the closest of ``choices`` (difflib), or ''."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" did you mean {close[0]}?" if close else ""


def check_preset_args(argv: Sequence[str]) -> None:
    """Fail with one line on `+conf=NAME` naming a preset that does not exist (before Hydra's longer message)."""
    for arg in argv:
        if arg.startswith(("+conf=", "conf=")):
            name = arg.split("=", 1)[1]
            if not (CONF_DIR / f"{name}.yaml").is_file():
                hint = _did_you_mean(name, presets())
                hint = hint.replace("mean ", "mean +conf=") if hint else ""
                raise ConfigError(f"unknown preset +conf={name}:{hint} choose one of {', '.join(presets())} "
                                  f"(files in {CONF_DIR})")
            if arg.startswith("conf="):
                raise ConfigError(f"select a preset with a leading plus: +{arg}")


def _schema_fields(schema: type) -> dict[str, Any]:
    """Field name -> resolved type of a config dataclass."""
    hints = typing.get_type_hints(schema)
    return {f.name: hints[f.name] for f in dataclasses.fields(schema)}


def setting_names(schema: type = Config, prefix: str = "") -> list[str]:
    """Every settable dotted name of a config dataclass (``train.steps``, ...)."""
    names = []
    for name, kind in _schema_fields(schema).items():
        if dataclasses.is_dataclass(kind):
            names += setting_names(kind, f"{prefix}{name}.")
        else:
            names.append(f"{prefix}{name}")
    return names


def _unknown_key(key: str, arg: str, schema: type, section: type, at: int, reference: str) -> ConfigError:
    parts = key.split(".")
    name, where = parts[at], ".".join(parts[:at])
    owner = f"{where} has" if where else "the config has"
    siblings = [f"{where}.{n}" if where else n for n in _schema_fields(section)]
    hint = _did_you_mean(key, siblings) or _did_you_mean(key, setting_names(schema))
    if not hint:  # `steps=5` for train.steps: the last part matches a field of some section
        matches = [n for n in setting_names(schema) if n.rsplit(".", 1)[-1] == parts[-1]]
        hint = f" did you mean {matches[0]}?" if len(matches) == 1 else ""
    return ConfigError(f"unknown setting {key} in {arg} ({owner} no field {name}):{hint or ' no close name;'} "
                       f"{reference}")


def check_override_keys(argv: Sequence[str], schema: type = Config, groups: Sequence[str] = ("conf",),
                        reference: str = "every setting and its default: docs/configs.md") -> None:
    """One ConfigError line for an override whose key is not a field of ``schema`` (with the nearest valid
    name), that sets a whole section, or that has no value; refused: any override naming code to
    instantiate (a ``_target_`` key or value, ``hydra.callbacks``, the whole ``hydra`` node). Flags
    (``-...``), other ``hydra.*`` settings and the config ``groups`` are left to Hydra. Runs before Hydra,
    whose messages span several lines."""
    for arg in [a for a in argv if a.lstrip("+~").startswith("hydra")] + overrides_only(argv):
        key, _, value = arg.partition("=")
        bare = key.lstrip("+~")
        if ("_target_" in bare.split(".") or bare == "hydra" or bare.startswith("hydra.callbacks")
                or ("_target_" in value and "{" in value)):
            raise ConfigError(f"{arg}: refused: an override cannot name code to instantiate (_target_, "
                              "hydra.callbacks); settings are plain values")
        if bare in groups or bare.startswith(("hydra.", "hydra/")):
            continue
        if "=" not in arg and not key.startswith("~"):
            raise ConfigError(f"override {arg!r} has no value: write {bare}=VALUE")
        section: type = schema
        parts = bare.split(".")
        for at, name in enumerate(parts):
            fields = _schema_fields(section)
            if name not in fields:
                raise _unknown_key(bare, arg, schema, section, at, reference)
            kind, dotted = fields[name], ".".join(parts[: at + 1])
            last = at == len(parts) - 1
            if dataclasses.is_dataclass(kind):
                if last and not key.startswith("~"):
                    first = next(iter(_schema_fields(kind)))
                    raise ConfigError(f"{arg}: {dotted} is a section, not a value; set its fields, e.g. "
                                      f"{dotted}.{first}=VALUE")
                section = kind
            elif not last:
                if typing.get_origin(kind) is list and at == len(parts) - 2 and parts[-1].isdigit():
                    break  # an element of a list setting: optim.lr_tail_tokens.0=...
                raise ConfigError(f"{arg}: {dotted} is a value, not a section; write {dotted}=VALUE")


# Hydra's command-line flags that take a value (`--cfg job`): the value is not an override
HYDRA_VALUE_FLAGS = frozenset({"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                               "--config-dir", "-cd", "--info", "-i", "--experimental-rerun"})


def overrides_only(argv: Sequence[str]) -> list[str]:
    """``argv`` without Hydra's flags, their values and ``hydra.*`` overrides: what composes the config."""
    out, skip = [], False
    for arg in argv:
        if skip and "=" not in arg:
            skip = False
            continue
        skip = arg in HYDRA_VALUE_FLAGS
        if arg.startswith("-") or arg.lstrip("+~").startswith(("hydra.", "hydra/")):
            continue
        out.append(arg)
    return out


def _hydra_error_line(err: BaseException) -> str:
    """Hydra / OmegaConf's message and its cause's, first line of each, as one line."""
    first = [line.strip() for line in str(err).splitlines() if line.strip()][:1]
    cause = err.__cause__
    detail = [line.strip() for line in str(cause).splitlines() if line.strip()][:1] if cause is not None else []
    return ": ".join(line.rstrip(".") for line in first + detail) or type(err).__name__


def compose_node(overrides: Sequence[str]) -> Any:
    """Compose the schema with ``overrides`` (a preset and key=value settings) into a DictConfig; one
    ConfigError line for an unknown key, a value of the wrong type or bad override syntax."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    check_preset_args(overrides)
    check_override_keys(overrides)
    parser = OverridesParser.create()
    for arg in overrides:
        try:
            parser.parse_overrides([arg])
        except Exception as err:  # hydra.errors.OverrideParseException; its message spans lines
            raise ConfigError(f"{arg}: not a valid override ({_hydra_error_line(err)}); write key=value, quoting "
                              "values with spaces or brackets: key='a b'") from None
    register_schema()
    try:
        with initialize_config_dir(config_dir=str(REPO_ROOT), version_base=None):
            return compose(config_name=SCHEMA_NAME, overrides=list(overrides))
    except Exception as err:  # Hydra / OmegaConf raise several types: wrong type, grammar, merge errors
        raise ConfigError(f"{_hydra_error_line(err)}; every setting and its type: docs/configs.md") from None


def check_command_line(argv: Sequence[str]) -> None:
    """What a launcher checks before Hydra runs: the preset, each override's key, and that the overrides
    compose (types, syntax); flags and ``hydra.*`` overrides are left to Hydra."""
    check_override_keys(argv)  # hydra.* too: hydra.callbacks would instantiate classes named on the command line
    compose_node(overrides_only(argv))


HYDRA_RUN_OVERRIDES = ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra.job.chdir=false"]


def to_config(node: Any, world_size: int = 1) -> Config:
    """Turn a composed DictConfig into a validated Config."""
    from omegaconf import OmegaConf

    obj = OmegaConf.to_object(node)
    cfg = Config(**{k: getattr(obj, k) for k in Config.__dataclass_fields__})
    return validate(resolve_micro_batches(cfg, world_size), world_size)


def resolve_micro_batches(cfg: Config, world_size: int = 1) -> Config:
    """``parallel.micro_batches`` = m > 0 sets ``train.micro_batch_size`` = batch_size / (m x dp ranks)."""
    m, t = cfg.parallel.micro_batches, cfg.train
    _require(m >= 0, f"parallel.micro_batches ({m}) must be >= 0 (0: from train.micro_batch_size)")
    _require(cfg.parallel.pp >= 1, f"parallel.pp ({cfg.parallel.pp}) must be >= 1")
    if m == 0:
        return cfg
    dp = max(1, world_size // cfg.parallel.pp)
    _require(t.batch_size % (m * dp) == 0,
             f"parallel.micro_batches ({m}) x {dp} data-parallel ranks must divide train.batch_size "
             f"({t.batch_size}): pick a divisor of {t.batch_size // dp if t.batch_size % dp == 0 else t.batch_size}")
    return dataclasses.replace(cfg, train=dataclasses.replace(t, micro_batch_size=t.batch_size // (m * dp)))


def load_config(overrides: list[str] | None = None, world_size: int = 1) -> Config:
    """Compose the config as the launch scripts do (for tests, notebooks and tools)."""
    return to_config(compose_node(list(overrides or [])), world_size)


def config_to_yaml(cfg: Config) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
