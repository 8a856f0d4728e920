"""The pipeline runtime: executes one rank's action list (``actions.py``) on its stage modules.

One ``PipelineRuntime`` per rank; ``step(windows, ...)`` runs every micro-batch through the schedule
once and leaves the gradients in the stages' parameters, scaled as the one-process trainer scales them
(each micro-batch's loss divided by the number of micro-batches). The optimizer step is the caller's.

Actions
- ``F``: the chunk's forward. Its input is a received buffer (RECV_F) or, when the previous stage is on
  this rank (DualPipeV's turn), that stage's output. Every stage's input is a detached leaf, so each
  (stage, mb) has its own autograd graph; stage 0 also keeps its embedding output (see below).
- ``B``: the backward of (stage, mb) from the output gradient (RECV_B, the next stage on this rank, or
  the loss on the last stage). If the schedule has a ``W`` for that (stage, mb) and it is not the very
  next action, B computes the input gradient only and queues the weight gradient for W
  (``torch.distributed.pipelining._backward.stage_backward_input`` / ``stage_backward_weight``: B walks
  the graph from the outputs to the input, saving the gradients that reach the parameters' branches;
  W resumes from those). Otherwise B is one full backward (and the adjacent W does nothing).
  On stage 0 the input is the embedding output, detached: B stops there and W also runs the embedding's
  backward with the saved input gradient (torch's own schedule instead runs all of stage 0 in W).
- ``W``: the queued weight-gradient closure of (stage, mb).
- ``FB``: the forward of one micro-batch and the backward of another, handed to the ``overlap`` hook
  as a ``ForwardJob`` and a ``BackwardJob`` (below).
- ``SEND_*`` / ``RECV_*``: each run of consecutive ones is posted as ONE ``batch_isend_irecv`` over the
  pp group's global ranks; a receive is waited on just before its tensor is used, a send only at the
  end of the step (completed sends are dropped on the way). Shapes are known in advance
  ([micro_batch_size, T, dim] in the activation dtype). Point-to-point messages between two ranks are
  matched in the order they are posted (NCCL ignores tags), so a RECV also posts every earlier
  message that its peer sends before it (the peer's list order), which keeps both sides in one order
  whatever order the receiver's list uses.

After the last action: gradients of parameters held by several pp ranks are summed between them, so
every copy gets the same update: DualPipe's two copies of each stage (rank s chunk 0 and rank pp-1-s
chunk 1) and the embedding tied between stage 0 and the last stage's MTP when they are on different
ranks (1F1B, ZB1P). Who holds what is found once, in the constructor, from the names of every rank's
parameters (names are the model's, so a name means one tensor). Expert loads of duplicated MoE layers
are summed the same way, so the gate-bias update sees every micro-batch. The four loss sums are
all-reduced over the pp group (every micro-batch's pieces are computed on exactly one rank).

The FB hook (report sec 3.2.1, Figure 4). ``overlap(forward, backward)`` gets two independent jobs whose
inputs are in hand (receives are waited on inside ``run()``) and must run each exactly once; the
runtime files their results afterwards. ``run_in_order`` (the default, correct on CPU) runs the forward
then the backward. A GPU version runs the two halves so that one's all-to-all hides behind the other's
compute: e.g. the forward on one CUDA stream and the backward on another, or, like DeepSeek, chunk by
chunk (attention F | MLP B, dispatch of one while the other computes, combine likewise) with
``parallel.expert``'s asynchronous ``dispatch -> wait -> compute -> combine -> wait``. The jobs expose
``stage``, the micro-batch and their input/gradient sources for that; a per-layer split needs entry
points in the Stage (its ``layers`` are in order), which this file does not fake.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from parallel.expert import ExpertParallelExperts, Pieces, run_to_end
from parallel.mesh import ProcessGroups
from parallel.pipeline.overlap import SegmentedGraph, Trace, interleave, no_trace, segmented_forward, split_backward
from parallel.pipeline.actions import Action, Kind, Schedule
from parallel.pipeline.stages import Stage, StageOutput
from train.model import MoE
from train.runtime import one_weight_cast_per_step

COMPUTE = (Kind.F, Kind.B, Kind.W, Kind.FB)
COMM = (Kind.SEND_F, Kind.RECV_F, Kind.SEND_B, Kind.RECV_B)
# a tensor in flight: ("F", s, mb) = output of stage s; ("B", s, mb) = gradient of the input of stage s
Key = tuple[str, int, int]


class PipelineLayoutError(ValueError):
    """The schedule and the stages given to the runtime disagree (raised on every pp rank)."""


def _key(action: Action) -> Key:
    return ("F" if action.kind in (Kind.SEND_F, Kind.RECV_F) else "B", action.stage, action.mb)


# --------------------------------------------------------------------------------------------------
# Results and the FB jobs


@dataclass
class StepResult:
    """What one step leaves besides the gradients."""

    sums: Tensor  # float64 [4]: loss, lm_loss, mtp_loss, balance_loss (alpha-weighted) summed over the micro-batches
    expert_load: Tensor  # int64 [local MoE layers, E]: tokens per expert, rows in PipelineRuntime.moe_names order
    moe_names: list[str]

    @property
    def loss(self) -> float:
        return self.sums[0].item()


@dataclass
class _Saved:
    """What the backward of one (stage, mb) needs from its forward."""

    stage: Stage
    input: Tensor  # detached leaf; its gradient goes to the previous stage (stage 0: the embedding output)
    embedded: Tensor | None  # stage 0: the embedding output still attached to embed.weight
    hidden: Tensor | None  # the output sent on (None on the last stage)
    loss: Tensor | None  # this stage's loss / micro-batches (None when it has no gradient: no MoE, not last)
    graph: SegmentedGraph | None = None  # the forward cut into pieces (overlap), else one graph


@dataclass
class ForwardJob:
    """The forward of (stage, mb): ``run()`` fills ``output`` and ``saved``."""

    stage: Stage
    mb: int
    source: Callable[[], Tensor]  # -> tokens (stage 0) or the input hidden state (waits for a receive)
    window: Tensor
    scale: float  # 1 / micro-batches
    mtp_weight: float
    balance_alpha: float
    autocast: Callable[[], contextlib.AbstractContextManager]
    segmented: bool = False  # cut the graph into pieces (overlap.segmented_forward)
    trace: Trace = no_trace
    output: StageOutput | None = None
    saved: _Saved | None = None

    def run(self) -> None:
        run_to_end(self.pieces())

    def pieces(self) -> Pieces[None]:
        stage, embedded = self.stage, None
        x = self.source()
        with self.autocast():
            if stage.is_first:
                embedded = stage.embed_tokens(x)
                x = embedded.detach().requires_grad_(embedded.requires_grad)
            else:
                x = x.detach().requires_grad_(True)
        graph = None
        if self.segmented:
            graph = yield from segmented_forward(stage, x, self.window, self.mtp_weight, self.balance_alpha,
                                                 self.autocast, lambda e: self.trace(f"F{self.mb} {e}"))
            out = graph.output
        else:
            with self.autocast():
                out = stage.body(x, self.window, self.mtp_weight, self.balance_alpha)
        loss = out.loss * self.scale
        self.output = out
        self.saved = _Saved(stage, x, embedded, out.hidden, loss if loss.requires_grad else None, graph)


@dataclass
class BackwardJob:
    """The backward of (stage, mb): ``run()`` fills ``input_grad`` (None on stage 0) and, when split,
    ``weight_grad`` (a closure for the W action)."""

    saved: _Saved
    mb: int
    output_grad: Callable[[], Tensor] | None  # -> gradient of the stage output (waits); None on the last stage
    split: bool  # input gradient now, weight gradient later
    scale: float = 1.0  # 1 / micro-batches (the segmented backward needs it for the balance losses)
    trace: Trace = no_trace
    input_grad: Tensor | None = None
    weight_grad: Callable[[], None] | None = None
    done: bool = False

    @property
    def stage(self) -> Stage:
        return self.saved.stage

    def run(self) -> None:
        run_to_end(self.pieces())

    def pieces(self) -> Pieces[None]:
        saved = self.saved
        if saved.graph is not None:
            grad = self.output_grad() if saved.hidden is not None else None
            grad, weight_grads = yield from saved.graph.backward(grad, saved.loss, self.scale, self.split,
                                                                 lambda e: self.trace(f"B{self.mb} {e}"))
            if saved.embedded is not None:  # stage 0: the embedding's backward (W's when split)
                embedded, embedded_grad, grad = saved.embedded, grad, None
                weight_grads.append(lambda: torch.autograd.backward(embedded, embedded_grad))
            def weight_grad() -> None:
                for closure in weight_grads:
                    closure()

            if self.split:
                self.weight_grad = weight_grad
            else:
                weight_grad()  # the embedding's backward
            self.input_grad = grad
            self.done = True
            return
        outputs, grads = [], []
        if saved.hidden is not None:
            outputs.append(saved.hidden)
            grads.append(self.output_grad())
        if saved.loss is not None:
            outputs.append(saved.loss)
            grads.append(torch.ones_like(saved.loss))
        if self.split:
            self.input_grad, self.weight_grad = backward_input(saved, outputs, grads)
        else:
            self.input_grad = backward_full(saved, outputs, grads)
        self.done = True


def run_in_order(forward: ForwardJob, backward: BackwardJob) -> None:
    """The reference FB: the forward half, then the backward."""
    forward.run()
    backward.run()


def run_interleaved(forward: ForwardJob, backward: BackwardJob) -> None:
    """The overlapped FB (``overlap.py``): each half computes while the other's all-to-all is in flight."""
    interleave(forward.pieces(), backward.pieces(), forward.trace)


