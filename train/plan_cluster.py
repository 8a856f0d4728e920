"""Planner inputs: the machines (``Cluster``) and the bytes per element of each kind of state (``Precision``).

Defaults are the report's H800 cluster (sec 3.1, 3.2.2); precision follows the report's mixed-precision
recipe (sec 3.3.1, 3.3.3). docs/planner.md explains each number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any
from train.config import Config, ConfigError

GiB = 2**30
FP8_TILE = 128  # 1x128 activation tiles, one fp32 scale each (sec 3.3.2)
FP8_BYTES = 1 + 4 / FP8_TILE  # an E4M3 element with its share of the scale
E5M6_BYTES = 1.5 + 4 / FP8_TILE  # the input of the Linear after attention (sec 3.3.3), 12 bits
REPORT_GPU_HOURS_PER_TRILLION = 180_000  # sec 1: 180K H800 GPU-hours per trillion tokens
REPORT_PRETRAIN_GPU_HOURS = 2_664_000  # Table 1: 2664K GPU-hours ...
REPORT_PRETRAIN_TOKENS = 14.8e12  # ... for 14.8T tokens
REPORT_DAYS_PER_TRILLION = 3.7  # on 2048 H800
RESERVE = {"cuda": 2 * GiB, "cpu": GiB // 2}  # per process: CUDA context, cuBLAS and NCCL workspaces / the
# interpreter and libraries on a CPU (allocator fragmentation is not modelled)


@dataclass(frozen=True)
class Cluster:
    """The machines (``cluster.*`` keys of launch/plan.py). Defaults: the report's H800 cluster."""

    gpus: int = 2048  # GPUs (processes) in all
    gpus_per_node: int = 8
    gpu_memory_gb: float = 80.0  # per GPU, in GiB (an "80 GB" H800 has 79.6 GiB)
    peak_tflops: float = 989.0  # dense BF16 peak per GPU (H800)
    fp8_peak_tflops: float = 1979.0  # dense FP8 peak per GPU (H800)
    nvlink_gbps: float = 160.0  # GB/s per GPU inside a node (report sec 3.2.2)
    ib_gbps: float = 50.0  # GB/s per GPU between nodes (400 Gb/s InfiniBand, sec 3.2.2)
    mfu: float = 0.40  # assumed fraction of each GEMM's peak reached while computing
    device: str = "cuda"  # cuda | cpu: what train.dtype=auto means (bf16 autocast on GPUs, fp32 on CPUs)

    def check(self) -> None:
        for name in ("gpus", "gpus_per_node"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ConfigError(f"cluster.{name} ({getattr(self, name)}) must be an integer >= 1")
        for name in ("gpu_memory_gb", "peak_tflops", "fp8_peak_tflops", "nvlink_gbps", "ib_gbps"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"cluster.{name} ({value}) must be > 0")
        if not 0 < self.mfu <= 1:
            raise ConfigError(f"cluster.mfu ({self.mfu}) must be in (0, 1]")
        if self.device not in ("cuda", "cpu"):
            raise ConfigError(f"cluster.device ({self.device!r}) must be cuda or cpu")

    @property
    def memory_bytes(self) -> float:
        return self.gpu_memory_gb * GiB

    @property
    def ranks_per_node(self) -> int:
        return min(self.gpus, self.gpus_per_node)


@dataclass(frozen=True)
class Precision:
    """Bytes per element of each kind of state (report sec 3.3.1, 3.3.3)."""

    weight: int  # the parameters (norms and gates always FP32): FP32, the master itself, or BF16 working weights
    master: int  # the FP32 master of BF16 working weights, sharded by ZeRO-1 (0: the FP32 parameters are it)
    grad: int  # weight gradients: FP32 (sec 3.3.3: "retained in FP32")
    moments: int  # both AdamW moments together: 2 x optim.moment_dtype
    act: int  # activations cached for backward where FP8 does not apply: BF16 or FP32
    fp8: bool  # fp8.enabled: GEMM inputs cached in FP8, FP8 dispatch, FP8 GEMM peak
    fp8_dispatch: bool
    recompute: str  # memory.recompute: none | selective | full

    @property
    def name(self) -> str:
        return "BF16" if self.act == 2 else "FP32"


def precision(cfg: Config, device: str = "cuda") -> Precision:
    """``train.dtype``: bfloat16, or auto on a GPU -> BF16 activations; float32, or auto on a CPU -> FP32.
    ``train.param_dtype`` bfloat16, or auto under BF16: BF16 working weights with ZeRO-1-sharded FP32 masters
    (the report's mixed precision, train/precision.py); float32: the FP32 parameters are the masters."""
    low = cfg.train.dtype == "bfloat16" or (cfg.train.dtype == "auto" and device == "cuda")
    width = 2 if low else 4
    bf16_weights = cfg.train.param_dtype == "bfloat16" or (cfg.train.param_dtype == "auto" and low)
    moment = 2 if cfg.optim.moment_dtype == "bfloat16" else 4
    return Precision(weight=2 if bf16_weights else 4, master=4 if bf16_weights else 0, grad=4, moments=2 * moment,
                     act=width, fp8=cfg.fp8.enabled,
                     fp8_dispatch=cfg.fp8.enabled and cfg.fp8.dispatch, recompute=cfg.memory.recompute)


def layout_for(cfg: Config, world: int, cluster: Cluster) -> Any:
    """``parallel.mesh.plan_layout`` of ``world`` processes (rank 0): ConfigError for an impossible layout."""
    from parallel.mesh import plan_layout

    rpn = cfg.parallel.ranks_per_node or cluster.ranks_per_node
    return plan_layout(cfg, world, 0, rpn)
