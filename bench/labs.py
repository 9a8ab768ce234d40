"""A lab with the sample mirror module serving, for one benchmark; always taken down.

The benchmarks drive the lab exactly as `make demo` does (``LabDriver``:
the `rampart` verbs, quietly), so a figure measures the product a person
runs, CLI and all.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from node_service.demo import VENV_BIN, DemoError, LabDriver, module_new_argv

REPO = Path(__file__).resolve().parent.parent


@dataclass
class MirrorLab:
    """A running lab, its module sources, and the module's failover settings."""

    lab: LabDriver
    src: Path
    work: Path
    heartbeat_timeout_s: float


@contextmanager
def mirror_lab(name: str) -> Iterator[MirrorLab]:
    """Bring up lab ``name`` with the sample module PRIM/SECOND; take it down however it ends."""
    from node_service.module import userconfig

    lab = LabDriver(name)
    if lab.is_up():
        print(f"bench: lab {name} is up from an earlier run: taking it down first", flush=True)
        lab.down()
    work = Path(tempfile.mkdtemp(prefix=f"rampart-bench-{name}-"))
    try:
        lab.up()
        lab.rampart(*module_new_argv(work, name, lab.vip()))
        src = work / "web"
        timeout_s = userconfig.load_dir(src).failover.heartbeat_timeout_ms / 1000
        lab.install(src, work)
        lab.roles()
        yield MirrorLab(lab, src, work, timeout_s)
    finally:
        lab.down()
        shutil.rmtree(work, ignore_errors=True)


def in_host(lab: LabDriver, node: str, python_args: list[str]) -> subprocess.Popen[str]:
    """Start ``python PYTHON_ARGS`` inside a lab host, from this repository (so `-m bench.x`)."""
    return subprocess.Popen(
        [str(VENV_BIN / "rampart"), "lab", "exec", node, "--", sys.executable, *python_args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=lab.env,
    )


def finish(proc: subprocess.Popen[str], what: str, timeout: float) -> str:
    """Wait (bounded) for a process started by in_host; its stdout, or DemoError."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=10)
        raise DemoError(f"{what} did not finish within {timeout:g} s") from None
    if proc.returncode != 0:
        raise DemoError(f"{what} failed (exit {proc.returncode}): {err.strip()[-300:]}")
    return out
