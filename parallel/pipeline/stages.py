"""Cut the Transformer into pipeline stages (report sec 3.2.1; design: pipeline split).

Stage 0 holds the embedding and the first blocks, middle stages hold blocks, the last stage holds the
last blocks, the final norm, the output head and the MTP modules. A ``Stage`` is built from the
ORIGINAL submodules (the same objects, no copies) under the original names (``embed.weight``,
``layers.3.attn.wq.weight``, ``mtp.0.eh_proj.weight``), so a stage's state_dict keys are those of the
full model and checkpoints do not depend on the pipeline layout.

MTP embeds the input tokens again at the last stage, so the last stage also holds ``embed`` (the same
object as stage 0's). When both stages live on one rank (DualPipe, DualPipeV) that is one tensor;
when they do not (1F1B, ZB1P at pp > 1) each rank has its own copy of the same name, and the runtime
sums the two copies' gradients before the optimizer step (tied weights, ``runtime.PipelineRuntime``).

Automatic boundaries balance the forward cost per stage, estimated as the parameters a token passes
through (the active parameters: dense weights, the gate, shared experts and K of the N routed experts;
~FLOPs/2 per token). The embedding lookup costs nothing; the head counts once per use (main output and
each MTP depth). Attention's sequence-length-dependent score FLOPs are ignored (equal for every block).
The trainer does not rely on this default: ``parallelize.PipelinePart`` passes the planner's cuts
(``train.plan.pipeline_boundaries``: ``parallel.stage_boundaries``, or these moved to balance memory where
the first and last stage share a rank, docs/planner.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from train.losses import Losses, compute_losses, head_cross_entropy
from train.model import Block, MoE, ModelOutput, RoutedExperts, Transformer, rope_tables
from train.ops import to_compute_dtype


@dataclass
class StageOutput:
    """One stage's forward on one micro-batch."""

    hidden: Tensor | None  # [mb, T, dim] for the next stage; None on the last stage
    loss: Tensor  # this stage's part of the objective: alpha * its balance losses (+ CE + lambda * MTP on the last)
    balance_loss: Tensor  # sum of this stage's MoE balance losses, without alpha (0 without MoE layers)
    expert_load: Tensor  # [this stage's MoE layers, E] tokens per expert
    losses: Losses | None = None  # last stage: compute_losses() of its part (lm_loss, mtp_loss, alpha * its balance)


