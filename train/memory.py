"""Activation memory accounting (report sec 3.2.3): the bytes autograd keeps for the backward.

``saved_activation_bytes`` runs a forward under ``torch.autograd.graph.saved_tensors_hooks`` and adds up
the storages saved for backward once each (views and tensors saved by several operations count once),
leaving out parameters and buffers. Recomputed regions (``torch.utils.checkpoint``) save only their
inputs, which the hooks see; what they recompute is not saved and not counted. Works on any device,
the CPU included (no allocator statistics needed).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


def saved_activation_bytes(model: nn.Module, forward: Callable[[], Any]) -> tuple[int, Any]:
    """Run ``forward()`` (with grad enabled) and return (bytes saved for backward, its result)."""
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip and storage.nbytes():
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = forward()
    return sum(saved.values()), result


def activation_bytes_per_token(cfg: Any, lengths: tuple[int, int] = (128, 256), seed: int = 0,
                               device: str = "cpu") -> float:
    """Bytes per token that one micro-batch's forward and losses leave for backward in ``cfg``'s model
    (a ``train.config.Config``: its recompute mode, FP8 conversion, and ``train.dtype`` as on a GPU:
    bfloat16 means BF16 autocast over FP32 parameters), on ``device``. Measured at two sequence lengths and
    differenced, which drops what does not grow with the tokens (autocast's BF16 copies of the weights,
    the rope tables, the FP8 experts' alignment padding): the per-token part of what the planner's
    ``stage_plans(...).activation_bytes`` predicts."""
    small, large = measured_activation_bytes(cfg, lengths, seed, device)
    return (large - small) / (lengths[1] - lengths[0])


def measured_activation_bytes(cfg: Any, lengths: tuple[int, ...], seed: int = 0, device: str = "cpu") -> list[int]:
    """Bytes one micro-batch of one sequence of each length leaves for backward (``activation_bytes_per_token``),
    in a step's context (``one_weight_cast_per_step``, as the trainer runs it). Under BF16 autocast this
    includes the weights' BF16 copies, which the planner counts as weights, not activations."""
    from train.losses import compute_losses
    from train.model import Transformer, set_recompute
    from train.runtime import autocast_to, one_weight_cast_per_step

    device_type = torch.device(device).type
    compute = torch.bfloat16 if cfg.train.dtype == "bfloat16" else torch.float32
    torch.manual_seed(seed)
    # the experts as a GPU runs them: auto would pad their rows in BF16 on a CPU (model.expert_impl, up to
    # PADDED_ROWS - 1 rows per expert and MoE block, a CPU-only choice the planner leaves out)
    impl = "loop" if cfg.model.expert_impl == "auto" else cfg.model.expert_impl
    model = Transformer(dataclasses.replace(cfg.model, expert_impl=impl)).to(device)
    model.init_weights(seed=seed)
    set_recompute(model, cfg.memory.recompute)
    if cfg.fp8.enabled:
        from fp8.convert import convert_to_fp8

        convert_to_fp8(model, "emulate" if device == "cpu" else cfg.fp8.backend, device)
    measured = []
    for length in lengths:
        window = torch.randint(0, cfg.model.vocab_size, (1, length + 1), device=device)

        def forward(window: Tensor = window) -> Tensor:
            with autocast_to(device_type, compute):
                return compute_losses(model(window[:, :-1], window), window, 0.3, 1e-4).loss

        with one_weight_cast_per_step(lambda: autocast_to(device_type, compute), device_type):
            nbytes, loss = saved_activation_bytes(model, forward)
        del loss
        measured.append(nbytes)
    return measured


def planned_activation_bytes_per_token(cfg: Any, lengths: tuple[int, int] = (128, 256)) -> float:
    """The planner's prediction of ``activation_bytes_per_token(cfg)``, differenced the same way."""
    small, large = planned_activation_bytes(cfg, lengths)
    return (large - small) / (lengths[1] - lengths[0])


def planned_activation_bytes(cfg: Any, lengths: tuple[int, ...]) -> list[float]:
    """The planner's activation bytes (``train.plan_stages.stage_plans``, one pipeline stage) for one
    micro-batch of one sequence of each length: ``measured_activation_bytes``'s prediction."""
    import copy

    from train.plan_cluster import precision
    from train.plan_stages import stage_plans

    cfg = copy.deepcopy(cfg)
    cfg.train.micro_batch_size = 1
    planned = []
    for length in lengths:
        cfg.train.seq_len = length
        device = "cuda" if cfg.train.dtype == "bfloat16" else "cpu"
        planned.append(stage_plans(cfg, 1, precision(cfg, device))[0].activation_bytes)
    return planned
