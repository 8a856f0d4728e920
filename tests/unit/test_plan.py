"""The planner (train/plan.py, launch/plan.py): parameter counts, FLOPs against torch's FLOP counter, memory
terms against hand arithmetic, the report's layout, suggestions, the trainer's check and the command line.
The model behind each number: docs/planner.md."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from parallel.pipeline.schedule import make_schedule
from parallel.pipeline.simulate import activations_held
from tests.conftest import TINY
from train.config import Config, ConfigError, ModelConfig, load_config
from train.errors import UserError
from train.model import Transformer, count_parameters
from train.plan import (
    GiB, Cluster, block_cost, check_plan, format_plan, forward_flops_per_token, layer_flops, memory_micro_batches,
    plan, precision, tail_cost, weighted_peaks,
)

REPO = Path(__file__).resolve().parents[2]
REPORT = ["+conf=671b", "parallel.pp=16", "parallel.ep=64"]


@pytest.fixture(scope="module")
def report_plan():
    return plan(load_config(REPORT, world_size=2048), Cluster(gpus=2048))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "launch" / "plan.py"), *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


# --------------------------------------------------------------------------------------------------
# Sizes and FLOPs


def test_671b_parameter_counts(report_plan):
    """Report sec 4.2: 671B total, 37B activated; the MTP module 14B with the shared embedding and head."""
    assert round(report_plan.total_params / 1e9, 2) == 671.03
    assert round(report_plan.active_params / 1e9, 2) == 37.55
    assert round(report_plan.mtp_params / 1e9, 2) == 13.46
    assert round(report_plan.mtp_unique_params / 1e9, 2) == 11.61


def test_parameters_per_stage_add_up_and_costs_match_the_runtime():
    """The per-layer split of the parameters sums to count_parameters, and block/tail costs are those
    ``stage_costs`` reads off a built model (so the planner's boundaries are split_model's)."""
    from parallel.pipeline.stages import stage_costs
    from train.plan import stage_plans

    for overrides in (["+conf=small"], ["+conf=tiny"]):
        cfg = load_config(overrides)
        c = count_parameters(cfg.model)
        (stage,) = stage_plans(cfg, 1, precision(cfg))
        assert stage.dense_params + stage.expert_params + stage.embed_params == c.total + c.mtp_unique
        with torch.device("meta"):
            model = Transformer(cfg.model)
        blocks, tail = stage_costs(model)
        assert blocks == [block_cost(cfg.model, i) for i in range(cfg.model.n_layers)]
        assert tail == tail_cost(cfg.model)


@pytest.mark.parametrize("q_lora_rank", [0, 16])
def test_flops_per_token_against_torch_flop_counter(q_lora_rank):
    """FlopCounterMode counts every matrix product of a forward of the tiny model (2 FLOPs per multiply-add).

    - Matrix products other than attention (projections, gate, experts, head, MTP): equal EXACTLY (no
      token dropping, so the routed experts see exactly K x tokens rows).
    - Attention: on CPU the fused SDPA kernel is not counted at all; the math kernel is counted as two full
      T x T batched products with v padded to the q/k head dim (our MLA pads v for the fused kernels).
      The planner counts causal attention, (T+1)/2 keys per query, with the real v head dim, so the
      counter's attention = ours x 2T/(T+1) x 2 qk/(qk + dv): checked exactly too. Hence no tolerance
      is needed beyond float rounding (1e-9).
    - Forward + backward of the matrix products = 3 x forward exactly (input and weight gradients).
    """
    m = ModelConfig(**{**TINY, "q_lora_rank": q_lora_rank})
    torch.manual_seed(0)
    model = Transformer(m)
    model.init_weights(0.05, seed=0)
    batch, seq = 2, 32
    tokens = torch.randint(0, m.vocab_size, (batch, seq))
    ours = forward_flops_per_token(m, seq)
    mtp_attention = layer_flops(m, m.n_layers, seq - 1)["attention"] * (seq - 1) / seq
    attention = ours["attention"] + mtp_attention  # per token of the main sequence
    matmuls = batch * seq * (sum(ours.values()) - attention)

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), FlopCounterMode(display=False) as counter:
        out = model(tokens)
    assert counter.get_total_flops() == pytest.approx(matmuls, rel=1e-9)

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), FlopCounterMode(display=False) as counter:
        out = model(tokens)
        (out.logits.float().sum() + sum(x.float().sum() for x in out.mtp_logits)).backward()
    assert counter.get_total_flops() == pytest.approx(3 * matmuls, rel=1e-9)

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(tokens)
    qk, dv = m.qk_nope_head_dim + m.qk_rope_head_dim, m.v_head_dim
    counted = counter.get_total_flops() - matmuls
    causal_to_full = {t: 2 * t / (t + 1) for t in (seq, seq - 1)}
    expected = batch * seq * (ours["attention"] * causal_to_full[seq] + mtp_attention * causal_to_full[seq - 1])
    assert counted == pytest.approx(expected * 2 * qk / (qk + dv), rel=1e-9)


def test_671b_flops_per_token(report_plan):
    """6 x activated non-embedding parameters plus attention: ~261 GFLOPs per token at 4K context."""
    m = load_config(REPORT, world_size=2048).model
    c = count_parameters(m)
    six_n = 6 * (c.active - m.vocab_size * m.dim)  # the head counts once, the embedding lookup not
    assert six_n / 1e9 == pytest.approx(219.75, abs=0.01)
    f = report_plan.flops_forward
    # attention over 61 layers: 2 x 128 heads x (192 + 128) x 2048.5 keys
    assert f["attention"] == pytest.approx(61 * 2 * 128 * 320 * 2048.5)
    assert report_plan.flops_per_token == pytest.approx(3 * sum(f.values()))
    assert report_plan.flops_per_token / 1e9 == pytest.approx(260.65, abs=0.01)
    assert six_n + 3 * f["attention"] < report_plan.flops_per_token < 1.2 * six_n + 3 * f["attention"]


# --------------------------------------------------------------------------------------------------
# Memory terms by hand


def small_cfg(*overrides: str, world: int = 1) -> Config:
    return load_config(["+conf=small", "fp8.enabled=false", "memory.recompute=selective", *overrides],
                       world_size=world)


def test_memory_terms_by_hand_one_gpu():
    """+conf=small on one GPU (FP32 weights, BF16 activations, selective recompute, no pipeline, no EP):
    the arithmetic of docs/planner.md written out."""
    cfg = small_cfg("train.param_dtype=float32")
    m = cfg.model
    assert (m.dim, m.inter_dim, m.moe_inter_dim, m.n_layers, m.n_dense_layers, m.n_heads) == (512, 1536, 256, 8, 1, 8)
    assert (m.q_lora_rank, m.kv_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim) == (192, 128, 64, 32)
    assert m.v_head_dim == 64
    assert (m.n_routed_experts, m.n_shared_experts, m.n_activated_experts, m.vocab_size) == (32, 1, 4, 16384)
    assert (cfg.train.seq_len, cfg.train.micro_batch_size) == (1024, 8)
    pl = plan(cfg, Cluster(gpus=1))

    # parameters: every one on this GPU; FP32 weights (the master itself), FP32 gradients, 2 BF16 moments,
    # and the BF16 casts of the weights the GEMMs read, once per step: all but the embedding, the RMSNorm
    # weights and the gates (FP32 affinities)
    c = count_parameters(m)
    params = c.total + c.mtp_unique
    assert pl.memory["weights"] == params * 4
    assert pl.memory["gradients"] == params * 4
    assert pl.memory["moments"] == pytest.approx(params * 2 * 2)
    norms = 9 * (2 * 512 + 128 + 192) + 512 + 3 * 512  # 8 blocks + the MTP block; final, enorm/hnorm/norm
    gates = 8 * 32 * 512  # 7 MoE blocks + the MTP block
    assert pl.memory["casts"] == 2 * (params - 16384 * 512 - norms - gates)

    # cached activations per token (docs/planner.md, "Activations"), BF16 (2 bytes): the residual stream
    # and the norms' outputs too; selective recompute keeps the block input, the latents and W^O's input
    # of the attention half (the RMSNorms, the MLA projections and the attention itself run again)
    attention_side = (
        512 * 2  # block input x
        + 192 * 2  # c_q
        + (128 + 32) * 2  # c_kv and k_rope
        + 8 * 64 * 2  # attention output (wo input)
        + 512 * 2 + 4  # residual after attention (ffn_norm input) and its 1/rms
    )
    assert attention_side == 3780
    dense_block = attention_side + 512 * 2 + 2 * 1536 * 2 + 1536 * 2  # w1/w3 input, SwiGLU inputs and output
    routing = 512 * 2 + 32 * 4 + 4 * 8 + (4 + 2) * 4  # gate/shared/dispatch input, scores, top-k ids, weights
    shared = 2 * 256 * 2 + 256 * 2  # SwiGLU inputs and output
    routed = 4 * (512 * 2 + 2 * 256 * 2 + 4 + 256 * 2 + 2 * 8)  # 4 slots: token, SwiGLU in, weight, out, ids
    moe_block = attention_side + routing + shared + routed
    assert (dense_block, moe_block) == (14020, 16844)
    head = 512 * 2 + 16384 * 2 + 4  # the head's input, the BF16 logits, their FP32 log-sum-exp
    tail = 512 * 2 + 4 + head  # final norm (input, 1/rms) and the head
    # MTP depth 1 on T-1 positions: enorm and hnorm (1/rms each; their inputs are block 0's and the head's),
    # eh_proj's input, the block, its norm (input, 1/rms), the head
    tail += (4 + 4 + 2 * 512 * 2 + moe_block + 512 * 2 + 4 + head) * 1023 / 1024
    tokens = 8 * 1024
    token_ids = 8
    assert pl.memory["activations"] == pytest.approx(tokens * (dense_block + 7 * moe_block + tail + token_ids))
    # no all-to-all; the logits' BF16 gradient for one micro-batch, one head at a time
    assert pl.memory["buffers"] == tokens * 16384 * 2
    assert pl.memory["reserve"] == 2 * GiB
    assert pl.memory_total == pytest.approx(sum(pl.memory.values()))
    assert pl.fits


@pytest.mark.parametrize("world, ep", [(1, 1), (8, 4)])
def test_bf16_working_weights_by_hand(world, ep):
    """train.param_dtype=auto on a GPU (BF16 compute): BF16 weights but the RMSNorm and gate weights, their
    FP32 masters sharded by ZeRO-1 (dense over dp, experts over edp), no per-step casts; everything else as
    with FP32 weights."""
    args = (f"parallel.ep={ep}", "train.batch_size_start=64")
    ours, fp32 = plan(small_cfg(*args, world=world), Cluster(gpus=world)), plan(
        small_cfg(*args, "train.param_dtype=float32", world=world), Cluster(gpus=world))
    m = small_cfg().model
    norms = 9 * (2 * 512 + 128 + 192) + 512 + 3 * 512  # 8 blocks + the MTP block; final, enorm/hnorm/norm
    gates = 8 * 32 * 512  # 7 MoE blocks + the MTP block
    kept = norms + gates
    c = count_parameters(m)
    experts = 8 * m.n_routed_experts * 3 * m.dim * m.moe_inter_dim  # 7 MoE blocks + the MTP block
    dense = c.total + c.mtp_unique - experts
    held = dense + experts / ep
    assert ours.memory["weights"] == pytest.approx(4 * kept + 2 * (held - kept))
    assert ours.memory["masters"] == pytest.approx(4 * ((dense - kept) / world + experts / ep / (world // ep)))
    assert ours.memory["casts"] == 0 and fp32.memory["masters"] == 0 and fp32.memory["casts"] > 0
    for term in ("gradients", "moments", "activations", "buffers", "reserve"):
        assert ours.memory[term] == pytest.approx(fp32.memory[term]), term
    # one GPU: 2 + 4 bytes per weight against 4 + the step's 2-byte cast, and the uncast embedding's 2 more;
    # over data-parallel ranks the masters shrink
    assert (ours.memory_total < fp32.memory_total) == (world > 1)


def test_memory_terms_by_hand_zero1_expert_parallel_and_fp8():
    """8 GPUs, ep 4: routed experts split 4 ways and their optimizer state over edp = 2; everything else
    replicated, its optimizer state over dp = 8. FP8 caches GEMM inputs in 1 byte + a 4-byte scale per 128."""
    cfg = small_cfg("parallel.ep=4", "fp8.enabled=true", "train.batch_size_start=64", "train.param_dtype=float32",
                    world=8)
    m = cfg.model
    pl = plan(cfg, Cluster(gpus=8))
    assert (pl.dp, pl.ep, pl.edp) == (8, 4, 2)
    c = count_parameters(m)
    experts = 3 * 512 * 256 * 32 * (7 + 1)  # 7 MoE blocks + the MTP block, 32 routed experts each
    dense = c.total + c.mtp_unique - experts
    local = dense + experts / 4
    assert pl.memory["weights"] == pytest.approx(local * 4)
    assert pl.memory["gradients"] == pytest.approx(local * 4)
    assert pl.memory["moments"] == pytest.approx(4 * (dense / 8 + experts / 4 / 2))
    # under FP8 only the head and eh_proj are cast to BF16; the FP8 linears' blocks and their transposes are
    # kept for the step (fp8/linear.py StepWeight): 2 bytes per weight of the linears convert_to_fp8 swaps,
    # and the routed experts' blocks (fp8/experts.py StepExpertWeights): 1 byte per local expert weight
    from fp8.convert import convert_to_fp8
    from fp8.linear import Fp8Linear

    with torch.device("meta"):
        swapped = Transformer(m)
    convert_to_fp8(swapped, "emulate")
    fp8_linears = sum(mod.weight.numel() for mod in swapped.modules() if isinstance(mod, Fp8Linear))
    assert pl.memory["casts"] == 2 * (16384 * 512 + 2 * 512 * 512) + 2 * fp8_linears + experts / 4
    cfg.fp8.expert_weight_cache = False  # the experts quantize at each use: nothing of theirs kept
    assert plan(cfg, Cluster(gpus=8)).memory["casts"] == pl.memory["casts"] - experts / 4
    fp8, e5m6 = 1 + 4 / 128, 1.5 + 4 / 128
    # as the BF16 table of the test above, with the FP8 caches: a GEMM input in FP8 (one copy for the
    # GEMMs that read it), the wo input in E5M6, the routed SwiGLU inputs in FP8 with their output recomputed
    attention_side = 512 * 2 + 192 * 2 + 160 * 2 + 8 * 64 * e5m6 + 512 * 2 + 4
    dense_block = attention_side + 512 * fp8 + 2 * 1536 * 2 + 1536 * fp8
    routing = 512 * 2 + 32 * 4 + 4 * 8 + 6 * 4
    shared = 512 * fp8 + 2 * 256 * 2 + 256 * fp8  # w1 and w3 share the FP8 copy of their input
    routed = 4 * (512 * fp8 + 2 * 256 * fp8 + 4 + 2 * 8)
    moe_block = attention_side + routing + shared + routed
    head = 512 * 2 + 16384 * 2 + 4
    tail = 512 * 2 + 4 + head + (8 + 2 * 512 * 2 + moe_block + 512 * 2 + 4 + head) * 1023 / 1024
    tokens = 8 * 1024
    # per micro-batch, the routed experts' x in 128-row tiles per expert, for the worst case: 128 (ceil(rows /
    # 128) + 8 local experts) rows of 512 for the 8192 x 4 rows of a block (1024 more), MTP's 8 x 1023 x 4 (1056)
    padding = (7 * 1024 + 1056) * 512 * fp8
    assert pl.memory["activations"] == pytest.approx(tokens * (dense_block + 7 * moe_block + tail + 8) + padding)
    # all-to-all inside one node of 8: no IB; 4 experts over 4 GPUs, expected distinct GPUs 4(1 - (3/4)^4)
    a = pl.a2a
    assert (a.nodes, a.ib_nodes) == (1, 0)
    assert a.target_gpus == pytest.approx(4 * (1 - 0.75 ** 4))
    assert a.dispatch_row == 512 + 4 * 4 + 8 * 4  # FP8 row, 4 scales, 4 ids + 4 weights
    receive = 2 * tokens * a.target_gpus * (a.dispatch_row + 512 * 2)  # dispatch + combine, two micro-batches
    assert pl.memory["buffers"] == pytest.approx(receive + tokens * 16384 * 2)


def test_pipeline_activations_follow_the_schedule():
    """1F1B at pp 2: stage 0 holds 2 micro-batches (PP), the last stage 1; DualPipe at pp 4 holds PP+1
    chunks on every rank (Table 2), counted on the schedule's own action lists."""
    from train.plan import stage_plans

    cfg = small_cfg("parallel.pp=2", "parallel.schedule=1f1b", "train.micro_batch_size=2", world=2)
    pl = plan(cfg, Cluster(gpus=2))
    stages = stage_plans(cfg, 2, precision(cfg), pl.boundaries)
    assert pl.ranks[0].terms["activations"] == pytest.approx(2 * stages[0].activation_bytes)
    assert pl.ranks[1].terms["activations"] == pytest.approx(stages[1].activation_bytes)
    cfg = small_cfg("parallel.pp=4", "parallel.schedule=dualpipe", "train.micro_batch_size=2", world=4)
    pl = plan(cfg, Cluster(gpus=4))
    assert [r.chunks_in_flight for r in pl.ranks] == [5, 5, 5, 5]
    assert [r.stages for r in pl.ranks] == [[0, 3], [1, 2], [2, 1], [3, 0]]


