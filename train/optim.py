"""AdamW with BF16 moments and FP32 master weights (report sec 3.3.3, 4.2).

The report keeps AdamW's first and second moments in BF16 "without incurring observable performance
degradation", while the master weights and the gradients stay in FP32. The arithmetic of a step is
that of ``torch.optim.AdamW`` (decoupled weight decay, bias correction), done in FP32: moments are
upcast, updated, used, and stored back rounded to their storage dtype. Hyper-parameters (sec 4.2):
beta1 = 0.9, beta2 = 0.95, weight decay 0.1 on matrices only.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from train.config import OptimConfig

MOMENT_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}

# Elements per foreach call when chunk_numel is None: cache-sized chunks on the CPU (about twice as
# fast there as one call over everything), large ones on accelerators (few kernel launches).
CPU_CHUNK_NUMEL = 2**18
ACCELERATOR_CHUNK_NUMEL = 2**27

# State entries whose dtype is the optimizer's choice, not the parameter's (see AdamW.load_state_dict).
_TYPED_STATE_KEYS = ("step", "exp_avg", "exp_avg_sq", "master")


class AdamW(torch.optim.Optimizer):
    """Decoupled-weight-decay Adam with low-precision moments and FP32 master weights (sec 3.3.3).

    Per parameter ``p`` with a gradient, ``self.state[p]`` holds:
      - ``step``: float32 scalar tensor on the CPU (as torch.optim keeps it), the number of updates;
      - ``exp_avg``, ``exp_avg_sq``: first and second moments, shaped like ``p``, in ``moment_dtype``;
      - ``master``: an FP32 copy of ``p``, only when ``p`` is not FP32 (an FP32 parameter is its own
        master). The update goes to the master, then the parameter receives it rounded.

    Per group: ``lr`` (the trainer sets it every step), ``betas``, ``eps``, ``weight_decay``.
    Parameters whose ``grad`` is None are skipped (their ``step`` does not advance).
    Tensors are updated with ``torch._foreach_*`` ops, grouped by (device, dtype) and cut into chunks
    of at most ``chunk_numel`` elements (None: CPU_CHUNK_NUMEL on the CPU, ACCELERATOR_CHUNK_NUMEL
    elsewhere), which bounds the FP32 temporaries of the BF16 moments. A larger tensor is a chunk alone.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        moment_dtype: torch.dtype = torch.bfloat16,
        chunk_numel: int | None = None,
    ):
        if not lr >= 0.0:
            raise ValueError(f"AdamW: lr ({lr}) must be >= 0")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"AdamW: betas ({betas}) must be in [0, 1)")
        if not eps >= 0.0:
            raise ValueError(f"AdamW: eps ({eps}) must be >= 0")
        if not weight_decay >= 0.0:
            raise ValueError(f"AdamW: weight_decay ({weight_decay}) must be >= 0")
        if moment_dtype not in MOMENT_DTYPES.values():
            raise ValueError(f"AdamW: moment_dtype ({moment_dtype}) must be torch.bfloat16 or torch.float32")
        if chunk_numel is not None and chunk_numel <= 0:
            raise ValueError(f"AdamW: chunk_numel ({chunk_numel}) must be > 0")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.moment_dtype = moment_dtype
        self.chunk_numel = chunk_numel

    def init_state(self, p: Tensor) -> None:
        """Create p's state (zero moments, FP32 master if needed); ZeRO-1 calls it before the first step
        so that a checkpoint can be loaded into the state."""
        state = self.state[p]
        state["step"] = torch.zeros((), dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(p, dtype=self.moment_dtype, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moment_dtype, memory_format=torch.preserve_format)
        if p.dtype != torch.float32:
            state["master"] = p.detach().to(dtype=torch.float32, copy=True)

    def _chunks(self, params: list[Tensor]) -> Iterator[list[Tensor]]:
        """Consecutive runs of parameters (one device and dtype) with at most chunk_numel elements."""
        limit = self.chunk_numel
        if limit is None:
            limit = CPU_CHUNK_NUMEL if params[0].device.type == "cpu" else ACCELERATOR_CHUNK_NUMEL
        chunk: list[Tensor] = []
        numel = 0
        for p in params:
            if chunk and numel + p.numel() > limit:
                yield chunk
                chunk, numel = [], 0
            chunk.append(p)
            numel += p.numel()
        if chunk:
            yield chunk

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """One AdamW update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW does not support sparse gradients")
                if not p.is_floating_point():
                    raise RuntimeError(f"AdamW: parameter of dtype {p.dtype} is not floating point")
                if len(self.state[p]) == 0:
                    self.init_state(p)
                buckets.setdefault((p.device, p.dtype), []).append(p)
            for params in buckets.values():
                for chunk in self._chunks(params):
                    self._update(chunk, group)
        return loss

    def _update(self, params: list[Tensor], group: dict[str, Any]) -> None:
        """AdamW on parameters of one device and dtype, in FP32 (same operations as torch.optim.AdamW)."""
        lr, eps, weight_decay = float(group["lr"]), group["eps"], group["weight_decay"]
        beta1, beta2 = group["betas"]
        states = [self.state[p] for p in params]
        for state in states:
            state["step"] += 1
        steps = [state["step"].item() for state in states]

        grads = [p.grad.float() for p in params]  # the gradient itself when FP32, else an FP32 copy
        masters = [state.get("master", p) for state, p in zip(states, params)]
        exp_avgs = [state["exp_avg"] for state in states]
        exp_avg_sqs = [state["exp_avg_sq"] for state in states]
        m = [t.float() for t in exp_avgs]  # the stored moment itself when FP32, else an FP32 copy
        v = [t.float() for t in exp_avg_sqs]

        if weight_decay != 0:
            torch._foreach_mul_(masters, 1 - lr * weight_decay)
        torch._foreach_lerp_(m, grads, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, grads, grads, 1 - beta2)

        step_sizes = [-(lr / (1 - beta1**s)) for s in steps]
        bias_correction2_sqrt = [(1 - beta2**s) ** 0.5 for s in steps]
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, bias_correction2_sqrt)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(masters, m, denom, step_sizes)

        if self.moment_dtype != torch.float32:  # store the moments back, rounded (sec 3.3.3)
            torch._foreach_copy_(exp_avgs, m)
            torch._foreach_copy_(exp_avg_sqs, v)
        if params[0].dtype != torch.float32:  # low-precision parameters receive the master, rounded
            torch._foreach_copy_(params, masters)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load as torch.optim does, but keep the moments in moment_dtype and masters in FP32.

        ``torch.optim.Optimizer.load_state_dict`` casts every floating state tensor to its parameter's
        dtype, which would turn BF16 moments into FP32 (or round an FP32 master to BF16). The typed
        entries are therefore taken out, the rest is loaded by the base class, and they are put back
        with the dtype this optimizer stores (``step``: float32 on the CPU).
        """
        saved = state_dict["state"]
        typed = {pid: {k: v for k, v in s.items() if k in _TYPED_STATE_KEYS} for pid, s in saved.items()}
        rest = {pid: {k: v for k, v in s.items() if k not in _TYPED_STATE_KEYS} for pid, s in saved.items()}
        super().load_state_dict({**state_dict, "state": rest})

        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params, strict=True):
            entries = typed.get(pid)
            if not entries:
                continue
            state = self.state[p]
            for key, value in entries.items():
                if key == "step":
                    state[key] = value.to(device="cpu", dtype=torch.float32)
                elif key == "master":
                    state[key] = value.to(device=p.device, dtype=torch.float32)
                else:
                    state[key] = value.to(device=p.device, dtype=self.moment_dtype)
            if p.dtype == torch.float32:
                state.pop("master", None)  # an FP32 parameter is its own master
            elif "master" not in state and "exp_avg" in state:
                state["master"] = p.detach().to(dtype=torch.float32, copy=True)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: weight decay on matrices (ndim >= 2), none on vectors (sec 4.2).

    Decayed: embedding, output head, attention and MLP projections, stacked expert weights
    [E, out, in], gate weights. Not decayed: RMSNorm weights and any bias. The gate biases of the
    auxiliary-loss-free balancing are buffers, so they are in no group. Frozen parameters are left
    out; empty groups are dropped.
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> AdamW:
    """AdamW of the config over ``param_groups(model)``; its lr starts at the peak, the trainer sets it each step."""
    return AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        moment_dtype=MOMENT_DTYPES[cfg.moment_dtype],
    )
