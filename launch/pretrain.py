"""Pretrain a DeepSeek-V3 model: `python launch/pretrain.py +conf=tiny`, or under torchrun.

Any field of train/config.py can be overridden (`train.steps=50 run.dir=runs/x`). Errors in the
config, data or checkpoint print one line and exit with status 1.
"""

from __future__ import annotations

import faulthandler
import gc
import os
import sys

import hydra
from omegaconf import DictConfig

from train.config import HYDRA_RUN_OVERRIDES, SCHEMA_NAME, check_command_line, register_schema, to_config
from train.errors import UserError, print_error

register_schema()


@hydra.main(config_path="..", config_name=SCHEMA_NAME, version_base=None)
def main(node: DictConfig) -> None:
    status = run(node)
    if status:
        # the failed run's traceback is gone now: free the process groups it held while the interpreter is
        # alive (train.runtime.release_process_groups says why), so that the exit status is this one
        gc.collect()
        sys.exit(status)


def run(node: DictConfig) -> int:
    """Train; the exit status (a user error prints its one line)."""
    try:
        cfg = to_config(node, world_size=int(os.environ.get("WORLD_SIZE", "1")))
        from train.trainer import train

        train(cfg)
        return 0
    except UserError as err:
        print_error(err)  # a config error by rank 0 only, any other by each rank with its number
        return 1
    except KeyboardInterrupt:  # the second Ctrl-C (the first one stops after the step, with a checkpoint)
        print("interrupted: no checkpoint written for the current step; run the same command to resume from "
              "the last one", file=sys.stderr, flush=True)
        return 130


def command_line(argv: list[str]) -> list[str]:
    """The overrides, checked before Hydra sees them (presets, keys, types: one line each)."""
    # `async` is a Python keyword, so the field is checkpoint.async_save; accept the short spelling too
    args = [a.replace("checkpoint.async=", "checkpoint.async_save=", 1) if a.startswith("checkpoint.async=") else a
            for a in argv]
    check_command_line(args)
    return args


if __name__ == "__main__":
    faulthandler.enable()  # a crash in native code (SIGSEGV, SIGABRT) prints every thread's Python stack
    try:
        sys.argv = [sys.argv[0], *command_line(sys.argv[1:]), *HYDRA_RUN_OVERRIDES]
    except UserError as err:
        print_error(err, same_on_every_rank=True)  # the command line: every rank has the same
        sys.exit(1)
    main()