def test_weighted_peaks_count_what_the_simulator_counts_and_stop_growing():
    for name, pp in (("1f1b", 4), ("zb1p", 4), ("dualpipe", 8), ("dualpipev", 4)):
        s = make_schedule(name, pp, 4 * pp)
        assert [c for _, c in weighted_peaks(s, [1.0] * s.n_stages)] == activations_held(s)
    # the cap on micro-batches used for the memory peak changes nothing: the report's layout, 120 micro-batches
    weights = [1.0 + 0.1 * i for i in range(16)]
    full = weighted_peaks(make_schedule("dualpipe", 16, 120), weights)
    capped = weighted_peaks(make_schedule("dualpipe", 16, memory_micro_batches("dualpipe", 16, 120)), weights)
    assert full == capped


# --------------------------------------------------------------------------------------------------
# The report's layout, a layout that does not fit, suggestions


def test_report_layout_fits(report_plan):
    """2048 H800 of 80 GB, PP 16 DualPipe, EP 64 over 8 nodes, ZeRO-1, FP8, selective recompute."""
    pl = report_plan
    assert (pl.pp, pl.dp, pl.ep, pl.edp, pl.schedule, pl.micro_batches) == (16, 128, 64, 2, "dualpipe", 120)
    assert pl.fits and pl.memory_total < 80 * GiB
    assert all(r.chunks_in_flight == 17 for r in pl.ranks)  # PP + 1 (Table 2)
    assert pl.ranks[0].stages == [0, 15]  # embedding and head on one rank
    # the forward-balanced split overflows the end ranks; moving 2 blocks from stage 0 to stage 15 (the same
    # rank) fits: the pipeline runs with these cuts
    assert pl.forward_boundaries[0] == 5 and pl.forward_split_total > 80 * GiB
    assert pl.boundaries == list(range(3, 60, 4)) and pl.boundaries_source == "memory-balanced"
    # node-limited all-to-all: 4 target nodes, 3.5 of them over IB; FP8 dispatch rows, BF16 combine rows
    a = pl.a2a
    assert (a.nodes, a.target_nodes, a.ib_nodes) == (8, 4, 3.5)
    assert a.dispatch_row == 7168 + 4 * 56 + 8 * 8 and a.combine_row == 7168 * 2
    assert a.dispatch_ib == 3.5 * 7456 and a.combine_ib == 3.5 * 14336
    assert 0.3 < pl.chunk_ratio < 1.5  # the report: about 1 : 1
    # cost within a factor of 1.5 of the report's 180K GPU-hours per trillion tokens at mfu 0.4
    assert 120e3 < pl.gpu_hours_per_trillion < 270e3
    assert 0.2 < pl.implied_mfu < 0.6


