"""ZeRO-1 AdamW (parallel/zero.py) on real gloo ranks against one-process train.optim.AdamW.

Gradients are multiples of 2^-10 below 1 in magnitude, so their sums over ranks and the division by a
power-of-two dp are exact in FP32 whatever order gloo adds them in. The reference then sees the very
same averaged gradient and AdamW runs the same elementwise FP32 operations on each element, so
unclipped steps must agree BITWISE (parameters and BF16 moments). A clipped step scales by a norm
summed in another order (shards, then ranks; torch's clip_grad_norm_ sums in FP32 and is off by about
8e-7 relative here, ours by less than 1e-7), so the clipping coefficients differ in the last bits. With BF16
moments that can flip the rounding of a moment by one BF16 step (2^-8), which lr amplifies into the
parameters; the clipping test therefore uses FP32 moments and compares to 2e-6 relative and 1e-7
absolute, for elements near zero (a few 1e-6 of the largest update, lr = 2e-2, and of the gradients).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from parallel.mesh import Layout, ProcessGroups, build_process_groups
from parallel.zero import ZeroAdamW, parameter_squares
from parallel.local_ranks import run_ranks
from train import checkpoint
from train.config import ModelConfig, OptimConfig
from train.losses import compute_losses
from train.model import RoutedExperts, Transformer
from train.optim import build_optimizer

CFG = OptimConfig(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
CFG_FP32 = dataclasses.replace(CFG, moment_dtype="float32")
LRS = [1e-2, 2e-2, 5e-3, 1e-2, 3e-3]
# dim 0 not divisible by 2 or 4 (uneven and empty shards with 4 ranks), 1-D ones, a 3-D one
SHAPES = {"a": (5, 3), "b": (3, 4), "c": (7,), "d": (1,), "e": (64, 33), "f": (2, 3, 4), "g": (6,)}
# a Transformer whose sharded dims are uneven: vocab 33 over dp 4, moe_inter_dim 5 and dim 25 over edp 2
MODEL = ModelConfig(
    vocab_size=33, dim=25, inter_dim=16, moe_inter_dim=5, n_layers=2, n_dense_layers=1, n_heads=2,
    q_lora_rank=0, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4,
    n_routed_experts=4, n_shared_experts=1, n_activated_experts=2, mtp_depth=1, max_seq_len=16,
    original_seq_len=16, expert_impl="loop",
)


class Toy(nn.Module):
    """Parameters of SHAPES, N(0, 1)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        for name, shape in SHAPES.items():
            self.register_parameter(name, nn.Parameter(torch.randn(shape, generator=gen)))


def dyadic(shape, *seed: int) -> Tensor:
    """Made-up gradient: multiples of 2^-10 in (-0.25, 0.25), so sums of a few are exact."""
    gen = torch.Generator().manual_seed(hash(seed) % 2**31)
    return torch.randint(-256, 257, tuple(shape), generator=gen).float() / 1024


def make_groups(rank: int, world: int, ep: int = 1) -> ProcessGroups:
    return build_process_groups(Layout(world_size=world, rank=rank, pp=1, ep=ep, ranks_per_node=world), "cpu")


def full_state(zero: ZeroAdamW) -> dict[str, dict[str, Tensor]]:
    """Copies of the sharded moments gathered to full global tensors (a collective; on one rank
    full_tensor() returns the state itself), and of the step counters."""
    return {name: {key: (value.full_tensor() if isinstance(value, DTensor) else value).clone()
                   for key, value in entry.items()}
            for name, entry in zero.state_dict().items()}


def reference(model: nn.Module, grads: list[dict[str, Tensor]], max_norm: float = 0.0, cfg: OptimConfig = CFG):
    """One process: build_optimizer's AdamW on the given (already averaged) gradients; returns the norms."""
    opt = build_optimizer(model, cfg)
    params = dict(model.named_parameters())
    norms = []
    for lr, step_grads in zip(LRS, grads):
        for name, g in step_grads.items():
            params[name].grad = g.clone()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf")))
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        opt.zero_grad(set_to_none=True)
    return opt, [n.item() for n in norms]


