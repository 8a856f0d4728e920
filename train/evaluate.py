"""Long-context evaluation (report sec 4.3): held-out perplexity by length and the passkey retrieval test.

The reusable pieces take a model and token windows; ``launch/eval.py`` is the command line around them.

Held-out text. The trainer's loader samples windows from the whole prepared token file, so no part of
that file is held out. What training never read is the rest of the corpus: documents are read in a fixed
order and ``data.max_bytes`` keeps only the first bytes of them (``data/corpus.py``), so the documents
that start after that prefix are unseen (the document cut at the boundary is skipped too). With
``data.max_bytes=0`` the whole corpus was used and ``heldout=PATH`` must name other text (any
``data.source`` form); ``heldout=train`` evaluates on the training token file instead, and says so.
Held-out documents are tokenized with the run's tokenizer, without FIM, each followed by EOS (the
packing of sec 4.1), and cut into consecutive windows.

Passkey ("needle in a haystack", report Fig. 8). Filler = a slice of held-out text; the needle
``The pass key is 71432. Remember it. 71432 is the pass key.`` is inserted at a depth (0 = the start of
the context, 1 = just before the question) and the prompt ends with ``What is the pass key? The pass
key is``. Scoring is by likelihood so that a tiny model can show a signal: the log-probability of the
true key's tokens is compared with that of ``candidates - 1`` random keys of the same number of digits
(chance = 1 / candidates); ``accuracy`` counts the trials where the true key ranks first, ``margin`` is
its log-probability minus the distractors' mean (nats; > 0 means the model uses the needle). The greedy
continuation (``greedy``: it starts with the key) is reported too: the stricter test of the report.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from train.config import REPO_ROOT, ConfigError, DataConfig, ModelConfig
from train.errors import CheckpointError, DataError

NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
TASKS = ("ppl", "passkey")
CONTEXT_FIELDS = ("max_seq_len", "rope_factor", "original_seq_len", "beta_fast", "beta_slow", "mscale",
                  "mscale_all_dim")  # the model fields an evaluation may change (as checkpoint.init_from)


# --------------------------------------------------------------------------------------------------
# Windows and perplexity


def token_windows(stream: Sequence[int] | np.ndarray, length: int, count: int) -> Tensor:
    """``count`` consecutive windows of ``length + 1`` tokens with stride ``length`` (the loader's packing):
    window j is ``stream[j*length : j*length + length + 1]``. Returns int64 [count, length + 1]."""
    stream = np.asarray(stream)
    if count < 1 or count * length + 1 > len(stream):
        raise DataError(f"{len(stream):,} held-out tokens make {max(0, (len(stream) - 1) // length)} windows of "
                        f"{length + 1} tokens, fewer than {max(count, 1)}; give more held-out text or fewer tokens")
    rows = [stream[j * length: j * length + length + 1] for j in range(count)]
    return torch.from_numpy(np.stack(rows).astype(np.int64))


@torch.no_grad()
def token_losses(model: torch.nn.Module, windows: Tensor, batch_size: int = 8) -> Tensor:
    """Next-token cross-entropy of the main head at every position: [N, L] (fp32) for windows [N, L+1]."""
    out = []
    for chunk in windows.split(max(1, batch_size)):
        logits = model(chunk[:, :-1]).logits.float()
        out.append(F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="none")
                   .view(chunk.shape[0], -1).cpu())
    return torch.cat(out)


def perplexity(model: torch.nn.Module, windows: Tensor, batch_size: int = 8) -> dict[str, float]:
    """Mean cross-entropy (nats) and its exp over all positions of the windows, and over their second half
    (positions L/2..L-1: where a model trained on shorter sequences is off its training lengths)."""
    losses = token_losses(model, windows, batch_size).double()
    half = losses[:, losses.shape[1] // 2:]
    return {"windows": int(losses.shape[0]), "tokens": int(losses.numel()),
            "loss": float(losses.mean()), "ppl": math.exp(float(losses.mean())),
            "loss_2nd_half": float(half.mean()), "ppl_2nd_half": math.exp(float(half.mean()))}


# --------------------------------------------------------------------------------------------------
# Passkey retrieval


@dataclass
class PasskeyPrompt:
    tokens: list[int]  # exactly the requested number of tokens
    needle_start: int  # index of the needle's first token
    needle_end: int  # one past its last token


def build_passkey_prompt(filler: Sequence[int], needle: Sequence[int], question: Sequence[int], length: int,
                         depth: float) -> PasskeyPrompt:
    """``filler[:k] + needle + filler[k:n] + question`` of exactly ``length`` tokens, where n = length -
    len(needle) - len(question) filler tokens are used and k = round(depth * n): depth 0 puts the needle
    first, depth 1 right before the question."""
    if not 0.0 <= depth <= 1.0:
        raise ConfigError(f"depth {depth} must be within [0, 1] (fraction of the filler before the needle)")
    n = length - len(needle) - len(question)
    if n < 0:
        raise ConfigError(f"length {length} is shorter than the needle and question ({len(needle) + len(question)} "
                          "tokens); evaluate longer lengths")
    if len(filler) < n:
        raise DataError(f"{len(filler)} filler tokens, {n} needed for length {length}; give more held-out text")
    k = int(round(depth * n))
    tokens = [*filler[:k], *needle, *filler[k:n], *question]
    return PasskeyPrompt([int(t) for t in tokens], k, k + len(needle))


@torch.no_grad()
def candidate_logprobs(model: torch.nn.Module, prompt: Sequence[int], answers: Sequence[Sequence[int]],
                       device: torch.device | str = "cpu") -> Tensor:
    """Sum of log p(answer tokens | prompt) under the main head for each answer (one batch; answers are
    padded at the end, which the causal model never attends to). Returns [len(answers)] fp64."""
    width = max(len(a) for a in answers)
    rows = [list(prompt) + list(a) + [0] * (width - len(a)) for a in answers]
    batch = torch.tensor(rows, dtype=torch.long, device=device)
    logp = torch.log_softmax(model(batch[:, :-1]).logits.float(), dim=-1)
    scores = []
    p = len(prompt)
    for i, answer in enumerate(answers):
        positions = torch.arange(p - 1, p - 1 + len(answer), device=device)
        scores.append(logp[i, positions, torch.tensor(list(answer), device=device)].double().sum())
    return torch.stack(scores).cpu()


def rank_of_first(scores: Tensor) -> int:
    """0-based rank of scores[0] (the true answer) among all; ties count against it."""
    return int((scores[1:] >= scores[0]).sum())


@torch.no_grad()
def greedy_tokens(model: torch.nn.Module, prompt: Sequence[int], n: int,
                  device: torch.device | str = "cpu") -> list[int]:
    """``n`` greedy next tokens after ``prompt`` (no KV cache: one forward per token)."""
    tokens = list(prompt)
    for _ in range(n):
        logits = model(torch.tensor([tokens], dtype=torch.long, device=device)).logits
        tokens.append(int(logits[0, -1].argmax()))
    return tokens[len(prompt):]


def random_keys(rng: random.Random, count: int, digits: int) -> list[str]:
    """``count`` distinct keys of ``digits`` digits (no leading zero)."""
    keys: list[str] = []
    while len(keys) < count:
        key = str(rng.randrange(10 ** (digits - 1), 10 ** digits))
        if key not in keys:
            keys.append(key)
    return keys


@dataclass
class PasskeyTrial:
    length: int
    depth: float | None  # None: the control prompt without a needle (the same filler, key and candidates)
    key: str
    rank: int  # of the true key among the candidates (0 = first)
    margin: float  # log p(true key) - mean log p(distractors), nats
    greedy: bool  # the greedy continuation starts with the key


def passkey_trial(model: torch.nn.Module, encode: Any, decode: Any, filler: Sequence[int], length: int,
                  depth: float | None, keys: Sequence[str], needle: str = NEEDLE, question: str = QUESTION,
                  greedy: bool = True, device: torch.device | str = "cpu") -> PasskeyTrial:
    """One prompt of exactly ``length`` tokens (including room for the longest candidate answer); keys[0] is
    the true key, the others are the distractors. ``depth=None``: the control, no needle (filler instead).
    ``encode``: str -> list[int]; ``decode``: list[int] -> str."""
    answers = [encode(" " + k) for k in keys]
    room = max(len(a) for a in answers)
    needle_tokens = encode("\n" + needle.format(key=keys[0]) + "\n") if depth is not None else []
    prompt = build_passkey_prompt(filler, needle_tokens, encode("\n" + question), length - room,
                                  0.0 if depth is None else depth)
    scores = candidate_logprobs(model, prompt.tokens, answers, device)
    hit = False
    if greedy:
        text = decode(greedy_tokens(model, prompt.tokens, len(answers[0]), device))
        hit = text.strip().startswith(keys[0])
    return PasskeyTrial(length, depth, keys[0], rank_of_first(scores), float(scores[0] - scores[1:].mean()), hit)


def _cell(trials: Sequence[PasskeyTrial]) -> dict[str, float]:
    n = max(1, len(trials))
    return {"samples": len(trials), "accuracy": sum(t.rank == 0 for t in trials) / n,
            "greedy": sum(t.greedy for t in trials) / n, "margin": sum(t.margin for t in trials) / n,
            "mean_rank": sum(t.rank for t in trials) / n}


def passkey_table(trials: Sequence[PasskeyTrial], candidates: int) -> list[dict[str, Any]]:
    """Per (length, depth): accuracy (true key ranked first), greedy exact rate, mean margin, mean rank.
    Depth None is the control without a needle (accuracy ~ chance = 1 / candidates)."""
    cells: dict[tuple[int, float], list[PasskeyTrial]] = {}
    for t in trials:
        cells.setdefault((t.length, -1.0 if t.depth is None else t.depth), []).append(t)
    return [{"length": length, "depth": None if depth < 0 else depth, **_cell(ts), "chance": 1.0 / candidates}
            for (length, depth), ts in sorted(cells.items())]


def passkey_eval(model: torch.nn.Module, encode: Any, decode: Any, stream: Sequence[int] | np.ndarray,
                 lengths: Sequence[int], depths: Sequence[float], samples: int, candidates: int = 10,
                 digits: int = 5, seed: int = 0, needle: str = NEEDLE, question: str = QUESTION, greedy: bool = True,
                 control: bool = True, device: torch.device | str = "cpu") -> list[PasskeyTrial]:
    """``samples`` trials per (length, depth), plus (``control``) one without a needle per (length, sample):
    trial i uses the same key, candidates and filler offset at every length and depth (seeded by ``seed``
    and i), so cells differ only in length and depth."""
    stream = np.asarray(stream)
    longest = max(lengths)
    if len(stream) < longest + 1:
        raise DataError(f"{len(stream):,} held-out tokens, fewer than the longest length {longest}; give more "
                        "held-out text")
    plans = []
    for i in range(samples):
        rng = random.Random(f"dsv3-passkey:{seed}:{i}")
        offset = rng.randrange(0, len(stream) - longest)
        plans.append((random_keys(rng, candidates, digits), stream[offset: offset + longest].tolist()))
    cells = [*depths, *([None] if control else [])]
    return [passkey_trial(model, encode, decode, filler, length, depth, keys, needle, question,
                          greedy and depth is not None, device)
            for length in lengths for depth in cells for keys, filler in plans]


# --------------------------------------------------------------------------------------------------
# Held-out text


def heldout_documents(data: DataConfig, heldout: str = "") -> Iterator[str]:
    """Documents training never read: those of ``heldout`` (a ``data.source``-style path), or, when it is
    empty, the documents of ``data.source`` that start after its first ``data.max_bytes`` bytes."""
    from data.corpus import iter_documents

    if heldout:
        try:
            yield from iter_documents(dataclasses.replace(data, source=heldout, max_bytes=0))
        except DataError as err:
            raise DataError(str(err).replace("data.source ", "heldout=", 1)) from None
        return
    if data.max_bytes <= 0:
        raise DataError("data.max_bytes=0: training read the whole corpus, so none of it is held out; pass "
                        "heldout=PATH (text training never saw) or heldout=train (training windows, not held out)")
    seen = 0
    for text in iter_documents(dataclasses.replace(data, max_bytes=0)):
        if seen >= data.max_bytes:
            yield text
        seen += len(text.encode("utf-8"))  # the document that crosses the limit was cut in training: skip it


def heldout_stream(data: DataConfig, tokenizer_path: str | Path, n_tokens: int, heldout: str = "") -> np.ndarray:
    """At least ``n_tokens`` held-out tokens (fewer if the text runs out): documents encoded without FIM,
    each followed by EOS, as the trainer packs them."""
    from data.tokenizer import SpecialTokens, for_encoding, load_tokenizer

    tok = for_encoding(load_tokenizer(tokenizer_path))
    eos = SpecialTokens.of(tok).eos
    out: list[int] = []
    for text in heldout_documents(data, heldout):
        out += tok.encode(text, add_special_tokens=False).ids
        out.append(eos)
        if len(out) >= n_tokens:
            break
    return np.asarray(out, dtype=np.int64)


# --------------------------------------------------------------------------------------------------
# Configuration of launch/eval.py


_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def _optional_mirror(cls: type, name: str, names: Sequence[str] | None = None) -> type:
    """A dataclass with ``cls``'s fields (or those in ``names``) as Optional, default None (= keep the run's)."""
    fields = [(f.name, Optional[_TYPES[f.type] if isinstance(f.type, str) else f.type], None)  # noqa: UP045
              for f in dataclasses.fields(cls) if names is None or f.name in names]
    return dataclasses.make_dataclass(name, fields)


ContextOverrides = _optional_mirror(ModelConfig, "ContextOverrides", CONTEXT_FIELDS)
DataOverrides = _optional_mirror(DataConfig, "DataOverrides")


@dataclass
class EvalConfig:
    """launch/eval.py's settings (``key=value`` overrides, Hydra syntax)."""

    task: str = "ppl"  # ppl | passkey
    checkpoint: str = ""  # a checkpoint directory (with meta.json) or a run directory (its newest checkpoint)
    lengths: list[int] = field(default_factory=list)  # context lengths in tokens; [] = the model's max_seq_len
    heldout: str = ""  # "" = the corpus after data.max_bytes | PATH (text training never saw) | train
    tokens: int = 16384  # ppl: held-out tokens per length (the same tokens at every length)
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])  # passkey needle depths
    samples: int = 8  # passkey: prompts per (length, depth)
    candidates: int = 10  # passkey: the true key and candidates-1 random ones (chance = 1/candidates)
    digits: int = 5  # passkey: digits of a key
    greedy: bool = True  # passkey: also decode greedily and check the key (one forward per answer token)
    control: bool = True  # passkey: also score each prompt without its needle (should be at chance)
    needle: str = NEEDLE
    question: str = QUESTION
    batch_tokens: int = 16384  # ppl: tokens per forward pass
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | float32 | bfloat16
    out: str = ""  # write the results as JSON here (also: --json PATH)
    use_ema: bool = False  # evaluate the parameters' EMA saved with the checkpoint (memory.ema, sec 3.2.3)
    model: ContextOverrides = field(default_factory=ContextOverrides)  # context fields only; None = checkpoint's
    data: DataOverrides = field(default_factory=DataOverrides)  # None = the run's config.yaml value


