"""Fixtures shared by the unit tests: running the `rampart` CLI in-process."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from node_service.cli import main
from node_service.replication.dirty import DirtyLog


@dataclass(frozen=True)
class CliResult:
    rc: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return self.err.splitlines()


@pytest.fixture
def rampart(capsys: pytest.CaptureFixture[str]) -> Callable[..., CliResult]:
    """`rampart(*argv)` runs node_service.cli.main and returns exit code, stdout, stderr."""

    def run(*argv: object) -> CliResult:
        capsys.readouterr()  # drop anything printed before this call
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse usage errors
            rc = exc.code if isinstance(exc.code, int) else 1
        captured = capsys.readouterr()
        return CliResult(rc, captured.out, captured.err)

    return run


@pytest.fixture
def dirty_log(tmp_path) -> Iterator[DirtyLog]:
    """A module's dirty log (SQLite WAL) in a fresh directory, closed afterwards."""
    log = DirtyLog(tmp_path / "dirty.sqlite")
    try:
        yield log
    finally:
        log.close()