def assert_state_equal(zero_state: dict, opt: torch.optim.Optimizer, model: nn.Module, exact: bool = True) -> None:
    for name, p in model.named_parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            got, want = zero_state[name][key], opt.state[p][key]
            assert got.dtype == want.dtype and got.shape == want.shape, (name, key)
            if exact:
                assert torch.equal(got, want), (name, key)
            else:
                torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-7)  # atol: moments that cancel near 0
        assert zero_state[name]["step"].item() == opt.state[p]["step"].item()


# ---------------------------------------------------------------- dense parameters, clipping, buckets

def _dense_run(rank: int, world: int, bucket_mb: float, max_norm: float, cfg: OptimConfig = CFG):
    model = Toy()
    zero = ZeroAdamW(model, make_groups(rank, world), cfg, bucket_mb=bucket_mb)
    assert all(not bucket.masters.numel() for bucket in zero.buckets)  # FP32: each parameter its own master
    norms = []
    for step, lr in enumerate(LRS):
        for i, (name, p) in enumerate(model.named_parameters()):
            p.grad = dyadic(p.shape, rank, step, i) * (1 + step % 3)
        norms.append(zero.step(lr, max_norm))
        assert all(p.grad is None for p in model.parameters())
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return params, full_state(zero), norms, zero.comm


def _dense_expected(world: int, max_norm: float, cfg: OptimConfig = CFG):
    model = Toy()
    grads = [{name: sum(dyadic(shape, r, step, i) for r in range(world)) * (1 + step % 3) / world
              for i, (name, shape) in enumerate(SHAPES.items())} for step in range(len(LRS))]
    opt, norms = reference(model, grads, max_norm, cfg)
    exact_norms = [sum(g.double().square().sum() for g in step_grads.values()).sqrt().item() for step_grads in grads]
    return model, opt, norms, exact_norms


def test_dense_equals_adamw_on_averaged_gradients():
    for world, bucket_mb in [(1, 25.0), (2, 25.0), (4, 25.0), (4, 1e-4)]:
        results = run_ranks(_dense_run, world, bucket_mb, 0.0)
        model, opt, norms, exact_norms = _dense_expected(world, 0.0)
        for params, _, got_norms, _ in results:
            for name, p in model.named_parameters():
                assert torch.equal(params[name], p.detach()), (world, name)  # bitwise, see the module doc
            assert got_norms == pytest.approx(exact_norms, rel=1e-7)
            assert got_norms == pytest.approx(norms, rel=2e-6)
        assert_state_equal(results[0][1], opt, model)


LOW_PRECISION = ("a", "e", "f")  # BF16 parameters in the mixed model: 2-D, a large one and the 3-D one


def coarse(shape, *seed: int) -> Tensor:
    """Made-up gradient for a BF16 parameter: multiples of 1/16 below 0.5, so that their sums over 4 ranks
    (times 3 at most) and the division by dp stay exact in BF16 as in FP32."""
    gen = torch.Generator().manual_seed(hash(seed) % 2**31)
    return torch.randint(-8, 9, tuple(shape), generator=gen).float() / 16


def mixed_toy() -> Toy:
    model = Toy()
    for name in LOW_PRECISION:
        getattr(model, name).data = getattr(model, name).data.bfloat16()
    return model


def _mixed_run(rank: int, world: int):
    model = mixed_toy()
    zero = ZeroAdamW(model, make_groups(rank, world), CFG)
    for shard in zero.shards.values():  # FP32: the master is the parameter's own slice; BF16: an FP32 copy
        shares = shard.master.untyped_storage().data_ptr() == shard.param.untyped_storage().data_ptr()
        assert shares == (shard.name not in LOW_PRECISION) and shard.master.dtype == torch.float32, shard.name
    for step, lr in enumerate(LRS):
        for i, (name, p) in enumerate(model.named_parameters()):
            make = coarse if name in LOW_PRECISION else dyadic
            p.grad = (make(p.shape, rank, step, i) * (1 + step % 3)).to(p.dtype)
        zero.step(lr, 0.0)
    return {n: p.detach().clone() for n, p in model.named_parameters()}, full_state(zero)


