"""Evaluate a checkpoint at long contexts (report sec 4.3): held-out perplexity or passkey retrieval.

    python launch/eval.py task=ppl checkpoint=RUN_DIR lengths=[128,512]
    python launch/eval.py task=passkey checkpoint=RUN_DIR/checkpoints/step_00000200 lengths=[128,256,512] \
        model.max_seq_len=512 --json out.json

The model config comes from the checkpoint (meta.json); only its context fields may be overridden
(model.max_seq_len, model.rope_factor, model.original_seq_len, model.beta_fast, model.beta_slow,
model.mscale, model.mscale_all_dim), e.g. to run a base model beyond its training length with or
without YaRN. The data config comes from the run's config.yaml (data.* overrides it). Settings:
train/evaluate.py EvalConfig; docs/long_context.md. Prints tables; `out=PATH` (or `--json PATH`)
writes JSON. Bad input prints one `error:` line and exits with status 1.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python launch/eval.py` from anywhere
    sys.path.insert(0, str(REPO))

from train.errors import UserError, print_error  # noqa: E402


def translate_args(argv: list[str]) -> list[str]:
    """``--json PATH`` / ``--json=PATH`` -> ``out=PATH``; everything else is a Hydra override."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--json":
            if i + 1 >= len(argv):
                raise UserError("--json needs a path: --json PATH")
            out.append(f"out={argv[i + 1]}")
            i += 2
            continue
        if arg.startswith("--json="):
            arg = "out=" + arg.split("=", 1)[1]
        elif arg.startswith("--"):
            raise UserError(f"unknown option {arg}: settings are key=value (task=, checkpoint=, lengths=[...]) "
                            "and --json PATH")
        out.append(arg)
        i += 1
    return out


def main(argv: list[str]) -> int:
    try:
        from train.config import check_override_keys
        from train.evaluate import EvalConfig, evaluate, format_result, load_eval_config, write_json

        overrides = translate_args(argv)
        check_override_keys(overrides, schema=EvalConfig, groups=(),
                            reference="settings: train/evaluate.py EvalConfig (docs/long_context.md)")
        cfg = load_eval_config(overrides)
        result = evaluate(cfg)
        print(format_result(result), flush=True)
        if cfg.out:
            write_json(result, cfg.out)
            print(f"wrote {cfg.out}", flush=True)
    except UserError as err:
        print_error(err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
