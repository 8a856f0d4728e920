"""AdamW with BF16 moments / FP32 masters against torch.optim.AdamW, parameter groups, DCP round trip.

Both update paths run the checks: ``update="foreach"`` (the reference) against torch's default
path bitwise, ``update="fused"`` (torch's fused kernel, the CPU default) against the same bounds, against
torch's fused kernel, and against the reference."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from train.config import ModelConfig, OptimConfig
from train.model import Gate, RMSNorm, Transformer
from train.optim import AdamW, build_optimizer, param_groups

SHAPES = [(16, 8), (8,), (3, 4, 5), (1,), (7, 3)]
STEPS = 20
LR = 1e-3
BETAS = (0.9, 0.95)


def make_params(dtype: torch.dtype = torch.float32, seed: int = 0) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]


def make_grads(seed: int = 1, dtype: torch.dtype = torch.float32) -> list[list[torch.Tensor]]:
    """STEPS lists of gradients, one per parameter; scales vary so that v is not constant."""
    gen = torch.Generator().manual_seed(seed)
    return [[(torch.randn(s, generator=gen) * (1 + step % 3)).to(dtype) for s in SHAPES] for step in range(STEPS)]


def groups(params: list[nn.Parameter]) -> list[dict]:
    """Matrices with weight decay, vectors without (as param_groups does)."""
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def run(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], grads: list[list[torch.Tensor]]) -> None:
    """Apply the gradients step by step, changing lr every step as the trainer does."""
    for step, step_grads in enumerate(grads):
        for group in optimizer.param_groups:
            group["lr"] = LR * (0.5 + 0.5 * (step + 1) / len(grads))
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


FUSED = pytest.mark.parametrize("update", ["foreach", "fused"])


def test_fp32_moments_equal_torch_adamw():
    ours_params, ref_params, grads = make_params(), make_params(), make_grads()
    ours = AdamW(groups(ours_params), lr=LR, betas=BETAS, eps=1e-8, moment_dtype=torch.float32, update="foreach")
    ref = torch.optim.AdamW(groups(ref_params), lr=LR, betas=BETAS, eps=1e-8)
    run(ours, ours_params, grads)
    run(ref, ref_params, grads)
    for p, q in zip(ours_params, ref_params):
        assert torch.equal(p, q)  # bitwise: the same operations in the same order
        for key in ("exp_avg", "exp_avg_sq"):
            assert ours.state[p][key].dtype == torch.float32
            assert torch.equal(ours.state[p][key], ref.state[q][key])
        assert ours.state[p]["step"].item() == STEPS
        assert "master" not in ours.state[p]  # an FP32 parameter is its own master


@FUSED
def test_bf16_moments_within_bound_of_torch_adamw(update):
    """BF16 moments (sec 3.3.3) stay within a derived bound of FP32 AdamW, and do differ from it.

    Bound. BF16 keeps 8 significant bits, so each store rounds with relative error u <= 2^-8. The
    stored moments obey m_t = b1 m_{t-1} + (1-b1) g_t, so their error after rounding is
    e_t = b1 e_{t-1} + rho_t m_t with |rho_t| <= u: at most u |m| / (1 - b1) for gradients of
    a steady scale, likewise u v / (1 - b2) for v. The update ratio m^/sqrt(v^) then moves by at
    most u B (1/(1-b1) + 1/(2 (1-b2))), B ~ 1.2 bounding |m^|/sqrt(v^) for b1^2 < b2 (Cauchy-Schwarz),
    and FP32 parameters add nothing. After n steps of learning rate <= lr the parameters differ by
    at most n lr u B (1/(1-b1) + 1/(2(1-b2))) = n lr u 24 for (0.9, 0.95).
    """
    ours_params, ref_params, grads = make_params(), make_params(), make_grads()
    ours = AdamW(groups(ours_params), lr=LR, betas=BETAS, eps=1e-8, moment_dtype=torch.bfloat16, update=update)
    ref = torch.optim.AdamW(groups(ref_params), lr=LR, betas=BETAS, eps=1e-8)
    run(ours, ours_params, grads)
    run(ref, ref_params, grads)

    u = 2.0**-8
    c = 1.2 * (1 / (1 - BETAS[0]) + 1 / (2 * (1 - BETAS[1])))
    bound = STEPS * LR * u * c
    diff = max((p - q).abs().max().item() for p, q in zip(ours_params, ref_params))
    assert 0 < diff <= bound, (diff, bound)  # > 0: the BF16 rounding is in effect
    for p, q in zip(ours_params, ref_params):
        assert p.dtype == torch.float32 and "master" not in ours.state[p]
        for key in ("exp_avg", "exp_avg_sq"):
            assert ours.state[p][key].dtype == torch.bfloat16
        # moments are the reference ones up to the accumulated BF16 rounding
        torch.testing.assert_close(ours.state[p]["exp_avg_sq"].float(), ref.state[q]["exp_avg_sq"],
                                   rtol=u / (1 - BETAS[1]), atol=0)


@FUSED
@pytest.mark.parametrize("moment_dtype", [torch.float32, torch.bfloat16])
def test_bf16_params_keep_fp32_master(moment_dtype, update):
    """BF16 parameters: the FP32 master follows an FP32-parameter run exactly; the parameter is it rounded."""
    low = make_params(torch.bfloat16)
    high = [nn.Parameter(p.detach().float()) for p in low]
    grads = make_grads(dtype=torch.bfloat16)  # what a BF16 model's backward produces
    opt_low = AdamW(groups(low), lr=LR, betas=BETAS, moment_dtype=moment_dtype, update=update)
    opt_high = AdamW(groups(high), lr=LR, betas=BETAS, moment_dtype=moment_dtype, update=update)
    run(opt_low, low, grads)
    run(opt_high, high, [[g.float() for g in step_grads] for step_grads in grads])
    for p, q in zip(low, high):
        master = opt_low.state[p]["master"]
        assert p.dtype == torch.bfloat16 and master.dtype == torch.float32
        assert torch.equal(master, q.detach())
        assert torch.equal(p.detach(), master.to(torch.bfloat16))
        assert not torch.equal(master, p.detach().float())  # the master holds more than the BF16 value
        assert opt_low.state[p]["exp_avg"].dtype == moment_dtype


@FUSED
def test_params_without_grad_are_skipped_and_chunks_do_not_change_the_result(update):
    params, grads = make_params(), make_grads()
    frozen_before = params[1].detach().clone()
    whole = AdamW(groups(params), lr=LR, moment_dtype=torch.bfloat16, update=update)
    chunked_params = make_params()
    chunked = AdamW(groups(chunked_params), lr=LR, moment_dtype=torch.bfloat16, chunk_numel=20, update=update)
    no_grad_for_1 = [[None if i == 1 else g for i, g in enumerate(step)] for step in grads]
    for opt, ps in ((whole, params), (chunked, chunked_params)):
        for step_grads in no_grad_for_1:
            for p, g in zip(ps, step_grads):
                p.grad = None if g is None else g.clone()
            opt.step()
    assert torch.equal(params[1].detach(), frozen_before)
    assert len(whole.state[params[1]]) == 0
    for p, q in zip(params, chunked_params):
        assert torch.equal(p, q)


def test_fused_equals_torch_fused_kernel():
    """FP32 moments: bitwise torch.optim.AdamW(fused=True) on tensors of whole vectors (multiples of 64
    elements), where both feed the kernel the same way. Elsewhere ours computes the tail on the vector
    path too, torch on the scalar one: within FP32 rounding of the update (1e-6 of the movement)."""
    shapes = [(16, 8), (64,), (4, 4, 12), (7, 3), (5,)]
    gen = torch.Generator().manual_seed(0)
    ours_params = [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    ref_params = [nn.Parameter(p.detach().clone()) for p in ours_params]
    start = [p.detach().clone() for p in ours_params]
    ours = AdamW(ours_params, lr=LR, betas=BETAS, moment_dtype=torch.float32, update="fused")
    ref = torch.optim.AdamW(ref_params, lr=LR, betas=BETAS, weight_decay=0.1, fused=True)
    for step in range(STEPS):
        for a, b in zip(ours_params, ref_params):
            a.grad = torch.randn(a.shape, generator=gen) * (1 + step % 3)
            b.grad = a.grad.clone()
        ours.step()
        ref.step()
    for p, q, p0 in zip(ours_params, ref_params, start):
        if p.numel() % 64 == 0:
            assert torch.equal(p, q)
            assert torch.equal(ours.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"])
        else:
            assert (p - q).abs().max() <= 1e-6 * (p - p0).abs().max()


@pytest.mark.parametrize("moment_dtype", [torch.float32, torch.bfloat16])
def test_fused_result_does_not_depend_on_how_a_tensor_is_cut(moment_dtype):
    """ZeRO-1 cuts parameters anywhere, and expert weights along their second dim (non-contiguous
    slices): every element must get the same bits whichever piece it lies in (torch's kernel alone
    computes a tensor's last numel % vector-width elements on another path)."""
    gen = torch.Generator().manual_seed(2)
    start = torch.randn(6, 100, generator=gen)
    grads = [torch.randn(6, 100, generator=gen) for _ in range(5)]
    col_cuts, flat_cuts = ((0, 37), (37, 100)), (1, 250, 349)

    whole = nn.Parameter(start.clone())
    columns = [nn.Parameter(torch.empty(100, 6).t()[:, a:b]) for a, b in col_cuts]  # strided storage
    for col, (a, b) in zip(columns, col_cuts):
        col.data.copy_(start[:, a:b])
        assert not col.is_contiguous()
    pieces = [nn.Parameter(t.clone()) for t in start.view(-1).split(flat_cuts)]
    optimizers = [AdamW(ps, lr=LR, moment_dtype=moment_dtype, update="fused") for ps in ([whole], columns, pieces)]
    for g in grads:
        whole.grad = g.clone()
        for col, (a, b) in zip(columns, col_cuts):
            col.grad = g[:, a:b].clone()
        for p, part in zip(pieces, g.reshape(-1).split(flat_cuts)):
            p.grad = part.clone()
        for opt in optimizers:
            opt.step()
    assert torch.equal(torch.cat([c.detach() for c in columns], dim=1), whole.detach())
    assert torch.equal(torch.cat([p.detach() for p in pieces]), whole.detach().view(-1))
    one, cut = optimizers[0].state[whole], optimizers[1].state
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(torch.cat([cut[c][key] for c in columns], dim=1), one[key])


def test_fused_agrees_with_foreach_on_bf16_moments():
    """The fast path against the reference, BF16 moments, 20 steps: both compute the update in FP32
    from the same widened moments and round them once per step, so they differ by the FP32 rounding of
    the kernel's own operation order (measured 3e-7 of the movement); that moves a stored moment only
    when it sits on a BF16 rounding boundary: moments within one BF16 ULP (2^-8 relative)."""
    a, b, grads = make_params(), make_params(), make_grads()
    start = [p.detach().clone() for p in a]
    foreach = AdamW(groups(a), lr=LR, betas=BETAS, moment_dtype=torch.bfloat16, update="foreach")
    fused = AdamW(groups(b), lr=LR, betas=BETAS, moment_dtype=torch.bfloat16, update="fused")
    run(foreach, a, grads)
    run(fused, b, grads)
    for p, q, p0 in zip(a, b, start):
        moved = (p - p0).abs().max().item()
        assert moved > 0 and (p - q).abs().max().item() <= 1e-6 * moved
        for key in ("exp_avg", "exp_avg_sq"):
            x, y = foreach.state[p][key], fused.state[q][key]
            assert y.dtype == torch.bfloat16
            torch.testing.assert_close(y.float(), x.float(), rtol=2.0**-8, atol=0)


def test_step_with_closure_returns_loss():
    p = nn.Parameter(torch.ones(3))
    opt = AdamW([p], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 3.0
    assert (p < 1).all()


def test_invalid_arguments_are_refused():
    p = [nn.Parameter(torch.ones(2))]
    with pytest.raises(ValueError, match="betas"):
        AdamW(p, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="moment_dtype"):
        AdamW(p, moment_dtype=torch.float16)


# --------------------------------------------------------------------------------------------------
# Parameter groups and build_optimizer on the real model


def tiny_model() -> Transformer:
    model = Transformer(ModelConfig())
    model.init_weights()
    return model


def test_param_groups_decay_matrices_only():
    model = tiny_model()
    groups_ = param_groups(model, weight_decay=0.1)
    assert [g["weight_decay"] for g in groups_] == [0.1, 0.0]
    ids = [id(p) for g in groups_ for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}  # every parameter exactly once

    decay = {id(p) for p in groups_[0]["params"]}
    names = dict(model.named_parameters())
    for name, p in names.items():
        assert (id(p) in decay) == (p.ndim >= 2), name
    for name in ("embed.weight", "head.weight", "layers.1.ffn.experts.w1", "layers.1.ffn.gate.weight",
                 "layers.0.attn.wkv_b.weight", "mtp.0.eh_proj.weight"):
        assert id(names[name]) in decay, name
    norms = [m.weight for m in model.modules() if isinstance(m, RMSNorm)]
    assert norms and all(id(w) not in decay and id(w) in ids for w in norms)

    gate_biases = [m.bias for m in model.modules() if isinstance(m, Gate)]
    assert gate_biases and all(id(b) not in ids for b in gate_biases)  # buffers, never optimized


def test_build_optimizer_from_config():
    model = tiny_model()
    cfg = OptimConfig()
    opt = build_optimizer(model, cfg)
    assert opt.moment_dtype == torch.bfloat16
    assert [g["weight_decay"] for g in opt.param_groups] == [cfg.weight_decay, 0.0]
    for g in opt.param_groups:
        assert g["lr"] == cfg.lr and g["betas"] == (0.9, 0.95) and g["eps"] == cfg.eps
    assert build_optimizer(model, OptimConfig(moment_dtype="float32")).moment_dtype == torch.float32


# --------------------------------------------------------------------------------------------------
# Checkpointing through torch.distributed.checkpoint


def random_grads(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-2).to(p.dtype)


def steps(model: nn.Module, opt: AdamW, seeds: range) -> None:
    for seed in seeds:
        random_grads(model, seed)
        opt.step()
        opt.zero_grad(set_to_none=True)


def assert_same_state(a: AdamW, b: AdamW, model_a: nn.Module, model_b: nn.Module) -> None:
    for (name, p), (_, q) in zip(model_a.named_parameters(), model_b.named_parameters()):
        assert torch.equal(p, q), name
        sa, sb = a.state[p], b.state[q]
        assert sa.keys() == sb.keys(), name
        for key in sa:
            assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), (name, key)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # one process, no group: intended
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_dcp_state_dict_round_trip(tmp_path, param_dtype):
    """Save model + optimizer with DCP, load into fresh ones, and take identical further steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    cfg = ModelConfig(n_layers=2, vocab_size=256, dim=64)
    model = Transformer(cfg).to(param_dtype)
    model.init_weights()
    opt = build_optimizer(model, OptimConfig())
    steps(model, opt, range(3))
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp_path))

    fresh = Transformer(cfg).to(param_dtype)
    fresh.init_weights(std=0.5)  # different weights: everything must come from the checkpoint
    fresh_opt = build_optimizer(fresh, OptimConfig())
    fresh_model_sd, fresh_optim_sd = get_state_dict(fresh, fresh_opt)
    loaded = {"model": fresh_model_sd, "optim": fresh_optim_sd}
    dcp.load(loaded, checkpoint_id=str(tmp_path))
    set_state_dict(fresh, fresh_opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])

    assert_same_state(opt, fresh_opt, model, fresh)
    p = next(fresh.parameters())
    assert fresh_opt.state[p]["exp_avg"].dtype == torch.bfloat16
    assert fresh_opt.state[p]["step"].item() == 3
    assert ("master" in fresh_opt.state[p]) == (param_dtype != torch.float32)
    steps(model, opt, range(3, 5))
    steps(fresh, fresh_opt, range(3, 5))
    assert_same_state(opt, fresh_opt, model, fresh)


def test_load_state_dict_keeps_moment_and_master_dtypes():
    params = make_params(torch.bfloat16)
    opt = AdamW(groups(params), lr=LR, moment_dtype=torch.bfloat16)
    run(opt, params, make_grads(dtype=torch.bfloat16)[:2])
    saved = copy.deepcopy(opt.state_dict())
    other_params = make_params(torch.bfloat16, seed=5)
    other = AdamW(groups(other_params), lr=LR, moment_dtype=torch.bfloat16)
    other.load_state_dict(saved)
    for p, q in zip(params, other_params):
        for key, value in opt.state[p].items():
            assert other.state[q][key].dtype == value.dtype and torch.equal(other.state[q][key], value), key
