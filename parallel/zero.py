"""ZeRO-1: AdamW whose optimizer state is sharded over the data-parallel ranks (report sec 3, 3.3.3).

Parameters stay replicated in their data-parallel group; each rank keeps the FP32 master and the BF16
moments of one slice of every parameter, along one dimension (as FSDP2 shards), so that every slice is
a DTensor ``Shard`` and DCP can save it once and load it under another layout. An FP32 parameter's
master is its own slice (a view: AdamW updates it in place and the all-gather sends it to the other
ranks), so the master costs no memory; a lower-precision parameter (BF16 working weights,
train/precision.py) gets an FP32 copy of its slice, which checkpoints hold in the parameter's place
(``master_tensors``), and its bucket is all-gathered in its own dtype. The slices are:

- dense parameters: dim 0 over the dp group (the mesh ``groups.dp_mesh``);
- routed-expert parameters when ``layout.ep > 1``: the local tensor [E/ep, ...] along dim 1 over the
  edp group (dim 0 is already split over ep), i.e. [Shard(1), Shard(0), Shard(0)] on
  ``groups.expert_mesh`` for the global [E, ...].

Uneven sizes follow DTensor's ``Shard`` (torch.chunk): with ``c = ceil(n / k)`` rank i of k holds rows
[i*c, min(n, (i+1)*c)), possibly none.

A step: bucketed reduce-scatter of the gradients (several parameters per collective; one flat buffer
per bucket, rank-major, each parameter's chunk padded to c rows; started during the last backward with
``overlap_next_backward``), the global gradient norm (every element counted once) and clipping, the
AdamW of ``train.optim`` on this rank's shards, bucketed all-gather of the updated shards into the
parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.distributed.tensor.placement_types import Placement

from parallel.mesh import ProcessGroups
from train.config import OptimConfig
from train.model import RoutedExperts
from train.optim import MOMENT_DTYPES, AdamW, param_groups

MOMENT_KEYS = ("exp_avg", "exp_avg_sq")
# torch 2.13 renamed the flat-tensor collectives (the old names warn there); torch 2.11 has only the old ones
reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass
class ParamShard:
    """One parameter's slice on this rank and its place in a bucket."""

    name: str
    param: Tensor
    expert: bool
    dim: int  # the sharded dimension of the (local) parameter
    rows: int  # c = ceil(n / k): rows of dim ``dim`` per rank, the chunk of every rank padded to it
    start: int  # first row (along dim) of this rank's slice
    local_rows: int  # rows this rank holds, 0..rows
    offset: int = field(init=False, default=0)  # where its padded chunk starts in a bucket's per-rank segment
    master: Tensor = field(init=False)  # the FP32 slice: the parameter's own (FP32), else in ``Bucket.masters``

    @property
    def master_is_param(self) -> bool:
        """An FP32 parameter is its own master: the master is a view of its slice."""
        return self.param.dtype == torch.float32

    @property
    def chunk_shape(self) -> tuple[int, ...]:
        shape = list(self.param.shape)
        shape[self.dim] = self.rows
        return tuple(shape)

    @property
    def chunk_numel(self) -> int:
        return math.prod(self.chunk_shape)

    def param_slice(self) -> Tensor:
        """This rank's slice of the parameter (a view)."""
        return self.param.detach().narrow(self.dim, self.start, self.local_rows)


@dataclass
class Bucket:
    """Parameters reduced and gathered together in one collective over one group."""

    group: dist.ProcessGroup
    size: int  # ranks in the group
    dtype: torch.dtype  # of all its parameters: what the all-gather sends
    shards: list[ParamShard] = field(default_factory=list)
    numel: int = 0  # elements of one rank's segment (the padded chunks of all its parameters)
    # [numel] FP32 masters of a lower-precision bucket's parameters (their padded chunks, the padding zero);
    # empty for an FP32 bucket (each parameter is its own master)
    masters: Tensor = field(init=False)

    def chunks(self, flat: Tensor, shard: ParamShard) -> Tensor:
        """[size, *chunk_shape] view of one parameter's padded chunks in a rank-major [size * numel] buffer."""
        return flat.view(self.size, self.numel)[:, shard.offset:shard.offset + shard.chunk_numel].unflatten(
            1, shard.chunk_shape)

    def own(self, segment: Tensor, shard: ParamShard) -> Tensor:
        """This rank's (unpadded) slice of one parameter inside a [numel] segment."""
        chunk = segment[shard.offset:shard.offset + shard.chunk_numel].view(shard.chunk_shape)
        return chunk.narrow(shard.dim, 0, shard.local_rows)


