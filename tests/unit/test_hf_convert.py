"""launch/convert.py and train/hf_io.py: HF / DeepSeek-V3 safetensors directories <-> our DCP checkpoints.

Oracle: transformers' ``DeepseekV3ForCausalLM`` (random tiny models saved with ``save_pretrained``, and our
exports loaded with ``from_pretrained``). Logits are compared in fp32 with test_hf_oracle's tolerance:
max |ours - HF| <= 1e-5 * max(1, max |logit|) (same weights, different op orders; any mapping error moves
logits by 1e-3 .. 1). A BF16 export is compared with our model whose weights were rounded to BF16 (the
export is exactly that rounding, checked tensor by tensor), so the same fp32 tolerance applies.

FP8 round trip bound (derived here, checked elementwise). Per 128x128 block the export sets
s = fl(amax / 448) and stores q = e4m3(fl(w / s)) clamped to +-448; the import returns fl(q * s). With
u = 2^-24 (fp32 unit roundoff): |fl(w/s) - w/s| <= u |w|/s; e4m3 rounding to nearest has a half-spacing of
2^-4 * 2^floor(log2 |y|) <= 2^-4 |y| for normal |y| >= 2^-6 and 2^-10 in the subnormal range (spacing 2^-9);
clamping loses at most 448 * 2u (s may be rounded below amax / 448); the product adds u |w|. Hence
    |w - fl(q * s)| <= 2^-4 |w| + 2^-10 s + 2^-20 amax     (the last term covers all the u-terms with room).
Random normal weights reach more than half of this bound (asserted, so the bound is not vacuous).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from train.checkpoint import load_checkpoint, model_state, read_meta, save_checkpoint
from train.config import ModelConfig
from train.hf import config_to_hf, to_hf_state_dict
from train.hf_io import (
    SCALE_SUFFIX,
    ConvertError,
    DcpCheckpoint,
    dequantize_fp8,
    export_hf,
    fp8_scale_shape,
    hf_layout,
    import_hf,
    is_weights_only,
    load_weights,
    parse_size,
    verify_manifest,
    write_synthetic_hf,
)
from train.model import Transformer

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

from launch.convert import main as convert_main  # noqa: E402

RTOL = 1e-5  # as tests/unit/test_hf_oracle.py
REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("single_thread")

IMPORT_CASES = {
    # name: (config overrides, HF attention implementation)
    "no_q_lora_dense1": (dict(q_lora_rank=0, n_dense_layers=1), "eager"),
    "q_lora_dense0_groups4": (dict(q_lora_rank=48, n_dense_layers=0, n_routed_experts=16, n_activated_experts=4,
                                   n_expert_groups=4, topk_groups=2), "sdpa"),
    "groups8_shared2_dense2": (dict(n_layers=4, n_dense_layers=2, n_routed_experts=16, n_activated_experts=4,
                                    n_expert_groups=8, topk_groups=4, n_shared_experts=2), "eager"),
}


# --------------------------------------------------------------------------------------------------
# helpers


def random_hf(cfg: ModelConfig, attn: str = "eager", seed: int = 0) -> DeepseekV3ForCausalLM:
    """A random HF model: norms U(0.5, 1.5), matrices N(0, 0.08), gate biases N(0, 0.05)."""
    hf_cfg = DeepseekV3Config(**config_to_hf(cfg))
    hf_cfg._attn_implementation = attn
    torch.manual_seed(seed)
    hf = DeepseekV3ForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if name.endswith("norm.weight") else torch.randn_like(p) * 0.08)
        for layer in hf.model.layers[cfg.n_dense_layers:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0.0, 0.05)
    return hf


def ours_from(path: Path, cfg: ModelConfig) -> Transformer:
    model = Transformer(dataclasses.replace(cfg, expert_impl="loop"))
    state = load_weights(path, model_state(model), model.cfg)
    assert state == {"step": 0, "tokens": 0, "weights_only": True} or state["step"] >= 0
    return model.eval()


def assert_logits_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    scale = max(1.0, ours.abs().max().item())
    diff = (ours - theirs).abs().max().item()
    assert diff <= RTOL * scale, f"max |diff| {diff:.3g} > {RTOL:g} x {scale:.3g}"


def tokens(cfg: ModelConfig, T: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(seed))


def write_hf_dir(path: Path, cfg: ModelConfig, hf_sd: dict[str, torch.Tensor], shard_bytes: int = 60_000,
                 config: dict | None = None) -> Path:
    """A DeepSeek-V3-format directory written by hand: config.json, shards and the index."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config or config_to_hf(cfg)))
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in hf_sd.items():
        if size + t.nbytes > shard_bytes and shards[-1] and not name.endswith(SCALE_SUFFIX):
            shards.append({})
            size = 0
        shards[-1][name] = t.clone().contiguous()
        size += t.nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / name))
        weight_map.update({k: name for k in shard})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def read_all(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def rounded(model: Transformer, dtype: torch.dtype) -> Transformer:
    """A copy of ``model`` whose weights went through ``dtype`` (the gate biases stay fp32, as exported)."""
    copy = Transformer(model.cfg).eval()
    copy.load_state_dict({k: v if k.endswith("gate.bias") else v.to(dtype).float()
                          for k, v in model.state_dict().items()})
    return copy


def fp8_cfg(tiny_cfg, **overrides) -> ModelConfig:
    """Shapes over 128 with partial edge blocks: dim 160 (128 + 32), kv_a out 138, wkv_b out 2 * 72, ..."""
    return tiny_cfg(dim=160, inter_dim=200, moe_inter_dim=136, n_heads=2, kv_lora_rank=130, qk_nope_head_dim=40,
                    qk_rope_head_dim=8, v_head_dim=32, q_lora_rank=144, mtp_depth=1, **overrides)


# --------------------------------------------------------------------------------------------------
# import


@pytest.mark.parametrize("case", list(IMPORT_CASES))
def test_import_save_pretrained_matches_hf(tmp_path, tiny_cfg, case):
    overrides, attn = IMPORT_CASES[case]
    cfg = tiny_cfg(**overrides, mtp_depth=0)
    hf = random_hf(cfg, attn)
    hf.save_pretrained(str(tmp_path / "hf"), max_shard_size="100KB")
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 3  # really sharded

    stats = import_hf(tmp_path / "hf", tmp_path / "ours")
    out = tmp_path / "ours"
    meta = read_meta(out)
    assert meta["weights_only"] is True and meta["step"] == 0 and is_weights_only(out)
    assert ModelConfig(**meta["model"]) == dataclasses.replace(cfg, expert_impl="auto")
    assert verify_manifest(out) == len(list(p for p in out.iterdir() if p.name != "manifest.json"))
    # experts are stored one chunk per expert: the writer never held a layer's stacked experts
    expert_key = f"model.layers.{cfg.n_layers - 1}.ffn.experts.w1"
    assert len(DcpCheckpoint(out).tensors[expert_key].chunks) == cfg.n_routed_experts
    assert stats.largest_item == 4 * max(p.numel() for p in hf.parameters() if p.dim() == 2)  # embed / head

    ours = ours_from(out, cfg)
    x = tokens(cfg)
    with torch.no_grad():
        mine, theirs = ours(x).logits, hf(x).logits
    assert mine.abs().max() > 0.1
    assert_logits_close(mine, theirs)


def test_import_drop_mtp_of_save_pretrained(tmp_path, tiny_cfg):
    """transformers' save_pretrained drops the MTP layer but keeps num_nextn_predict_layers: importing it asks
    for --drop-mtp (named in the one-line error), which imports the main model with mtp_depth 0."""
    cfg = tiny_cfg(mtp_depth=1)
    hf = random_hf(cfg)
    hf.save_pretrained(str(tmp_path / "hf"), max_shard_size="100KB")
    with pytest.raises(ConvertError, match=r"missing: model\.layers\.3\..*--drop-mtp"):
        import_hf(tmp_path / "hf", tmp_path / "ours")
    import_hf(tmp_path / "hf", tmp_path / "ours", drop_mtp=True)
    assert read_meta(tmp_path / "ours")["model"]["mtp_depth"] == 0
    ours = ours_from(tmp_path / "ours", dataclasses.replace(cfg, mtp_depth=0))
    x = tokens(cfg)
    with torch.no_grad():
        assert_logits_close(ours(x).logits, hf(x).logits)


def test_import_threads_give_the_same_checkpoint(tmp_path, tiny_cfg, random_model):
    cfg = tiny_cfg(mtp_depth=1)
    model = random_model(cfg)
    write_hf_dir(tmp_path / "hf", cfg, to_hf_state_dict(model.state_dict(), cfg))
    import_hf(tmp_path / "hf", tmp_path / "one")
    stats = import_hf(tmp_path / "hf", tmp_path / "three", threads=3)
    assert stats.extra["max_items_alive"] <= 3  # one per writer thread
    a, b = ours_from(tmp_path / "one", cfg).state_dict(), ours_from(tmp_path / "three", cfg).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and all(torch.equal(a[k], v) for k, v in model.state_dict().items())


def test_hand_made_fp8_checkpoint_dequantizes_exactly(tmp_path, tiny_cfg, random_model):
    """DeepSeek's FP8 layout written by hand (random e4m3 payloads, random fp32 scales, partial edge blocks):
    every imported weight equals fp8 * scale_inv of its 128x128 block, computed here independently."""
    cfg = fp8_cfg(tiny_cfg)
    model = random_model(cfg)
    hf_sd = {k: v.to(torch.bfloat16) for k, v in to_hf_state_dict(model.state_dict(), cfg).items()}
    gen = torch.Generator().manual_seed(0)
    fp8_names = [e.hf for e in hf_layout(cfg) if e.fp8]
    expected = {}
    for name in fp8_names:
        rows, cols = hf_sd[name].shape
        codes = torch.randint(0, 256, (rows, cols), generator=gen, dtype=torch.uint8)
        codes[(codes & 0x7F) == 0x7F] = 0x3C  # no NaN codes (e4m3fn NaN = S.1111.111)
        payload = codes.view(torch.float8_e4m3fn)
        scale = torch.exp2(torch.rand(fp8_scale_shape((rows, cols)), generator=gen) * 12 - 14)
        scale = scale * (1 + torch.rand(scale.shape, generator=gen))
        hf_sd[name], hf_sd[name + SCALE_SUFFIX] = payload, scale.float()
        # independent reference: pad to whole blocks, multiply by kron-expanded scales, crop
        br, bc = math.ceil(rows / 128), math.ceil(cols / 128)
        padded = torch.zeros(br * 128, bc * 128)
        padded[:rows, :cols] = payload.float()
        expected[name] = (padded * torch.kron(scale, torch.ones(128, 128)))[:rows, :cols]
    assert any(t.shape[0] % 128 and t.shape[0] > 128 for t in expected.values())  # partial edge blocks
    assert any(t.shape[1] % 128 and t.shape[1] > 128 for t in expected.values())
    config = {**config_to_hf(cfg), "quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                                                           "activation_scheme": "dynamic", "weight_block_size": [128, 128]}}
    write_hf_dir(tmp_path / "hf", cfg, hf_sd, shard_bytes=200_000, config=config)
    import_hf(tmp_path / "hf", tmp_path / "ours")

    ours = ours_from(tmp_path / "ours", cfg)
    back = to_hf_state_dict(ours.state_dict(), cfg)
    for name in fp8_names:
        assert torch.equal(back[name], expected[name]), name
    for name, t in hf_sd.items():  # everything else: exact bf16 -> fp32
        if name not in expected and not name.endswith(SCALE_SUFFIX):
            assert torch.equal(back[name], t.float()), name


def test_dequantize_fp8_matches_fp8_quant():
    from fp8.quant import quantize_weight

    w = torch.randn(300, 200)
    q = quantize_weight(w)
    assert torch.equal(dequantize_fp8(q.data, q.scale), q.dequantize())


# --------------------------------------------------------------------------------------------------
# export


def trainer_checkpoint(tmp_path: Path, model: Transformer) -> Path:
    """A checkpoint as the trainer writes it (model, optimizer state, trainer state) for the export to read."""
    optim = {"state": {"m": torch.ones(3)}, "step": torch.tensor(7)}
    return save_checkpoint(tmp_path / "run", 7, 7000, model_state(model), optim, model.cfg,
                           trainer_state={"loader": {"position": 1}}, keep=1)


def test_export_takes_a_run_directorys_newest_checkpoint(tmp_path, tiny_cfg, random_model):
    model = random_model(tiny_cfg())
    ckpt = trainer_checkpoint(tmp_path, model)
    assert DcpCheckpoint(tmp_path / "run").path == ckpt
    export_hf(tmp_path / "run", tmp_path / "hf", dtype="fp32")
    export_hf(ckpt, tmp_path / "hf_direct", dtype="fp32")
    assert read_all(tmp_path / "hf").keys() == read_all(tmp_path / "hf_direct").keys()
    assert all(torch.equal(a, b) for a, b in zip(read_all(tmp_path / "hf").values(),
                                                 read_all(tmp_path / "hf_direct").values()))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConvertError, match="no complete checkpoint there"):
        DcpCheckpoint(tmp_path / "empty")


def test_export_fp32_and_bf16_load_in_transformers(tmp_path, tiny_cfg, random_model):
    cfg = tiny_cfg(mtp_depth=2, q_lora_rank=48, n_routed_experts=16, n_activated_experts=4, n_expert_groups=4,
                   topk_groups=2)
    model = random_model(cfg)
    ckpt = trainer_checkpoint(tmp_path, model)
    x = tokens(cfg, 32)
    for dtype, reference in (("fp32", model), ("bf16", rounded(model, torch.bfloat16))):
        out = tmp_path / f"hf_{dtype}"
        stats = export_hf(ckpt, out, dtype=dtype, max_shard_size="150KB")
        index = json.loads((out / "model.safetensors.index.json").read_text())
        shards = sorted(out.glob("model-*.safetensors"))
        assert len(shards) > 3 and set(index["weight_map"].values()) == {s.name for s in shards}
        assert stats.shard_bytes <= 150_000 and verify_manifest(out) == len(shards) + 2

        stored = read_all(out)
        ours_hf = to_hf_state_dict(reference.state_dict(), cfg)
        assert stored.keys() == ours_hf.keys()  # incl. MTP layers n, n+1 with their embedding / head copies
        for name, t in stored.items():
            want = torch.float32 if dtype == "fp32" or name.endswith("e_score_correction_bias") else torch.bfloat16
            assert t.dtype == want and torch.equal(t.float(), ours_hf[name]), name

        hf, info = DeepseekV3ForCausalLM.from_pretrained(str(out), output_loading_info=True, dtype=torch.float32,
                                                         attn_implementation="eager")
        assert not info["missing_keys"] and not info["mismatched_keys"]
        assert all(k.startswith((f"model.layers.{cfg.n_layers}.", f"model.layers.{cfg.n_layers + 1}."))
                   for k in info["unexpected_keys"])  # HF builds no MTP layer
        with torch.no_grad():
            assert_logits_close(reference(x).logits, hf.eval()(x).logits)

        # and back: the MTP modules survive the round trip (exactly in fp32, as the bf16 rounding in bf16)
        import_hf(out, tmp_path / f"back_{dtype}")
        back = ours_from(tmp_path / f"back_{dtype}", cfg).state_dict()
        ref = reference.state_dict()
        assert any(k.startswith("mtp.1.") for k in back)
        assert all(torch.equal(back[k], ref[k]) for k in ref), dtype
        with torch.no_grad():
            mtp = ours_from(tmp_path / f"back_{dtype}", cfg)(x).mtp_logits
            assert all(torch.equal(a, b) for a, b in zip(mtp, reference(x).mtp_logits))


def fp8_round_trip_bound(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element bound of the module docstring for weight w, and the block scales s."""
    rows, cols = w.shape
    br, bc = math.ceil(rows / 128), math.ceil(cols / 128)
    padded = torch.zeros(br * 128, bc * 128)
    padded[:rows, :cols] = w.abs()
    amax = padded.view(br, 128, bc, 128).amax(dim=(1, 3))
    s = amax / 448
    expand = lambda t: torch.kron(t, torch.ones(128, 128))[:rows, :cols]  # noqa: E731
    return 2**-4 * w.abs() + 2**-10 * expand(s) + 2**-20 * expand(amax), expand(s)


def test_fp8_export_round_trip_within_block_quantization_error(tmp_path, tiny_cfg, random_model):
    from fp8.quant import quantize_weight

    cfg = fp8_cfg(tiny_cfg)
    model = random_model(cfg)
    ckpt = trainer_checkpoint(tmp_path, model)
    export_hf(ckpt, tmp_path / "fp8", dtype="fp8", max_shard_size="400KB")
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert config["quantization_config"] == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                             "weight_block_size": [128, 128]}
    stored = read_all(tmp_path / "fp8")
    layout = {e.hf: e for e in hf_layout(cfg)}
    n = cfg.n_layers
    for name, entry in layout.items():  # DeepSeek's choice of FP8 tensors
        quantized = any(p in name for p in ("self_attn.", "mlp.experts.", "mlp.shared_experts.", "_proj.weight")) \
            and "mlp.gate." not in name and "eh_proj" not in name and "layernorm" not in name and not entry.copy
        assert entry.fp8 == quantized, name
        if quantized:
            assert stored[name].dtype == torch.float8_e4m3fn
            assert stored[name + SCALE_SUFFIX].shape == fp8_scale_shape(entry.shape)
        else:
            assert name + SCALE_SUFFIX not in stored
            want = torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16
            assert stored[name].dtype == want, name
    for name in (f"model.layers.{n}.eh_proj.weight", "model.embed_tokens.weight", "lm_head.weight",
                 f"model.layers.{n}.embed_tokens.weight", f"model.layers.{n}.shared_head.head.weight",
                 f"model.layers.{n}.mlp.gate.weight"):
        assert stored[name].dtype == torch.bfloat16, name
    assert stored[f"model.layers.{n}.self_attn.kv_a_proj_with_mqa.weight"].dtype == torch.float8_e4m3fn  # MTP block

    import_hf(tmp_path / "fp8", tmp_path / "back")
    back = to_hf_state_dict(ours_from(tmp_path / "back", cfg).state_dict(), cfg)
    original = to_hf_state_dict(model.state_dict(), cfg)
    worst = 0.0
    for name, entry in layout.items():
        w = original[name]
        if entry.fp8:
            assert torch.equal(back[name], quantize_weight(w).dequantize()), name  # the same arithmetic
            bound, _ = fp8_round_trip_bound(w)
            err = (back[name] - w).abs()
            assert (err <= bound).all(), name
            worst = max(worst, (err / bound).max().item())
        elif name.endswith("e_score_correction_bias"):
            assert torch.equal(back[name], w)
        else:
            assert torch.equal(back[name], w.to(torch.bfloat16).float()), name
    assert worst > 0.5  # the bound is nearly reached: it is not vacuous


def test_fp8_export_loads_in_transformers(tmp_path, tiny_cfg, random_model):
    """transformers reads our FP8 export (without a GPU it dequantizes, in fp32 here) and gives the logits
    of our model imported back from the same files. Its CPU dequantizer splits weights evenly over the
    scale grid (rows // scale_rows: a 240-row weight becomes two blocks of 120), so every dim here is a
    multiple of 128 or below 128 (dim 256, kv_a 64 + 64 rows, wq_b and wkv_b 2 x 128, wo 128 columns);
    partial edge blocks are checked against our own reference in the tests above."""
    pytest.importorskip("accelerate")  # transformers' FP8 loading needs it
    cfg = tiny_cfg(dim=256, inter_dim=384, moe_inter_dim=128, n_heads=2, kv_lora_rank=64, qk_nope_head_dim=64,
                   qk_rope_head_dim=64, v_head_dim=64, q_lora_rank=128, mtp_depth=1)
    model = random_model(cfg)
    export_hf(trainer_checkpoint(tmp_path, model), tmp_path / "fp8", dtype="fp8", max_shard_size="1MB")
    hf = DeepseekV3ForCausalLM.from_pretrained(str(tmp_path / "fp8"), dtype=torch.float32,
                                               attn_implementation="eager").eval()
    import_hf(tmp_path / "fp8", tmp_path / "back")
    ours = ours_from(tmp_path / "back", cfg)
    x = tokens(cfg)
    with torch.no_grad():
        assert_logits_close(ours(x).logits, hf(x).logits)


# --------------------------------------------------------------------------------------------------
# streaming: memory stays around one shard / one tensor, not the model


def test_streaming_memory_is_bounded_by_a_shard_not_the_model(tmp_path):
    """~190 MB of BF16 weights (380 MB as our fp32 checkpoint) in ~16 MB shards: the import's peak RSS growth
    (kernel high-water mark, reset at its start) stays within one source shard (mmap pages of the open
    shard) plus a few of the largest tensors, far below the model; so does the export's."""
    cfg = ModelConfig(vocab_size=8192, dim=512, inter_dim=1024, moe_inter_dim=256, n_layers=6, n_dense_layers=1,
                      n_heads=4, q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32,
                      v_head_dim=64, n_routed_experts=32, n_shared_experts=1, n_activated_experts=4, mtp_depth=1,
                      max_seq_len=64, original_seq_len=64)
    model_bytes, shard_bytes, _ = write_synthetic_hf(tmp_path / "hf", cfg, shard_bytes=16 * 2**20)
    assert model_bytes > 180e6 and shard_bytes <= 16 * 2**20
    largest = max(4 * math.prod(e.shape) for e in hf_layout(cfg))  # fp32 embedding / head: 16 MiB

    stats = import_hf(tmp_path / "hf", tmp_path / "ours")
    assert stats.bytes_read == model_bytes and stats.largest_item == largest
    assert stats.extra["max_items_alive"] == 1  # each item was freed before the next was produced
    assert stats.largest_item < model_bytes / 10
    if stats.rss_growth is not None:
        bound = shard_bytes + 3 * largest + 32 * 2**20
        assert stats.rss_growth < bound, f"import peak RSS growth {stats.rss_growth / 2**20:.0f} MiB"
        assert stats.rss_growth < 2 * model_bytes / 4  # far from the fp32 model (2 x model_bytes)

    out = export_hf(tmp_path / "ours", tmp_path / "exp", dtype="bf16", max_shard_size=16 * 2**20)
    assert out.shard_bytes <= 16 * 2**20 and out.bytes_written > model_bytes
    if out.rss_growth is not None:
        assert out.rss_growth < 4 * largest + 32 * 2**20, f"export peak RSS growth {out.rss_growth / 2**20:.0f} MiB"
    # the export is the import's source again: same names, shapes and bytes
    with safe_open(str(next((tmp_path / "exp").glob("model-00002-*"))), "pt") as f:
        name = next(iter(f.keys()))
        src = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["weight_map"][name]
        with safe_open(str(tmp_path / "hf" / src), "pt") as g:
            assert torch.equal(f.get_tensor(name), g.get_tensor(name))


# --------------------------------------------------------------------------------------------------
# bad input: one line naming the problem, exit status 1


@pytest.fixture
def good_hf_dir(tmp_path, tiny_cfg, random_model):
    cfg = tiny_cfg(mtp_depth=1)
    hf_sd = to_hf_state_dict(random_model(cfg).state_dict(), cfg)
    return cfg, hf_sd, write_hf_dir(tmp_path / "good", cfg, hf_sd)


def run_cli(capsys, *args: str) -> str:
    capsys.readouterr()
    code = convert_main([str(a) for a in args])
    err = capsys.readouterr().err
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_bad_inputs_one_line_each(tmp_path, capsys, good_hf_dir):
    cfg, hf_sd, good = good_hf_dir
    out = tmp_path / "out"

    (tmp_path / "empty").mkdir()
    assert "no config.json" in run_cli(capsys, "import", tmp_path / "empty", out)
    assert "not a directory" in run_cli(capsys, "import", tmp_path / "nowhere", out)

    llama = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
             "vocab_size": 96, "intermediate_size": 128, "max_position_embeddings": 64}
    bad = write_hf_dir(tmp_path / "llama", cfg, {}, config=llama)
    line = run_cli(capsys, "import", bad, out)
    assert "not a DeepSeek-V3 config" in line and "llama" in line

    softmax = write_hf_dir(tmp_path / "softmax", cfg, {}, config={**config_to_hf(cfg), "scoring_func": "softmax"})
    assert "scoring_func" in run_cli(capsys, "import", softmax, out)

    name = f"model.layers.{cfg.n_layers - 1}.mlp.experts.3.up_proj.weight"
    missing = write_hf_dir(tmp_path / "missing", cfg, {k: v for k, v in hf_sd.items() if k != name})
    line = run_cli(capsys, "import", missing, out)
    assert "missing" in line and name in line

    extra = write_hf_dir(tmp_path / "extra", cfg, {**hf_sd, "model.layers.0.self_attn.extra.weight": torch.ones(2)})
    line = run_cli(capsys, "import", extra, out)
    assert "unexpected" in line and "model.layers.0.self_attn.extra.weight" in line

    wrong = "model.layers.1.self_attn.o_proj.weight"
    shape = write_hf_dir(tmp_path / "shape", cfg, {**hf_sd, wrong: torch.ones(cfg.dim, 3)})
    line = run_cli(capsys, "import", shape, out)
    assert wrong in line and f"[{cfg.dim}, 3]" in line and str(list(hf_sd[wrong].shape)) in line

    fp8 = write_hf_dir(tmp_path / "fp8", cfg, {**hf_sd, wrong: hf_sd[wrong].to(torch.float8_e4m3fn)})
    line = run_cli(capsys, "import", fp8, out)
    assert "FP8" in line and wrong + SCALE_SUFFIX in line

    scale = write_hf_dir(tmp_path / "scale", cfg, {**hf_sd, wrong: hf_sd[wrong].to(torch.float8_e4m3fn),
                                                   wrong + SCALE_SUFFIX: torch.ones(2, 2)})
    assert wrong + SCALE_SUFFIX in run_cli(capsys, "import", scale, out)

    copy = f"model.layers.{cfg.n_layers}.embed_tokens.weight"
    differ = write_hf_dir(tmp_path / "copy", cfg, {**hf_sd, copy: hf_sd[copy] + 1})
    assert copy in run_cli(capsys, "import", differ, out)

    assert not out.exists() and not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())

    # export side
    assert "no complete checkpoint there" in run_cli(capsys, "export", tmp_path / "empty", tmp_path / "exp")
    assert convert_main(["import", str(good), str(out)]) == 0
    assert "already exists" in run_cli(capsys, "import", good, out)
    line = run_cli(capsys, "export", out, tmp_path / "exp", "--max-shard-size", "lots")
    assert "lots" in line

    # a corrupted file is caught by the manifest
    data = next(out.glob("*.distcp"))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    assert data.name in run_cli(capsys, "verify", out)


def test_cli_subprocess_exit_status_and_summary(tmp_path, good_hf_dir):
    _, _, good = good_hf_dir
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    bad = subprocess.run([sys.executable, str(REPO / "launch" / "convert.py"), "import", str(tmp_path), str(tmp_path / "o")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 1 and bad.stderr.strip().count("\n") == 0 and "no config.json" in bad.stderr
    ok = subprocess.run([sys.executable, str(REPO / "launch" / "convert.py"), "import", str(good), str(tmp_path / "o"),
                         "--progress"], capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "imported" in ok.stdout and "GB/s" in ok.stdout


def test_cli_contract_names_import_hf_and_export_hf(tmp_path, good_hf_dir, capsys):
    """design.md's contract names the commands import-hf and export-hf: they are import and export."""
    _, hf_sd, good = good_hf_dir
    assert convert_main(["import-hf", str(good), str(tmp_path / "ours")]) == 0
    assert convert_main(["export-hf", str(tmp_path / "ours"), str(tmp_path / "hf"), "--dtype", "fp32"]) == 0
    assert "imported" in capsys.readouterr().out
    from safetensors.torch import load_file

    exported = {}
    for shard in sorted((tmp_path / "hf").glob("*.safetensors")):
        exported.update(load_file(shard))
    assert exported.keys() == hf_sd.keys()
    assert all(torch.equal(exported[k], hf_sd[k]) for k in hf_sd)


def test_imported_checkpoint_loads_as_init_from_not_as_resume(tmp_path, good_hf_dir, random_model):
    """What the trainer calls for checkpoint.init_from: load_model_weights fills the model (step 0 in the
    meta); resuming an import (load_checkpoint, with optimizer state) is refused with one line."""
    from train.checkpoint import load_model_weights
    from train.errors import CheckpointError

    cfg, _, good = good_hf_dir
    import_hf(good, tmp_path / "ours")
    model = Transformer(cfg)
    meta = load_model_weights(tmp_path / "ours", model_state(model), cfg)
    assert meta["step"] == 0 and meta["weights_only"]
    reference = random_model(cfg)
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in model.state_dict().items())
    with pytest.raises(CheckpointError, match="holds model weights only .* checkpoint.init_from="):
        load_checkpoint(tmp_path / "ours", model_state(model), {}, cfg)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("200KiB") == 204800 and parse_size(1000) == 1000
    assert parse_size("1.5MB") == 1_500_000 and parse_size("7") == 7
    with pytest.raises(ConvertError):
        parse_size("lots")
