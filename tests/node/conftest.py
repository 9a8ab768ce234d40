"""Fixtures for tests that need real lab hosts (`rampart lab`, root).

- ``lab``: one 2-node lab shared by the whole session. Do not crash, cut or
  reconfigure its hosts; use ``fresh_lab`` or ``lab_factory`` for that.
- ``fresh_lab``: a 2-node lab owned by one test module (crash it freely).
- ``lab_factory(nodes=N)``: a lab with N nodes, taken down at session end.

Each yields/returns the ``rampart lab status --json`` dict. Labs get unique
names (``rt`` + 4 random characters) so parallel runs never clash, and are
always taken down, even when ``up`` or the test fails.
"""

from __future__ import annotations

import json
import secrets
import string
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import pytest

RAMPART = [sys.executable, "-m", "node_service.cli"]
LAB_TIMEOUT_S = 120


def rampart(*args: str, check: bool = True, timeout: float = LAB_TIMEOUT_S, **kw):
    """Run the `rampart` CLI; return the CompletedProcess (text mode)."""
    done = subprocess.run(
        [*RAMPART, *args], capture_output=True, text=True, timeout=timeout, check=False, **kw
    )
    if check and done.returncode != 0:
        raise AssertionError(
            f"rampart {' '.join(args)} exited {done.returncode}:\n{done.stdout}{done.stderr}"
        )
    return done


def unique_lab_name() -> str:
    alphabet = string.ascii_lowercase + string.digits
    return "rt" + "".join(secrets.choice(alphabet) for _ in range(4))


def lab_status(name: str) -> dict:
    return json.loads(rampart("lab", "status", "--name", name, "--json").stdout)


@contextmanager
def lab_running(nodes: int = 2, name: str | None = None) -> Iterator[dict]:
    """A lab for the duration of the block. A fixed ``name`` makes the lab's
    node names (and so everything hashed from them) the same on every run;
    a leftover lab of that name from an interrupted run is taken down first."""
    if name is None:
        name = unique_lab_name()
    else:
        rampart("lab", "down", "--name", name, check=False)
    try:
        rampart("lab", "up", "--name", name, "--nodes", str(nodes))
        yield lab_status(name)
    finally:
        rampart("lab", "down", "--name", name, check=False)


@pytest.fixture(scope="session")
def lab() -> Iterator[dict]:
    with lab_running(2) as status:
        yield status


@pytest.fixture(scope="module")
def fresh_lab() -> Iterator[dict]:
    with lab_running(2) as status:
        yield status


@pytest.fixture(scope="session")
def lab_factory() -> Iterator[Callable[..., dict]]:
    with ExitStack() as stack:

        def make(nodes: int = 2) -> dict:
            return stack.enter_context(lab_running(nodes))

        yield make
