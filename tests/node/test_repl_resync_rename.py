"""A resync while the application renames, through the real FUSE layer and transport.

The application renames a directory holding files the pass planned, after the
namespace phase and before their data goes: the data must reach the new
names (the secondary renamed its stale copies in operation order).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from node_service.replication.fs import ReplicatedOperations
from node_service.replication.mount import ReplicatedMount
from node_service.replication.resync import Resync
from node_service.replication.sender import Link
from tests.unit.repl_pair import Pair, identical, mirrored_over_fuse

pytestmark = pytest.mark.node

MIB = 1024 * 1024


@pytest.fixture
def mirrored(tmp_path) -> Iterator[tuple[Pair, Path, Path, ReplicatedMount]]:
    with mirrored_over_fuse(tmp_path, "rt-rename") as made:
        yield made


class ApplicationFirst:
    """The FUSE layer's ordering locks; ``application`` runs, in its own thread,
    just before the pass takes the namespace lock the second time (its data
    phase: the namespace phase took it once and released it)."""

    def __init__(self, operations: ReplicatedOperations, application: Callable[[], None]):
        self.operations = operations
        self.application = application
        self.calls = 0
        self.ran = threading.Event()

    def namespace(self) -> AbstractContextManager[object]:
        self.calls += 1
        if self.calls == 2:
            app = threading.Thread(target=self._run, name="test-fuse-renamer")
            app.start()
            app.join(10)
            assert self.ran.is_set(), "the application's rename did not complete"
        return self.operations.namespace()

    def inode(self, ino: int) -> AbstractContextManager[object]:
        return self.operations.inode(ino)

    def _run(self) -> None:
        self.application()
        self.ran.set()


def test_a_directory_renamed_between_the_phases_gets_its_files_data(mirrored):
    pair, src, dst, mount = mirrored
    primary_fd = mount.root_fd
    (src / "d").mkdir()
    (src / "d" / "log").write_bytes(b"\0" * (3 * MIB))
    assert pair.sender.drain(10)
    pair.sender.mark_absent("heartbeats lost")
    with open(src / "d" / "log", "r+b") as f:  # a stream rewrites it while alone
        for offset in range(0, 3 * MIB, 256 * 1024):
            f.seek(offset)
            f.write(bytes([offset // MIB + 1]) * 256 * 1024)
    (src / "d" / "new").write_bytes(b"created while alone" * 500)
    assert identical(primary_fd, dst) != []

    ordering = ApplicationFirst(mount.operations, lambda: os.rename(src / "d", src / "e"))
    passes = Resync(pair.sender, [primary_fd], ordering=ordering, timeout=30)
    passes.run(lambda: pair.connect(resync=True), full=False)
    assert ordering.ran.is_set()
    assert pair.sender.link == Link.CONNECTED
    assert pair.sender.drain(10)
    assert sorted(p.name for p in (dst / "e").iterdir()) == ["log", "new"]
    assert identical(primary_fd, dst) == []
