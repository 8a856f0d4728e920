"""Apply pipeline parallelism to a model built on the meta device (design: the pipeline-split step).

The model is cut where the planner says (``train.plan.pipeline_boundaries``: ``parallel.stage_boundaries``
when given, else the cuts that balance memory, the ones ``launch/plan.py`` prints; report sec 3.2.1,
Table 2). This rank keeps only its stages (``schedule.placement[pp_rank]``), materializes and initialises
just their parameters (seeded by name, so exactly what one process would hold), and runs one
``PipelineRuntime`` per micro-batch count (the batch-size ramp changes it during a run).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from parallel.mesh import ProcessGroups
from parallel.pipeline.runtime import PipelineRuntime
from parallel.pipeline.schedule import make_schedule, min_micro_batches
from parallel.pipeline.stages import Stage, rank_module, split_model
from train.config import Config, ConfigError
from train.model import MoE, Transformer, init_parameters
from train.plan import pipeline_boundaries


def micro_batch_quantum(cfg: Config, dp: int) -> int:
    """Sequences per global batch step of the ramp: micro-batch x dp ranks, x2 for DualPipe (an even
    number of micro-batches, half fed from each end)."""
    return cfg.train.micro_batch_size * dp * (2 if cfg.parallel.pp > 1 and cfg.parallel.schedule == "dualpipe" else 1)


def check_micro_batches(cfg: Config, dp: int) -> None:
    """Every micro-batch count of the batch ramp must suit the schedule; one line naming a fix that works:
    the largest smaller ``train.micro_batch_size`` that suits both ends of the ramp, else the batch sizes
    the current one needs."""
    p, t = cfg.parallel, cfg.train
    need, even = min_micro_batches(p.schedule, p.pp), p.schedule == "dualpipe"

    def suits(batch: int, micro: int) -> bool:
        m = batch // (micro * dp)
        return batch % (micro * dp) == 0 and m >= need and not (even and m % 2)

    ends = (("batch_size_start", t.batch_size_start), ("batch_size", t.batch_size))
    for name, batch in ends:
        n_micro = batch // (t.micro_batch_size * dp)
        try:
            make_schedule(p.schedule, p.pp, n_micro)
        except ValueError:
            count = f"{'an even number of ' if even else ''}at least {need} micro-batches per step"
            smaller = next((m for m in range(t.micro_batch_size - 1, 0, -1)
                            if all(suits(b, m) for _, b in ends)), None)
            quantum = t.micro_batch_size * dp * (2 if even else 1)
            fix = (f"use train.micro_batch_size={smaller}" if smaller is not None else
                   f"raise {' and '.join(f'train.{n}' for n, b in ends if not suits(b, t.micro_batch_size))} "
                   f"to at least {need * t.micro_batch_size * dp}" + (f" (a multiple of {quantum})" if quantum > 1 else ""))
            raise ConfigError(
                f"parallel.schedule={p.schedule} at parallel.pp={p.pp} cannot run train.{name} ({batch}) = {n_micro} "
                f"micro-batches of train.micro_batch_size ({t.micro_batch_size}) x {dp} data-parallel ranks: it "
                f"needs {count}; {fix}") from None


class PipelinePart:
    """This rank's stages, the module that holds their parameters under the model's names (for the
    optimizer and checkpoints), and the runtimes."""

    def __init__(self, cfg: Config, model: Transformer, groups: ProcessGroups, device: torch.device,
                 autocast: Callable[[], contextlib.AbstractContextManager], activation_dtype: torch.dtype):
        layout = groups.layout
        self.cfg, self.groups, self.autocast, self.activation_dtype = cfg, groups, autocast, activation_dtype
        probe = make_schedule(cfg.parallel.schedule, layout.pp, min_micro_batches(cfg.parallel.schedule, layout.pp))
        # the planner's cuts, the same on every rank (pure arithmetic on the config and the layout)
        self.boundaries = pipeline_boundaries(cfg, layout, "cuda" if device.type == "cuda" else "cpu")
        stages = split_model(model, probe.n_stages, self.boundaries)
        self.stages: dict[int, Stage] = {chunk: stages[s] for chunk, s in enumerate(probe.placement[layout.pp_rank])}
        self.module: nn.Module = rank_module(list(self.stages.values()))
        self.module.to_empty(device=device)
        init_parameters(self.module, cfg.model.init_std, cfg.train.seed)
        for stage in self.stages.values():
            stage.init_rope(device)
        self._runtimes: dict[int, PipelineRuntime] = {}

    def runtime(self, micro_batches: int) -> PipelineRuntime:
        if micro_batches not in self._runtimes:
            schedule = make_schedule(self.cfg.parallel.schedule, self.groups.layout.pp, micro_batches)
            self._runtimes[micro_batches] = PipelineRuntime(schedule, self.stages, self.groups, autocast=self.autocast,
                                                            activation_dtype=self.activation_dtype,
                                                            overlap=self.cfg.parallel.overlap)
        return self._runtimes[micro_batches]

    def moe_layers(self) -> list[MoE]:
        """The local MoE layers, in the row order of ``PipelineRuntime.step(...).expert_load``."""
        return [moe for stage in sorted(self.stages.values(), key=lambda s: s.index) for _, moe in stage.moe_layers()]

    def copies(self) -> dict[str, int]:
        """How many pipeline ranks hold each local parameter (DualPipe copies, tied embedding)."""
        return self.runtime(min_micro_batches(self.cfg.parallel.schedule, self.groups.layout.pp)).copies
