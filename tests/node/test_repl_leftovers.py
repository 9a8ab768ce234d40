"""A dead FUSE mount left by a killed replication process is cleared by the runner's
replication, and a live one is never touched.

Seen under systemd: a killed rampartd takes the replication process along and
/run/rampart with it, so the module starts afresh with a dead mount on its dir.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from node_service.replication.control import ProcessReplication
from node_service.replication.mount import mounted_at

pytestmark = pytest.mark.node

MOUNTER = textwrap.dedent(
    """
    import os, sys, threading
    from node_service.replication.applier import LoopbackReplicator
    from node_service.replication.mount import mount_replicated
    dest = os.open(sys.argv[2], os.O_RDONLY | os.O_DIRECTORY)
    mount_replicated(sys.argv[1], LoopbackReplicator(dest))
    print("mounted", flush=True)
    threading.Event().wait(60)
    """
)


class Journal:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def record(self, kind: str, text: str, module: str, **_: object) -> None:
        self.lines.append(text)

    error = warning = record


def fuse_mounts(path: Path) -> list[str]:
    return [m.fstype for m in mounted_at(str(path)) if m.fstype.startswith("fuse")]


@pytest.fixture
def dead_mount(tmp_path: Path) -> Iterator[Path]:
    """A replicated dir whose FUSE process was SIGKILLed: every call gets ENOTCONN."""
    data, dest = tmp_path / "data", tmp_path / "dest"
    data.mkdir()
    dest.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", MOUNTER, str(data), str(dest)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "mounted"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        with pytest.raises(OSError) as exc:
            os.listdir(data)
        assert exc.value.errno == errno.ENOTCONN
        yield data
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        assert proc.stdout is not None
        proc.stdout.close()
        for _ in range(4):
            if not fuse_mounts(data):
                break
            subprocess.run(["fusermount3", "-u", "-z", str(data)], check=False)


def replication(tmp_path: Path, data: Path) -> tuple[ProcessReplication, Journal]:
    journal = Journal()
    module = SimpleNamespace(name="web", replicated_dirs=(str(data),))
    node = SimpleNamespace(api_socket=tmp_path / "run" / "api.sock", replication_port=0)
    return (
        ProcessReplication(module=module, module_dir=tmp_path, node=node, journal=journal),
        journal,
    )


def test_a_dead_mount_is_detached_when_the_module_starts_afresh(dead_mount, tmp_path):
    repl, _ = replication(tmp_path, dead_mount)
    done = asyncio.run(repl.clear_dead_leftovers())
    assert done == "no mount left behind"
    assert fuse_mounts(dead_mount) == []
    assert os.listdir(dead_mount) == []
    # Nothing left: a second call has nothing to do.
    assert asyncio.run(repl.clear_dead_leftovers()) is None


def test_stopping_a_module_without_a_process_detaches_a_dead_mount(dead_mount, tmp_path):
    repl, _ = replication(tmp_path, dead_mount)
    reason = asyncio.run(repl.stop("module stopped"))
    assert reason == "replication of web is off; no mount left behind"
    assert fuse_mounts(dead_mount) == []


def test_a_mount_whose_process_answers_is_left_alone(dead_mount, tmp_path):
    repl, _ = replication(tmp_path, dead_mount)

    async def with_live_control() -> str | None:
        repl.control.parent.mkdir(parents=True, exist_ok=True)
        server = await asyncio.start_unix_server(lambda r, w: w.close(), path=str(repl.control))
        async with server:
            return await repl.clear_dead_leftovers()

    assert asyncio.run(with_live_control()) is None
    assert fuse_mounts(dead_mount) != []
