"""Model FLOPs utilization: model FLOPs per token x tokens/s / (peak FLOP/s x devices).

Model FLOPs are the planner's (``train.plan_flops.training_flops_per_token``: 2 per multiply-add,
training = 3 x forward, causal attention over (T+1)/2 keys, MTP modules included, recomputation not
counted), so MFU compares runs whatever their recompute mode. The peak is the device's dense BF16
peak, also for FP8 runs (the report's GPU-hour figures are stated that way; an FP8 run's MFU shows
what FP8 buys). ``logging.peak_tflops`` sets it; 0 looks the GPU up in ``DENSE_BF16_TFLOPS`` and
leaves MFU out where the device is not listed (CPUs).
"""

from __future__ import annotations

import torch

from train.config import ModelConfig
from train.plan_flops import training_flops_per_token

# Dense (not 2:4 sparse) BF16 Tensor-Core peaks in TFLOP/s from the vendors' data sheets, by a
# substring of torch.cuda.get_device_name(); the first match wins (most specific first).
DENSE_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100", 989.0),  # SXM
    ("H800", 989.0),
    ("H20", 148.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
)


def peak_tflops(device: torch.device, configured: float = 0.0) -> float | None:
    """The dense BF16 peak of one device in TFLOP/s: ``configured`` when > 0, else the table's entry for
    a CUDA device's name, else None (MFU not reported)."""
    if configured > 0:
        return configured
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops for key, tflops in DENSE_BF16_TFLOPS if key in name), None)


def model_flops_utilization(model: ModelConfig, seq_len: int, tokens_per_s: float, peak: float,
                            devices: int) -> float:
    """MFU as a fraction: the model's training FLOPs at ``tokens_per_s`` (all devices together) over
    ``devices`` x ``peak`` TFLOP/s."""
    return training_flops_per_token(model, seq_len) * tokens_per_s / (peak * 1e12 * devices)