def test_fp32_parameters_are_their_own_masters_lower_precision_ones_get_fp32_copies():
    """Mixed FP32 / BF16 parameters against the one-process AdamW (which keeps an FP32 master for a BF16
    parameter): bitwise, parameters and moments. With only FP32 parameters no master buffer exists."""
    for world in (1, 2, 4):
        results = run_ranks(_mixed_run, world)
        model = mixed_toy()
        grads = [{name: sum((coarse if name in LOW_PRECISION else dyadic)(shape, r, step, i) for r in range(world))
                  .mul(1 + step % 3).div(world).to(getattr(model, name).dtype)
                  for i, (name, shape) in enumerate(SHAPES.items())} for step in range(len(LRS))]
        opt, _ = reference(model, grads)
        for params, _ in results:
            for name, p in model.named_parameters():
                assert params[name].dtype == p.dtype and torch.equal(params[name], p.detach()), (world, name)
        assert_state_equal(results[0][1], opt, model)


def _working_run(rank: int, world: int, path: str):
    model = Toy()
    groups = make_groups(rank, world)
    zero = ZeroAdamW(model, groups, CFG, working_dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and p.grad_dtype == torch.float32 for p in model.parameters())
    assert all(b.dtype == torch.bfloat16 and b.masters.numel() == b.numel for b in zero.buckets)
    first = {n: t.full_tensor().clone() for n, t in zero.master_tensors().items()}
    for step, lr in enumerate(LRS):
        for i, (name, p) in enumerate(model.named_parameters()):
            p.grad = dyadic(p.shape, rank, step, i) * (1 + step % 3)  # FP32, as grad_dtype makes autograd's
        zero.step(lr, 0.0)
    dcp.save({"model": checkpoint.model_state(model, groups, masters=zero.master_tensors())}, checkpoint_id=path)
    masters = {n: t.full_tensor().clone() for n, t in zero.master_tensors().items()}
    return first, masters, {n: p.detach().clone() for n, p in model.named_parameters()}, full_state(zero)


def test_bf16_working_weights_keep_fp32_masters(tmp_path):
    """working_dtype=bfloat16: the parameters become BF16 with FP32 gradients; the masters start from their
    FP32 values (not the rounding), follow one-process FP32 AdamW bitwise, the parameters are their BF16
    rounding, and a checkpoint of ``master_tensors`` loads whole into an FP32 model."""
    for world in (1, 2, 4):
        path = str(tmp_path / f"working_{world}")
        results = run_ranks(_working_run, world, path)
        init = dict(Toy().named_parameters())
        model, opt, _, _ = _dense_expected(world, 0.0)
        for first, masters, params, state in results:
            for name, p in model.named_parameters():
                assert torch.equal(first[name], init[name].detach()), (world, name)
                assert torch.equal(masters[name], p.detach()), (world, name)
                assert params[name].dtype == torch.bfloat16 and torch.equal(params[name], p.detach().bfloat16())
            assert_state_equal(state, opt, model)
        loaded = Toy(seed=1)
        dcp.load({"model": checkpoint.model_state(loaded)}, checkpoint_id=path, no_dist=True)
        for name, p in model.named_parameters():
            assert torch.equal(dict(loaded.named_parameters())[name].detach(), p.detach()), (world, name)


def test_parameter_squares_one_kernel_path_agrees_with_the_row_sums():
    """The GPU path (one ``_foreach_norm`` over all parameters) run on the CPU against the CPU's row sums: the
    same per-parameter sums up to FP32 rounding (a CPU's long FP32 norm is off by up to ~1e-5 relative), each
    independent of the other tensors."""
    gen = torch.Generator().manual_seed(0)
    chunks = [torch.randn(n, generator=gen) * scale for n, scale in ((7, 1.0), (256, 3.0), (70_001, 1e-3), (1, 5.0))]
    rows, one_kernel = parameter_squares(chunks, "cpu"), parameter_squares(chunks, "cuda")
    exact = torch.stack([c.double().square().sum() for c in chunks])
    assert rows.dtype == one_kernel.dtype == torch.float64 and rows.shape == (4,)
    torch.testing.assert_close(rows, exact, rtol=1e-7, atol=0)
    torch.testing.assert_close(one_kernel, exact, rtol=1e-5, atol=0)
    assert torch.equal(parameter_squares(chunks[2:3], "cpu"), rows[2:3])  # its own elements only
    assert parameter_squares([], "cpu").numel() == 0


