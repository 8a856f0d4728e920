"""docs/configs.md lists every config field with its current default (the docs cannot go stale silently)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from train.config import Config

DOC = Path(__file__).resolve().parents[2] / "docs" / "configs.md"


def test_every_field_is_documented_with_its_default():
    text = DOC.read_text()
    missing = []
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(section.default_factory()):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            row = f"| `{section.name}.{f.name}` | `{default}` |"
            if row not in text:
                missing.append(row)
    assert not missing, "docs/configs.md lacks (or has another default for):\n" + "\n".join(missing)
