"""The planner's activation table against what autograd really keeps (report sec 3.2.3, 3.3.3).

``train.memory.activation_bytes_per_token`` runs the model's forward and losses on the CPU and adds up
the tensors saved for backward; the planner predicts the same quantity from its table
(``train/plan_activations.py``) without running anything. Every item of the table is an exact byte
count, so the two agree to within the few per-token scalars the table leaves out (the balance loss's
sums): 0.2%. Under FP8 the measurement exceeds the table by 1.0% (no recompute) and 1.4% (selective) on
the tiny model, 2026-11-28, not itemised (the routed experts' FP8 cache of x matches it exactly: k D bytes
per token, its worst-case padding being per micro-batch, fp8/experts.py); hence 2% there.
"""

from __future__ import annotations

import pytest

from train.config import load_config
from train.memory import activation_bytes_per_token, planned_activation_bytes_per_token

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


@pytest.mark.parametrize("recompute", ["none", "selective"])
def test_fp8_activations_are_what_autograd_keeps(recompute):
    cfg = load_config(["+conf=tiny", "train.dtype=bfloat16", f"memory.recompute={recompute}", "fp8.enabled=true"])
    measured = activation_bytes_per_token(cfg)
    assert planned_activation_bytes_per_token(cfg) == pytest.approx(measured, rel=2e-2)
    bf16 = activation_bytes_per_token(load_config(["+conf=tiny", "train.dtype=bfloat16",
                                                   f"memory.recompute={recompute}"]))
    assert measured < bf16  # the FP8 caches are the memory saving (sec 3.3.3)
