"""Parameter EMA in CPU memory (report sec 3.2.3): the asynchronous update equals a synchronous one."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from train.ema import CpuEma


def test_async_ema_equals_synchronous_reference():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 4))
    decay = 0.9
    ema = CpuEma(module, decay)
    reference = {n: p.detach().clone() for n, p in module.named_parameters()}
    blend_threads = set()
    original = ema._blend

    def recording_blend(copied):
        blend_threads.add(threading.current_thread().name)
        original(copied)

    ema._blend = recording_blend
    for step in range(5):
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.randn_like(p))
        ema.update()
        assert ema._pending is not None  # handed to the background thread, not done inline
        for name, p in module.named_parameters():
            reference[name].lerp_(p.detach(), 1 - decay)
    for name, average in ema.state().items():
        assert torch.equal(average, reference[name]), name  # same lerp, same order: bit for bit
    assert blend_threads and all(t.startswith("ema") for t in blend_threads)
    target = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 4))
    ema.copy_to(target)
    assert all(torch.equal(p, reference[n]) for n, p in target.named_parameters())
    ema.close()


def test_parameters_changed_after_update_do_not_leak_into_the_pending_blend():
    """update() copies the parameters into staging buffers before returning: the optimizer may change
    them at once while the blend runs."""
    module = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        module.weight.fill_(1.0)
    ema = CpuEma(module, 0.5)
    with torch.no_grad():
        module.weight.fill_(3.0)
    ema.update()
    with torch.no_grad():
        module.weight.fill_(100.0)  # the next step's update, while the blend may still run
    assert torch.equal(ema.state()["weight"], torch.full((4, 4), 2.0))
    ema.close()


def test_bad_decay_is_refused():
    with pytest.raises(ValueError, match="EMA decay must be in"):
        CpuEma(nn.Linear(2, 2), 1.0)
