"""``train.compile``: torch.compile on the parts of the model with static shapes (issue on performance).

What is compiled, per module instance, in place (parameter names, checkpoints and the optimizer are
unchanged, unlike wrapping in an ``OptimizedModule``):

* MLA: its ``forward`` (down-projections, norms, up-projections, RoPE, the concatenations and padding
  around the fused attention, output projection), and under ``memory.recompute=selective``, where
  Block.attention calls them inside checkpoints, its ``down`` and ``core``;
* MLP: the dense FFNs and the shared experts (SwiGLU).

Not compiled: the routing and the routed experts (data-dependent shapes: the counts of the expert
loads, per-expert slices; the graph would break there anyway), the embedding, head and losses.
Applied last, after the FP8 swap, the pipeline split and the expert sharding (the torchtitan order).
FP8 linears are not traced (``fp8_linear`` is ``torch.compiler.disable``: their autograd functions hand
weight gradients over through Python objects, fp8/wgrad.py, and share per-step quantizations through a
memo): the graph breaks around each, which runs eagerly, and the norms, RoPE and attention between them
are compiled (tests/unit/test_compile.py compares it with eager FP8).

Measured on the CPU (docs/perf.md, ``python bench/train_throughput.py --compile-ours``): no gain on the
bench shape (1.00x eager, within the noise of interleaved rounds), because the GEMMs dominate there
and the fused element-wise work is small; the first step pays ~10 s of compilation, and each distinct
shape (sequence length, micro-batch) compiles once more. Hence off by default. On a GPU, where the
element-wise work around the attention is memory-bound, it is expected to pay; bench/gpu_check.sh
measures it.
"""

from __future__ import annotations

import torch
from torch import nn

from train.model import MLA, MLP

MLA_METHODS = ("down", "core")


def compile_model(model: nn.Module, recompute: str) -> str:
    """Compile ``model``'s MLA and MLP modules in place (see the module docstring); a one-line summary."""
    n_mla = n_mlp = 0
    for module in model.modules():
        if isinstance(module, MLA):
            module.compile()
            if recompute == "selective":
                for name in MLA_METHODS:  # instance attributes shadow the methods
                    setattr(module, name, torch.compile(getattr(module, name)))
            n_mla += 1
        elif isinstance(module, MLP):
            module.compile()
            n_mlp += 1
    methods = f" (and {', '.join(MLA_METHODS)} for selective recompute)" if recompute == "selective" else ""
    return f"compile: torch.compile on {n_mla} MLA{methods} and {n_mlp} MLP modules; routing and experts eager"