EVAL_SCHEMA = "dsv3_eval"


def load_eval_config(overrides: Sequence[str]) -> EvalConfig:
    """Compose ``EvalConfig`` from ``key=value`` overrides; ConfigError with one line on a bad one."""
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    ConfigStore.instance().store(name=EVAL_SCHEMA, node=EvalConfig)
    try:
        with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base=None):
            node = compose(config_name=EVAL_SCHEMA, overrides=list(overrides))
        cfg = OmegaConf.to_object(node)
    except Exception as err:  # Hydra / OmegaConf: unknown key, wrong type, bad syntax
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        cause = err.__cause__
        detail = [line.strip() for line in str(cause).splitlines() if line.strip()][:1] if cause else []
        reason = "; ".join(line.rstrip(".") for line in lines[:1] + detail)
        raise ConfigError(f"{reason} (settings: task, checkpoint, lengths, heldout, tokens, depths, samples, "
                          f"candidates, digits, out, model.<{'|'.join(CONTEXT_FIELDS)}>, data.<field>)") from None
    if cfg.task not in TASKS:
        raise ConfigError(f"task={cfg.task!r} is not a task: choose task=ppl or task=passkey")
    if not cfg.checkpoint:
        raise ConfigError("checkpoint=PATH is required: a checkpoint directory or a run directory")
    for name in ("tokens", "samples", "batch_tokens", "digits"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} ({getattr(cfg, name)}) must be >= 1")
    if cfg.candidates < 2:
        raise ConfigError(f"candidates ({cfg.candidates}) must be >= 2 (the true key and distractors)")
    if any(not 0.0 <= d <= 1.0 for d in cfg.depths) or not cfg.depths:
        raise ConfigError(f"depths ({list(cfg.depths)}) must be within [0, 1]")
    if any(n < 2 for n in cfg.lengths):
        raise ConfigError(f"lengths ({list(cfg.lengths)}) must be >= 2")
    return cfg


