"""A dirty log that cannot be written is never swallowed by the FUSE layer.

The FUSE operations class is called directly (no mount) with a Replicator
whose dirty log fails: the application gets EIO, the failure is reported
once through ``on_fatal``, and an open that failed leaves no descriptor.
"""

from __future__ import annotations

import errno
import os

import mfusepy
import pytest

from node_service.replication.dirty import DirtyLogError
from node_service.replication.fs import ReplicatedOperations
from node_service.replication.ops import ReplicationUnavailable

CALLER = (0, 0)


class BrokenLog:
    """Accepts operations until ``broken``, then fails like a full or dead log disk."""

    def __init__(self) -> None:
        self.broken = False
        self.submitted = 0

    def submit(self, op):
        if self.broken:
            raise DirtyLogError("/var/lib/rampart/modules/m/state/dirty.sqlite: disk I/O error")
        self.submitted += 1
        return self.submitted

    def wait(self, ticket):
        return None


def make_fs(root, replicator, reports):
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    fs = ReplicatedOperations(fd, replicator, caller=lambda: CALLER, on_fatal=reports.append)
    return fd, fs


def test_a_dirty_log_failure_fails_the_write_with_eio_and_is_reported_once(tmp_path):
    log, reports = BrokenLog(), []
    fd, fs = make_fs(tmp_path, log, reports)
    try:
        fi = mfusepy.fuse_file_info()
        fi.flags = os.O_WRONLY | os.O_CREAT
        fs.create("/f", 0o600, fi)
        assert fs.write(None, b"before", 0, fi) == 6
        log.broken = True
        with pytest.raises(OSError) as first:
            fs.write(None, b"after", 6, fi)
        with pytest.raises(OSError) as second:
            fs.mkdir("/d", 0o700)
        fs.release(None, fi)
    finally:
        fs.destroy("/")
        os.close(fd)
    assert first.value.errno == errno.EIO
    assert second.value.errno == errno.EIO
    assert len(reports) == 1
    assert "dirty.sqlite: disk I/O error" in reports[0]
    assert fs.fatal == reports[0]


def test_an_open_failing_on_the_dirty_log_leaves_no_descriptor(tmp_path):
    log, reports = BrokenLog(), []
    log.broken = True
    (tmp_path / "g").write_bytes(b"x")
    fd, fs = make_fs(tmp_path, log, reports)
    try:
        fi = mfusepy.fuse_file_info()
        fi.flags = os.O_RDWR
        with pytest.raises(OSError) as failed:
            fs.open("/g", fi)
        open_handles = dict(fs._files)
    finally:
        fs.destroy("/")
        os.close(fd)
    assert failed.value.errno == errno.EIO
    assert open_handles == {}
    assert len(reports) == 1


def test_a_peer_failure_is_still_swallowed(tmp_path):
    class Gone:
        def submit(self, op):
            raise ReplicationUnavailable("peer n2 is unreachable")

        def wait(self, ticket):  # pragma: no cover - submit never returns a ticket
            raise AssertionError("wait without ticket")

    reports: list[str] = []
    fd, fs = make_fs(tmp_path, Gone(), reports)
    try:
        fs.mkdir("/d", 0o700)
    finally:
        fs.destroy("/")
        os.close(fd)
    assert (tmp_path / "d").is_dir()
    assert reports == []
    assert fs.fatal is None
    assert fs.replication_failures == 1