class Stage(nn.Module):
    """Consecutive blocks of a Transformer (and the ends it owns) under the model's own names.

    Children: ``embed`` (stage 0, and the last stage when the model has MTP), ``layers`` (a ModuleDict
    keyed by the original layer index), and on the last stage ``norm``, ``head``, ``mtp``.
    ``forward(x, window)``: stage 0 takes tokens [mb, T], the others the previous stage's hidden state;
    the last stage also needs the micro-batch's window [mb, T+1] (MTP embeddings and the targets).
    """

    def __init__(self, model: Transformer, index: int, n_stages: int, layer_ids: list[int]):
        super().__init__()
        self.cfg = model.cfg
        self.index = index
        self.n_stages = n_stages
        self.is_first = index == 0
        self.is_last = index == n_stages - 1
        self.embed = model.embed if self.is_first or (self.is_last and len(model.mtp) > 0) else None
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layer_ids})
        self.norm = model.norm if self.is_last else None
        self.head = model.head if self.is_last else None
        self.mtp = model.mtp if self.is_last else None
        # the same rope tables (not saved: the model's are non-persistent too)
        self.register_buffer("rope_cos", model.rope_cos, persistent=False)
        self.register_buffer("rope_sin", model.rope_sin, persistent=False)

    def extra_repr(self) -> str:
        ids = [int(i) for i in self.layers]
        span = f"layers {ids[0]}..{ids[-1]}" if ids else "no layers"
        return f"stage {self.index} of {self.n_stages}: {span}"

    @torch.no_grad()
    def init_rope(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the rope tables on ``device``: after materializing a stage built on the meta device
        (``Transformer.init_weights`` does it for the whole model)."""
        cos, sin = rope_tables(self.cfg, device=device)
        self.rope_cos, self.rope_sin = cos, sin

    @property
    def layer_ids(self) -> list[int]:
        return [int(i) for i in self.layers]

    def moe_layers(self) -> list[tuple[str, MoE]]:
        """(name, MoE) of this stage's MoE layers in the model's order: the rows of ``expert_load``."""
        return [(name, m) for name, m in self.named_modules() if isinstance(m, MoE)]

    def embed_tokens(self, tokens: Tensor) -> Tensor:
        """Stage 0's first step: token ids [mb, T] -> embeddings [mb, T, dim]."""
        return to_compute_dtype(self.embed(tokens))  # the residual stream, as Transformer.forward

    def forward(self, x: Tensor, window: Tensor | None = None, mtp_weight: float = 0.0,
                balance_alpha: float = 0.0) -> StageOutput:
        if self.is_first:
            x = self.embed_tokens(x)
        return self.body(x, window, mtp_weight, balance_alpha)

    def body(self, h: Tensor, window: Tensor | None = None, mtp_weight: float = 0.0,
             balance_alpha: float = 0.0) -> StageOutput:
        """Everything after the embedding: h [mb, T, dim] is the embedded tokens on stage 0, else the
        previous stage's output. (The runtime calls ``embed_tokens`` and ``body`` separately on stage 0,
        so that its backward can stop at the embedding output: the B/W split point.)"""
        seqlen = h.shape[1]
        cos, sin = self.rope_cos[:seqlen], self.rope_sin[:seqlen]
        embedded = h if self.is_first else None
        balance, loads = [], []
        for layer in self.layers.values():
            h, stats = layer(h, cos, sin)
            if stats is not None:
                balance.append(stats.balance_loss)
                loads.append(stats.expert_load)
        return self.finish(h, window, mtp_weight, balance_alpha, balance, loads, embedded)

    def finish(self, h: Tensor, window: Tensor | None, mtp_weight: float, balance_alpha: float,
               balance: list[Tensor], loads: list[Tensor], embedded: Tensor | None = None) -> StageOutput:
        """After the blocks: the output (hidden state, or on the last stage norm, head, MTP and the
        losses). ``balance`` / ``loads``: the blocks' balance losses and expert loads, in order."""
        if not self.is_last:
            return self._output(h, balance, loads, balance_alpha)
        seqlen = h.shape[1]
        cos, sin = self.rope_cos[:seqlen], self.rope_sin[:seqlen]
        if window is None:
            raise ValueError(f"stage {self.index} is the last stage: it needs the micro-batch's window [mb, T+1]")
        h = self.norm(h)
        logits = self.head(h)
        cross_entropies = [head_cross_entropy(logits, window)]  # each right after its head (Transformer.forward)
        mtp_logits = []
        if len(self.mtp):
            if embedded is None:
                # this rank's embedding (shared or tied copy), in the residual stream's dtype
                embedded = to_compute_dtype(self.embed(window[:, :-1]))
            for depth, module in enumerate(self.mtp, start=1):  # as Transformer.forward
                length = seqlen - depth
                h, stats = module(h[:, :length], embedded[:, depth:], cos[:length], sin[:length])
                if stats is not None:
                    balance.append(stats.balance_loss)
                    loads.append(stats.expert_load)
                h = module.norm(h)
                mtp_logits.append(self.head(h))
                cross_entropies.append(head_cross_entropy(mtp_logits[-1], window, depth))
        out = self._output(None, balance, loads, balance_alpha)
        losses = compute_losses(ModelOutput(logits, mtp_logits, out.balance_loss, out.expert_load, cross_entropies),
                                window, mtp_weight, balance_alpha)
        out.loss, out.losses = losses.loss, losses
        return out

    def _output(self, hidden: Tensor | None, balance: list[Tensor], loads: list[Tensor],
                balance_alpha: float) -> StageOutput:
        device = self.rope_cos.device
        if balance:
            balance_loss = torch.stack(balance).sum()
            expert_load = torch.stack(loads)
        else:
            balance_loss = torch.zeros((), dtype=torch.float32, device=device)
            expert_load = torch.zeros(0, self.cfg.n_routed_experts, dtype=torch.long, device=device)
        return StageOutput(hidden, balance_alpha * balance_loss, balance_loss, expert_load)


# --------------------------------------------------------------------------------------------------
# Where to cut


def _active_params(module: nn.Module, activated: int) -> int:
    """Parameters a token passes through: routed experts count K of their N, everything else in full."""
    total = 0
    for sub in module.modules():
        for p in sub.parameters(recurse=False):
            if isinstance(sub, RoutedExperts):
                total += p[0].numel() * activated  # per-expert size, whatever the expert sharding
            else:
                total += p.numel()
    return total


def stage_costs(model: Transformer) -> tuple[list[int], int]:
    """Per-block forward cost and the cost of the last stage's fixed part (norm, head, MTP modules)."""
    k = model.cfg.n_activated_experts
    blocks = [_active_params(block, k) for block in model.layers]
    head = model.head.weight.numel()
    tail = model.norm.weight.numel() + head + sum(_active_params(m, k) + head for m in model.mtp)
    return blocks, tail


def balanced_boundaries(block_costs: list[int], tail_cost: int, n_stages: int) -> list[int]:
    """The boundaries (first layer of each stage after the first) that minimise the largest stage cost.

    Every stage but the last gets at least one block; the last may get none (it has the head and MTP).
    Dynamic programming over the cut points, O(n_stages * n_layers^2).
    """
    n = len(block_costs)
    if n_stages < 1 or n < n_stages - 1:
        raise ValueError(f"cannot cut {n} layers into {n_stages} stages: every stage but the last needs a layer")
    prefix = [0]
    for c in block_costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][i]: smallest max cost of layers [0, i) in k stages (each >= 1 layer); cut[k][i]: start of stage k-1
    best = [[inf] * (n + 1) for _ in range(n_stages)]
    cut = [[0] * (n + 1) for _ in range(n_stages)]
    best[0][0] = 0
    for k in range(1, n_stages):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    # the last stage takes layers [j, n) plus the tail
    last_best, last_cut = inf, n
    for j in range(n_stages - 1, n + 1):
        value = max(best[n_stages - 1][j], prefix[n] - prefix[j] + tail_cost)
        if value < last_best:
            last_best, last_cut = value, j
    bounds = [last_cut]
    for k in range(n_stages - 1, 1, -1):
        bounds.append(cut[k][bounds[-1]])
    return sorted(bounds) if n_stages > 1 else []