# --------------------------------------------------------------------------------------------------
# Loading a checkpoint for evaluation


@dataclass
class LoadedRun:
    model: torch.nn.Module
    model_cfg: ModelConfig
    path: Path  # the checkpoint directory
    step: int
    data: DataConfig  # the run's data config (config.yaml), with the overrides
    seed: int  # the run's train.seed (part of the prepared-data cache key)
    device: torch.device
    saved_model: dict[str, Any]  # the checkpoint's model config
    trained_seq_len: int | None  # the run's train.seq_len (config.yaml), if known


def find_checkpoint(path: str) -> Path:
    """A checkpoint directory, or a run directory's newest complete one; CheckpointError otherwise."""
    from train import checkpoint as ckpt

    p = Path(path).expanduser()
    if (p / ckpt.META_FILE).is_file() and (p / ".metadata").is_file():  # any name (an import, a copy)
        return p
    latest = ckpt.latest_checkpoint(p) if p.is_dir() else None
    if latest is None:
        what = "does not exist" if not p.exists() else "holds no complete checkpoint"
        raise CheckpointError(f"checkpoint={path}: {what}; give a checkpoint directory (RUN/checkpoints/step_N, "
                              "with meta.json) or a run directory with checkpoints/")
    return latest


def run_config(checkpoint_dir: Path) -> dict[str, Any]:
    """The run's config.yaml (RUN/config.yaml next to RUN/checkpoints/), or {} if it is not there."""
    import yaml

    path = checkpoint_dir.parent.parent / "config.yaml"
    if not path.is_file():
        return {}
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise CheckpointError(f"{path}: unreadable ({err}); move it away to use the checkpoint's meta.json") from None


