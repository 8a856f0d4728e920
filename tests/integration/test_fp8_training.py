"""FP8 training end to end (report sec 3.3): checkpoints hold FP32 master weights whatever the compute
precision, so an FP8 run resumes in full precision and the other way round."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from tests.integration.pretrain_runs import failure_report, run_pretrain, run_pretrains_side_by_side
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
    assert result.returncode == 0, failure_report(result)
    assert ("fp8 (emulate)" in result.stdout) == bool(first)
    saved = checkpoint.latest_checkpoint(run_dir)
    dtypes = weight_dtypes(saved)
    linear = [k for k in dtypes if k.endswith(("attn.wkv_b.weight", "ffn.experts.w1", "attn.wo.weight"))]
    assert linear and all(dtypes[k] == torch.float32 for k in linear), {k: dtypes[k] for k in linear}

    result = run_pretrain(run_dir, data_cache, "train.steps=4", *SHORT, *then)
    assert result.returncode == 0, failure_report(result)
    assert "resumed from" in result.stdout and "step_00000002" in result.stdout
    assert ("fp8 (emulate)" in result.stdout) == bool(then)
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(m["loss"] == m["loss"] and m["loss"] < 12 for m in metrics)  # finite, sane


# The convergence check (report sec 3.3, "Validation": FP8 loss within 0.25% of the higher-precision
# run). Config: +conf=tiny's model (1.3M parameters), 300 steps of 8 x 64 tokens (154K tokens) on the
# 1.5 MB corpus, LR warm-up 10 steps, held 60K tokens, cosine over 80K, then the preset's tails; one
# thread. Baseline: full precision (fp32 on the CPU, where BF16 autocast is ~8x slower: stricter than
# the report's BF16, as every non-FP8 op is then more precise). Metric: the LM loss of the final
# models on the same 128 evaluation windows (the corpus' last 8K tokens; training samples windows
# anywhere, so some were seen), evaluated in full precision: a paired comparison.
#
# At this scale rounding alone moves that loss by about 1%: two runs whose arithmetic differs at all
# part ways after a few dozen steps (MoE routing is discrete). Measured at seed 0, full precision, for
# versions of the code and optimizer kernels that differ only in FP32 rounding: 3.8964, 3.8723, 3.9090,
# 3.8862, 3.8916 (sd 0.35% of the mean); FP8 runs: 3.9045, 3.8840, 3.8575, 3.9094 (gaps to their full-
# precision pair +0.21%, +0.30%, -1.32%, +0.60%). The report's 0.25% therefore cannot be asserted for one
# pair of runs here without failing on unrelated changes, and neither can a bound made of one extra
# run's spread: when both differences are pure rounding noise, one exceeds twice the other in about 30%
# of draws (it failed that way once). The bound is the noise of a difference of two runs measured
# above, 3 x sd x sqrt(2) = 1.5%, or twice this run's own spread (a second full-precision run whose only
# difference is FP32 rounding: optim.update=foreach) if the noise has grown: an end-to-end guard against
# an FP8 path that trains worse than rounding noise. Each FP8 GEMM's accuracy is bounded against fp64
# by tests/unit/test_fp8_linear.py.
CONVERGENCE = ["train.steps=300", "train.seq_len=64", "train.batch_size_start=8", "train.batch_size=8",
               "checkpoint.every=0", "optim.lr_hold_tokens=60e3", "optim.lr_decay_tokens=80e3", "train.dtype=float32"]


def prepared_tiny_data(data_cache):
    """The runs' config and prepared data (prepared here if the cache does not hold it yet)."""
    from data.prepare import prepare_data
    from tests.integration.pretrain_runs import TINY_DATA
    from train.config import load_config

    cfg = load_config(["+conf=tiny", f"data.cache_dir={data_cache}", *TINY_DATA])
    return cfg, prepare_data(cfg.data, vocab_size=cfg.model.vocab_size, seed=cfg.train.seed)


def evaluation_loss(run_dir, data_cache, n: int = 128, seq: int = 64) -> float:
    import numpy as np
    import torch.distributed.checkpoint as dcp

    from data.prepare import TOKEN_DTYPE
    from train.losses import compute_losses
    from train.model import Transformer

    cfg, prepared = prepared_tiny_data(data_cache)
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
    extras = {"fp8": FP8, "full": [], "full, other rounding": ["optim.update=foreach"]}  # the longest first
    runs = {name: (tmp_path / name.replace(", ", "_").replace(" ", "_"), [*CONVERGENCE, *extra])
            for name, extra in extras.items()}
    prepared_tiny_data(data_cache)  # once, before the runs read it side by side
    results = run_pretrains_side_by_side(runs, data_cache, timeout=1800)
    losses = {}
    for name, (run_dir, _) in runs.items():
        assert results[name].returncode == 0, failure_report(results[name])
        losses[name] = evaluation_loss(run_dir, data_cache)
        curve = read_metrics(run_dir)
        assert curve[-1]["lm_loss"] < curve[0]["lm_loss"] - 2.5  # each learned (7.6 -> ~4)
    noise = abs(losses["full, other rounding"] - losses["full"]) / losses["full"]
    gap = abs(losses["fp8"] - losses["full"]) / losses["full"]
    bound = max(0.015, 2 * noise)
    print(f"evaluation LM loss: {losses}; FP8 gap {gap:.3%}, rounding spread {noise:.3%}, bound {bound:.3%}")
    assert gap < bound, losses
