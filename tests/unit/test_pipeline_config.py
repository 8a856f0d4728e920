"""Pipeline settings the schedules cannot take are refused at start-up with one line naming the fix."""

from __future__ import annotations

import pytest

from parallel.pipeline.parallelize import check_micro_batches, micro_batch_quantum
from train.config import Config, ConfigError, ParallelConfig, TrainConfig, validate


def config(schedule: str, pp: int, micro: int, start: int, end: int) -> Config:
    return Config(parallel=ParallelConfig(pp=pp, schedule=schedule),
                  train=TrainConfig(micro_batch_size=micro, batch_size_start=start, batch_size=end, seq_len=128),)


def test_too_few_micro_batches_for_the_schedule():
    """The line names a fix that passes this same check: a smaller micro-batch that suits both ends of the
    batch ramp, else the batch sizes."""
    cfg = config("dualpipev", pp=4, micro=4, start=8, end=64)  # 2 micro-batches at the start; DualPipeV needs 7
    with pytest.raises(ConfigError, match=r"parallel.schedule=dualpipev at parallel.pp=4 cannot run "
                                          r"train.batch_size_start \(8\) = 2 micro-batches .* needs at least 7 "
                                          r"micro-batches per step; use train.micro_batch_size=1$"):
        check_micro_batches(cfg, dp=1)
    check_micro_batches(config("dualpipev", pp=4, micro=1, start=8, end=64), dp=1)  # 8 and 64: fine
    # the README's layout with DualPipeV: 8 = 2 micro-batches of 2 x 2 ranks; micro-batches of 1 give 4 and 8
    with pytest.raises(ConfigError, match=r"use train.micro_batch_size=1$"):
        check_micro_batches(config("dualpipev", pp=2, micro=2, start=8, end=16), dp=2)
    check_micro_batches(config("dualpipev", pp=2, micro=1, start=8, end=16), dp=2)
    # no smaller micro-batch suits both ends: the batch sizes to raise, and by how much
    with pytest.raises(ConfigError, match=r"needs at least 7 micro-batches per step; raise train.batch_size_start "
                                          r"and train.batch_size to at least 7$"):
        check_micro_batches(config("dualpipev", pp=4, micro=1, start=4, end=6), dp=1)
    with pytest.raises(ConfigError, match=r"needs an even number of at least 6 micro-batches per step; raise "
                                          r"train.batch_size_start to at least 12 \(a multiple of 4\)$"):
        check_micro_batches(config("dualpipe", pp=4, micro=1, start=8, end=32), dp=2)
    check_micro_batches(config("dualpipe", pp=4, micro=1, start=12, end=32), dp=2)


def test_dualpipe_needs_an_even_number_of_micro_batches():
    # the batch ramp rounds to micro x dp x 2 under DualPipe, so every step has an even count
    assert micro_batch_quantum(config("dualpipe", 2, 2, 8, 16), dp=2) == 8
    assert micro_batch_quantum(config("1f1b", 2, 2, 8, 16), dp=2) == 4
    with pytest.raises(ConfigError, match=r"train.batch_size \(12\) must be a positive multiple of "
                                          r"train.micro_batch_size x data-parallel ranks x 2 \(DualPipe\) \(8\)"):
        validate(config("dualpipe", 2, 2, 8, 12), world_size=4)
    validate(config("1f1b", 2, 2, 8, 12), world_size=4)  # 12 = 3 micro-batches of 2 x 2 ranks: fine for 1F1B


def test_micro_batches_sets_the_micro_batch_size():
    """parallel.micro_batches=m: train.micro_batch_size = batch_size / (m x dp), through the launchers'
    config loading (Hydra overrides); a count that does not divide the batch is one line naming both."""
    from train.config import load_config

    cfg = load_config(["+conf=tiny", "parallel.pp=2", "parallel.micro_batches=4", "train.batch_size=16"],
                      world_size=4)
    assert cfg.train.micro_batch_size == 2  # 16 sequences / (4 micro-batches x dp 2)
    with pytest.raises(ConfigError, match=r"parallel.micro_batches \(3\) x 2 data-parallel ranks must divide "
                                          r"train.batch_size \(16\)"):
        load_config(["+conf=tiny", "parallel.pp=2", "parallel.micro_batches=3", "train.batch_size=16"], world_size=4)