# --------------------------------------------------------------------------------------------------
# Backward: full, or split into input gradient (B) and weight gradient (W)


def backward_full(saved: _Saved, outputs: list[Tensor], grads: list[Tensor]) -> Tensor | None:
    """One backward through the stage: parameters' .grad accumulate; returns the input's gradient."""
    if outputs:
        torch.autograd.backward(outputs, grads)
    grad = saved.input.grad
    saved.input.grad = None
    if saved.embedded is not None:
        if grad is not None:
            torch.autograd.backward(saved.embedded, grad)
        return None
    return grad


def backward_input(saved: _Saved, outputs: list[Tensor], grads: list[Tensor]
                   ) -> tuple[Tensor | None, Callable[[], None]]:
    """B: the input gradient only; returns it and the W closure that accumulates the weight gradients.

    ``stage_backward_input`` computes d(outputs)/d(input) with the graph retained, recording the gradient
    arriving at each node where a parameter's branch joins the input's path; ``stage_backward_weight``
    later back-propagates those recorded gradients into the parameters only, and frees the graph."""
    weights = [p for p in saved.stage.parameters() if p.requires_grad]
    stage_input, stage_weight = split_backward()
    if outputs:
        (grad,), groups = stage_input(outputs, grads, [saved.input], weights)
    else:
        grad, groups = None, []
    saved.input.grad = None
    embedded = saved.embedded

    def weight_grad() -> None:
        stage_weight(weights, groups)
        if embedded is not None and grad is not None:
            torch.autograd.backward(embedded, grad)

    return (None if embedded is not None else grad), weight_grad