def choose_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but CUDA is not available; use device=cpu")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"device={name!r}: choose auto, cpu or cuda")
    return torch.device(name)


def load_run(cfg: EvalConfig) -> LoadedRun:
    """The checkpoint's model (its config from meta.json, context fields overridden) in eval mode, and the
    run's data config (config.yaml, data.* overridden)."""
    from train import checkpoint as ckpt
    from train.model import Transformer, rope_tables

    path = find_checkpoint(cfg.checkpoint)
    meta = ckpt.read_meta(path)
    saved = dict(meta.get("model") or {})
    if not saved:
        raise CheckpointError(f"{path}/meta.json has no model config; the checkpoint is not from train/trainer.py")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    base = ModelConfig(**{k: v for k, v in saved.items() if k in known})
    changes = {k: v for k, v in dataclasses.asdict(cfg.model).items() if v is not None}
    model_cfg = dataclasses.replace(base, **changes)
    if model_cfg.rope_factor < 1.0:
        raise ConfigError(f"model.rope_factor ({model_cfg.rope_factor}) must be >= 1 (1 = no YaRN)")
    if model_cfg.max_seq_len < 1 or model_cfg.original_seq_len < 1:
        raise ConfigError("model.max_seq_len and model.original_seq_len must be >= 1")
    if cfg.lengths and max(cfg.lengths) > model_cfg.max_seq_len:
        raise ConfigError(f"lengths {list(cfg.lengths)}: {max(cfg.lengths)} is above the model's max_seq_len "
                          f"({model_cfg.max_seq_len}); pass model.max_seq_len={max(cfg.lengths)} to evaluate beyond "
                          "it (with model.rope_factor=S model.original_seq_len=N for YaRN)")

    run = run_config(path)
    data = DataConfig(**{k: v for k, v in (run.get("data") or {}).items()
                         if k in {f.name for f in dataclasses.fields(DataConfig)}})
    data = dataclasses.replace(data, **{k: v for k, v in dataclasses.asdict(cfg.data).items() if v is not None})
    seed = int((run.get("train") or {}).get("seed", 0))

    device = choose_device(cfg.device)
    with torch.device("meta"):
        model = Transformer(model_cfg)
    model.to_empty(device=device)
    cos, sin = rope_tables(model_cfg, device=device)  # non-persistent buffers: not in the checkpoint
    model.rope_cos.copy_(cos)
    model.rope_sin.copy_(sin)
    try:
        ckpt.load_model_weights(path, ckpt.model_state(model), model_cfg)
    except CheckpointError as err:
        raise CheckpointError(str(err).replace("check checkpoint.init_from", "check checkpoint=")) from None
    if cfg.use_ema:  # the EMA section holds the parameters (buffers such as gate biases stay the model's)
        if not ckpt.has_ema(path):
            raise CheckpointError(f"{path}: holds no parameter EMA (train with memory.ema=true); drop use_ema=true")
        ckpt.load_ema(path, ckpt.model_state(model, tensors=dict(model.named_parameters())))
    model.eval()
    trained = (run.get("train") or {}).get("seq_len")
    return LoadedRun(model, model_cfg, path, int(meta.get("step", 0)), data, seed, device, saved,
                     int(trained) if trained else None)


