"""Fixtures shared by the unit tests: the CLI in-process, dirty logs, replication pairs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from node_service.cli import main
from node_service.replication.dirty import DirtyLog
from tests.unit.repl_pair import Pair, make_site, pairs


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


@pytest.fixture(scope="module")
def repl_site(tmp_path_factory) -> Path:
    """One site's secrets (CA, nodes n1 and n2) for every replication pair of a test module."""
    return make_site(tmp_path_factory.mktemp("site"))


@pytest.fixture
def pair_factory(repl_site, tmp_path) -> Iterator[Callable[..., Pair]]:
    """Connected primary/secondary pairs (``repl_pair.pairs``), all closed after the test."""
    with pairs(repl_site, tmp_path) as make:
        yield make