def test_clipping_uses_the_global_norm():
    max_norm = 5.0  # the scales 1, 2, 3 of the gradients give norms of about 3.4, 6.8, 10: some steps clip
    results = run_ranks(_dense_run, 4, 25.0, max_norm, CFG_FP32)
    model, opt, norms, exact_norms = _dense_expected(4, max_norm, CFG_FP32)
    assert min(norms) < max_norm < max(norms)
    for params, _, got_norms, _ in results:
        assert got_norms == pytest.approx(exact_norms, rel=1e-7)  # the norm before clipping
        assert got_norms == pytest.approx(norms, rel=2e-6)
        for name, p in model.named_parameters():
            # the update (at most about lr = 2e-2) differs by a few 1e-6 of itself: 1e-7 absolute
            torch.testing.assert_close(params[name], p.detach(), rtol=2e-6, atol=1e-7)
    assert_state_equal(results[0][1], opt, model, exact=False)


def _bucket_run(rank: int, world: int):
    runs = []
    for bucket_mb in (1e-6, 25.0):  # 1 byte: one parameter per bucket; 25 MB: all in one
        model = Toy()
        zero = ZeroAdamW(model, make_groups(rank, world), CFG, bucket_mb=bucket_mb)
        for i, p in enumerate(model.parameters()):
            p.grad = dyadic(p.shape, rank, i)
        zero.step(1e-2, 1.0)
        runs.append(({n: p.detach().clone() for n, p in model.named_parameters()}, zero.comm, len(zero.buckets)))
    return runs


def test_buckets_group_parameters_into_few_collectives():
    for (small, large) in run_ranks(_bucket_run, 2):
        params_small, comm_small, n_small = small
        params_large, comm_large, n_large = large
        assert n_small == len(SHAPES) and n_large == 1
        assert comm_small.reduce_scatters == comm_small.all_gathers == len(SHAPES)
        assert comm_large.reduce_scatters == comm_large.all_gathers == 1
        assert comm_small.all_reduces == comm_large.all_reduces == 1  # the norm (and which params have grads)
        for name in SHAPES:
            assert torch.equal(params_small[name], params_large[name])


def _missing_grad_run(rank: int, world: int):
    model = Toy()
    zero = ZeroAdamW(model, make_groups(rank, world), CFG)
    for step, lr in enumerate(LRS[:2]):
        for i, (name, p) in enumerate(model.named_parameters()):
            if name != "g" and (name != "c" or rank == 0):  # g: no gradient anywhere; c: on rank 0 only
                p.grad = dyadic(p.shape, rank, step, i)
        zero.step(lr, 0.0)
    return {n: p.detach().clone() for n, p in model.named_parameters()}, full_state(zero)


@pytest.mark.parametrize("world", [1, 2])  # one rank: the masters take the parameters' gradients, no copy
def test_missing_gradients_count_as_zero_or_skip_the_parameter(world):
    results = run_ranks(_missing_grad_run, world)
    model = Toy()
    grads = [{name: sum(dyadic(shape, r, step, i) for r in range(world if name != "c" else 1)) / world
              for i, (name, shape) in enumerate(SHAPES.items()) if name != "g"} for step in range(2)]
    opt, _ = reference(model, grads)
    for params, _ in results:
        for name, p in model.named_parameters():
            assert torch.equal(params[name], p.detach()), name
    assert torch.equal(results[0][0]["g"], Toy().g.detach())  # skipped: no weight decay either
    assert results[0][1]["g"]["step"].item() == 0 and results[0][1]["c"]["step"].item() == 2


def _nonfinite_run(rank: int, world: int):
    """Step 0 normal; step 1: one rank's gradient holds a NaN (or inf), or the caller says skip; step 2 normal."""
    model = Toy()
    zero = ZeroAdamW(model, make_groups(rank, world), CFG)
    snapshots, norms = [], []
    for step, poison in enumerate([None, "nan", "inf", "skip", None]):
        for i, (name, p) in enumerate(model.named_parameters()):
            p.grad = dyadic(p.shape, rank, step, i)
        if poison in ("nan", "inf") and rank == world - 1:
            model.e.grad[3, 7] = float(poison)  # one element on one rank: the all-reduced norm tells every rank
        snapshots.append(({n: p.detach().clone() for n, p in model.named_parameters()}, full_state(zero)))
        norms.append(zero.step(LRS[0], 1.0, skip=poison == "skip"))
        assert all(p.grad is None for p in model.parameters())
    return snapshots, norms, ({n: p.detach().clone() for n, p in model.named_parameters()}, full_state(zero))


