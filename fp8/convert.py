"""Swap a DeepSeek-V3 model's GEMMs to FP8 (report sec 3.3.1), before parallelization.

Converted (FP8 Fprop / Dgrad / Wgrad, activations cached in FP8):

* MLA's projections ``wq`` (or ``wq_a`` / ``wq_b``), ``wkv_a``, ``wkv_b``, and ``wo``; ``wo`` is the
  "Linear after the attention operator" whose input is cached in E5M6 (sec 3.3.3, ``cache="e5m6"``);
* the SwiGLU MLPs: the dense FFN of the first layers and the shared experts (``w1`` / ``w2`` / ``w3``);
* the routed experts: ``RoutedExperts.fp8_ffn = partial(fp8_expert_ffn, backend=...)`` (grouped GEMMs,
  SwiGLU inputs cached in FP8, its output recomputed in backward).

Kept in BF16 / FP32 (the report's list): the embedding, the output head, the MoE gate, every RMSNorm and
the attention operator itself (SDPA, not a module). Also kept: MTP's projection ``eh_proj``. The report
does not list it either way; it is one [D, 2D] GEMM per MTP depth (negligible cost next to the blocks),
and it sits between the embedding and the shared head, both high-precision, mixing a fresh embedding
into the MTP path; so it follows them. The transformer block inside each MTP module is an ordinary block
and is converted like the main ones.

Modules are swapped, not rebuilt: each ``Fp8Linear`` is created on the meta device and adopts the old
module's Parameter objects, so parameter names, state-dict keys, optimizer state and data (or the lack
of it on meta) are untouched. Works on a meta model (then ``to_empty`` + init) and on a materialized
one. Converting a model twice raises ValueError (a second conversion is always a mistake, e.g. two
backends).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import nn

from fp8.backend import get_backend
from fp8.experts import fp8_expert_ffn
from fp8.linear import Fp8Linear
from train.model import MLA, MLP, Gate, RMSNorm, RoutedExperts

ATTENTION_LINEARS = ("wq", "wq_a", "wq_b", "wkv_a", "wkv_b", "wo")
MLP_LINEARS = ("w1", "w2", "w3")
E5M6_LINEARS = ("wo",)  # input of the Linear after the attention operator (sec 3.3.3)


@dataclass
class Fp8ConversionReport:
    """What ``convert_to_fp8`` did: FP8 linears (name -> cache format), FP8 routed experts, and the
    modules with parameters kept in BF16/FP32 (name -> kind)."""

    backend: str
    linears: dict[str, str] = field(default_factory=dict)
    experts: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for the trainer's log."""
        e5m6 = sum(cache == "e5m6" for cache in self.linears.values())
        kinds = sorted(set(self.kept.values()))
        return (f"fp8 ({self.backend}): {len(self.linears)} linears ({e5m6} with E5M6 cache), "
                f"{len(self.experts)} routed-expert groups; kept high precision: {len(self.kept)} modules "
                f"({', '.join(kinds)})")


def _default_device(model: nn.Module) -> torch.device:
    """The model's device; for a meta model, the device it will most likely be materialized on."""
    param = next(model.parameters(), None)
    if param is None or param.device.type == "meta":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return param.device


def is_fp8(model: nn.Module) -> bool:
    """Whether any part of ``model`` is already converted."""
    return any(isinstance(m, Fp8Linear) or getattr(m, "fp8_ffn", None) is not None for m in model.modules())


def convert_to_fp8(model: nn.Module, backend: str = "auto", device: torch.device | str | None = None,
                   expert_weight_cache: bool = True) -> Fp8ConversionReport:
    """Swap ``model``'s attention and MLP linears for ``Fp8Linear`` and give its routed experts the FP8
    grouped SwiGLU (see the module docstring for what is kept). ``backend`` is a name for
    ``fp8.backend.get_backend``, resolved for ``device`` (default: the model's device; cuda/cpu for a
    meta model). ``expert_weight_cache``: the experts' FP8 weight blocks made once per training step
    (``fp8.expert_weight_cache``; fp8/experts.py). In place; returns the report."""
    if is_fp8(model):
        raise ValueError("model is already converted to FP8 (convert_to_fp8 was applied before)")
    gemm = get_backend(backend, device if device is not None else _default_device(model))
    report = Fp8ConversionReport(backend=gemm.name)

    def swap(parent: nn.Module, prefix: str, names: tuple[str, ...]) -> None:
        for name in names:
            linear = getattr(parent, name, None)
            if isinstance(linear, nn.Linear):
                cache = "e5m6" if name in E5M6_LINEARS and isinstance(parent, MLA) else "e4m3"
                setattr(parent, name, Fp8Linear.from_linear(linear, gemm, cache))
                report.linears[f"{prefix}{name}"] = cache

    for module_name, module in list(model.named_modules()):
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, MLA):
            swap(module, prefix, ATTENTION_LINEARS)
        elif isinstance(module, MLP):
            swap(module, prefix, MLP_LINEARS)
        elif isinstance(module, RoutedExperts):
            module.fp8_ffn = functools.partial(fp8_expert_ffn, backend=gemm, cache_weights=expert_weight_cache)
            report.experts.append(module_name)

    for module_name, module in model.named_modules():
        if isinstance(module, Fp8Linear) or module_name in report.experts:
            continue
        if not any(True for _ in module.parameters(recurse=False)):
            continue
        kind = ("embedding" if isinstance(module, nn.Embedding) else "gate" if isinstance(module, Gate)
                else "norm" if isinstance(module, RMSNorm) else "linear" if isinstance(module, nn.Linear)
                else type(module).__name__)
        report.kept[module_name] = kind
    return report