def split_model(model: Transformer, n_stages: int, boundaries: list[int] | None = None) -> list[Stage]:
    """Cut ``model`` into ``n_stages`` Stages sharing its modules.

    boundaries: the layer index where each stage after the first starts (n_stages - 1 increasing
    numbers; stage 0 and the middle stages need at least one layer, the last may have none); None
    balances the estimated forward cost (``stage_costs``). The trainer passes the planner's
    (``train.plan.pipeline_boundaries``).
    """
    n = len(model.layers)
    if boundaries is None:
        boundaries = balanced_boundaries(*stage_costs(model), n_stages)
    boundaries = list(boundaries)
    if len(boundaries) != n_stages - 1:
        raise ValueError(f"split_model: {n_stages} stages need {n_stages - 1} boundaries, got {boundaries}")
    edges = [0, *boundaries, n]
    for k in range(n_stages):
        lo, hi = edges[k], edges[k + 1]
        if hi < lo or hi > n or (hi == lo and k < n_stages - 1):
            raise ValueError(f"split_model: boundaries {boundaries} leave stage {k} with layers [{lo}, {hi}) of "
                             f"{n}; every stage but the last needs at least one layer (increasing boundaries "
                             f"in 1..{n})")
    for block in model.layers:
        assert isinstance(block, Block)
    return [Stage(model, k, n_stages, list(range(edges[k], edges[k + 1]))) for k in range(n_stages)]


def rank_module(stages: list[Stage]) -> nn.Module:
    """One module with the parameters and buffers of a rank's stages under their original names, each
    once (stage 0 and the last stage share ``embed`` on one rank): for ZeroAdamW, checkpoints
    (``checkpoint.model_state``) and the gate-bias update. Not meant to be called."""
    children: dict[str, nn.Module] = {}
    layers: dict[int, nn.Module] = {}
    for stage in sorted(stages, key=lambda s: s.index):
        for name in ("embed", "norm", "head", "mtp"):
            child = getattr(stage, name)
            if child is not None:
                if children.setdefault(name, child) is not child:
                    raise ValueError(f"rank_module: two different {name!r} modules (stages of different models?)")
        layers.update((int(i), block) for i, block in stage.layers.items())
    module = nn.Module()
    for name in ("embed", "layers", "norm", "head", "mtp"):  # the model's order (moe_layers() order, buckets)
        if name == "layers":
            module.layers = nn.ModuleDict({str(i): layers[i] for i in sorted(layers)})
        elif name in children:
            setattr(module, name, children[name])
    return module