def test_a_layout_that_does_not_fit_names_the_term_and_gets_a_layout_that_does():
    cluster = Cluster(gpus=2048)
    cfg = load_config(["+conf=671b", "parallel.pp=4"], world_size=2048)
    pl = plan(cfg, cluster)
    assert not pl.fits
    assert "largest term" in pl.overflow and " of 80 GiB" in pl.overflow
    assert pl.suggestion, pl.overflow
    fixed = plan(load_config(["+conf=671b", "parallel.pp=4", *pl.suggestion.split()], world_size=2048), cluster)
    assert fixed.fits
    # activations do not shrink with pp or ep: with BF16 activations (no FP8) or without recompute no
    # layout fits; more recomputation is named before FP8 (which changes the numerics)
    bf16 = plan(load_config(["+conf=671b", "fp8.enabled=false"], world_size=2048), cluster)
    assert not bf16.fits and "largest term activations" in bf16.overflow
    assert bf16.suggestion == "memory.recompute=full"
    stored = plan(load_config(["+conf=671b", "memory.recompute=none"], world_size=2048), cluster)
    assert not stored.fits and stored.suggestion == "memory.recompute=selective"


# --------------------------------------------------------------------------------------------------
# The cuts the pipeline runs with


def runtime_cuts(cfg: Config, gpus: int, device: str) -> list[int]:
    """What PipelinePart passes to split_model on a rank of this world (its layout from parallel.mesh)."""
    from parallel.mesh import plan_layout
    from train.plan import pipeline_boundaries

    return pipeline_boundaries(cfg, plan_layout(cfg, gpus, 0, min(gpus, 8)), device)


