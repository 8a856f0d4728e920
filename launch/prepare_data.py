"""Prepare the token stream for a config: ``python launch/prepare_data.py [+conf=NAME] [key=value ...]``.

Trains (or loads) the tokenizer with ``model.vocab_size`` tokens, applies FIM with ``train.seed``,
writes the EOS-joined uint32 stream under ``data.cache_dir`` and prints a summary. A second run
with the same inputs is a cache hit.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from data.prepare import PreparedData, prepare_data
from train.config import HYDRA_RUN_OVERRIDES, SCHEMA_NAME, check_command_line, register_schema, to_config
from train.errors import UserError

register_schema()


def summary(prepared: PreparedData) -> str:
    """A few lines a person reads after preparation."""
    per_byte = prepared.n_tokens / max(prepared.n_bytes, 1)
    fim_share = prepared.n_fim / max(prepared.n_documents, 1)
    skipped = len(prepared.skipped_files)
    return "\n".join([
        f"{'cache hit' if prepared.cache_hit else 'prepared'} in {prepared.seconds:.2f} s: {prepared.directory}",
        f"  tokens     {prepared.n_tokens:,} ({per_byte:.3f} tokens/byte of {prepared.n_bytes:,} bytes)",
        f"  documents  {prepared.n_documents:,} ({prepared.n_fim:,} with FIM, {fim_share:.1%})",
        f"  skipped    {skipped} file(s) not UTF-8 text" + (f", first {prepared.skipped_files[0]}" if skipped else "")
        + f"; {len(prepared.empty_files)} empty; {prepared.split_documents} long document(s) split",
        f"  tokenizer  {prepared.tokenizer_path} (vocab {prepared.tokenizer_vocab_size:,})",
    ])


@hydra.main(config_path="..", config_name=SCHEMA_NAME, version_base=None)
def main(node: DictConfig) -> None:
    try:
        cfg = to_config(node)
        prepared = prepare_data(cfg.data, vocab_size=cfg.model.vocab_size, seed=cfg.train.seed)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    print(summary(prepared))


if __name__ == "__main__":
    try:
        check_command_line(sys.argv[1:])  # presets, keys, types: one line each, before Hydra's longer messages
    except UserError as err:
        sys.exit(f"error: {err}")
    sys.argv += HYDRA_RUN_OVERRIDES
    main()
