"""A module directory as a whole: userconfig.xml plus the scripts in bin/.

``review(path)`` loads the module and looks at ``bin/``: a checker script
that is missing is a problem (the checker could never pass), while a script
that is not executable or a file no one runs is only a warning, because the
module still works and the author may be mid-edit. ``module validate`` and
``module build`` report both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from node_service.errors import Problem, ValidationError
from node_service.module import userconfig
from node_service.module.model import SCRIPT_NAMES, Module


@dataclass(frozen=True)
class Review:
    module: Module
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class BinEntry:
    name: str
    is_file: bool
    executable: bool


def review(path: str | Path) -> Review:
    """The module of ``path`` and warnings about ``bin/``; ValidationError on problems."""
    path = Path(path)
    module = userconfig.load_dir(path)
    warnings, problems = judge_bin(module, _list_bin(path / "bin"), f"{path}/bin")
    if problems:
        raise ValidationError([Problem(f"{path}/bin", None, p) for p in problems])
    return Review(module, tuple(warnings))


def _list_bin(bin_dir: Path) -> list[BinEntry]:
    if not bin_dir.is_dir():
        return []
    return [
        BinEntry(p.name, p.is_file() and not p.is_symlink(), os.access(p, os.X_OK))
        for p in sorted(bin_dir.iterdir())
    ]


def judge_bin(module: Module, entries: list[BinEntry], where: str) -> tuple[list[str], list[str]]:
    """(warnings, problems) about the scripts of ``module`` found in ``bin/``."""
    warnings: list[str] = []
    problems: list[str] = []
    present = {e.name for e in entries}
    wanted = set(module.checker_scripts)
    for entry in entries:
        if entry.name in wanted or entry.name in module.lifecycle_scripts:
            if not entry.is_file:
                problems.append(
                    f"{entry.name} is not a regular file; expected an executable script"
                )
            elif not entry.executable:
                warnings.append(
                    f"{where}/{entry.name} is not executable; it will not run (chmod +x it)"
                )
        elif entry.name in SCRIPT_NAMES:
            warnings.append(
                f"{where}/{entry.name} is not run by a {module.kind} module; expected "
                + ", ".join(module.lifecycle_scripts)
            )
        else:
            warnings.append(
                f"{where}/{entry.name} is not a lifecycle script nor a checker script; "
                "nothing will run it"
            )
    for script in sorted(wanted - present):
        problems.append(
            f"{script} is missing; a <script name={script!r}> checker needs an executable "
            f"bin/{script}"
        )
    return warnings, problems