def test_1gpu_preset_is_the_16b_shape_that_fits_one_80gb_gpu():
    """+conf=1gpu (single-GPU MFU): the 16b widths at the most layers whose plan fits one 80 GB GPU in
    BF16 with FP32 masters; one more layer does not fit; refused on a CPU box with the one GPU it needs."""
    cfg, base = load_config(["+conf=1gpu"], world_size=1), load_config(["+conf=16b"])
    assert cfg.model.n_layers == 7 and cfg.model.dim == base.model.dim == 2048
    assert cfg.model.n_routed_experts == base.model.n_routed_experts and cfg.model.vocab_size == 102400
    assert cfg.memory.recompute == "selective" and cfg.train.micro_batch_size == 2
    cluster = Cluster(gpus=1, gpu_memory_gb=80, device="cuda")
    fits = plan(cfg, cluster, suggest=False)
    assert fits.fits and fits.total_params == pytest.approx(4.0e9, rel=0.01)
    assert fits.active_params == pytest.approx(1.0e9, rel=0.01)
    bigger = plan(load_config(["+conf=1gpu", "model.n_layers=8"], world_size=1), cluster, suggest=False)
    assert not bigger.fits
    with torch.device("meta"):
        model = Transformer(cfg.model)
    assert sum(p.numel() for p in model.parameters()) == fits.total_params + fits.mtp_unique_params
    with pytest.raises(UserError, match=r"it needs at least 1 GPU of 80 GiB \(as configured"):
        check_plan(cfg, 1, 24 * GiB, device="cpu")  # on a CPU box: the one GPU it was made for


