"""BF16 working weights (train/precision.py): which parameters are cast, that their gradients stay FP32
(autograd's accumulation, the embedding's row sums, FP8 Wgrad), and that a model with them computes what the
FP32-parameter model computes under BF16 autocast."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fp8.backend import EmulateBackend
from fp8.experts import fp8_expert_ffn
from fp8.linear import fp8_linear
from train.losses import compute_losses
from train.model import Gate, RMSNorm
from train.ops import embedding
from train.precision import cast_working_weights

pytestmark = pytest.mark.usefixtures("single_thread")


def test_cast_keeps_norms_and_gates_fp32_and_the_parameter_objects(tiny_cfg, random_model):
    model = random_model(tiny_cfg())
    before = {name: (p, p.detach().clone()) for name, p in model.named_parameters()}
    kept = {id(p) for m in model.modules() if isinstance(m, (RMSNorm, Gate)) for p in m.parameters()}
    cast = cast_working_weights(model, torch.bfloat16)
    assert cast == sum(p.numel() for p in model.parameters() if id(p) not in kept) > 0
    for name, p in model.named_parameters():
        param, value = before[name]
        assert p is param, name  # optimizers and pipeline stages keep their references
        if id(p) in kept:
            assert p.dtype == torch.float32 and torch.equal(p.detach(), value), name
        else:
            assert p.dtype == torch.bfloat16 and p.grad_dtype == torch.float32, name
            assert torch.equal(p.detach(), value.bfloat16()), name
    assert model.moe_layers()[0].gate.bias.dtype == torch.float32  # a buffer: untouched
    assert cast_working_weights(model, torch.float32) == 0


def test_bf16_weights_compute_what_fp32_weights_compute_under_autocast(tiny_cfg, random_model):
    """Same forward, bitwise, and the same FP32 gradients: without MTP bitwise; with MTP the shared head's
    two gradients are summed in FP32 (autocast's one cast of an FP32 head sums them in BF16), a difference
    within a few BF16 roundings of the head's gradient."""
    for mtp_depth in (0, 1):
        cfg = tiny_cfg(mtp_depth=mtp_depth)
        reference, working = random_model(cfg), random_model(cfg)
        cast_working_weights(working, torch.bfloat16)
        window = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
        grads = []
        for model in (reference, working):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(window[:, :-1])
            losses = compute_losses(out, window, 0.3, 1e-4)
            losses.loss.backward()
            grads.append((losses.loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
        (loss_ref, ref), (loss, got) = grads
        assert torch.equal(loss, loss_ref), mtp_depth
        for name, g in ref.items():
            assert got[name].dtype == torch.float32, name
            if mtp_depth == 0 or name != "head.weight":
                assert torch.equal(got[name], g), (mtp_depth, name)
            else:
                torch.testing.assert_close(got[name], g, rtol=0, atol=4 * 2**-8 * g.abs().max().item())


def test_a_bf16_embedding_sums_its_gradient_rows_in_fp32():
    """A token that occurs 4096 times adds 4096 gradient rows: summed in BF16 the small ones are lost."""
    table = torch.randn(8, 16)
    tokens = torch.cat([torch.zeros(4096, dtype=torch.long), torch.arange(8)])
    grad = (torch.rand(tokens.numel(), 16, generator=torch.Generator().manual_seed(1)) + 0.5).bfloat16()
    ours = torch.nn.Parameter(table.bfloat16())
    ours.grad_dtype = torch.float32
    embedding(tokens, ours).backward(grad)
    exact = torch.zeros(8, 16, dtype=torch.float64).index_add_(0, tokens, grad.double())
    fp32 = torch.nn.Parameter(table.bfloat16().float())  # the FP32-table path: F.embedding in FP32
    F.embedding(tokens, fp32).backward(grad.float())
    assert ours.grad.dtype == torch.float32 and torch.equal(ours.grad, fp32.grad)
    assert (ours.grad.double() - exact).abs().max() < 1e-3 * exact.abs().max()
    plain = torch.nn.Parameter(table.bfloat16())  # BF16 table without the FP32 sum
    F.embedding(tokens, plain).backward(grad)
    assert (plain.grad.double() - exact).abs().max() > 10 * (ours.grad.double() - exact).abs().max()


def test_fp8_wgrad_reaches_a_bf16_weight_unrounded():
    """The FP8 Wgrad GEMMs accumulate in FP32 (report Figure 6); a BF16 working weight receives that FP32
    gradient as is, the same bits as an FP32 weight of the same values."""
    backend = EmulateBackend()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 128, generator=gen)
    dy = torch.randn(256, 256, generator=gen)
    values = torch.randn(256, 128, generator=gen).bfloat16()
    grads = []
    for dtype in (torch.bfloat16, torch.float32):
        w = torch.nn.Parameter(values.to(dtype))
        if dtype == torch.bfloat16:
            w.grad_dtype = torch.float32
        fp8_linear(x, w, backend).backward(dy)
        grads.append(w.grad)
    assert grads[0].dtype == torch.float32 and torch.equal(grads[0], grads[1])
    assert not torch.equal(grads[0], grads[0].bfloat16().float())  # FP32 bits a BF16 gradient would drop

    counts = [100, 0, 156]
    experts = [torch.randn(3, 64, 128, generator=gen), torch.randn(3, 128, 64, generator=gen),
               torch.randn(3, 64, 128, generator=gen)]
    xs = torch.randn(256, 128, generator=gen)
    grads = []
    for dtype in (torch.bfloat16, torch.float32):
        ws = [torch.nn.Parameter(w.bfloat16().to(dtype)) for w in experts]
        for w in ws:
            if dtype == torch.bfloat16:
                w.grad_dtype = torch.float32
        fp8_expert_ffn(xs, counts, *ws, backend=backend).sum().backward()
        grads.append([w.grad for w in ws])
    for got, want in zip(*grads):
        assert got.dtype == torch.float32 and torch.equal(got, want)
