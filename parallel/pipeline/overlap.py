"""The overlapped F&B chunk: one micro-batch's forward and another's backward, interleaved so that each
one's expert all-to-all travels while the other computes (report sec 3.2.1, Figure 4).

A stage's forward and backward are written as *pieces* (generators, ``parallel.expert.Pieces``) that
yield each time they have issued an all-to-all. ``run_interleaved`` alternates the two halves of an FB
action: while the forward's dispatch is in flight the backward computes, while the backward's gradient
all-to-all is in flight the forward computes, and so on, layer by layer:

    forward  (block l):  attention + gate + [dispatch issued] + shared experts | ... | experts + [combine issued] | ... | residual
    backward (block l):  [combine-gradient all-to-all issued] | ... | experts' backward + [dispatch-gradient issued] | ... | attention's backward

On CPU gloo runs an issued all-to-all on its own threads, on GPU NCCL on its own stream, so in both the
exchange proceeds while this thread computes the other half; the arithmetic is the same as the
sequential F then B (``run_in_order``), which the tests compare against.

For the backward to stop between the pieces, the forward cuts the stage's autograd graph at each block
input and around each expert exchange (``segmented_forward``): every cut is a detached leaf whose
gradient the backward reads and hands to the piece before it. A block without an expert exchange (dense
FFN, or experts that are not expert-parallel) is one piece; the last stage's norm, head, MTP and losses
are one more (an MTP block's exchange stays synchronous inside it). Each piece's backward is full, or
with a B/W split, input-gradient now and weight-gradient later (``backward_piece``).
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from parallel.expert import DispatchedTokens, ExpertParallelExperts, Pieces, _Route
from parallel.pipeline.stages import Stage, StageOutput
from train.model import Block, MoE

Trace = Callable[[str], None]


def no_trace(_: str) -> None:
    pass


# --------------------------------------------------------------------------------------------------
# Backward of one piece of graph


def split_backward():
    """torch's ``stage_backward_input`` and ``stage_backward_weight``, imported on first use: importing
    ``torch.distributed.pipelining`` pulls in ``torch._dynamo`` (about 1 s per process), which a run
    without a split backward never needs."""
    from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight

    return stage_backward_input, stage_backward_weight


def backward_piece(outputs: list[Tensor | None], grads: list[Tensor | None], inputs: list[Tensor],
                   params: list[nn.Parameter], split: bool, weight_grads: list[Callable[[], None]]) -> None:
    """Back-propagate ``grads`` from ``outputs`` (pairs whose output has no graph are skipped) into the
    ``inputs`` (leaves: their ``.grad`` accumulates) and, unless ``split``, into the parameters. With
    ``split`` the weight gradients are deferred: a closure for the W action is appended to ``weight_grads``
    (torch's ``stage_backward_input`` / ``stage_backward_weight``)."""
    pairs = [(o, g) for o, g in zip(outputs, grads) if o is not None and (o.requires_grad or o.grad_fn)]
    if not pairs:
        return
    outs, grads = [o for o, _ in pairs], [g for _, g in pairs]
    if not split:
        torch.autograd.backward(outs, grads)
        return
    weights = [p for p in params if p.requires_grad]
    # one scalar root, sum_i <output_i, grad_i>: its gradient at each output is exactly grad_i (the
    # products' backward multiplies by 1), and torch's function may detach it in place (not a view)
    root = torch.stack([(o * g).sum().float() for o, g in zip(outs, grads)]).sum()
    stage_input, stage_weight = split_backward()
    _, groups = stage_input([root], None, inputs, weights)
    weight_grads.append(lambda: stage_weight(weights, groups))


def take_grad(leaf: Tensor) -> Tensor:
    """The gradient accumulated in a cut leaf (zeros if nothing reached it), cleared on the leaf."""
    grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
    leaf.grad = None
    return grad


# --------------------------------------------------------------------------------------------------
# The graph of one stage's forward, cut into pieces


@dataclass
class _WholeBlock:
    """A block without an expert exchange: one piece."""

    block: Block
    x: Tensor  # input leaf
    out: Tensor
    balance: Tensor | None

    def backward(self, grad: Tensor, balance_grad: Tensor, split: bool, weight_grads: list) -> Pieces[Tensor]:
        backward_piece([self.out, self.balance], [grad, balance_grad], [self.x], list(self.block.parameters()),
                       split, weight_grads)
        return take_grad(self.x)
        yield  # a generator without an all-to-all


@dataclass
class _ExchangeBlock:
    """A block whose routed experts are expert-parallel: attention piece (attention, gate, shared experts),
    experts piece (from the received tokens to the partial sums), and the residual done by hand."""

    block: Block
    x: Tensor  # input leaf
    h: Tensor  # attention output with its residual (attention piece)
    sent: Tensor  # the tokens dispatched, in the compute dtype (attention piece)
    weights: Tensor  # their gate weights, fp32 (attention piece)
    shared: Tensor | None  # shared experts' output (attention piece)
    balance: Tensor
    tokens: DispatchedTokens  # received rows: x and weights are leaves (experts piece)
    partial: Tensor  # this rank's partial sums of the received rows
    route: _Route
    routed_dtype: torch.dtype

    def backward(self, grad: Tensor, balance_grad: Tensor, split: bool, weight_grads: list,
                 trace: Trace = no_trace) -> Pieces[Tensor]:
        block, moe = self.block, self.block.ffn
        # out = h + (routed + shared).view(shape): the gradient goes unchanged to h, routed and shared
        grad_routed = grad.reshape(-1, grad.shape[-1]).to(self.routed_dtype)
        trace("combine-grad")
        (grad_partial,) = yield from self.route.scatter_pieces([grad_routed.contiguous()], "combine_grad")
        trace("experts-backward")
        backward_piece([self.partial], [grad_partial], [self.tokens.x, self.tokens.weights],
                       list(moe.experts.parameters()), split, weight_grads)
        trace("dispatch-grad")
        grad_sent, grad_weights = yield from self.route.reduce_pieces(
            [take_grad(self.tokens.x).contiguous(), take_grad(self.tokens.weights).contiguous()], "dispatch_grad")
        trace("attention-backward")
        params = [p for name, p in block.named_parameters() if not name.startswith("ffn.experts.")]
        shared_grad = grad_routed.to(self.shared.dtype) if self.shared is not None else None
        backward_piece([self.h, self.sent, self.weights, self.shared, self.balance],
                       [grad, grad_sent, grad_weights, shared_grad, balance_grad], [self.x], params, split,
                       weight_grads)
        return take_grad(self.x)


@dataclass
class SegmentedGraph:
    """The pieces of one stage's forward on one micro-batch, and its output."""

    blocks: list[_WholeBlock | _ExchangeBlock]
    tail_input: Tensor | None  # last stage: leaf feeding norm, head, MTP and the losses
    tail_params: list[nn.Parameter]
    balance_alpha: float
    output: StageOutput

    def backward(self, output_grad: Tensor | None, loss: Tensor | None, scale: float, split: bool,
                 trace: Trace = no_trace) -> Pieces[tuple[Tensor, list[Callable[[], None]]]]:
        """The stage's backward, block by block from the end: returns its input's gradient and the
        deferred weight-gradient closures (empty unless ``split``). ``loss``: the stage's scaled loss
        (last stage; its balance part reaches only the MTP blocks, the body's are given below)."""
        weight_grads: list[Callable[[], None]] = []
        grad = output_grad
        if self.tail_input is not None:
            trace("tail-backward")
            backward_piece([loss], [torch.ones_like(loss) if loss is not None else None], [self.tail_input],
                           self.tail_params, split, weight_grads)
            grad = take_grad(self.tail_input)
        # d(scale * alpha * sum of the blocks' balance losses) / d(one of them), in the order autograd uses
        balance_grad = torch.full((), scale, dtype=torch.float32, device=grad.device) * self.balance_alpha
        for i in reversed(range(len(self.blocks))):
            piece = self.blocks[i]
            if isinstance(piece, _ExchangeBlock):
                grad = yield from piece.backward(grad, balance_grad, split, weight_grads,
                                                 lambda e, i=i: trace(f"L{i} {e}"))
            else:
                trace(f"L{i} block-backward")
                grad = yield from piece.backward(grad, balance_grad, split, weight_grads)
        return grad, weight_grads


def _exchanges(block: Block) -> bool:
    return isinstance(block.ffn, MoE) and isinstance(block.ffn.experts, ExpertParallelExperts)


def _exchange_block_forward(block: Block, x: Tensor, cos: Tensor, sin: Tensor,
                            autocast: Callable[[], contextlib.AbstractContextManager], trace: Trace
                            ) -> Pieces[tuple[_ExchangeBlock, Tensor, object]]:
    """Block.forward with MoE.forward's steps split at the all-to-alls (same arithmetic)."""
    moe: MoE = block.ffn
    experts: ExpertParallelExperts = moe.experts
    with autocast():
        trace("attention")
        h = block.attention(x, cos, sin)
        flat, routing, stats = moe.route(block.ffn_norm(h))
        handle = experts.dispatch(flat, routing)
        sent, weights = handle.x, handle.weights
        trace("dispatch")
        shared = moe.shared(flat)  # while its own tokens travel
    yield
    tokens = yield from handle.receive()
    with autocast():
        trace("experts")
        partial = experts.compute(tokens)
        combine = experts.combine(partial, handle)
        trace("combine")
    yield
    routed = yield from combine.finish_pieces()
    with autocast(), torch.no_grad():
        out = h + moe.mix(routed, shared, h.shape)
    piece = _ExchangeBlock(block, x, h, sent, weights, shared, stats.balance_loss, tokens, partial, handle.route,
                           routed.dtype)
    return piece, out, stats


def segmented_forward(stage: Stage, x: Tensor, window: Tensor | None, mtp_weight: float, balance_alpha: float,
                      autocast: Callable[[], contextlib.AbstractContextManager],
                      trace: Trace = no_trace) -> Pieces[SegmentedGraph]:
    """``stage.body(x, ...)`` cut into pieces (module docstring); ``x`` is the stage's input leaf. The
    output is the same as ``body``'s; its ``loss`` holds the blocks' balance losses as values only."""
    seqlen = x.shape[1]
    cos, sin = stage.rope_cos[:seqlen], stage.rope_sin[:seqlen]
    blocks: list[_WholeBlock | _ExchangeBlock] = []
    balance, loads = [], []
    h = x
    for i, block in enumerate(stage.layers.values()):
        leaf = h if i == 0 else h.detach().requires_grad_(True)
        if _exchanges(block):
            piece, h, stats = yield from _exchange_block_forward(block, leaf, cos, sin, autocast,
                                                                 lambda e, i=i: trace(f"L{i} {e}"))
        else:
            trace(f"L{i} block")
            with autocast():
                h, stats = block(leaf, cos, sin)
            piece = _WholeBlock(block, leaf, h, stats.balance_loss if stats is not None else None)
        blocks.append(piece)
        if stats is not None:
            balance.append(stats.balance_loss.detach())
            loads.append(stats.expert_load)
    tail_input, tail_params = None, []
    if stage.is_last:
        tail_input = h.detach().requires_grad_(True)
        tail_params = [p for name, p in stage.named_parameters() if not name.startswith("layers.")]
        h = tail_input
        trace("tail")
    with autocast():
        out = stage.finish(h, window, mtp_weight, balance_alpha, balance, loads, x if stage.is_first else None)
    return SegmentedGraph(blocks, tail_input, tail_params, balance_alpha, out)


# --------------------------------------------------------------------------------------------------
# The FB chunk


def interleave(forward: Pieces, backward: Pieces, trace: Trace = no_trace) -> None:
    """Run two halves' pieces alternately, forward first: a half runs until it has issued an all-to-all
    (or ends), then the other runs; each is run to its end."""
    ready = deque([("F", forward), ("B", backward)])
    while ready:
        name, half = ready.popleft()
        trace(f"{name} runs")
        try:
            next(half)
        except StopIteration:
            continue
        ready.append((name, half))