def test_nonfinite_gradient_or_skip_changes_nothing():
    for params_and_state in run_ranks(_nonfinite_run, 2):
        snapshots, norms, final = params_and_state
        assert math.isnan(norms[1]) and math.isinf(norms[2]) and math.isfinite(norms[3])
        for skipped in (1, 2, 3):  # parameters, moments and AdamW step counts as before the skipped step
            before, after = snapshots[skipped], snapshots[skipped + 1]
            for name in SHAPES:
                assert torch.equal(before[0][name], after[0][name]), (skipped, name)
                for key, value in before[1][name].items():
                    assert torch.equal(value, after[1][name][key]), (skipped, name, key)
        assert all(entry["step"].item() == 2 for entry in final[1].values())  # steps 0 and 4 applied
        assert not torch.equal(snapshots[4][0]["a"], final[0]["a"])  # training goes on after the skips


# ---------------------------------------------------------------- expert parameters (ep 2 x edp 2)

def _train_micro_batches(model: Transformer, zero: ZeroAdamW, rank: int, overlap: bool) -> list[int]:
    """3 steps of 2 micro-batches of this rank's tokens through the real model and losses; the reduce-scatters
    issued during each step's backward."""
    overlapped = []
    for step, lr in enumerate(LRS[:3]):
        gen = torch.Generator().manual_seed(1000 * rank + step)
        windows = [torch.randint(0, MODEL.vocab_size, (2, 9), generator=gen) for _ in range(2)]
        before = zero.comm.overlapped_reduce_scatters
        for window in windows:
            loss = compute_losses(model(window[:, :-1]), window, 0.3, 1e-4).loss / len(windows)
            if overlap and window is windows[-1]:
                zero.overlap_next_backward()
            loss.backward()
        overlapped.append(zero.comm.overlapped_reduce_scatters - before)
        zero.step(lr, 1.0)
    return overlapped


def _overlap_run(rank: int, world: int):
    groups = make_groups(rank, world)
    results = {}
    for overlap in (False, True):
        model = build_model(groups.layout)
        zero = ZeroAdamW(model, groups, CFG, bucket_mb=0.002)
        overlapped = _train_micro_batches(model, zero, rank, overlap)
        results[overlap] = ({n: p.detach().clone() for n, p in model.named_parameters()}, full_state(zero),
                            overlapped, zero.comm.reduce_scatters, len(zero.reduction.order))
    # a toy whose "c" gets no gradient on rank 1: its bucket and those after it wait for step there
    toy = Toy()
    zero = ZeroAdamW(toy, groups, CFG, bucket_mb=1e-4)
    zero.overlap_next_backward()
    sum((p * dyadic(p.shape, rank, i)).sum() for i, (name, p) in enumerate(toy.named_parameters())
        if name != "c" or rank == 0).backward()
    toy_overlapped = zero.comm.overlapped_reduce_scatters
    zero.step(1e-2, 0.0)
    # a second gradient into an armed, already packed parameter is refused
    zero.overlap_next_backward()
    (toy.a.sum() + toy.b.sum()).backward()
    with pytest.raises(RuntimeError, match="second gradient for a"):
        toy.a.sum().backward()
    return results, toy_overlapped, {n: p.detach().clone() for n, p in toy.named_parameters()}


def test_reduce_scatters_overlapped_with_backward_change_nothing():
    """parallel.grad_overlap: each bucket's reduce-scatter issued from the gradient hooks during the last
    micro-batch's backward gives the very same parameters and moments as issuing them all in step (the
    same sums of the same gradients, bitwise), and really is issued during the backward: every bucket on
    the real model. A parameter without a gradient on one rank holds its bucket, and the later ones in the
    issue order, back to step on that rank only; the ranks still agree."""
    world = 2
    results = run_ranks(_overlap_run, world)
    for (by_mode, toy_overlapped, toy_params), rank in zip(results, range(world)):
        (plain, plain_state, none, rs_plain, _), (fast, fast_state, overlapped, rs_fast, shared) = \
            by_mode[False], by_mode[True]
        assert none == [0, 0, 0] and overlapped == [shared] * 3 and shared > 3
        assert rs_plain == rs_fast == 3 * shared
        for name in plain:
            assert torch.equal(plain[name], fast[name]), (rank, name)
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(plain_state[name][key], fast_state[name][key]), (rank, name, key)
        assert toy_overlapped > 0
    assert results[0][1] > results[1][1]  # rank 1 waited for step from "c" on
    for name in SHAPES:
        assert torch.equal(results[0][2][name], results[1][2][name]), name
    grads = [{name: sum(dyadic(shape, r, i) for r in range(world if name != "c" else 1)) / world
              for i, (name, shape) in enumerate(SHAPES.items())}]
    model = Toy()
    reference(model, grads)
    for name, p in model.named_parameters():
        assert torch.equal(results[0][2][name], p.detach()), name