@dataclass
class CommStats:
    """Collectives issued (1-rank groups issue none); tests use it to see that buckets really bucket."""

    reduce_scatters: int = 0
    overlapped_reduce_scatters: int = 0  # of which issued during a backward (overlap_next_backward)
    all_gathers: int = 0
    all_reduces: int = 0


@dataclass
class Reduction:
    """One step's gradient reduce-scatters in flight (ZeroAdamW.overlap_next_backward, _reduce_scatter_gradients).

    ``order``: the bucket indices with several ranks, in the order they are issued (the reverse of the
    model's); ``next``: how many of them have been; ``remaining``: per bucket index, parameters whose
    gradient has not arrived; ``flats``: buffers being filled; ``packed``: ids of the shards packed,
    ``with_grad``: of those, the ones that had a gradient;
    ``issued``: bucket index -> (its segment, or its own buffer on one rank; the collective's work or None)."""

    order: list[int]
    sizes: dict[int, int]
    armed: bool = False
    next: int = 0
    remaining: dict[int, int] = field(default_factory=dict)
    flats: dict[int, Tensor] = field(default_factory=dict)
    packed: set[int] = field(default_factory=set)
    with_grad: set[int] = field(default_factory=set)
    issued: dict[int, tuple[Tensor, object]] = field(default_factory=dict)

    def reset(self) -> None:
        self.armed, self.next = False, 0
        self.remaining = dict(self.sizes)
        self.flats, self.packed, self.with_grad, self.issued = {}, set(), set(), {}


def pack_chunks(dst: Tensor, src: Tensor, dim: int, rows: int) -> None:
    """dst [k, *chunk] <- src cut along ``dim`` into k chunks of ``rows`` rows (torch.chunk), zero-padded."""
    full, rest = divmod(src.shape[dim], rows)
    if full:
        dst[:full].copy_(src.narrow(dim, 0, full * rows).unflatten(dim, (full, rows)).movedim(dim, 0))
    if rest:
        dst[full].narrow(dim, 0, rest).copy_(src.narrow(dim, full * rows, rest))
        dst[full].narrow(dim, rest, rows - rest).zero_()
    dst[full + (1 if rest else 0):].zero_()


def unpack_chunks(dst: Tensor, src: Tensor, dim: int, rows: int) -> None:
    """dst <- the k padded chunks src [k, *chunk] (the inverse of pack_chunks)."""
    full, rest = divmod(dst.shape[dim], rows)
    if full:
        dst.narrow(dim, 0, full * rows).unflatten(dim, (full, rows)).movedim(dim, 0).copy_(src[:full])
    if rest:
        dst.narrow(dim, full * rows, rest).copy_(src[full].narrow(dim, 0, rest))


def grads_empty(device: torch.device) -> Tensor:
    """The flattened gradient of a parameter without one: no elements, no squares."""
    return torch.zeros(0, dtype=torch.float32, device=device)


def sum_of_squares(x: Tensor, row: int = 256) -> Tensor:
    """FP64 sum of the squares of a flat FP32 tensor, from FP32 sums over rows of ``row`` elements.

    One FP32 norm over millions of elements is off by 1e-5 to 1e-4 relative on the CPU (so is
    torch.nn.utils.clip_grad_norm_ on large tensors); short rows keep it near 1e-10 at the same speed
    (a norm in FP64 is about 20 times slower there).
    """
    whole = x.numel() // row * row
    rows = torch.linalg.vector_norm(x[:whole].view(-1, row), dim=1).double().square().sum()
    return rows + x[whole:].double().square().sum()


def parameter_squares(chunks: list[Tensor], device_type: str) -> Tensor:
    """[len(chunks)] FP64 sums of squares of flat FP32 tensors, each from its own elements only (so a sum does
    not depend on how buckets group the parameters). On a GPU one multi-tensor norm kernel for all of them
    (``torch._foreach_norm``, as clip_grad_norm_: GPU reductions are tree-shaped, accurate in FP32), not ten
    small kernels per parameter; elsewhere ``sum_of_squares`` per tensor (a CPU's FP32 norm of a long tensor
    is not accurate enough)."""
    if not chunks:
        return torch.zeros(0, dtype=torch.float64)
    if device_type == "cuda":
        return torch.stack(torch._foreach_norm(chunks)).double().square()
    return torch.stack([sum_of_squares(chunk) for chunk in chunks])