# --------------------------------------------------------------------------------------------------
# Sums between the pp ranks that hold the same tensor (DualPipe copies, tied embedding, expert loads)


def sum_over_holders(values: dict[str, Tensor | None], like: dict[str, Tensor], holders: dict[str, tuple[int, ...]],
                     me: int, global_ranks: list[int], group: dist.ProcessGroup) -> dict[str, Tensor | None]:
    """For each name held by several pp ranks (``holders``: name -> pp ranks), the sum of every holder's
    value (shape and dtype of ``like[name]``; None counts as zeros, and the sum is None when every holder
    has None). Added in holder order on every holder, so the copies stay bitwise equal. One flat buffer
    (values and a has-value flag each) per (holders, dtype), exchanged in one batch_isend_irecv."""
    packs: dict[tuple[tuple[int, ...], str], list[str]] = defaultdict(list)
    for name in sorted(values):
        if len(holders[name]) > 1:
            packs[holders[name], str(like[name].dtype)].append(name)
    ops, plans = [], []
    for (ranks, _), names in sorted(packs.items()):
        parts = []
        for name in names:
            value, template = values[name], like[name]
            flag = template.new_ones(1) if value is not None else template.new_zeros(1)
            value = value.detach().reshape(-1) if value is not None else template.new_zeros(template.numel())
            parts += [value, flag]
        flat = torch.cat(parts)
        received = {}
        for r in ranks:
            if r != me:
                received[r] = torch.empty_like(flat)
                ops.append(dist.P2POp(dist.isend, flat, global_ranks[r], group))
                ops.append(dist.P2POp(dist.irecv, received[r], global_ranks[r], group))
        plans.append((ranks, names, flat, received))
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    out: dict[str, Tensor | None] = {}
    for ranks, names, flat, received in plans:
        total = None
        for r in ranks:
            part = flat if r == me else received[r]
            total = part.clone() if total is None else total.add_(part)
        starts, offset = [], 0
        for name in names:
            starts.append(offset)
            offset += like[name].numel() + 1
        flags = total[[start + like[name].numel() for start, name in zip(starts, names)]].tolist()  # one sync
        for start, name, flag in zip(starts, names, flags):
            n = like[name].numel()
            out[name] = total[start:start + n].view_as(like[name]) if flag != 0 else None
    return out