def is_expert(model: nn.Module, name: str) -> bool:
    return isinstance(model.get_submodule(name.rsplit(".", 1)[0]), RoutedExperts)


def build_model(layout: Layout, seed: int = 0) -> Transformer:
    """The full model initialised like one process; with ep > 1 each RoutedExperts keeps its local experts."""
    model = Transformer(MODEL)
    model.init_weights(seed=seed)
    if layout.ep > 1:
        for module in model.modules():
            if isinstance(module, RoutedExperts):
                local = module.n_experts // layout.ep
                first = layout.ep_rank * local
                for w in ("w1", "w2", "w3"):
                    setattr(module, w, nn.Parameter(getattr(module, w).detach()[first:first + local].clone()))
                module.expert_offset = first
    return model


def local_rows(layout: Layout, full: Tensor) -> Tensor:
    local = full.shape[0] // layout.ep
    return full[layout.ep_rank * local:(layout.ep_rank + 1) * local]


def _expert_run(rank: int, world: int, ep: int):
    groups = make_groups(rank, world, ep)
    layout = groups.layout
    model = build_model(layout)
    zero = ZeroAdamW(model, groups, CFG, bucket_mb=0.01)
    shapes = dict(Transformer(MODEL).named_parameters())  # global shapes
    norms = []
    for step, lr in enumerate(LRS):
        for i, (name, p) in enumerate(model.named_parameters()):
            if is_expert(model, name):
                # the gradient of ep group edp_rank's tokens for all experts; this rank holds its slice
                p.grad = local_rows(layout, dyadic(shapes[name].shape, 100 + layout.edp_rank, step, i))
            else:
                p.grad = dyadic(p.shape, rank, step, i)
        norms.append(zero.step(lr, 0.0))
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return params, full_state(zero), norms, layout