class ZeroAdamW:
    """AdamW (``train.optim.AdamW``: FP32 master, BF16 moments) with its state sharded over data parallelism.

    ``model``'s parameters must be materialized, initialised and identical across their data-parallel
    group; with ``groups.layout.ep > 1`` the parameters of ``RoutedExperts`` modules are the local
    experts [E/ep, ...] of the global [E, ...]. The trainer's loss must be a mean per rank: the
    gradients are summed over the group and divided by ``layout.dp``.
    The masters are copied from the parameters here; change the parameters afterwards only through ``step``
    or a checkpoint (``load_state_dict``). ``working_dtype`` BF16: the parameters are cast to it here (all
    but ``train.precision.KEEP_FP32``'s; train/precision.py), their FP32 values kept as the masters.
    ``copies``: for a parameter held by several pipeline ranks (DualPipe's two copies of a stage, an
    embedding tied between the first and last stage; ``PipelineRuntime.copies``), how many; the global
    norm counts each of its elements once. The copies' gradients must already be equal (the runtime
    sums them), so their updates are too.
    """

    def __init__(self, model: nn.Module, groups: ProcessGroups, cfg: OptimConfig, bucket_mb: float = 25.0,
                 copies: dict[str, int] | None = None, working_dtype: torch.dtype = torch.float32):
        layout = groups.layout
        self.groups = groups
        self.dp = layout.dp
        self.copies = {name: n for name, n in (copies or {}).items() if n != 1}
        self.comm = CommStats()
        expert_ids: set[int] = set()
        if layout.ep > 1:
            for name, module in model.named_modules():
                if isinstance(module, RoutedExperts):
                    for p in module.parameters():
                        if p.shape[0] * layout.ep != module.n_experts:
                            raise ValueError(f"ZeroAdamW: {name} holds {p.shape[0]} of {module.n_experts} experts; with "
                                             f"ep={layout.ep} each rank must hold {module.n_experts // layout.ep}")
                        expert_ids.add(id(p))
        decay_groups = param_groups(model, cfg.weight_decay)
        managed = {id(p) for g in decay_groups for p in g["params"]}

        self.shards: dict[str, ParamShard] = {}
        for name, param in model.named_parameters():
            if id(param) in managed:
                self.shards[name] = self._make_shard(name, param, id(param) in expert_ids)
        devices = {s.param.device for s in self.shards.values()}
        if len(devices) > 1:
            raise ValueError(f"ZeroAdamW: parameters on several devices ({sorted(map(str, devices))})")
        self.device = devices.pop() if devices else torch.device("cpu")
        exact: dict[str, Tensor] = {}
        if working_dtype != torch.float32:  # keep this rank's FP32 slices for the masters, then cast
            from train.precision import cast_working_weights

            exact = {n: s.param_slice().clone() for n, s in self.shards.items() if s.param.dtype == torch.float32}
            cast_working_weights(model, working_dtype)
            exact = {n: t for n, t in exact.items() if not self.shards[n].master_is_param}
        self.buckets = self._make_buckets(list(self.shards.values()), int(bucket_mb * 2**20))
        shared = [i for i, bucket in enumerate(self.buckets) if bucket.size > 1]
        self.reduction = Reduction(order=shared[::-1], sizes={i: len(self.buckets[i].shards) for i in shared})
        self.reduction.reset()
        for index in shared:
            for shard in self.buckets[index].shards:
                shard.param.register_post_accumulate_grad_hook(
                    lambda _, index=index, shard=shard: self._on_gradient(index, shard))

        by_param = {id(s.param): s for s in self.shards.values()}
        self.inner = AdamW(
            [{"params": [by_param[id(p)].master for p in g["params"]], "weight_decay": g["weight_decay"]}
             for g in decay_groups],
            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay,
            moment_dtype=MOMENT_DTYPES[cfg.moment_dtype], update=cfg.update,
        )
        # State exists from the start (not at the first step), so that state_dict() can be loaded into.
        for shard in self.shards.values():
            self.inner.init_state(shard.master)
        self.copy_masters_from_params()
        for name, fp32 in exact.items():  # the masters of the cast weights: their FP32 values, not the rounding
            self.shards[name].master.copy_(fp32)
        # each parameter's weight in the global norm: 1 / the pipeline ranks holding it (model order)
        self.norm_weights = torch.tensor([1.0 / self.copies.get(name, 1) for name in self.shards],
                                         dtype=torch.float64, device=self.device)

    # ----- construction
    def _placement(self, expert: bool) -> tuple[DeviceMesh, list[Placement], dist.ProcessGroup, int]:
        """Mesh and placements of a state DTensor, the group that shards it, the sharded dim."""
        if expert:
            return self.groups.expert_mesh, [Shard(1), Shard(0), Shard(0)], self.groups.edp, 1
        return self.groups.dp_mesh, [Shard(0)], self.groups.dp, 0

    def global_shape(self, shard: ParamShard) -> torch.Size:
        shape = list(shard.param.shape)
        if shard.expert:
            shape[0] *= self.groups.layout.ep
        return torch.Size(shape)

    def _make_shard(self, name: str, param: Tensor, expert: bool) -> ParamShard:
        mesh, placements, group, dim = self._placement(expert)
        if param.ndim <= dim:
            raise ValueError(f"ZeroAdamW: cannot shard {name} of shape {list(param.shape)} along dim {dim}")
        k, rank = dist.get_world_size(group), dist.get_rank(group)
        n = param.shape[dim]
        rows = max(1, -(-n // k))
        start = min(n, rank * rows)
        shard = ParamShard(name, param, expert, dim, rows, start, min(n, start + rows) - start)
        # The collectives' chunk i must be the DTensor's slice on this rank: check DTensor's own sizes.
        global_shape = self.global_shape(shard)
        local_shape, offset = compute_local_shape_and_global_offset(global_shape, mesh, placements)
        expect_offset = [0] * param.ndim
        expect_offset[dim] = start
        if expert:
            expect_offset[0] = self.groups.layout.ep_rank * param.shape[0]
        expect_shape = list(param.shape)
        expect_shape[dim] = shard.local_rows
        if list(local_shape) != expect_shape or list(offset) != expect_offset:
            raise RuntimeError(f"ZeroAdamW: {name}: slice {expect_shape} at {expect_offset} differs from DTensor's "
                               f"{list(local_shape)} at {list(offset)}")
        return shard

    def _make_buckets(self, shards: list[ParamShard], bucket_bytes: int) -> list[Bucket]:
        """Consecutive parameters of one group and one dtype, at most bucket_bytes of FP32 padded gradient
        per bucket."""
        buckets: list[Bucket] = []
        open_bucket: dict[tuple[bool, torch.dtype], Bucket] = {}
        for shard in shards:
            _, _, group, _ = self._placement(shard.expert)
            key = (shard.expert, shard.param.dtype)
            bucket = open_bucket.get(key)
            grown = (bucket.numel + shard.chunk_numel) * bucket.size * 4 if bucket else 0
            if bucket is None or (bucket.shards and grown > bucket_bytes):
                bucket = Bucket(group, dist.get_world_size(group), shard.param.dtype)
                open_bucket[key] = bucket
                buckets.append(bucket)
            shard.offset = bucket.numel
            bucket.numel += shard.chunk_numel
            bucket.shards.append(shard)
        for bucket in buckets:
            separate = bucket.dtype != torch.float32
            bucket.masters = torch.zeros(bucket.numel if separate else 0, dtype=torch.float32, device=self.device)
            for shard in bucket.shards:
                shard.master = bucket.own(bucket.masters, shard) if separate else shard.param_slice()
        return buckets

    # ----- the step
    @torch.no_grad()
    def copy_masters_from_params(self) -> None:
        """Masters <- this rank's slices of the parameters (after they were set outside step); nothing to
        do for FP32 parameters, their own masters."""
        for shard in self.shards.values():
            if not shard.master_is_param:
                shard.master.copy_(shard.param_slice())

    @torch.no_grad()
    def step(self, lr: float, max_norm: float, skip: bool = False) -> float:
        """Reduce-scatter, clip, AdamW on the shards, all-gather; returns the gradient norm before clipping.

        max_norm <= 0 or inf: no clipping. A parameter without a gradient on every rank is skipped (its
        AdamW step does not advance), as AdamW skips it; a rank without one contributes zeros.
        ``skip`` (the caller's verdict, equal on every rank) or a non-finite global norm (equal on every rank,
        it is all-reduced): the gradients are dropped and nothing changes (parameters, masters, moments,
        AdamW step counts); the norm is still returned.
        """
        grads, chunks, has_grad = self._reduce_scatter_gradients()
        norm = self._global_norm(chunks, has_grad)
        if skip or not math.isfinite(norm):
            self.zero_grad()
            return norm
        if 0 < max_norm < math.inf:
            coef = max_norm / (norm + 1e-6)  # as torch.nn.utils.clip_grad_norm_
            if coef < 1.0:
                for g in grads:
                    g.mul_(coef)
        for group in self.inner.param_groups:
            group["lr"] = lr
        self.inner.step()
        self.params_from_masters()
        self.zero_grad()
        return norm

    def _reduce_scatter_gradients(self) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """The masters' averaged gradients (.grad): each bucket's reduced segment ([numel], padding zero) that
        they view, or on a one-rank bucket the parameters' own gradients (nothing to send: no copy). Returns
        those tensors (what clipping scales), each parameter's gradient flattened in model order (empty
        without one) and per parameter 1.0 where this rank had a gradient for it, else 0.0 (float64).
        Buckets the last backward did not issue (``overlap_next_backward``) are packed and issued now, in
        the same fixed order on every rank.

        Averaging: every rank's loss is the mean over its own tokens, and the trained loss is the mean of
        these over the dp ranks, L = (1/dp) sum_r L_r. A dense parameter's gradient is therefore
        (1/dp) sum_r dL_r/dp over the dp group. An expert parameter lives on one ep rank of each edp
        group; through the all-to-all backward its gradient on edp rank j already holds sum_{r in ep group
        j} dL_r/dW (the tokens of all ep ranks routed to it). Summing over the edp groups covers every
        rank r once, so dividing that sum by dp (not edp) gives dL/dW as well.
        """
        reduction = self.reduction
        reduction.armed = False
        for index in reduction.order[reduction.next:]:
            self._issue(index)
        for index in range(len(self.buckets)):
            if index not in reduction.issued:  # one-rank buckets: nothing to send
                self._issue(index)
        grads, chunk_of = [], {}
        for index, bucket in enumerate(self.buckets):
            segment, work = reduction.issued[index]
            if segment is None:  # one rank: each master takes its parameter's gradient as it is
                for shard in bucket.shards:
                    grad, shard.param.grad = shard.param.grad, None
                    if grad is not None:
                        if self.dp > 1:  # experts with edp 1: summed over their ep group by the all-to-all
                            grad.div_(self.dp)
                        shard.master.grad = grad
                        reduction.with_grad.add(id(shard))
                        grads.append(grad)
                    chunk_of[id(shard)] = grad.view(-1) if grad is not None else grads_empty(self.device)
                continue
            if work is not None:
                work.wait()
            if self.dp > 1:
                segment.div_(self.dp)
            for shard in bucket.shards:
                shard.master.grad = bucket.own(segment, shard)
                chunk_of[id(shard)] = segment[shard.offset:shard.offset + shard.chunk_numel]
            grads.append(segment)
        has_grad = torch.tensor([float(id(s) in reduction.with_grad) for s in self.shards.values()],
                                dtype=torch.float64)
        reduction.reset()
        # per parameter in the model's order (padding zero), so that neither the norm's sums nor their order
        # depend on how buckets group the parameters
        return grads, [chunk_of[id(s)] for s in self.shards.values()], has_grad

    def overlap_next_backward(self) -> None:
        """Start each bucket's reduce-scatter during the coming backward, as soon as its gradients are
        complete (the last micro-batch's backward without a pipeline; DDP's overlap). A post-accumulate hook
        packs each gradient into its bucket's buffer as it arrives (freeing it); a bucket is issued once all
        its parameters have arrived and every bucket before it in ``order`` (the reverse of the model's: the
        order backward produces them) has been, so every rank issues the same sequence. Buckets whose
        parameters got no gradient wait for ``step``. Nothing to do where no bucket spans several ranks."""
        if self.reduction.order:
            self.reduction.reset()
            self.reduction.armed = True

    @torch.no_grad()
    def _on_gradient(self, index: int, shard: ParamShard) -> None:
        reduction = self.reduction
        if not reduction.armed:
            return
        if id(shard) in reduction.packed:
            raise RuntimeError(f"ZeroAdamW: a second gradient for {shard.name} after overlap_next_backward; arm it "
                               "only before the backward that completes the step's gradients")
        self._pack(index, shard)
        reduction.remaining[index] -= 1
        while reduction.next < len(reduction.order) and reduction.remaining[reduction.order[reduction.next]] == 0:
            self._issue(reduction.order[reduction.next])
            reduction.next += 1

    def _pack(self, index: int, shard: ParamShard) -> None:
        """shard's gradient (zeros where it has none) -> its chunks in bucket ``index``'s rank-major buffer."""
        bucket = self.buckets[index]
        flat = self.reduction.flats.get(index)
        if flat is None:
            flat = self.reduction.flats[index] = torch.empty(bucket.size * bucket.numel, dtype=torch.float32,
                                                             device=self.device)
        chunks, grad = bucket.chunks(flat, shard), shard.param.grad
        if grad is None:
            chunks.zero_()
        else:
            pack_chunks(chunks, grad, shard.dim, shard.rows)
            shard.param.grad = None  # packed: free it now, so that the flat buffers add no memory
            self.reduction.with_grad.add(id(shard))
        self.reduction.packed.add(id(shard))

    @torch.no_grad()
    def _issue(self, index: int) -> None:
        """Pack what is left of bucket ``index`` and start its reduce-scatter; a one-rank bucket whose
        parameters' gradients can be the masters' as they are is left alone (``_direct``)."""
        bucket = self.buckets[index]
        if bucket.size == 1 and self._direct(bucket):
            self.reduction.issued[index] = (None, None)
            return
        for shard in bucket.shards:
            if id(shard) not in self.reduction.packed:
                self._pack(index, shard)
        flat = self.reduction.flats.pop(index)
        if bucket.size == 1:
            self.reduction.issued[index] = (flat, None)
            return
        segment = torch.empty(bucket.numel, dtype=torch.float32, device=self.device)
        work = reduce_scatter_flat(segment, flat, group=bucket.group, async_op=True)
        self.comm.reduce_scatters += 1
        if self.reduction.armed:
            self.comm.overlapped_reduce_scatters += 1
        self.reduction.issued[index] = (segment, work)

    @staticmethod
    def _direct(bucket: Bucket) -> bool:
        """Whether a one-rank bucket's gradients can serve as its masters' unchanged: FP32, contiguous, each of
        its master's shape (a one-rank shard is the whole parameter)."""
        return all(s.param.grad is None or (s.param.grad.dtype == torch.float32 and s.param.grad.is_contiguous()
                                            and s.param.grad.shape == s.master.shape) for s in bucket.shards)

    def _global_norm(self, chunks: list[Tensor], has_grad: Tensor) -> float:
        """L2 norm of the full averaged gradient: every element lies in exactly one rank's shard (dense
        shards partition over dp; expert shards over edp x ep = dp), so the local sums of squares are
        summed over the dp group, and over the pipeline stages (a parameter on k pipeline ranks, ``copies``,
        adds 1/k of its squares on each). The same all-reduce sums ``has_grad``
        (1 per parameter with a gradient here): the shards of parameters with none anywhere lose .grad.
        ``chunks``: each parameter's gradient here, flattened, in model order; parameters held by several
        pipeline ranks count once (``norm_weights``)."""
        squares = (parameter_squares(chunks, self.device.type).to(self.device) * self.norm_weights).sum()
        if self.dp > 1:  # the flags travel with the squares; from pinned memory the copy does not wait
            flags = has_grad.pin_memory() if self.device.type == "cuda" else has_grad
            summed = torch.cat([squares.view(1), flags.to(self.device, non_blocking=True)])
            dist.all_reduce(summed, group=self.groups.dp)
            self.comm.all_reduces += 1
            total, counts = summed[:1], summed[1:].tolist()
        else:  # one rank's flags are its own: no copy to the device and back
            total, counts = squares.view(1), has_grad.tolist()
        if self.groups.layout.pp > 1:
            dist.all_reduce(total, group=self.groups.pp)
            self.comm.all_reduces += 1
        for shard, count in zip(self.shards.values(), counts):
            if count == 0:
                shard.master.grad = None
        return math.sqrt(total.item())

    @torch.no_grad()
    def params_from_masters(self) -> None:
        """Every rank's masters -> the parameters (rounded to their dtype): after each step, and after a
        checkpoint loaded the masters (``master_tensors``). An FP32 parameter's slice is its master, updated
        in place: one rank alone has nothing to do, several send it. A lower-precision bucket sends its
        masters rounded to the parameters' dtype (BF16: half the bytes of FP32)."""
        pending = []
        for bucket in self.buckets:
            separate = bucket.dtype != torch.float32
            if bucket.size == 1:  # only the lower-precision parameters need their masters, rounded in place
                if separate:
                    for shard in bucket.shards:
                        shard.param.detach().copy_(shard.master)
                continue
            if separate:  # what this rank sends: its slices of every parameter (the padding zero)
                segment = bucket.masters.to(bucket.dtype)
            else:
                segment = torch.zeros(bucket.numel, dtype=torch.float32, device=self.device)
                for shard in bucket.shards:
                    bucket.own(segment, shard).copy_(shard.master)
            flat = torch.empty(bucket.size * bucket.numel, dtype=bucket.dtype, device=self.device)
            work = all_gather_flat(flat, segment, group=bucket.group, async_op=True)
            self.comm.all_gathers += 1
            pending.append((bucket, flat, work))
        for bucket, flat, work in pending:
            if work is not None:
                work.wait()
            for shard in bucket.shards:
                unpack_chunks(shard.param.detach(), bucket.chunks(flat, shard), shard.dim, shard.rows)

    def zero_grad(self) -> None:
        """Drop the gradients of the parameters and of the shards."""
        for shard in self.shards.values():
            shard.param.grad = None
            shard.master.grad = None

    # ----- checkpoints
    def state_dict(self) -> dict[str, dict[str, Tensor]]:
        """{name: {"exp_avg", "exp_avg_sq": DTensor of the global shape, "step": Tensor}}, aliasing the state.

        Dense: [Shard(0)] on ``groups.dp_mesh``; expert: [Shard(1), Shard(0), Shard(0)] on
        ``groups.expert_mesh``. DCP saves each slice once and loads (in place) under any layout.
        """
        out: dict[str, dict[str, Tensor]] = {}
        for name, shard in self.shards.items():
            state = self.inner.state[shard.master]
            out[name] = {"step": state["step"], **{key: self._global(shard, state[key]) for key in MOMENT_KEYS}}
        return out

    def _global(self, shard: ParamShard, local: Tensor) -> DTensor:
        """``local`` (this rank's slice of ``shard``'s parameter, or of its state) as a DTensor of the global shape."""
        mesh, placements, _, _ = self._placement(shard.expert)
        shape = self.global_shape(shard)
        return DTensor.from_local(local, mesh, placements, run_check=False, shape=shape,
                                  stride=torch.empty(shape, device="meta").stride())

    def master_tensors(self) -> dict[str, DTensor]:
        """{name: FP32 master DTensor of the global shape, placed as the moments} of every lower-precision
        parameter, aliasing the masters: a checkpoint holds these in those parameters' place (so it keeps
        FP32 weights whatever the compute precision), and loading one fills them in place; then call
        ``params_from_masters``. Empty when every parameter is FP32 (each is its own master)."""
        return {name: self._global(shard, shard.master) for name, shard in self.shards.items()
                if not shard.master_is_param}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, dict[str, Tensor]]) -> None:
        """Copy a state_dict()-shaped dict (e.g. filled by dcp.load) into the moments and step counts. The
        weights are the caller's: an FP32 parameter loaded is its master already; for lower-precision ones
        load ``master_tensors()`` and call ``params_from_masters`` (or load the parameters and call
        ``copy_masters_from_params``)."""
        missing = set(self.shards) - set(state)
        if missing:
            raise KeyError(f"ZeroAdamW.load_state_dict: no state for {sorted(missing)[:5]}")
        for name, shard in self.shards.items():
            saved = state[name]
            target = self.inner.state[shard.master]
            target["step"].copy_(saved["step"])
            mesh, placements, _, _ = self._placement(shard.expert)
            for key in MOMENT_KEYS:
                value = saved[key]
                if not isinstance(value, DTensor) or value.device_mesh != mesh or list(value.placements) != placements:
                    raise ValueError(f"ZeroAdamW.load_state_dict: {name}.{key} must be a DTensor {placements} on "
                                     f"this layout's mesh (load a checkpoint into state_dict() with dcp.load)")
                target[key].copy_(value.to_local())
