"""AdamW with BF16 moments and FP32 master weights (report sec 3.3.3, 4.2).

The report keeps AdamW's first and second moments in BF16 "without incurring observable performance
degradation", while the master weights and the gradients stay in FP32. The arithmetic of a step is
that of ``torch.optim.AdamW`` (decoupled weight decay, bias correction), done in FP32: moments are
upcast, updated, used, and stored back rounded to their storage dtype. Hyper-parameters (sec 4.2):
beta1 = 0.9, beta2 = 0.95, weight decay 0.1 on matrices only.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from train.config import OptimConfig
from train.errors import UserError

MOMENT_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
UPDATES = ("auto", "fused", "foreach", "triton")  # optim.update, AdamW(update=...)

# Elements per foreach call when chunk_numel is None: cache-sized chunks on the CPU (about twice as
# fast there as one call over everything), large ones on accelerators (few kernel launches).
CPU_CHUNK_NUMEL = 2**18
ACCELERATOR_CHUNK_NUMEL = 2**27
# Elements the fused CPU kernel handles per vector instruction, rounded up to cover AVX-512 (16) and
# unrolling: tensors are fed to it in whole multiples of this (see AdamW).
_LANES = 64

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
    Tensors are grouped by (device, dtype) and cut into chunks of at most ``chunk_numel`` elements
    (None: CPU_CHUNK_NUMEL on the CPU, ACCELERATOR_CHUNK_NUMEL elsewhere), which bounds the FP32
    temporaries of the BF16 moments (views of one scratch buffer, reused). A larger tensor is a chunk
    alone. A chunk is updated by ``update``:

    - ``"foreach"`` (the reference): ``torch._foreach_*`` ops in the order of ``torch.optim.AdamW``'s
      foreach path, about ten passes over the data;
    - ``"triton"`` (the default on CUDA where Triton imports): one pass per tensor reading and writing the
      BF16 moments directly (train/adamw_triton.py; about 22 bytes per parameter against the reference's
      130); a non-contiguous tensor goes through the reference;
    - ``"fused"`` (the default on the CPU): torch's fused AdamW kernel (``torch._fused_adamw_``, what
      ``torch.optim.AdamW(fused=True)`` runs), one pass. It takes FP32 moments only, so BF16 moments are
      widened into the scratch before and rounded back after. Its CPU kernel computes the last
      ``numel % vector width`` elements of a tensor on a scalar path whose rounding differs from the
      vector path's, which would make a result depend on where ZeRO-1 cuts a parameter; every tensor's
      tail therefore goes through the kernel zero-padded to whole vectors (``_LANES``), so each element
      is computed the same way wherever it lies (tested bitwise: ZeRO-1 shards against one process).

    All compute the step in FP32 and round the moments once, so they agree to FP32 rounding
    (tests/unit/test_optim.py, test_optim_triton.py); ``python -m bench optimizer`` measures them
    (docs/perf.md). ``"auto"``: fused on the CPU, triton on CUDA when importable, else foreach.
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
        update: str = "auto",
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
        if update not in UPDATES:
            raise ValueError(f"AdamW: update ({update!r}) must be one of {', '.join(UPDATES)}")
        if chunk_numel is not None and chunk_numel <= 0:
            raise ValueError(f"AdamW: chunk_numel ({chunk_numel}) must be > 0")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.moment_dtype = moment_dtype
        self.chunk_numel = chunk_numel
        self.update = update
        self.triton_failure: str | None = None  # why the Triton update failed here (auto then uses foreach)
        self._scratch: dict[torch.device, Tensor] = {}  # CPU: FP32 temporaries of a chunk, reused every step

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
            for (device, _), params in buckets.items():
                update = {"fused": self._update_fused, "foreach": self._update,
                          "triton": self._update_triton}[self.update_on(device)]
                for chunk in self._chunks(params):
                    update(chunk, group)
        return loss

    def update_on(self, device: torch.device) -> str:
        """The update path this optimizer runs for tensors on ``device`` (``update`` with auto resolved)."""
        if self.update == "triton" and not triton_importable():
            raise UserError("optim.update=triton needs Triton (pip install -e '.[gpu]'); use optim.update=auto")
        if self.update == "triton":
            from fp8.triton_gemm import runs_on

            if not runs_on(device):
                raise UserError(f"optim.update=triton runs on CUDA (or under TRITON_INTERPRET=1), not on "
                                f"{device.type}; use optim.update=auto")
        if self.update != "auto":
            return self.update
        if device.type == "cpu":
            return "fused"
        usable = device.type == "cuda" and triton_importable() and self.triton_failure is None
        return "triton" if usable else "foreach"

    def _scratch_views(self, device: torch.device, sizes: list[int]) -> list[Tensor]:
        """Flat FP32 tensors of ``sizes``. On the CPU: consecutive views of one scratch buffer that grows
        to the largest chunk and is reused, because fresh temporaries cost more than the arithmetic
        there: each large allocation comes back from the OS as new pages (measured: an out-of-place
        ``_foreach_sqrt`` over 15M elements 47 ms, the in-place one 8 ms). Elsewhere a fresh buffer:
        the caching allocator makes it cheap and gives the memory back to activations after the step."""
        if device.type != "cpu":
            return list(torch.empty(sum(sizes), dtype=torch.float32, device=device).split(sizes))
        scratch = self._scratch.get(device)
        if scratch is None or scratch.numel() < sum(sizes):
            scratch = self._scratch[device] = torch.empty(sum(sizes), dtype=torch.float32, device=device)
        return list(scratch[:sum(sizes)].split(sizes))

    def _update_fused(self, params: list[Tensor], group: dict[str, Any]) -> None:
        """AdamW on parameters of one device and dtype through torch's fused kernel. The FP32 moments are
        copied into the scratch, each padded to whole vectors; a contiguous parameter's whole vectors
        are updated in place, and its tail (or all of a non-contiguous one, such as an expert shard cut
        along its second dim) in a zero-padded scratch copy (see the class docstring)."""
        beta1, beta2 = group["betas"]
        device = params[0].device
        states = [self.state[p] for p in params]
        step_counts = [state["step"] for state in states]
        torch._foreach_add_(step_counts, 1)
        steps = step_counts if device.type == "cpu" else [s.to(device, non_blocking=True) for s in step_counts]
        masters = [state.get("master", p) for state, p in zip(states, params)]
        grads = [p.grad.float() for p in params]
        n = len(params)
        numels = [p.numel() for p in params]
        padded = [-(-k // _LANES) * _LANES for k in numels]
        bodies = [k - k % _LANES if p.is_contiguous() else 0 for k, p in zip(numels, masters)]
        copied = [i for i in range(n) if bodies[i] < numels[i]]  # tail (or whole) done in the scratch
        views = self._scratch_views(device, padded * 2 + [2 * (padded[i] - bodies[i]) for i in copied])
        m, v = views[:n], views[n:2 * n]
        for dst, key in ((m, "exp_avg"), (v, "exp_avg_sq")):  # FP32 moments, zero past the end
            pads = [d[k:] for d, k in zip(dst, numels) if k < d.numel()]
            if pads:
                torch._foreach_zero_(pads)
            torch._foreach_copy_([d[:k].view(s[key].shape) for d, k, s in zip(dst, numels, states)],
                                 [s[key] for s in states])
        ops: list[list[Tensor]] = [[], [], [], [], []]  # params, grads, m, v, steps
        for i, body in enumerate(bodies):
            if body:
                flat_p, flat_g = masters[i].view(-1), grads[i].reshape(-1)
                for op, t in zip(ops, (flat_p[:body], flat_g[:body], m[i][:body], v[i][:body], steps[i])):
                    op.append(t)
        back = []  # (the parameter, or its tail; the scratch holding it)
        for i, room in zip(copied, views[2 * n:]):
            body, rest = bodies[i], numels[i] - bodies[i]
            tail_p, tail_g = room.zero_().chunk(2)
            src_p = masters[i].view(-1)[body:] if body else masters[i]
            src_g = grads[i].reshape(-1)[body:]
            tail_p[:rest].view(src_p.shape).copy_(src_p)
            tail_g[:rest].copy_(src_g)
            for op, t in zip(ops, (tail_p, tail_g, m[i][body:], v[i][body:], steps[i])):
                op.append(t)
            back.append((src_p, tail_p[:rest].view(src_p.shape)))
        torch._fused_adamw_(*ops[:4], [], ops[4], lr=float(group["lr"]), beta1=beta1, beta2=beta2,
                            weight_decay=group["weight_decay"], eps=group["eps"], amsgrad=False, maximize=False)
        if back:
            torch._foreach_copy_([dst for dst, _ in back], [src for _, src in back])
        for src, key in ((m, "exp_avg"), (v, "exp_avg_sq")):  # stored back, rounded if BF16 (sec 3.3.3)
            torch._foreach_copy_([s[key] for s in states],
                                 [t[:k].view(s[key].shape) for t, k, s in zip(src, numels, states)])
        if params[0].dtype != torch.float32:  # low-precision parameters receive the master, rounded
            torch._foreach_copy_(params, masters)

    def _update_triton(self, params: list[Tensor], group: dict[str, Any]) -> None:
        """AdamW through train/adamw_triton.py, one launch per tensor; non-contiguous ones through ``_update``."""
        from train.adamw_triton import adamw_update

        beta1, beta2 = group["betas"]
        rest = []
        for index, p in enumerate(params):
            state = self.state[p]
            master = state.get("master", p)
            if self.triton_failure is not None or not (master.is_contiguous() and p.is_contiguous()):
                rest.append(p)
                continue
            try:  # the kernel compiles at its first launch with a new signature: it raises before any write
                adamw_update(master, p.grad.contiguous(), state["exp_avg"], state["exp_avg_sq"],
                             p if p is not master else None, lr=float(group["lr"]), beta1=beta1, beta2=beta2,
                             eps=group["eps"], weight_decay=group["weight_decay"], step=state["step"].item() + 1)
            except Exception as exc:  # a kernel that cannot build or run on this GPU
                if self.update == "triton":  # asked for by name: say so
                    raise
                self.triton_failure = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
                warnings.warn(f"AdamW: the Triton update failed ({self.triton_failure}); updating with the foreach "
                              "reference from now on (slower, same numbers to FP32 rounding)", RuntimeWarning,
                              stacklevel=4)
                rest.extend(params[index:])
                break
            state["step"] += 1
        if rest:
            self._update(rest, group)

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
        n = len(params)
        temporaries = 1 if self.moment_dtype == torch.float32 else 3
        views = self._scratch_views(params[0].device, [p.numel() for p in params] * temporaries)
        views = [t.view(p.shape) for t, p in zip(views, params * temporaries)]
        denom = views[:n]
        if self.moment_dtype == torch.float32:
            m, v = exp_avgs, exp_avg_sqs
        else:  # FP32 copies of the stored moments
            m, v = views[n:2 * n], views[2 * n:]
            torch._foreach_copy_(m, exp_avgs)
            torch._foreach_copy_(v, exp_avg_sqs)

        if weight_decay != 0:
            torch._foreach_mul_(masters, 1 - lr * weight_decay)
        torch._foreach_lerp_(m, grads, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, grads, grads, 1 - beta2)

        step_sizes = [-(lr / (1 - beta1**s)) for s in steps]
        bias_correction2_sqrt = [(1 - beta2**s) ** 0.5 for s in steps]
        torch._foreach_copy_(denom, v)
        torch._foreach_sqrt_(denom)
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
        update=cfg.update,
    )


def triton_importable() -> bool:
    """Whether Triton (the gpu extra) imports here."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True