def test_expert_parameters_with_ep2_equal_adamw():
    world, ep = 4, 2
    results = run_ranks(_expert_run, world, ep)
    model = build_model(Layout(1, 0, 1, 1, 1))
    grads = []
    for step in range(len(LRS)):
        step_grads = {}
        for i, (name, p) in enumerate(model.named_parameters()):
            if is_expert(model, name):  # summed over the edp groups, divided by dp
                step_grads[name] = sum(dyadic(p.shape, 100 + k, step, i) for k in range(world // ep)) / world
            else:
                step_grads[name] = sum(dyadic(p.shape, r, step, i) for r in range(world)) / world
        grads.append(step_grads)
    opt, norms = reference(model, grads)
    for params, _, got_norms, layout in results:
        for name, p in model.named_parameters():
            want = local_rows(layout, p.detach()) if is_expert(model, name) else p.detach()
            assert torch.equal(params[name], want), (layout.rank, name)
        # the norm counts each element once: experts are split over ep and sharded over edp
        assert got_norms == pytest.approx(norms, rel=2e-6)
    assert_state_equal(results[0][1], opt, model)


# ---------------------------------------------------------------- checkpoints that reshard

def model_state(model: nn.Module, groups: ProcessGroups) -> dict[str, Tensor]:
    """Parameters aliased for DCP; expert ones as DTensors of the global shape when ep > 1."""
    state = {}
    for name, p in model.named_parameters():
        tensor = p.detach()
        if groups.layout.ep > 1 and is_expert(model, name):
            tensor = DTensor.from_local(tensor, groups.expert_mesh, [Replicate(), Shard(0), Shard(0)], run_check=False)
        state[name] = tensor
    return state


def full_params(model: nn.Module, groups: ProcessGroups) -> dict[str, Tensor]:
    return {name: (t.full_tensor() if isinstance(t, DTensor) else t).clone()
            for name, t in model_state(model, groups).items()}


def set_global_grads(model: nn.Module, layout: Layout, step: int) -> None:
    """The same averaged gradient G under every layout: dense ranks all get G, expert ranks ep * G's rows
    (so that summing over edp and dividing by dp = edp * ep gives G)."""
    shapes = dict(Transformer(MODEL).named_parameters())
    for i, (name, p) in enumerate(model.named_parameters()):
        g = dyadic(shapes[name].shape, step, i)
        p.grad = local_rows(layout, g) * layout.ep if layout.ep > 1 and is_expert(model, name) else g


def weights(model: nn.Module, groups: ProcessGroups, zero: ZeroAdamW) -> dict[str, Tensor]:
    """What a checkpoint holds of the model: the parameters, or the FP32 masters of BF16 working weights
    (the trainer's ``train.checkpoint.model_state(..., masters=...)``)."""
    masters = zero.master_tensors()
    return checkpoint.model_state(model, groups, masters=masters) if masters else model_state(model, groups)


def full_masters(zero: ZeroAdamW) -> dict[str, Tensor]:
    return {name: t.full_tensor().clone() for name, t in zero.master_tensors().items()}


def _save_run(rank: int, world: int, ep: int, path: str, working: torch.dtype = torch.float32):
    """Two steps, save, then one more step: what continuing at this layout gives."""
    groups = make_groups(rank, world, ep)
    model = build_model(groups.layout)
    zero = ZeroAdamW(model, groups, CFG, working_dtype=working)
    for step in range(2):
        set_global_grads(model, groups.layout, step)
        zero.step(LRS[step], 0.0)
    dcp.save({"model": weights(model, groups, zero), "optim": zero.state_dict()}, checkpoint_id=path)
    saved = full_state(zero)
    set_global_grads(model, groups.layout, 2)
    zero.step(LRS[2], 0.0)
    return saved, full_params(model, groups), full_state(zero), full_masters(zero)


def _load_run(rank: int, world: int, ep: int, path: str, working: torch.dtype = torch.float32):
    """Load into a model initialised differently and a fresh optimizer, then take the third step."""
    groups = make_groups(rank, world, ep)
    model = build_model(groups.layout, seed=1)
    zero = ZeroAdamW(model, groups, CFG, working_dtype=working)
    state = {"model": weights(model, groups, zero), "optim": zero.state_dict()}
    dcp.load(state, checkpoint_id=path)
    zero.load_state_dict(state["optim"])
    zero.params_from_masters()  # BF16 working weights from the masters just loaded (FP32: nothing changes)
    loaded = full_state(zero)
    set_global_grads(model, groups.layout, 2)
    zero.step(LRS[2], 0.0)
    return loaded, full_params(model, groups), full_state(zero), full_masters(zero)


def check_reshard(tmp_path, save: tuple[int, int], loads: list[tuple[int, int]],
                  working: torch.dtype = torch.float32) -> None:
    path = str(tmp_path / f"ckpt_{save[0]}_{save[1]}")
    saved, params, state, masters = run_ranks(_save_run, *save, path, working)[0]
    assert all(entry["step"].item() == 2 for entry in saved.values())
    assert bool(masters) == (working != torch.float32)
    for world, ep in loads:
        loaded, got_params, got_state, got_masters = run_ranks(_load_run, world, ep, path, working)[0]
        for name in saved:
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(loaded[name][key], saved[name][key]), (save, world, ep, name, key)
                assert torch.equal(got_state[name][key], state[name][key]), (save, world, ep, name, key)
            assert torch.equal(got_params[name], params[name]), (save, world, ep, name)
        assert got_masters.keys() == masters.keys()
        for name, master in masters.items():
            assert torch.equal(got_masters[name], master), (save, world, ep, name)


def test_checkpoint_from_ep2_edp2_reshards(tmp_path):
    check_reshard(tmp_path, (4, 2), [(2, 2), (2, 1), (1, 1)])


def test_checkpoint_from_dp4_reshards(tmp_path):
    check_reshard(tmp_path, (4, 1), [(2, 1), (1, 1)])


def test_checkpoint_from_one_rank_into_four(tmp_path):
    check_reshard(tmp_path, (1, 1), [(4, 2)])


def test_bf16_working_weights_checkpoint_reshards(tmp_path):
    """The FP32 masters of BF16 working weights, saved sharded like the moments (experts over ep and edp),
    load under other layouts and continue bitwise; the working weights are their rounding."""
    check_reshard(tmp_path, (4, 2), [(2, 1), (1, 1)], working=torch.bfloat16)