# --------------------------------------------------------------------------------------------------
# The runtime


@dataclass
class _StepState:
    """Everything one step keeps between actions (nothing survives the step)."""

    windows: list[Tensor]
    mtp_weight: float
    balance_alpha: float
    shape: tuple[int, ...]
    incoming: dict[int, deque[Key]]  # peer -> keys it sends us, in its order, not yet posted
    received: dict[Key, tuple[Tensor, list]] = field(default_factory=dict)  # posted receives: buffer, works
    outbox: dict[Key, Tensor] = field(default_factory=dict)  # produced here: to send or to hand over locally
    sending: list[tuple[Tensor, list]] = field(default_factory=list)  # posted sends not known complete
    saved: dict[tuple[int, int], _Saved] = field(default_factory=dict)  # (stage, mb) -> its forward's state
    weight_grads: dict[tuple[int, int], Callable[[], None]] = field(default_factory=dict)  # W's to run
    sums: Tensor = field(default_factory=lambda: torch.zeros(4, dtype=torch.float64))
    loads: dict[str, Tensor] = field(default_factory=dict)  # MoE layer name -> [E] tokens


class PipelineRuntime:
    """Runs ``schedule.actions[pp_rank]`` on this rank's stages (``{chunk: Stage}``).

    activation_dtype: dtype of the hidden states that travel (default: the stages' parameter dtype; the
    trainer passes the autocast dtype, the residual stream's: ``train.ops.to_compute_dtype``).
    autocast: context factory around every forward (e.g. ``lambda: torch.autocast("cuda", torch.bfloat16)``).
    overlap: run FB actions overlapped (``overlap.py``) when a stage has expert-parallel MoE blocks, else
    forward then backward.
    trace: called with a short event name at each piece (tests).
    Construction is collective over ``groups.pp``: every rank checks the schedule against its stages,
    and all raise ``PipelineLayoutError`` if any rank's disagree.
    """

    def __init__(self, schedule: Schedule, stages: dict[int, Stage], groups: ProcessGroups, *,
                 activation_dtype: torch.dtype | None = None,
                 autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
                 overlap: bool = False, trace: Trace | None = None):
        self.schedule = schedule
        self.stages = dict(stages)
        self.groups = groups
        self.group = groups.pp
        self.rank = dist.get_rank(self.group)
        self.global_ranks = dist.get_process_group_ranks(self.group)  # pp rank -> global rank
        self.autocast = autocast or contextlib.nullcontext
        exchanges = any(isinstance(m.experts, ExpertParallelExperts) for s in self.stages.values()
                        for _, m in s.moe_layers())
        self.segmented = overlap and exchanges
        self.fb = run_interleaved if self.segmented else run_in_order
        self.trace = trace or no_trace
        params = {n: p for s in self.stages.values() for n, p in s.named_parameters()}
        self.params = params
        first = next(iter(params.values()), None)
        self.dtype = activation_dtype or (first.dtype if first is not None else torch.float32)
        self.device = first.device if first is not None else torch.device("cpu")
        cfg = next(iter(self.stages.values())).cfg if self.stages else None
        self.n_experts = cfg.n_routed_experts if cfg is not None else 0
        self.dim = cfg.dim if cfg is not None else 0
        self.stage_moe = {c: [n for n, _ in s.moe_layers()] for c, s in self.stages.items()}
        self.moe: list[tuple[str, MoE]] = [m for s in sorted(self.stages.values(), key=lambda s: s.index)
                                           for m in s.moe_layers()]
        self.moe_names = [n for n, _ in self.moe]

        problems = self._layout_problems()
        everyone: list = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(everyone, (problems, sorted(params), self.moe_names), group=self.group)
        errors = [f"pp rank {r}: {p}" for r, (probs, _, _) in enumerate(everyone) for p in probs]
        if errors:
            raise PipelineLayoutError(f"pipeline schedule {schedule.name!r} does not match the stages given to the "
                                      "runtime:\n  " + "\n  ".join(errors))
        holders: dict[str, list[int]] = defaultdict(list)
        for r, (_, names, moe_names) in enumerate(everyone):
            for name in {*names, *(f"{m}#load" for m in moe_names)}:
                holders[name].append(r)
        self.holders = {n: tuple(sorted(rs)) for n, rs in holders.items()}
        # the number of pp ranks holding each local parameter (ZeroAdamW(copies=...) counts it once)
        self.copies = {n: len(self.holders[n]) for n in params}
        self.shared = sorted(n for n in params if self.copies[n] > 1)

        self.actions = schedule.actions[self.rank]
        self.later_w = self._split_backwards()

    # ----- construction checks
    def _layout_problems(self) -> list[str]:
        s, rank = self.schedule, self.rank
        size = dist.get_world_size(self.group)
        if s.pp != size:
            return [f"the schedule is for pp={s.pp} but the pp group has {size} ranks"]
        problems = []
        want = {c: stage for c, stage in enumerate(s.placement[rank])}
        for chunk in sorted(set(want) | set(self.stages)):
            if chunk not in self.stages:
                problems.append(f"chunk {chunk} should hold stage {want[chunk]} but no stage was given for it")
            elif chunk not in want:
                problems.append(f"was given chunk {chunk} (stage {self.stages[chunk].index}), but the schedule "
                                f"places only {len(want)} chunk(s) here: {s.placement[rank]}")
            elif self.stages[chunk].index != want[chunk] or self.stages[chunk].n_stages != s.n_stages:
                got = self.stages[chunk]
                problems.append(f"chunk {chunk} should hold stage {want[chunk]} of {s.n_stages} (placement "
                                f"{s.placement[rank]}) but holds stage {got.index} of {got.n_stages}")
        if not problems:
            problems += self._message_problems()
        return problems

    def _message_problems(self) -> list[str]:
        """Each RECV of this rank must be one of its peer's SENDs to it (the order is handled in step)."""
        s, rank = self.schedule, self.rank
        problems = []
        for a in s.actions[rank]:
            if a.kind in (Kind.RECV_F, Kind.RECV_B):
                send = Kind.SEND_F if a.kind == Kind.RECV_F else Kind.SEND_B
                if not any(b.kind == send and b.peer == rank and _key(b) == _key(a) for b in s.actions[a.peer]):
                    problems.append(f"{a} has no matching {send.value} on rank {a.peer}")
        return problems

    def _split_backwards(self) -> set[tuple[int, int]]:
        """(stage, mb) whose B computes the input gradient only: those with a W that is not the very next
        action (B immediately followed by its W is one full backward, as in DeepSeek's code)."""
        later: set[tuple[int, int]] = set()
        for i, a in enumerate(self.actions):
            back = a.back[:2] if a.kind == Kind.FB else (a.stage, a.mb) if a.kind == Kind.B else None
            if back is None:
                continue
            nxt = self.actions[i + 1] if i + 1 < len(self.actions) else None
            if nxt is not None and nxt.kind == Kind.W and (nxt.stage, nxt.mb) == back:
                continue
            if any(w.kind == Kind.W and (w.stage, w.mb) == back for w in self.actions[i + 1:]):
                later.add(back)
        return later

    # ----- the step
    def step(self, windows: list[Tensor], mtp_weight: float, balance_alpha: float) -> StepResult:
        """Run all micro-batches (``windows[mb]``: [micro_batch_size, T+1] tokens) through the schedule."""
        s = self.schedule
        if len(windows) != s.micro_batches:
            raise ValueError(f"schedule {s.name!r} has {s.micro_batches} micro-batches, got {len(windows)} windows")
        mb_size, width = windows[0].shape
        st = _StepState(windows=windows, mtp_weight=mtp_weight, balance_alpha=balance_alpha,
                        shape=(mb_size, width - 1, self.dim), incoming=self._incoming())
        st.sums = st.sums.to(self.device)
        # gradients from before this step are already equal on every holder: set them aside, add them back
        earlier = {n: self.params[n].grad for n in self.shared}
        for n in self.shared:
            self.params[n].grad = None

        with one_weight_cast_per_step(self.autocast, self.device.type):  # shared by the micro-batches in flight
            i = 0
            while i < len(self.actions):
                a = self.actions[i]
                if a.kind in COMM:
                    j = i
                    while j < len(self.actions) and self.actions[j].kind in COMM:
                        j += 1
                    self._post(st, self.actions[i:j])
                    i = j
                    continue
                self._compute(st, a)
                i += 1
        return self._finish(st, earlier)

    def _incoming(self) -> dict[int, deque[Key]]:
        return {p: deque(_key(b) for b in self.schedule.actions[p]
                         if b.kind in (Kind.SEND_F, Kind.SEND_B) and b.peer == self.rank)
                for p in range(self.schedule.pp) if p != self.rank}

    def _compute(self, st: _StepState, a: Action) -> None:
        if a.kind == Kind.F:
            job = self._forward_job(st, a.stage, a.mb, a.chunk)
            job.run()
            self._file_forward(st, job, a.chunk)
        elif a.kind == Kind.B:
            job = self._backward_job(st, a.stage, a.mb)
            job.run()
            self._file_backward(st, job)
        elif a.kind == Kind.FB:
            fwd = self._forward_job(st, a.stage, a.mb, a.chunk)
            bwd = self._backward_job(st, a.back[0], a.back[1])
            self.fb(fwd, bwd)
            if fwd.output is None or not bwd.done:
                raise RuntimeError(f"the FB hook {self.fb.__name__} did not run both halves of {a}")
            self._file_forward(st, fwd, a.chunk)
            self._file_backward(st, bwd)
        elif a.kind == Kind.W:
            if (a.stage, a.mb) in self.later_w:
                closure = st.weight_grads.pop((a.stage, a.mb), None)
                if closure is None:
                    raise RuntimeError(f"rank {self.rank}: {a} before the B of stage {a.stage}, mb {a.mb}")
                closure()
            # else: its B was a full backward
        else:
            raise ValueError(f"rank {self.rank}: unknown action {a}")

    # ----- forward and backward halves
    def _forward_job(self, st: _StepState, stage_index: int, mb: int, chunk: int) -> ForwardJob:
        stage = self.stages[chunk]
        window = st.windows[mb]
        if stage.is_first:
            tokens = window[:, :-1]
            source: Callable[[], Tensor] = lambda: tokens  # noqa: E731
        else:
            source = self._source(st, ("F", stage_index - 1, mb))
        return ForwardJob(stage, mb, source, window, 1.0 / self.schedule.micro_batches, st.mtp_weight,
                          st.balance_alpha, self.autocast, self.segmented, self.trace)

    def _file_forward(self, st: _StepState, job: ForwardJob, chunk: int) -> None:
        stage, out = job.stage, job.output
        st.saved[stage.index, job.mb] = job.saved
        if out.hidden is not None:
            if out.hidden.shape != st.shape or out.hidden.dtype != self.dtype:
                raise RuntimeError(f"stage {stage.index} returned {tuple(out.hidden.shape)} {out.hidden.dtype}; the "
                                   f"pipeline sends {st.shape} {self.dtype} (activation_dtype)")
            st.outbox["F", stage.index, job.mb] = out.hidden.detach()
        if out.losses is not None:  # last stage: CE + lambda * MTP + alpha * its balance losses
            ls = out.losses
            st.sums += torch.stack([ls.loss, ls.lm_loss, ls.mtp_loss, ls.balance_loss]).detach().double()
        else:  # alpha * its balance losses, in the loss and in the balance term
            st.sums[[0, 3]] += out.loss.detach().double()
        for name, load in zip(self.stage_moe[chunk], out.expert_load):
            st.loads[name] = st.loads[name] + load if name in st.loads else load.detach().clone()

    def _backward_job(self, st: _StepState, stage_index: int, mb: int) -> BackwardJob:
        saved = st.saved.pop((stage_index, mb), None)
        if saved is None:
            raise RuntimeError(f"rank {self.rank}: backward of stage {stage_index}, mb {mb} before its forward")
        grad = None if saved.stage.is_last else self._source(st, ("B", stage_index + 1, mb))
        return BackwardJob(saved, mb, grad, split=(stage_index, mb) in self.later_w,
                           scale=1.0 / self.schedule.micro_batches, trace=self.trace)

    def _file_backward(self, st: _StepState, job: BackwardJob) -> None:
        stage = job.stage
        if job.split:
            st.weight_grads[stage.index, job.mb] = job.weight_grad
        if not stage.is_first:
            grad = job.input_grad
            if grad is None:  # the stage did not depend on its input (cannot happen with blocks; keep shapes)
                grad = torch.zeros(st.shape, dtype=self.dtype, device=self.device)
            st.outbox["B", stage.index, job.mb] = grad

    def _source(self, st: _StepState, key: Key) -> Callable[[], Tensor]:
        """Where the tensor ``key`` comes from: this rank's outbox (stage on this rank) or a receive."""
        kind, stage, mb = key
        producer = self.schedule.routes[mb][stage][0]  # the rank of the stage that produced it
        if producer == self.rank:
            if key not in st.outbox:
                raise RuntimeError(f"rank {self.rank}: needs {kind} of stage {stage}, mb {mb} before it was computed")
            tensor = st.outbox.pop(key)
            return lambda: tensor
        if key not in st.received:
            raise RuntimeError(f"rank {self.rank}: needs {kind} of stage {stage}, mb {mb} from rank {producer} "
                               "but the schedule did not receive it before")
        buffer, works = st.received.pop(key)

        def wait() -> Tensor:
            for work in works:
                work.wait()
            return buffer

        return wait

    # ----- point to point
    def _post(self, st: _StepState, actions: list[Action]) -> None:
        """Post a run of SEND/RECV actions as one batch_isend_irecv."""
        st.sending = [(t, works) for t, works in st.sending if not all(w.is_completed() for w in works)]
        ops: list[dist.P2POp] = []
        targets: list[tuple[str, Key | Tensor]] = []
        for a in actions:
            key = _key(a)
            peer = self.global_ranks[a.peer]
            if a.kind in (Kind.SEND_F, Kind.SEND_B):
                tensor = st.outbox.pop(key, None)
                if tensor is None:
                    raise RuntimeError(f"rank {self.rank}: {a} before the tensor was computed")
                ops.append(dist.P2POp(dist.isend, tensor.contiguous(), peer, self.group))
                targets.append(("send", ops[-1].tensor))
                continue
            if key in st.received:  # posted earlier, with an earlier message of the same peer
                continue
            queue = st.incoming[a.peer]
            while queue:  # the peer's messages up to this one, in the peer's order
                k = queue.popleft()
                buffer = torch.empty(st.shape, dtype=self.dtype, device=self.device)
                ops.append(dist.P2POp(dist.irecv, buffer, peer, self.group))
                st.received[k] = (buffer, [])
                targets.append(("recv", k))
                if k == key:
                    break
        if not ops:
            return
        works = dist.batch_isend_irecv(ops)
        per_op = len(works) == len(ops)  # gloo: one work per op; NCCL coalesces the batch into one
        for n, (kind, target) in enumerate(targets):
            mine = [works[n]] if per_op else list(works)
            if kind == "send":
                st.sending.append((target, mine))
            else:
                st.received[target][1].extend(mine)

    # ----- the end of the step
    def _finish(self, st: _StepState, earlier: dict[str, Tensor | None]) -> StepResult:
        left = [f"{len(st.saved)} forward(s) without backward: {sorted(st.saved)}"] if st.saved else []
        if st.weight_grads:
            left.append(f"W not run for {sorted(st.weight_grads)}")
        if st.received:
            left.append(f"received but unused: {sorted(st.received)}")
        if st.outbox:
            left.append(f"computed but neither sent nor used: {sorted(st.outbox)}")
        if any(st.incoming.values()):
            left.append(f"messages never received: {[(p, list(q)) for p, q in st.incoming.items() if q]}")
        if left:
            raise RuntimeError(f"rank {self.rank}: schedule {self.schedule.name!r} left work undone: "
                               + "; ".join(left))
        for _, works in st.sending:
            for work in works:
                work.wait()

        # copies of one parameter on several ranks: the sum of their gradients everywhere
        summed = sum_over_holders({n: self.params[n].grad for n in self.shared}, self.params, self.holders,
                                  self.rank, self.global_ranks, self.group)
        for name in self.shared:
            grad, before = summed[name], earlier[name]
            if before is not None:
                grad = before if grad is None else grad + before
            self.params[name].grad = grad

        zeros = torch.zeros(self.n_experts, dtype=torch.long, device=self.device)
        loads = {f"{n}#load": st.loads.get(n, zeros) for n in self.moe_names}  # "#": not a parameter name
        loads.update({k: v for k, v in sum_over_holders(loads, loads, self.holders, self.rank, self.global_ranks,
                                                        self.group).items() if v is not None})
        expert_load = (torch.stack([loads[f"{n}#load"] for n in self.moe_names]) if self.moe_names
                       else torch.zeros(0, self.n_experts, dtype=torch.long, device=self.device))
        dist.all_reduce(st.sums, group=self.group)
        return StepResult(st.sums, expert_load, list(self.moe_names))

    # ----- for the trainer
    def moe_layers(self) -> list[MoE]:
        """This rank's MoE layers, in the rows' order of ``StepResult.expert_load``."""
        return [m for _, m in self.moe]
