"""Where the shipped resources (templates, theme, default configs) live."""

from __future__ import annotations

import sys
from pathlib import Path


def resources_dir() -> Path:
    """The `resources/` tree: beside the packages in a checkout, else under share/."""
    here = Path(__file__).resolve().parent.parent / "resources"
    if here.is_dir():
        return here
    return Path(sys.prefix) / "share" / "rampart" / "resources"


def templates_dir() -> Path:
    return resources_dir() / "templates"