def run_tokenizer(run: LoadedRun) -> Path:
    """The run's tokenizer.json: data.tokenizer, or the one its prepared-data cache holds (found, or
    rebuilt identically, by ``prepare_data`` with the run's data config and seed)."""
    if run.data.tokenizer:
        return Path(run.data.tokenizer).expanduser()
    from data.prepare import prepare_data

    return prepare_data(dataclasses.replace(run.data, workers=1), run.model_cfg.vocab_size, run.seed).tokenizer_path


def eval_stream(run: LoadedRun, cfg: EvalConfig, n_tokens: int) -> tuple[np.ndarray, str]:
    """The evaluation tokens and a description of where they come from."""
    if cfg.heldout == "train":
        from data.prepare import prepare_data

        prepared = prepare_data(dataclasses.replace(run.data, workers=1), run.model_cfg.vocab_size, run.seed)
        tokens = np.memmap(prepared.tokens_path, dtype=np.uint32, mode="r")[:n_tokens].astype(np.int64)
        return tokens, (f"NOT held out: the first {len(tokens):,} tokens of the training token file "
                        f"{prepared.tokens_path}")
    tokens = heldout_stream(run.data, run_tokenizer(run), n_tokens, cfg.heldout)
    where = (f"{cfg.heldout}" if cfg.heldout else
             f"data.source={run.data.source} after its first data.max_bytes={run.data.max_bytes:,} bytes")
    return tokens, f"held out: {len(tokens):,} tokens of {where} (no FIM, EOS-joined)"


