"""FP8 dispatch (report sec 3.3.3) on real gloo ranks: E4M3 payload with power-of-two 1x128 scales.

The experts compute on the decoded tokens, so the expert-parallel MoE with FP8 dispatch must equal the
single-device MoE whose routed experts see the same fake-quantized tokens (quantize then dequantize),
within the EP test's 1e-5 (only the order of fp32 additions differs). The traffic counter's dispatch
bytes must be exactly the FP8 row size over the BF16 one (about half for a real model dimension).
"""

from __future__ import annotations

import copy

import pytest
import torch

from fp8.dispatch import Fp8DispatchQuantizer, dispatch_row_bytes
from fp8.quant import quantize_act
from parallel.expert import parallelize_experts
from parallel.local_ranks import run_ranks
from tests.distributed.test_expert_parallel import FLAT_CFG, assert_close, process_groups, random_model

pytestmark = pytest.mark.usefixtures("single_thread")


def _rank(rank, world, model, xs, fp8: bool):
    """The fp32 model with (fp8) or without the FP8 dispatch: its output and traffic."""
    groups = process_groups(model.cfg, world, rank, world)
    model = copy.deepcopy(model)
    parallelize_experts(model, groups, "flat", Fp8DispatchQuantizer() if fp8 else None)
    moe = model.moe_layers()[0]
    with torch.no_grad():
        out, _ = moe(xs[rank])
    return out, moe.experts.traffic.as_dict()


def test_fp8_dispatch_matches_fake_quantized_single_device_and_halves_the_bytes():
    cfg = FLAT_CFG
    model = random_model(cfg)
    world, seqlen = 2, 6
    xs = [torch.randn(2, seqlen, cfg.dim) for _ in range(world)]
    fp8 = run_ranks(_rank, world, model, xs, True)

    # reference: one device, routed experts fed the quantized-dequantized tokens, gate and shared
    # experts the original ones (the quantizer sits on the dispatch only)
    moe = model.moe_layers()[0]
    for rank in range(world):
        x = xs[rank]
        flat, routing, _ = moe.route(x)
        fake = quantize_act(flat, pow2=True).dequantize()
        with torch.no_grad():
            want = moe.mix(moe.experts(fake, routing), moe.shared(flat), x.shape)
        assert_close(fp8[rank][0], want, f"rank {rank} output")

    # bytes: the same rows, each dim + 4 x ceil(dim / 128) + 8 K bytes instead of 2 dim + 8 K (bf16)
    bf16 = run_ranks(_rank_bf16, world, model, xs, False)
    fp8_traffic = run_ranks(_rank_bf16, world, model, xs, True)
    k = cfg.n_activated_experts
    ratio = dispatch_row_bytes(cfg.dim, k, fp8=True) / dispatch_row_bytes(cfg.dim, k, fp8=False)
    for rank in range(world):
        got, base = fp8_traffic[rank], bf16[rank]
        assert got["token_rank_copies"] == base["token_rank_copies"]
        sent = got["dispatch_intra_node_bytes"] + got["dispatch_inter_node_bytes"]
        sent_bf16 = base["dispatch_intra_node_bytes"] + base["dispatch_inter_node_bytes"]
        assert sent_bf16 > 0 and sent * dispatch_row_bytes(cfg.dim, k, False) == sent_bf16 * dispatch_row_bytes(
            cfg.dim, k, True)
        assert got["combine_intra_node_bytes"] == base["combine_intra_node_bytes"]  # combine unchanged
    # at DeepSeek-V3's width (7168 channels, top-8) the FP8 row is 52% of the BF16 one
    assert dispatch_row_bytes(7168, 8, True) / dispatch_row_bytes(7168, 8, False) == pytest.approx(0.5178, abs=1e-4)
    assert ratio < 0.62  # tiny dim 64: the metadata weighs more


def _rank_bf16(rank, world, model, xs, fp8: bool):
    """Traffic under bf16 autocast (as on a GPU), with the BF16 or the FP8 dispatch; combine in bf16."""
    groups = process_groups(model.cfg, world, rank, world)
    model = copy.deepcopy(model)
    parallelize_experts(model, groups, "flat", Fp8DispatchQuantizer(torch.bfloat16) if fp8 else None)
    moe = model.moe_layers()[0]
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        moe(xs[rank])
    return moe.experts.traffic.as_dict()