@pytest.mark.parametrize("overrides,gpus,device", [
    (REPORT, 2048, "cuda"),
    (["+conf=tiny", "parallel.pp=2", "train.micro_batch_size=2"], 4, "cpu"),  # DualPipe
    (["+conf=tiny", "parallel.pp=2", "parallel.schedule=1f1b"], 2, "cpu"),
    (["+conf=small", "parallel.pp=2"], 4, "cpu"),
    (["+conf=small", "parallel.pp=4", "parallel.schedule=dualpipev"], 4, "cpu"),
    (["+conf=16b", "parallel.pp=2", "parallel.ep=8"], 16, "cuda"),
])
def test_the_pipeline_runs_with_the_cuts_the_plan_prints(overrides, gpus, device):
    """PipelinePart's boundaries (train.plan.pipeline_boundaries on its layout) are the plan's, and
    split_model cuts the model into the plan's stage_layers with them."""
    from parallel.pipeline.stages import split_model

    cfg = load_config(overrides, world_size=gpus)
    pl = plan(cfg, Cluster(gpus=gpus, device=device), suggest=False)
    assert runtime_cuts(cfg, gpus, device) == pl.boundaries
    if cfg.model.n_layers < 30:  # build the (meta) model: the stages hold the planned layers
        with torch.device("meta"):
            stages = split_model(Transformer(cfg.model), pl.n_stages, pl.boundaries)
        assert [(s.layer_ids[0], s.layer_ids[-1] + 1) if s.layer_ids else (lo, lo)
                for s, (lo, _) in zip(stages, pl.stage_layers)] == pl.stage_layers


