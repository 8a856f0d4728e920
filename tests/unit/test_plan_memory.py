"""The planner's activation table against what autograd really keeps (report sec 3.2.3, 3.3.3).

``train.memory.activation_bytes_per_token`` runs the model's forward and losses on the CPU and adds up
the tensors saved for backward; the planner predicts the same quantity from its table
(``train/plan_activations.py``) without running anything. Every item of the table is an exact byte
count, so the two agree to within the few per-token scalars the table leaves out (the balance loss's
sums): 0.2%, FP8 included. (Under FP8 the measurement once exceeded the table by 1.0-1.4%: the E5M6 cache
of the linear after attention sat in 16-bit containers where the table counts the report's 12 bits; it is
now packed, fp8/linear.py. In FP32 it exceeded it by 2%: two linears reading one input each kept an FP8
copy of it, the step's memo being off without autocast; train/runtime.py.) What is left under FP8 is
the tiny model's expert width of 64: a partial 1x128 tile has a whole scale, the table counts 4/128
bytes per element, 24 bytes per token in all.

The absolute test (FP32, so that no BF16 weight copy is saved) also checks what the table does not scale
with the tokens: per micro-batch, the FP8 experts' alignment padding (``expert_padding_bytes``).
"""

from __future__ import annotations

import pytest

from train.config import load_config
from train.memory import (activation_bytes_per_token, measured_activation_bytes, planned_activation_bytes,
                          planned_activation_bytes_per_token)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiny_activations_are_what_autograd_keeps(dtype, recompute):
    cfg = load_config(["+conf=tiny", f"train.dtype={dtype}", f"memory.recompute={recompute}"])
    measured = activation_bytes_per_token(cfg)
    assert planned_activation_bytes_per_token(cfg) == pytest.approx(measured, rel=2e-3)


def test_without_query_compression():
    """q_lora_rank = 0 (queries straight from the normalised input, as DeepSeek-V2-Lite): no c_q."""
    cfg = load_config(["+conf=tiny", "model.q_lora_rank=0", "train.dtype=bfloat16", "memory.recompute=selective"])
    assert planned_activation_bytes_per_token(cfg) == pytest.approx(activation_bytes_per_token(cfg), rel=2e-3)


def test_small_activations_are_what_autograd_keeps():
    """The small preset's shapes (q/k head dim 96 > v 64: the padded attention), BF16, selective."""
    cfg = load_config(["+conf=small", "train.dtype=bfloat16", "memory.recompute=selective"])
    measured = activation_bytes_per_token(cfg)
    assert planned_activation_bytes_per_token(cfg) == pytest.approx(measured, rel=2e-3)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("recompute", ["none", "selective"])
def test_fp8_activations_are_what_autograd_keeps(recompute, dtype):
    cfg = load_config(["+conf=tiny", f"train.dtype={dtype}", f"memory.recompute={recompute}", "fp8.enabled=true"])
    measured = activation_bytes_per_token(cfg)
    assert planned_activation_bytes_per_token(cfg) == pytest.approx(measured, rel=2e-3)
    unquantized = activation_bytes_per_token(load_config(["+conf=tiny", f"train.dtype={dtype}",
                                                          f"memory.recompute={recompute}"]))
    assert measured < unquantized  # the FP8 caches are the memory saving (sec 3.3.3)


@pytest.mark.parametrize("fp8", ["false", "true"])
def test_micro_batch_activations_are_what_autograd_keeps(fp8):
    """Not differenced: one micro-batch's bytes at 128 and 255 tokens (255: the FP8 experts' layout has a
    partial tile), FP32. Under FP8 the experts' alignment padding is 405,504 bytes of the total here (3 MoE
    blocks, MTP's included, x 8 experts' worst-case tile of 128 rows x 128 channels, 6-8% of it): the
    planner without it would be off by that much."""
    cfg = load_config(["+conf=tiny", "train.dtype=float32", "memory.recompute=selective", f"fp8.enabled={fp8}"])
    lengths = (128, 255)
    for measured, planned in zip(measured_activation_bytes(cfg, lengths), planned_activation_bytes(cfg, lengths),
                                 strict=True):
        assert planned == pytest.approx(measured, rel=1e-3)


@pytest.mark.parametrize("mtp_depth", [0, 1, 2])
def test_one_logits_gradient_alive_at_a_time(monkeypatch, mtp_depth):
    """The planner's logits buffer is one gradient of the logits: with the window, the model computes each
    head's cross-entropy right after the head, so backward consumes each gradient (the head's matmul)
    before making the next (measured: the most ``_CrossEntropy.backward`` outputs alive at one time). The
    cross-entropies made after all the heads (``compute_losses`` on logits alone) keep all 1 + D alive
    together: the CE nodes are then the graph's last and backward runs them all first; same losses."""
    import weakref

    import torch

    from train import losses
    from train.model import Transformer
    from train.plan import plan
    from train.plan_cluster import Cluster

    live, most, original = [0], [0], losses._CrossEntropy.backward

    def counted(ctx, grad):
        out, none = original(ctx, grad)
        live[0] += 1
        most[0] = max(most[0], live[0])
        weakref.finalize(out.untyped_storage(), lambda: live.__setitem__(0, live[0] - 1))
        return out, none

    monkeypatch.setattr(losses._CrossEntropy, "backward", staticmethod(counted))
    cfg = load_config(["+conf=tiny", f"model.mtp_depth={mtp_depth}", "train.micro_batch_size=2"])
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    model.init_weights(seed=0)
    window = torch.randint(0, cfg.model.vocab_size, (2, cfg.train.seq_len + 1))
    loss = {}
    for inside in (True, False):
        most[0] = 0
        out = model(window[:, :-1], window if inside else None)
        loss[inside] = losses.compute_losses(out, window, 0.3, 1e-4).loss
        loss[inside].backward()
        assert most[0] == (1 if inside else 1 + mtp_depth)
    assert torch.equal(loss[True], loss[False])
    t, m = cfg.train, cfg.model
    logits = t.micro_batch_size * t.seq_len * m.vocab_size * 4  # FP32 on the CPU
    assert plan(cfg, Cluster(gpus=1, device="cpu"), suggest=False).memory["buffers"] == logits
