"""Expert parallelism: the routed experts split over the ep group, tokens exchanged by all-to-all (report sec 3.2.2).

Each rank of an ep group holds ``n_routed_experts / ep`` consecutive experts. A forward is

    dispatch  ->  compute (SwiGLU of the local experts)  ->  combine

- **flat**: one all-to-all over the ep group. A token goes ONCE to every rank that holds at least one of
  its experts, with its K global expert ids and K gate weights as metadata; that rank returns one
  partial sum  sum_k g_k FFN_k(u)  over ITS experts, and the source adds the partials.
- **hierarchical** (sec 3.2.2): hop 1 over ``ep_node`` (IB) sends a token once to each destination node,
  to the rank there with the sender's in-node index; hop 2 over ``ep_local`` (NVLink) forwards it to each
  rank of that node holding its experts. Combine reverses it: partials go back over ep_local, the
  forwarding rank adds those of its node per token, and one sum per (token, node) goes back over ep_node.
  Node-limited routing (sec 2.1.2) bounds the nodes per token by ``topk_groups`` (M); the traffic counter
  records the largest number seen.

Both modes add partials in the same two-level order (per (token, node) in rank order, then per token in
node order, each from zeros), and the receiving rank computes on its rows in the same order (by source
rank, then token), so hierarchical equals flat bitwise, forward and backward.

Tokens, ids and weights of one hop travel in ONE ``all_to_all_single`` as rows of bytes (gloo rejects
fp8, so everything is sent as uint8; a forwarding rank passes the bytes on without decoding them).
Split sizes come from one small all-gather of per-rank counts at dispatch (the only host sync): they also
size every index list built from a mask (``nonzero_static``), so nothing else waits for the GPU.
Autograd: a dispatch's backward is the combine-shaped route of the gradients, a combine's backward the
dispatch-shaped route. The combine's runs synchronously; the dispatch's first all-to-all is left in flight
by ``_Dispatched`` and waited for by ``_DispatchSent``, an identity recorded when the dispatch was issued,
so autograd runs the work done between issue and wait in the forward (the shared experts) while the
gradients travel (nodes run latest-recorded first). The asynchronous API (``dispatch`` -> ``wait`` ->
``compute`` -> ``combine`` -> ``wait``) lets a pipeline runtime overlap the first all-to-all of each
exchange with other work; ``forward`` is built from it. The ``*_pieces`` generators go further: they yield
at EVERY all-to-all in flight, forward and backward routes alike, so the pipeline's F&B chunk can run one
micro-batch's compute while another's tokens travel (``parallel/pipeline/overlap.py``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from parallel.mesh import ProcessGroups
from train.config import ModelConfig
from train.model import RoutedExperts, Routing, Transformer, count_per_expert
from train.ops import cast_weight, combine_rows, gather_rows, swiglu

DISPATCH_MODES = ("flat", "hierarchical")

T = TypeVar("T")
# Work in pieces: a generator that yields each time it has issued an all-to-all (so that other work can
# run while it is in flight) and returns its result; ``run_to_end`` runs one alone.
Pieces = Generator[None, None, T]


def run_to_end(pieces: Pieces[T]) -> T:
    """Run a generator of pieces to its end, with nothing in between, and return its value."""
    while True:
        try:
            next(pieces)
        except StopIteration as stop:
            return stop.value


def nonzero_sized(mask: Tensor, size: int) -> tuple[Tensor, ...]:
    """``mask.nonzero(as_tuple=True)`` when ``mask`` holds exactly ``size`` True entries, known on the host
    beforehand (from the dispatch's all-gathered counts, which are sums of the same masks), so that on a GPU
    the host does not wait for the count: ``nonzero`` reads it back, ``nonzero_static`` does not."""
    return torch.nonzero_static(mask, size=size).unbind(1)


# --------------------------------------------------------------------------------------------------
# Traffic counter and the dispatch quantizer hook


@dataclass
class TrafficCounter:
    """What this rank sent in its all-to-alls since the last ``reset()`` (accumulates over micro-batches).

    Bytes are those of the packed rows (activations plus metadata) sent to OTHER ranks, split by whether
    the receiver is on another node; rows a rank sends to itself are not counted. ``*_grad_*`` count the
    backward: the gradient of the dispatch travels like a combine, that of the combine like a dispatch.
    """

    dispatch_inter_node_bytes: int = 0
    dispatch_intra_node_bytes: int = 0
    combine_inter_node_bytes: int = 0
    combine_intra_node_bytes: int = 0
    dispatch_grad_inter_node_bytes: int = 0
    dispatch_grad_intra_node_bytes: int = 0
    combine_grad_inter_node_bytes: int = 0
    combine_grad_intra_node_bytes: int = 0
    tokens: int = 0  # local tokens dispatched
    token_rank_copies: int = 0  # (token, destination rank) pairs: the rows the experts computed on
    token_node_copies: int = 0  # (token, destination node) pairs: the rows hop 1 carries (own node included)
    max_nodes_per_token: int = 0  # most nodes any token was sent to (node-limited routing: <= node_limit)
    node_limit: int = 0  # model.topk_groups (M), for reference; not reset

    def add(self, phase: str, inter_node: int, intra_node: int) -> None:
        setattr(self, f"{phase}_inter_node_bytes", getattr(self, f"{phase}_inter_node_bytes") + inter_node)
        setattr(self, f"{phase}_intra_node_bytes", getattr(self, f"{phase}_intra_node_bytes") + intra_node)

    def reset(self) -> None:
        for f in dataclasses.fields(self):
            if f.name != "node_limit":
                setattr(self, f.name, 0)

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class DispatchQuantizer(Protocol):
    """Compresses the dispatched activations (report sec 3.3.3: FP8 dispatch, BF16 combine).

    ``encode(x)`` runs once per token at the source, before the first hop: x [N, D] -> payload tensors,
    each with N rows (any dtype, fp8 included: rows travel as bytes). ``decode(payload)`` runs where the
    tokens are consumed and returns [R, D] in a float dtype (cast to the compute dtype afterwards).
    Gradient: straight-through. The backward of the dispatch sends the gradient of the decoded rows back
    as if encode/decode were the identity (the report quantizes the backward's dgrad separately).
    """

    def encode(self, x: Tensor) -> tuple[Tensor, ...]: ...

    def decode(self, payload: tuple[Tensor, ...]) -> Tensor: ...


class IdentityQuantizer:
    """The default: the activations travel unchanged (in the compute dtype)."""

    def encode(self, x: Tensor) -> tuple[Tensor, ...]:
        return (x,)

    def decode(self, payload: tuple[Tensor, ...]) -> Tensor:
        return payload[0]


# --------------------------------------------------------------------------------------------------
# Rows of bytes and one all-to-all


@dataclass(frozen=True)
class _Field:
    dtype: torch.dtype
    shape: tuple[int, ...]  # per row

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _pack(tensors: list[Tensor]) -> tuple[Tensor, tuple[_Field, ...]]:
    """Tensors with the same number of rows -> one uint8 [rows, bytes] tensor (one all-to-all carries all)."""
    rows = tensors[0].shape[0]
    fields = tuple(_Field(t.dtype, tuple(t.shape[1:])) for t in tensors)
    columns = [t.contiguous().reshape(rows, math.prod(t.shape[1:])).view(torch.uint8) for t in tensors]
    return (columns[0] if len(columns) == 1 else torch.cat(columns, dim=1)), fields


def _unpack(packed: Tensor, fields: tuple[_Field, ...]) -> list[Tensor]:
    return [_column(packed, fields, i) for i in range(len(fields))]


def _column(packed: Tensor, fields: tuple[_Field, ...], i: int) -> Tensor:
    """The i-th tensor of packed rows (a copy)."""
    start = sum(f.nbytes for f in fields[:i])
    f = fields[i]
    column = packed[:, start:start + f.nbytes].contiguous()
    return column.view(f.dtype).reshape(packed.shape[0], *f.shape)


# torch 2.13 renamed all_gather_into_tensor (now deprecated) to all_gather_single
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass
class _InFlight:
    """Rows being received; ``wait()`` returns them."""

    rows: Tensor
    work: dist.Work | None = None

    def wait(self) -> Tensor:
        if self.work is not None:
            self.work.wait()
            self.work = None
        return self.rows


@dataclass
class _Hop:
    """One all-to-all: rows per group rank in both directions (forward = dispatch direction)."""

    group: dist.ProcessGroup
    send: list[int]  # rows I send to each group rank
    recv: list[int]  # rows I receive from each group rank
    me: int  # my index in the group
    other_node: list[bool]  # per group rank: on another node than mine

    def start(self, packed: Tensor, backward: bool, traffic: TrafficCounter, phase: str) -> _InFlight:
        send, recv = (self.recv, self.send) if backward else (self.send, self.recv)
        row_bytes = packed.shape[1]
        inter = sum(n for g, n in enumerate(send) if g != self.me and self.other_node[g]) * row_bytes
        intra = sum(n for g, n in enumerate(send) if g != self.me and not self.other_node[g]) * row_bytes
        traffic.add(phase, inter, intra)
        out = packed.new_empty(sum(recv), row_bytes)
        work = dist.all_to_all_single(out, packed.contiguous(), recv, send, group=self.group, async_op=True)
        return _InFlight(out, work)


@dataclass
class _Step:
    """Rows of the previous stage gathered in destination order (``index``), then optionally one hop.

    ``blocks`` are the rows per destination: contiguous, and no row of the previous stage appears twice
    inside a block. The reverse (combine direction) adds block after block into zeros, so the order of
    every float addition is fixed by the destination order whatever the device's index_add does.
    """

    index: Tensor
    blocks: list[int]
    n_in: int  # rows of the previous stage
    hop: _Hop | None = None

    def forward(self, packed: Tensor, traffic: TrafficCounter, phase: str) -> _InFlight:
        rows = packed[self.index]
        return self.hop.start(rows, False, traffic, phase) if self.hop else _InFlight(rows)

    def backward_start(self, tensors: list[Tensor], traffic: TrafficCounter, phase: str) -> tuple[_InFlight, tuple]:
        """Issue this step's all-to-all in the combine direction (the caller waits, unpacks, accumulates)."""
        packed, fields = _pack(tensors)
        return self.hop.start(packed, True, traffic, phase), fields

    def accumulate(self, tensors: list[Tensor]) -> list[Tensor]:
        out = []
        for t in tensors:
            acc = t.new_zeros((self.n_in, *t.shape[1:]))
            start = 0
            for size in self.blocks:
                if size:
                    acc.index_add_(0, self.index[start:start + size], t[start:start + size])
                start += size
            out.append(acc)
        return out


@dataclass
class _Route:
    """How the rows of one dispatch travel from the source tokens to the rows a rank computes on."""

    steps: list[_Step]
    traffic: TrafficCounter

    def scatter(self, tensors: list[Tensor], phase: str) -> list[Tensor]:
        """Copy rows along the whole route (synchronous); returns the received tensors."""
        return run_to_end(self.scatter_pieces(tensors, phase))

    def scatter_pieces(self, tensors: list[Tensor], phase: str) -> Pieces[list[Tensor]]:
        packed, fields = _pack(tensors)
        return _unpack((yield from self.forward_pieces(packed, phase)), fields)

    def forward_rows(self, packed: Tensor, phase: str, first: int = 0) -> Tensor:
        """Packed rows through steps ``first``.. (synchronous)."""
        return run_to_end(self.forward_pieces(packed, phase, first))

    def forward_pieces(self, packed: Tensor, phase: str, first: int = 0) -> Pieces[Tensor]:
        for step in self.steps[first:]:
            inflight = step.forward(packed, self.traffic, phase)
            if step.hop is not None:
                yield  # an all-to-all is in flight
            packed = inflight.wait()
        return packed

    def reduce(self, tensors: list[Tensor], phase: str, last: int | None = None) -> list[Tensor]:
        """Send rows back along the route and add them up (synchronous), from step ``last`` down to 0."""
        return run_to_end(self.reduce_pieces(tensors, phase, last))

    def reduce_pieces(self, tensors: list[Tensor], phase: str, last: int | None = None) -> Pieces[list[Tensor]]:
        last = len(self.steps) - 1 if last is None else last
        for step in reversed(self.steps[:last + 1]):
            if step.hop is not None:
                inflight, fields = step.backward_start(tensors, self.traffic, phase)
                yield  # an all-to-all is in flight
                tensors = _unpack(inflight.wait(), fields)
            tensors = step.accumulate(tensors)
        return tensors


# --------------------------------------------------------------------------------------------------
# Autograd around the routes


@dataclass
class _GradientsReturning:
    """The dispatch's gradients on their way back to the sources: left in flight by ``_Dispatched``'s
    backward, finished by ``_DispatchSent``'s."""

    pieces: Pieces[list[Tensor]] | None = None


class _DispatchSent(torch.autograd.Function):
    """Recorded when a dispatch is issued: the identity on (x, weights), whose backward waits for the
    gradients ``_Dispatched.backward`` left travelling. Autograd runs the nodes recorded between the two
    (the shared experts, computed while the tokens travelled) in between: they overlap the return too.
    Where no ``_Dispatched`` ran (the pipeline's F&B sends the gradients itself), it passes its own through."""

    @staticmethod
    def forward(ctx, returning: _GradientsReturning, x: Tensor, weights: Tensor):
        ctx.returning = returning
        return x.view_as(x), weights.view_as(weights)

    @staticmethod
    def backward(ctx, grad_x: Tensor, grad_w: Tensor):
        pieces, ctx.returning.pieces = ctx.returning.pieces, None
        if pieces is not None:
            grad_x, grad_w = run_to_end(pieces)
        return None, grad_x, grad_w


class _Dispatched(torch.autograd.Function):
    """Finishes a dispatch; backward issues the return of the received rows' gradients to their sources
    (``_DispatchSent`` waits for them) and hands zeros of no size on to it."""

    @staticmethod
    def forward(ctx, handle: DispatchHandle, x: Tensor, weights: Tensor):
        ctx.route, ctx.returning = handle.route, handle.returning
        ctx.sent = [(t.shape, t.dtype) for t in (x, weights)]
        x_recv, ids, w_recv = handle._finish()
        ctx.mark_non_differentiable(ids)
        return x_recv, ids, w_recv

    @staticmethod
    def backward(ctx, grad_x: Tensor, _grad_ids, grad_w: Tensor):
        pieces = ctx.route.reduce_pieces([grad_x.contiguous(), grad_w.contiguous()], "dispatch_grad")
        try:
            next(pieces)  # the first all-to-all is issued
        except StopIteration as done:  # no all-to-all on the way: the gradients are home
            return None, *done.value
        ctx.returning.pieces = pieces
        placeholders = [grad_x.new_zeros((), dtype=dtype).expand(shape) for shape, dtype in ctx.sent]
        return None, *placeholders


class _Combined(torch.autograd.Function):
    """Finishes a combine; backward copies the output gradient to every partial (dispatch-shaped)."""

    @staticmethod
    def forward(ctx, handle: CombineHandle, partial: Tensor):  # noqa: ARG004 (partial: autograd input)
        ctx.route = handle.route
        return handle._finish()

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (grad_partial,) = ctx.route.scatter([grad_out.contiguous()], "combine_grad")
        return None, grad_partial


# --------------------------------------------------------------------------------------------------
# Handles of the asynchronous API


@dataclass
class DispatchedTokens:
    """The rows a rank computes on: one per (source token, this rank), ordered by source rank then token."""

    x: Tensor  # [R, D] decoded activations in the compute dtype
    indices: Tensor  # [R, K] int32 GLOBAL expert ids of the token (only those of this rank are computed)
    weights: Tensor  # [R, K] fp32 gate weights, aligned with indices
    pairs: int  # (row, k) entries of indices on this rank's experts (from the dispatch's counts)


@dataclass
class DispatchHandle:
    """A dispatch whose first all-to-all is in flight; ``wait()`` returns the tokens to compute on."""

    experts: ExpertParallelExperts
    route: _Route
    inflight: _InFlight
    x: Tensor | None  # the autograd inputs (``_DispatchSent``'s outputs), dropped once waited
    weights: Tensor | None
    returning: _GradientsReturning
    fields: tuple[_Field, ...]  # of the packed rows: payload tensors, ids, weights
    dtype: torch.dtype  # the compute dtype (the autocast dtype at dispatch, else x's)
    counts: list[list[int]]  # per ep rank: rows to each ep rank, to each node, (token, expert) pairs to each ep rank
    _tokens: DispatchedTokens | None = None

    def wait(self) -> DispatchedTokens:
        if self._tokens is None:
            self._tokens = DispatchedTokens(*_Dispatched.apply(self, self.x, self.weights), self._pairs())
            self.x = self.weights = None
        return self._tokens

    def receive(self) -> Pieces[DispatchedTokens]:
        """``wait()`` outside autograd, in pieces: the tokens arrive as new leaves (``x`` and ``weights``
        require grad) and ``x`` / ``weights`` stay on the handle; the caller sends the gradients back
        with ``route.reduce_pieces``. Used by the pipeline's overlapped F&B (``parallel/pipeline/overlap.py``)."""
        x, ids, weights = yield from self._finish_pieces()
        self._tokens = DispatchedTokens(x.requires_grad_(), ids, weights.requires_grad_(), self._pairs())
        return self._tokens

    def _pairs(self) -> int:
        """(token, expert) pairs the sources route to this rank's experts: what ``compute`` will find."""
        layout = self.experts.groups.layout
        return sum(c[layout.ep + layout.ep_nodes + layout.ep_rank] for c in self.counts)

    def _finish(self) -> tuple[Tensor, Tensor, Tensor]:
        return run_to_end(self._finish_pieces())

    def _finish_pieces(self) -> Pieces[tuple[Tensor, Tensor, Tensor]]:
        packed = self.inflight.wait()
        first = len(self.route.steps)
        if self.experts.mode == "hierarchical":
            self.route.steps += self.experts._forwarding_steps(packed, self.fields, self.counts)
        packed = yield from self.route.forward_pieces(packed, "dispatch", first)
        *payload, ids, weights = _unpack(packed, self.fields)
        x = self.experts.quantizer.decode(tuple(payload)).to(self.dtype)
        return x, ids, weights


@dataclass
class CombineHandle:
    """A combine whose first all-to-all is in flight; ``wait()`` returns [N, D] for the source tokens."""

    route: _Route
    inflight: _InFlight
    fields: tuple[_Field, ...]
    step: int  # the step whose all-to-all is in flight
    partial: Tensor | None
    _out: Tensor | None = None

    def wait(self) -> Tensor:
        if self._out is None:
            self._out = _Combined.apply(self, self.partial)
            self.partial = None
        return self._out

    def _finish(self) -> Tensor:
        return run_to_end(self.finish_pieces())

    def finish_pieces(self) -> Pieces[Tensor]:
        """``wait()`` outside autograd, in pieces (the output does not require grad)."""
        tensors = self.route.steps[self.step].accumulate(_unpack(self.inflight.wait(), self.fields))
        (out,) = yield from self.route.reduce_pieces(tensors, "combine", last=self.step - 1)
        return out


# --------------------------------------------------------------------------------------------------
# The module


class ExpertParallelExperts(RoutedExperts):
    """Drop-in replacement for RoutedExperts inside MoE: holds n_experts/ep local experts and exchanges
    tokens in the ep group (report sec 3.2.2).

    w1, w2, w3 have RoutedExperts' names with local shapes [E/ep, ...]; ``n_experts`` stays global and
    ``expert_offset`` is the global id of local expert 0. ``traffic`` counts what the all-to-alls send.
    """

    def __init__(self, cfg: ModelConfig, groups: ProcessGroups, dispatch: str = "flat",
                 quantizer: DispatchQuantizer | None = None):
        layout = groups.layout
        if dispatch not in DISPATCH_MODES:
            raise ValueError(f"dispatch ({dispatch!r}) must be one of {', '.join(DISPATCH_MODES)}")
        if cfg.n_routed_experts % layout.ep:
            raise ValueError(f"n_routed_experts ({cfg.n_routed_experts}) must be divisible by ep ({layout.ep})")
        n_local = cfg.n_routed_experts // layout.ep
        super().__init__(dataclasses.replace(cfg, n_routed_experts=n_local))  # allocates local shapes only
        self.n_experts = cfg.n_routed_experts
        self.n_local_experts = n_local
        self.expert_offset = layout.ep_rank * n_local
        self.groups = groups
        self.mode = dispatch
        self.quantizer: DispatchQuantizer = quantizer if quantizer is not None else IdentityQuantizer()
        self.traffic = TrafficCounter(node_limit=cfg.topk_groups)

    def extra_repr(self) -> str:
        layout = self.groups.layout
        return (f"experts {self.expert_offset}..{self.expert_offset + self.n_local_experts - 1} of "
                f"{self.n_experts}, ep {layout.ep} ({layout.ep_nodes} node(s) x {layout.ep_per_node}), {self.mode}")

    # ---- topology
    @property
    def _per_node(self) -> int:
        return self.groups.layout.ep_per_node

    @property
    def _my_node(self) -> int:
        return self.groups.layout.ep_rank // self._per_node

    @property
    def _my_local(self) -> int:
        return self.groups.layout.ep_rank % self._per_node

    # ---- forward
    def forward(self, x: Tensor, routing: Routing) -> Tensor:
        """Same semantics as RoutedExperts.forward: x [N, D] local tokens, GLOBAL expert ids; returns [N, D]."""
        return self.forward_beside(x, routing, lambda: None)[0]

    def forward_beside(self, x: Tensor, routing: Routing, beside: Callable[[], Tensor | None]
                       ) -> tuple[Tensor, Tensor | None]:
        """``RoutedExperts.forward_beside`` with ``beside()`` (the shared experts) run while the dispatch's
        all-to-all is in flight: on a GPU it computes on the default stream as NCCL moves the tokens."""
        handle = self.dispatch(x, routing)
        other = beside()
        return self.combine(self.compute(handle.wait()), handle).wait(), other

    def dispatch(self, x: Tensor, routing: Routing) -> DispatchHandle:
        """Plan the exchange (one all-gather of counts, a host sync) and issue its first all-to-all.

        x must not be modified in place until ``wait()``.
        """
        device = x.device.type
        if torch.is_autocast_enabled(device):  # as RoutedExperts: the experts run in the autocast dtype
            x = x.to(torch.get_autocast_dtype(device))
        weights = routing.weights.float()
        layout, per_node = self.groups.layout, self._per_node
        ep, n_nodes, me = layout.ep, layout.ep_nodes, layout.ep_rank
        n = x.shape[0]

        rank_of = routing.indices // self.n_local_experts  # [N, K] ep rank holding each selected expert
        to_rank = torch.zeros(n, ep, dtype=torch.bool, device=x.device).scatter_(1, rank_of, True)
        to_node = to_rank.view(n, n_nodes, per_node).any(dim=2)
        nodes_per_token = to_node.sum(dim=1)
        local = torch.cat([to_rank.sum(dim=0), to_node.sum(dim=0), count_per_expert(rank_of, ep),
                           torch.cat([nodes_per_token, nodes_per_token.new_zeros(1)]).max().view(1)])
        gathered = local.new_empty(ep * local.numel())
        _all_gather_single(gathered, local, group=self.groups.ep)
        counts = gathered.view(ep, -1).tolist()
        ranks = [row[:ep] for row in counts]  # ranks[s][d]: rows ep rank s sends to ep rank d (flat)
        nodes = [row[ep:ep + n_nodes] for row in counts]  # nodes[s][m]: rows ep rank s sends to node m

        t = self.traffic
        t.tokens += n
        t.token_rank_copies += sum(ranks[me])
        t.token_node_copies += sum(nodes[me])
        t.max_nodes_per_token = max(t.max_nodes_per_token, counts[me][-1])

        # stage 1: one row per (token, node), by node then token
        node_of_row, token_of_row = nonzero_sized(to_node.t(), sum(nodes[me]))
        if self.mode == "flat":
            # stage 2: one row per (token, rank), by rank then token, indexing the stage-1 rows; then one hop
            row_of = torch.full((n_nodes, n), -1, dtype=torch.long, device=x.device)
            row_of[node_of_row, token_of_row] = torch.arange(node_of_row.numel(), device=x.device)
            rank_of_row, token_of_rank_row = nonzero_sized(to_rank.t(), sum(ranks[me]))
            hop = _Hop(self.groups.ep, send=ranks[me], recv=[ranks[s][me] for s in range(ep)], me=me,
                       other_node=[d // per_node != self._my_node for d in range(ep)])
            steps = [_Step(token_of_row, nodes[me], n),
                     _Step(row_of[rank_of_row // per_node, token_of_rank_row], ranks[me], node_of_row.numel(), hop)]
        else:
            # hop 1 (IB): to the rank with my in-node index on each destination node
            l = self._my_local
            hop = _Hop(self.groups.ep_node, send=nodes[me], recv=[nodes[m * per_node + l][self._my_node]
                                                                  for m in range(n_nodes)],
                       me=self._my_node, other_node=[m != self._my_node for m in range(n_nodes)])
            steps = [_Step(token_of_row, nodes[me], n, hop)]

        payload = self.quantizer.encode(x.detach())
        if any(p.shape[0] != n for p in payload):
            raise ValueError("DispatchQuantizer.encode must return tensors with one row per token")
        packed, fields = _pack([*payload, routing.indices.to(torch.int32), weights.detach()])
        route = _Route(steps, self.traffic)
        for step in steps[:-1]:
            packed = step.forward(packed, self.traffic, "dispatch").wait()  # local steps
        inflight = steps[-1].forward(packed, self.traffic, "dispatch")  # the first all-to-all, asynchronous
        returning = _GradientsReturning()
        x, weights = _DispatchSent.apply(returning, x, weights)
        return DispatchHandle(self, route, inflight, x, weights, returning, fields, x.dtype, counts)

    def _forwarding_steps(self, packed: Tensor, fields: tuple[_Field, ...], counts: list[list[int]]) -> list[_Step]:
        """Hierarchical, at the forwarding rank: hop 2 (NVLink) to the ranks of this node holding the
        experts of each received row, then the order by source rank and token that flat receives in."""
        layout, per_node = self.groups.layout, self._per_node
        n_nodes, me, node, l = layout.ep_nodes, layout.ep_rank, self._my_node, self._my_local
        ids = _column(packed, fields, len(fields) - 2).long()
        local_rank = ids // self.n_local_experts - node * per_node
        on_node = (local_rank >= 0) & (local_rank < per_node)
        to_local = torch.zeros(packed.shape[0], per_node + 1, dtype=torch.bool, device=packed.device)
        to_local.scatter_(1, torch.where(on_node, local_rank, per_node), True)
        ranks = [c[:layout.ep] for c in counts]
        send = [sum(ranks[m * per_node + l][node * per_node + j] for m in range(n_nodes)) for j in range(per_node)]
        recv = [sum(ranks[m * per_node + k][me] for m in range(n_nodes)) for k in range(per_node)]
        _, row = nonzero_sized(to_local[:, :per_node].t(), sum(send))  # by destination, then arrival order
        hop = _Hop(self.groups.ep_local, send=send, recv=recv, me=l, other_node=[False] * per_node)

        # rows arrive by forwarder k, then source node m; flat receives them by source rank m * per_node + k
        sizes = {(m, k): ranks[m * per_node + k][me] for m in range(n_nodes) for k in range(per_node)}
        start, offset = {}, 0
        for k in range(per_node):
            for m in range(n_nodes):
                start[m, k], offset = offset, offset + sizes[m, k]
        order = [torch.arange(start[m, k], start[m, k] + sizes[m, k]) for m in range(n_nodes) for k in range(per_node)]
        order = torch.cat(order).to(packed.device) if order else torch.zeros(0, dtype=torch.long, device=packed.device)
        return [_Step(row, send, packed.shape[0], hop), _Step(order, [offset], offset)]

    def compute(self, tokens: DispatchedTokens) -> Tensor:
        """Partial sums over this rank's experts: row r -> sum_k g_rk FFN_k(x_r) for its local experts k.

        As RoutedExperts: pairs sorted by expert, SwiGLU per expert (loop or grouped GEMM) in the dtype of
        x with the gate weights applied to its output in fp32, then summed per row in that dtype.
        """
        x = tokens.x
        local = tokens.indices.long() - self.expert_offset
        mine = (local >= 0) & (local < self.n_local_experts)
        row, k = nonzero_sized(mine, tokens.pairs)
        expert = local[row, k]
        order = expert.argsort(stable=True)
        row_of, k_of = row[order], k[order]
        counts = count_per_expert(expert, self.n_local_experts)
        x_sorted, weights = gather_rows(x, row_of), tokens.weights[row_of, k_of]
        if row_of.numel() == 0:
            # no token for any local expert: an empty product still gives every weight a (zero) gradient
            w1, w2, w3 = (cast_weight(w, x.dtype) for w in (self.w1, self.w2, self.w3))
            out = swiglu(x_sorted @ w1[0].t(), x_sorted @ w3[0].t(), weights) @ w2[0].t()
        else:
            out = self.ffn(x_sorted, counts, weights)
        return combine_rows(out, row_of, x.shape[0])

    def combine(self, partial: Tensor, handle: DispatchHandle) -> CombineHandle:
        """Issue the first all-to-all that returns the partials [R, D] of ``handle``'s rows to their sources.

        ``partial`` must not be modified in place until ``wait()``.
        """
        if handle._tokens is None:
            raise RuntimeError("combine() needs the dispatch to be waited first")
        route = handle.route
        tensors = [partial.detach()]
        step = len(route.steps) - 1
        while route.steps[step].hop is None:  # local steps (hierarchical: back to arrival order)
            tensors = route.steps[step].accumulate(tensors)
            step -= 1
        inflight, fields = route.steps[step].backward_start(tensors, route.traffic, "combine")
        return CombineHandle(route, inflight, fields, step, partial)


def parallelize_experts(model: Transformer, groups: ProcessGroups, dispatch: str = "flat",
                        quantizer: DispatchQuantizer | None = None) -> None:
    """Replace every MoE layer's RoutedExperts by ExpertParallelExperts, in place (design: expert sharding).

    On the meta device nothing is copied (the trainer materializes and initialises afterwards); on a real
    device the local slice of the existing weights is copied, so the model computes what it did before.
    """
    for moe in model.moe_layers():
        old = moe.experts
        if isinstance(old, ExpertParallelExperts):
            raise ValueError("parallelize_experts: the experts are already expert-parallel")
        with torch.device(old.w1.device):
            new = ExpertParallelExperts(model.cfg, groups, dispatch, quantizer)
        new.impl, new.fp8_ffn = old.impl, old.fp8_ffn  # the FP8 swap comes first (design order)
        new.to(dtype=old.w1.dtype)
        new.train(old.training)
        if old.w1.device.type != "meta":
            rows = slice(new.expert_offset, new.expert_offset + new.n_local_experts)
            with torch.no_grad():
                for name in ("w1", "w2", "w3"):
                    getattr(new, name).copy_(getattr(old, name)[rows])
        moe.experts = new