def test_the_report_layout_fits_with_the_runtime_cuts(report_plan):
    """The 671B plan at PP 16 / EP 64 / 2048 GPUs fits 80 GiB on every rank with the cuts the runtime uses,
    and would not with the forward-balanced ones (rank 0: 16 micro-batches of stage 0 in flight)."""
    cfg = load_config(REPORT, world_size=2048)
    assert runtime_cuts(cfg, 2048, "cuda") == report_plan.boundaries
    assert all(r.total <= 80 * GiB for r in report_plan.ranks)
    forward = plan(load_config([*REPORT, f"parallel.stage_boundaries={report_plan.forward_boundaries}"],
                               world_size=2048), Cluster(gpus=2048), suggest=False)
    assert forward.boundaries_source == "parallel.stage_boundaries" and not forward.fits
    assert forward.memory_total == pytest.approx(report_plan.forward_split_total)


def test_explicit_stage_boundaries_are_planned_and_checked():
    cfg = load_config(["+conf=small", "parallel.pp=2", "parallel.stage_boundaries=[4]"], world_size=4)
    pl = plan(cfg, Cluster(gpus=4, device="cpu"), suggest=False)
    assert pl.boundaries == [4] and pl.stage_layers == [(0, 4), (4, 8)] and runtime_cuts(cfg, 4, "cpu") == [4]
    assert "parallel.stage_boundaries" in format_plan(pl)
    for bad in ("[0]", "[9]", "[3,5]"):
        cfg = load_config(["+conf=small", "parallel.pp=2", f"parallel.stage_boundaries={bad}"], world_size=4)
        with pytest.raises(ConfigError) as err:
            plan(cfg, Cluster(gpus=4, device="cpu"))
        line = str(err.value)
        assert "\n" not in line and line.startswith(f"parallel.stage_boundaries ({bad.replace(',', ', ')}) must be 1 "
                                                     "increasing layer indices in 1..8"), line
        with pytest.raises(ConfigError, match=r"^parallel.stage_boundaries"):  # the trainer's start-up check
            check_plan(cfg, 4, 24 * GiB, device="cpu", ranks_per_node=4)
    # DualPipeV at pp 2 has 4 stages: 3 cuts
    cfg = load_config(["+conf=small", "parallel.pp=2", "parallel.schedule=dualpipev", "parallel.micro_batches=4",
                       "parallel.stage_boundaries=[2,5]"], world_size=2)
    with pytest.raises(ConfigError, match=r"must be 3 increasing layer indices in 1\.\.8 \(the first block of each "
                                          r"of the 4 stages of parallel.pp=2 dualpipev"):
        plan(cfg, Cluster(gpus=2, device="cpu"))
    # one stage: no cuts; more stages than blocks + 1: one line, not a traceback
    with pytest.raises(ConfigError, match=r"parallel.pp=1 has one stage"):
        plan(load_config(["+conf=small", "parallel.stage_boundaries=[4]"]), Cluster(gpus=1, device="cpu"))
    with pytest.raises(ConfigError, match=r"makes 64 pipeline stages; model.n_layers \(61\) allows at most 62"):
        plan(load_config(["+conf=671b", "parallel.pp=32", "parallel.schedule=dualpipev"], world_size=2048))


