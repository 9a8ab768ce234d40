"""End to end: an application writes through the real FUSE layer, the real transport
carries it over mutual TLS, the real applier writes it under a read-only view.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from node_service.replication.mount import ReplicatedMount
from node_service.replication.resync import Resync
from node_service.replication.sender import Link
from tests.unit.repl_pair import Pair, identical, mirrored_over_fuse

pytestmark = pytest.mark.node


@pytest.fixture
def mirrored(tmp_path) -> Iterator[tuple[Pair, Path, Path, ReplicatedMount]]:
    with mirrored_over_fuse(tmp_path, "rt-repl") as made:
        yield made


def test_application_writes_are_on_the_secondary_when_the_call_returns(mirrored):
    pair, src, dst, mount = mirrored
    primary_fd = mount.root_fd
    (src / "data").mkdir()
    with open(src / "data" / "db", "wb") as f:
        for i in range(64):
            f.write(bytes([i]) * 8192)
        f.flush()
        os.fsync(f.fileno())
        # sync mode: what returned to the application is already on the secondary
        assert (dst / "data" / "db").stat().st_size == 64 * 8192
    os.rename(src / "data" / "db", src / "data" / "db.old")
    (src / "data" / "note").write_text("hello")
    os.chmod(src / "data" / "note", 0o600)
    os.unlink(src / "data" / "db.old")
    assert sorted(p.name for p in (dst / "data").iterdir()) == ["note"]
    assert (dst / "data" / "note").read_text() == "hello"
    assert identical(primary_fd, dst) == []
    stats = pair.sender.stats()
    assert stats.link == "connected" and stats.lag_bytes == 0 and stats.ops > 64


def test_writes_while_the_peer_is_away_are_resynced_online(mirrored):
    pair, src, dst, mount = mirrored
    primary_fd = mount.root_fd
    with open(src / "big", "wb") as f:
        f.write(b"\0" * (4 * 1024 * 1024))
    pair.sender.mark_absent("heartbeats lost")
    with open(src / "big", "r+b") as f:  # the application goes on, alone
        for offset in range(0, 4 * 1024 * 1024, 512 * 1024):
            f.seek(offset + 100)
            f.write(b"changed while alone")
    (src / "new").mkdir()
    (src / "new" / "file").write_bytes(b"created while alone")
    assert identical(primary_fd, dst) != []

    stop, started = threading.Event(), threading.Event()
    passes = Resync(pair.sender, [primary_fd], ordering=mount.operations, timeout=30)
    during: list[int] = []

    def application() -> None:
        # keeps writing through FUSE while the resync runs
        with open(src / "big", "r+b") as f:
            for n in range(5000):
                if stop.is_set():
                    break
                f.seek((n * 37 % 64) * 64 * 1024 + n % 1000)
                f.write(b"during resync %05d" % n)
                f.flush()
                started.set()
                if passes.running:
                    during.append(n)

    writer = threading.Thread(target=application, name="test-fuse-writer")
    writer.start()
    try:
        assert started.wait(10)
        result = passes.run(lambda: pair.connect(resync=True), full=False)
    finally:
        stop.set()
        writer.join(30)
    assert during  # the application really wrote while the resync ran
    assert pair.sender.link == Link.CONNECTED
    assert pair.sender.drain(10)
    assert identical(primary_fd, dst) == []
    # only dirty regions travel again, never the whole 4 MiB file twice over
    assert result.bytes_resent <= 1.2 * result.regions * 64 * 1024
