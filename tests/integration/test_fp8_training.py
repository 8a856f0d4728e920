"""FP8 training end to end (report sec 3.3): checkpoints hold FP32 master weights whatever the compute
precision, so an FP8 run resumes in full precision and the other way round."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from tests.integration.pretrain_runs import run_pretrain
from train import checkpoint
from train.trainer import read_metrics

pytestmark = pytest.mark.slow

FP8 = ["fp8.enabled=true", "fp8.backend=emulate"]
SHORT = ["train.seq_len=64", "train.batch_size_start=8", "train.batch_size=8", "checkpoint.every=2"]


def weight_dtypes(path) -> dict[str, torch.dtype]:
    meta = FileSystemReader(str(path)).read_metadata()
    return {k: v.properties.dtype for k, v in meta.state_dict_metadata.items() if hasattr(v, "properties")
            and k.startswith("model.")}


@pytest.mark.parametrize("first,then", [(FP8, []), ([], FP8)], ids=["fp8-then-fp32", "fp32-then-fp8"])
def test_checkpoints_move_between_fp8_and_full_precision(tmp_path, data_cache, first, then):
    run_dir = tmp_path / "run"
    result = run_pretrain(run_dir, data_cache, "train.steps=2", *SHORT, *first)
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("fp8 (emulate)" in result.stdout) == bool(first)
    saved = checkpoint.latest_checkpoint(run_dir)
    dtypes = weight_dtypes(saved)
    linear = [k for k in dtypes if k.endswith(("attn.wkv_b.weight", "ffn.experts.w1", "attn.wo.weight"))]
    assert linear and all(dtypes[k] == torch.float32 for k in linear), {k: dtypes[k] for k in linear}

    result = run_pretrain(run_dir, data_cache, "train.steps=4", *SHORT, *then)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout and "step_00000002" in result.stdout
    assert ("fp8 (emulate)" in result.stdout) == bool(then)
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(m["loss"] == m["loss"] and m["loss"] < 12 for m in metrics)  # finite, sane


# The convergence check (report sec 3.3, "Validation": FP8 loss within 0.25% of the higher-precision
# run). Config: +conf=tiny's model (1.3M parameters), 300 steps of 8 x 64 tokens (154K tokens) on the
# 1.5 MB corpus, LR warm-up 10 steps, held 60K tokens, cosine over 80K, then the preset's tails; one
# thread. Baseline: full precision (fp32 on the CPU, where BF16 autocast is ~8x slower: stricter than
# the report's BF16, as every non-FP8 op is then more precise). Metric: the LM loss of both final
# models on the same 128 evaluation windows (the corpus' last 8K tokens; training samples windows
# anywhere, so some were seen), evaluated in full precision: a paired comparison, steadier than the
# last steps' training losses.
# Measured (this seed): 3.8964 (fp32) vs 3.9045 (FP8), +0.21%; with train.seed=1: 3.9563 vs 3.9536,
# -0.07%. Same-seed runs differ by this much from rounding alone (the trajectories part after a few
# dozen steps), so the margin under 0.25% is thin at this scale: a failure here after a change in the
# FP8 path is a real signal; docs/fp8.md has the numbers.
CONVERGENCE = ["train.steps=300", "train.seq_len=64", "train.batch_size_start=8", "train.batch_size=8",
               "checkpoint.every=0", "optim.lr_hold_tokens=60e3", "optim.lr_decay_tokens=80e3", "train.dtype=float32"]


def evaluation_loss(run_dir, data_cache, n: int = 128, seq: int = 64) -> float:
    import numpy as np
    import torch.distributed.checkpoint as dcp

    from data.prepare import TOKEN_DTYPE, prepare_data
    from tests.integration.pretrain_runs import TINY_DATA
    from train.config import load_config
    from train.losses import compute_losses
    from train.model import Transformer

    cfg = load_config(["+conf=tiny", f"data.cache_dir={data_cache}", *TINY_DATA])
    prepared = prepare_data(cfg.data, vocab_size=cfg.model.vocab_size, seed=cfg.train.seed)
    tokens = np.fromfile(prepared.tokens_path, dtype=TOKEN_DTYPE)
    start = len(tokens) - n * (seq + 1)
    windows = torch.from_numpy(tokens[start:].astype(np.int64)).view(n, seq + 1)
    model = Transformer(cfg.model)
    model.init_weights(seed=0)
    dcp.load({"model": checkpoint.model_state(model)}, checkpoint_id=str(checkpoint.latest_checkpoint(run_dir)),
             no_dist=True)
    model.eval()
    with torch.no_grad():
        return compute_losses(model(windows[:, :-1]), windows, 0.0, 0.0).lm_loss.item()


def test_fp8_training_converges_like_full_precision(tmp_path, data_cache):
    losses = {}
    for name, extra in (("full", []), ("fp8", FP8)):
        result = run_pretrain(tmp_path / name, data_cache, *CONVERGENCE, *extra, timeout=1800)
        assert result.returncode == 0, result.stderr[-3000:]
        losses[name] = evaluation_loss(tmp_path / name, data_cache)
        curve = read_metrics(tmp_path / name)
        assert curve[-1]["lm_loss"] < curve[0]["lm_loss"] - 2.5  # both learned (7.6 -> ~4)
    gap = abs(losses["fp8"] - losses["full"]) / losses["full"]
    print(f"evaluation LM loss: full precision {losses['full']:.4f}, FP8 {losses['fp8']:.4f}, gap {gap:.3%}")
    assert gap < 0.0025, losses