def test_tiny_two_stage_cuts():
    """+conf=tiny at pp 2 (docs/planner.md, "The split"): under DualPipe the memory-balanced cut leaves the dense
    block on stage 0 and both MoE blocks on stage 1; under 1F1B / ZB1P the forward-balanced cut puts all three
    blocks on stage 0, since the last stage's head and MTP module cost more forward FLOPs than all of them."""
    m = load_config(["+conf=tiny"]).model
    assert tail_cost(m) > sum(block_cost(m, i) for i in range(m.n_layers))
    dualpipe = load_config(["+conf=tiny", "parallel.pp=2", "train.micro_batch_size=2"], world_size=4)
    assert plan(dualpipe, Cluster(gpus=4, device="cpu")).boundaries == [1]
    for schedule in ("1f1b", "zb1p"):
        cfg = load_config(["+conf=tiny", "parallel.pp=2", f"parallel.schedule={schedule}"], world_size=2)
        assert plan(cfg, Cluster(gpus=2, device="cpu")).boundaries == [3]


# --------------------------------------------------------------------------------------------------
# The report's batch ramp and the long-context stages at their layouts


def test_671b_batch_ramp_is_trainable_at_the_report_layout(report_plan):
    """Every batch of the ramp (train.batch_size_start to train.batch_size, rounded as the trainer rounds it)
    gives DualPipe an even number >= 30 of micro-batches on the report's 128 data-parallel ranks."""
    from parallel.pipeline.parallelize import check_micro_batches, micro_batch_quantum
    from parallel.pipeline.schedule import make_schedule

    cfg = load_config(REPORT, world_size=2048)
    t = cfg.train
    assert (t.micro_batch_size, t.batch_size_start, t.batch_size) == (1, 4096, 15360)
    check_micro_batches(cfg, dp=128)
    quantum = micro_batch_quantum(cfg, dp=128)
    for batch in range(t.batch_size_start, t.batch_size + 1, quantum):
        make_schedule("dualpipe", 16, batch // 128)  # raises if it cannot run
    assert not any("batch_size_start" in n for n in report_plan.notes)
    # the report's 3072 would be 24 micro-batches: refused, with the batch that runs
    cfg = load_config([*REPORT, "train.batch_size_start=3072"], world_size=2048)
    assert any("train.batch_size_start=3840 runs" in n for n in plan(cfg, Cluster(gpus=2048), suggest=False).notes)


@pytest.mark.parametrize("conf,gpus,ep,tokens", [("671b_ext32k", 1024, 64, 32768), ("671b_ext128k", 256, 16, 131072)])
def test_long_context_stages_do_not_fit_and_say_why(conf, gpus, ep, tokens, capsys):
    """The extension stages at their assumed layouts (docs/planner.md, conf files): PP 16 DualPipe with the
    most data-parallel ranks that give DualPipe its 30 micro-batches (1920 sequences: 64 at EP 64; 480: 16,
    so EP 16). One micro-batch of 32K / 128K tokens does not fit 80 GiB under any layout near it
    (activations and buffers grow with its tokens); the verdict names the term and the least memory a
    layout of these GPUs needs. launch/plan.py finds the 128K layout itself (pp x ep = 1024 GPUs cannot
    split 480 sequences) and says so."""
    cfg = load_config([f"+conf={conf}", f"parallel.ep={ep}"], world_size=gpus)
    assert (cfg.parallel.pp, cfg.train.micro_batch_size * cfg.train.seq_len) == (16, tokens)
    pl = plan(cfg, Cluster(gpus=gpus), suggest=False)
    assert pl.micro_batches == 30 and not pl.fits and "largest term activations" in pl.overflow
    assert _launcher().main([f"+conf={conf}"]) == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith(f"plan +conf={conf}: {gpus:,} GPUs") and f"dp {gpus // 16} = ep {ep} x edp 1" in out[1]
    if ep != 64:
        assert f"planned on the most GPUs that split it: cluster.gpus={gpus} parallel.ep={ep}" in "\n".join(out)
    last = out[-1]
    assert last.startswith("DOES NOT FIT: needs") and f"no layout near this one fits on {gpus:,} GPUs" in last
    assert "the least memory on" in last and f"micro-batch's {tokens:,} tokens" in last
    assert "sequence parallelism" in last
    # on the report's 2048 GPUs the batch cannot be split at all: one line naming the GPUs that can
    assert _launcher().main([f"+conf={conf}", "cluster.gpus=2048"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"the batch runs on cluster.gpus={gpus}" in err


# --------------------------------------------------------------------------------------------------
# The trainer's start-up check


@pytest.mark.parametrize("conf,processes", [("tiny", 1), ("tiny", 2), ("tiny", 4), ("small", 1), ("small", 2)])
def test_check_plan_accepts_tiny_and_small_on_a_24_gib_cpu(conf, processes):
    extra = ["train.micro_batch_size=2"] if (conf, processes) == ("tiny", 4) else []
    cfg = load_config([f"+conf={conf}", *extra], world_size=processes)
    pl = check_plan(cfg, processes, 24 * GiB / processes, device="cpu", ranks_per_node=processes)
    assert pl.fits and pl.precision.act == 4  # FP32 on a CPU


def test_check_plan_refuses_671b_on_a_cpu_with_one_line():
    cfg = load_config(["+conf=671b"], world_size=1)
    with pytest.raises(UserError) as err:
        check_plan(cfg, 1, 24 * GiB, device="cpu")
    line = str(err.value)
    assert "\n" not in line
    assert line.startswith("model too large for this process: 682.6B parameters need")
    assert "GPUs of 80 GiB" in line and "+conf=tiny or +conf=small" in line


def test_check_plan_on_gpus():
    cfg = load_config(REPORT, world_size=2048)
    assert check_plan(cfg, 2048, 80 * GiB).boundaries[0] == 3
    with pytest.raises(UserError, match="model too large for this GPU.*this fits: parallel"):
        check_plan(load_config(["+conf=671b", "parallel.pp=4"], world_size=2048), 2048, 80 * GiB)


# --------------------------------------------------------------------------------------------------
# launch/plan.py


def test_cli_report_layout_prints_fits_and_gpu_hours():
    result = run_cli(*REPORT, "cluster.gpus=2048")
    assert result.returncode == 0, result.stderr
    assert "FITS" in result.stdout and "GPU-hours per trillion tokens" in result.stdout
    assert "180K H800 GPU-hours" in result.stdout


def _launcher():
    spec = importlib.util.spec_from_file_location("launch_plan", REPO / "launch" / "plan.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_json(tmp_path, capsys):
    path = tmp_path / "plan.json"
    assert _launcher().main(["+conf=tiny", "cluster.gpus=1", "--json", f"plan.json={path}"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data == json.loads(path.read_text())
    c = count_parameters(load_config(["+conf=tiny"]).model)
    assert (data["total_params"], data["active_params"], data["mtp_params"]) == (c.total, c.active, c.mtp)
    assert data["fits"] is True and data["memory_total"] > 0 and data["gpu_hours_per_trillion"] > 0


def test_cli_layout_that_does_not_fit_suggests_one_that_does(capsys):
    launcher = _launcher()
    args = ["+conf=671b", "parallel.pp=8", "parallel.ep=32", "cluster.gpus=256"]
    assert launcher.main(args) == 2
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("DOES NOT FIT: needs") and "GiB of 80 GiB" in last and "largest term" in last
    fix = last.split("nearest layout that fits: ")[1].split()
    assert launcher.main(args + fix) == 0, fix
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("FITS: ")
    # a layout these GPUs cannot even hold (ep 64 > 16 data-parallel ranks) gets one line and a layout that fits
    assert launcher.main(["+conf=671b", "cluster.gpus=256"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "parallel.ep (64) is larger" in err
    fix = err.strip().split("nearest layout that fits: ")[1].split()
    assert launcher.main(["+conf=671b", "cluster.gpus=256", *fix]) == 0, fix
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("FITS: ")


def test_cli_bad_cluster_key_is_one_line():
    result = run_cli("+conf=tiny", "cluster.gpu=8")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == ("error: unknown key cluster.gpu; valid keys: cluster.gpus, cluster.gpus_per_node, "
                             "cluster.gpu_memory_gb, cluster.peak_tflops, cluster.fp8_peak_tflops, "
                             "cluster.nvlink_gbps, cluster.ib_gbps, cluster.mfu, cluster.device\n")


@pytest.mark.parametrize("args,fragment", [
    (["+conf=tiny", "cluster.gpus=many"], "cluster.gpus='many' is not an integer"),
    (["+conf=tiny", "cluster.mfu=2"], "cluster.mfu (2.0) must be in (0, 1]"),
    (["+conf=tiny", "cluster.gpus"], "cluster.gpus needs a value"),
    (["+conf=tiny", "train.nope=1"], "Could not override 'train.nope'"),
    (["+conf=tiny", "train.steps=x"], "Error merging override train.steps=x: Value 'x'"),
    (["+conf=nope"], "unknown preset +conf=nope"),
    (["+conf=tiny", "--yaml"], "unknown option --yaml"),
    (["+conf=tiny", "parallel.pp=2", "parallel.stage_boundaries=[5]"], "parallel.stage_boundaries ([5]) must be 1 "
     "increasing layer indices in 1..3 (the first block of each of the 2 stages of parallel.pp=2 dualpipe after "
     "the first), or [] for the planner's cuts\n"),
])
def test_cli_bad_input_is_one_line(args, fragment, capsys):
    assert _launcher().main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and fragment in err, err