def autocast_context(run: LoadedRun, dtype: str) -> Any:
    import contextlib

    if dtype not in ("auto", "float32", "bfloat16"):
        raise ConfigError(f"dtype={dtype!r}: choose auto, float32 or bfloat16")
    use_bf16 = dtype == "bfloat16" or (dtype == "auto" and run.device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=run.device.type, dtype=torch.bfloat16)


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Run the task; return the JSON-able result (``format_result`` prints it)."""
    torch.manual_seed(cfg.seed)
    run = load_run(cfg)
    lengths = sorted(set(cfg.lengths)) if cfg.lengths else [run.model_cfg.max_seq_len]
    context = {k: getattr(run.model_cfg, k) for k in CONTEXT_FIELDS}
    result: dict[str, Any] = {"task": cfg.task, "checkpoint": str(run.path), "step": run.step, "model": context,
                              "trained_model": {k: run.saved_model.get(k) for k in CONTEXT_FIELDS},
                              "trained_seq_len": run.trained_seq_len,
                              "lengths": lengths}
    with autocast_context(run, cfg.dtype):
        if cfg.task == "ppl":
            need = max(cfg.tokens, max(lengths)) + 1
            stream, where = eval_stream(run, cfg, need)
            result["data"] = where
            rows = []
            for length in lengths:
                count = max(1, cfg.tokens // length)
                windows = token_windows(stream, length, count).to(run.device)
                rows.append({"length": length, **perplexity(run.model, windows, max(1, cfg.batch_tokens // length))})
            result["results"] = rows
        else:
            from data.tokenizer import for_encoding, load_tokenizer

            tok = for_encoding(load_tokenizer(run_tokenizer(run)))
            stream, where = eval_stream(run, cfg, max(4 * max(lengths), 4096))
            result["data"] = where

            def encode(text: str) -> list[int]:
                return tok.encode(text, add_special_tokens=False).ids

            trials = passkey_eval(run.model, encode, tok.decode, stream, lengths, list(cfg.depths), cfg.samples,
                                  cfg.candidates, cfg.digits, cfg.seed, cfg.needle, cfg.question, cfg.greedy,
                                  cfg.control, run.device)
            result.update(depths=list(cfg.depths), samples=cfg.samples, candidates=cfg.candidates,
                          chance=1.0 / cfg.candidates, needle=cfg.needle, question=cfg.question,
                          results=passkey_table(trials, cfg.candidates),
                          by_length=[{"length": length, **_cell([t for t in trials
                                                                  if t.length == length and t.depth is not None])}
                                     for length in lengths],
                          trials=[dataclasses.asdict(t) for t in trials])
    return result


def format_result(result: dict[str, Any]) -> str:
    """The result as text tables (what launch/eval.py prints)."""
    m, trained = result["model"], result["trained_model"]
    yarn = (f"YaRN s={m['rope_factor']:g} over original_seq_len {m['original_seq_len']}" if m["rope_factor"] > 1
            else "no YaRN")
    seq = f", trained at seq_len {result['trained_seq_len']}" if result.get("trained_seq_len") else ""
    lines = [f"{result['task']}: {result['checkpoint']} (step {result['step']:,}); max_seq_len {m['max_seq_len']} "
             f"(checkpoint's {trained['max_seq_len']}{seq}), {yarn}", f"data: {result['data']}"]
    if result["task"] == "ppl":
        lines.append(f"{'length':>8} {'windows':>8} {'loss':>8} {'ppl':>10} {'ppl 2nd half':>13}")
        for r in result["results"]:
            lines.append(f"{r['length']:>8} {r['windows']:>8} {r['loss']:>8.4f} {r['ppl']:>10.2f} "
                         f"{r['ppl_2nd_half']:>13.2f}")
        return "\n".join(lines)
    lengths = result["lengths"]
    lines.append(f"passkey: {result['samples']} prompts per cell, true key ranked first among {result['candidates']} "
                 f"candidates (chance {result['chance']:.0%}); rows: needle depth, columns: context length")
    cells = {(r["length"], r["depth"]): r for r in result["results"]}
    for metric, fmt in (("accuracy", "{:>8.0%}"), ("margin", "{:>8.2f}"), ("greedy", "{:>8.0%}")):
        lines.append(f"{metric:>9} " + " ".join(f"{n:>8}" for n in lengths))
        for depth in result["depths"]:
            lines.append(f"{depth:>9.2f} " + " ".join(fmt.format(cells[(n, depth)][metric]) for n in lengths))
        lines.append(f"{'all':>9} " + " ".join(fmt.format(r[metric]) for r in result["by_length"]))
        if (lengths[0], None) in cells and metric != "greedy":
            lines.append(f"{'no needle':>9} " + " ".join(fmt.format(cells[(n, None)][metric]) for n in lengths))
    return "\n".join(lines)


def write_json(result: dict[str, Any], path: str | Path) -> None:
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
