"""Shared fixtures: tiny model configs and randomly initialised models (fast on CPU)."""

from __future__ import annotations

import pytest
import torch

from train.config import ModelConfig
from train.model import Transformer

TINY = dict(
    vocab_size=96, dim=64, inter_dim=96, moe_inter_dim=32, n_layers=3, n_dense_layers=1, n_heads=4,
    q_lora_rank=0, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    n_routed_experts=8, n_shared_experts=1, n_activated_experts=2, n_expert_groups=1, topk_groups=1,
    route_scale=2.5, mtp_depth=1, max_seq_len=64, original_seq_len=64, expert_impl="loop",
)


@pytest.fixture
def single_thread():
    """Run a test with one intra-op thread (restored afterwards). Tiny models gain nothing from threads,
    and on a busy 2-core machine OpenMP threads that wait for each other made a 10 ms forward take
    seconds. Use with ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_cfg():
    """``tiny_cfg(**overrides) -> ModelConfig``: a few-layer DeepSeek-V3 shape that runs in milliseconds."""

    def make(**overrides) -> ModelConfig:
        return ModelConfig(**{**TINY, **overrides})

    return make


@pytest.fixture
def random_model():
    """``random_model(cfg, seed=0, std=0.05, bias_std=0.05) -> Transformer`` in eval mode.

    Weights N(0, std) (larger than the report's 0.006 so that routing scores spread and the outputs are
    far from trivial), RMSNorm weights U(0.5, 1.5) (so a dropped or misplaced norm shows), and gate biases
    N(0, bias_std) (so biased selection differs from the unbiased one).
    """

    def build(cfg: ModelConfig, seed: int = 0, std: float = 0.05, bias_std: float = 0.05) -> Transformer:
        torch.manual_seed(seed)
        model = Transformer(cfg)
        model.init_weights(std)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.uniform_(0.5, 1.5)
            for moe in model.moe_layers():
                moe.gate.bias.normal_(0.0, bias_std)
        return model.eval()

    return build


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One prepared-data cache for all end-to-end runs of a test session (the first run prepares it)."""
    return tmp_path_factory.mktemp("data_cache")


@pytest.fixture
def compiled_mode(monkeypatch):
    """Triton in compiled mode with its NVIDIA backend (compiling a kernel for a GPU needs none)."""
    triton_gemm = pytest.importorskip("fp8.triton_gemm", reason="Triton is not installed (the gpu extra)")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if triton_gemm.interpret_mode():
        pytest.skip("triton.knobs.runtime.interpret is set in code")
    pytest.importorskip("triton.backends.nvidia.compiler", reason="Triton has no NVIDIA backend")


def _loop_kernel(out_ptr, n):
    acc = 0.0
    for _ in range(0, n):  # a loop bound known at run time, as the FP8 GEMM's K loop
        acc += 1.0
    triton_language().store(out_ptr, acc)


def triton_language():
    import triton.language as tl

    return tl


@pytest.fixture
def triton_interpreter(monkeypatch):
    """``TRITON_INTERPRET=1`` for the test; skips (with the reason) where the installed Triton's interpreter
    cannot run a loop with a run-time bound: Triton 3.6's converts the bound with ``int()`` of a one-element
    array, which numpy >= 2.4 refuses (seen on the GPU machine: triton 3.6, numpy 2.5). Yields the module
    ``fp8.triton_gemm``."""
    triton_gemm = pytest.importorskip("fp8.triton_gemm", reason="Triton is not installed (the gpu extra)")
    import numpy
    import triton

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_gemm.interpret_mode(), "TRITON_INTERPRET=1 is overridden (triton.knobs.runtime.interpret set in code?)"
    out = torch.zeros(1)
    try:
        triton.jit(_loop_kernel)[(1,)](out, 3)
    except Exception as exc:  # noqa: BLE001 - the interpreter's own failure, named in the skip
        if "0-dimensional" not in str(exc):
            raise
        pytest.skip(f"Triton {triton.__version__}'s interpreter fails on run-time loop bounds with numpy "
                    f"{numpy.__version__} ({exc}); the compiled kernels' tests run on a GPU")
    assert out.item() == 3.0
    return triton_gemm
