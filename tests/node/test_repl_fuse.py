"""The replicating FUSE layer mounted for real (root, /dev/fuse), and the read-only view.

Applications work on the mounted path; a LoopbackReplicator applies every
operation to a secondary directory protected by the read-only bind mount.
Each test ends with the consistency check of the real primary directory
(reached through the mount's own descriptor) against the secondary.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from node_service.replication import syscalls
from node_service.replication.applier import LoopbackReplicator
from node_service.replication.mount import (
    MountError,
    ReadOnlyView,
    ReplicatedMount,
    mount_replicated,
    mounted_at,
    protect_readonly,
)
from tests.unit.test_repl_fs_direct import assert_same_tree, data_map

pytestmark = pytest.mark.node

FIVE_GIB = 5 * 1024**3
NOBODY = 65534


def wait_until(predicate, timeout: float = 5.0) -> bool:
    """Poll ``predicate`` until true or ``timeout``: FUSE sends RELEASE after close returns."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


@dataclass
class Mirror:
    base: str
    primary: str
    secondary: str
    mount: ReplicatedMount
    view: ReadOnlyView
    loop: LoopbackReplicator

    def check(self) -> None:
        self.loop.drain()
        assert self.loop.error is None
        assert self.mount.operations.replication_failures == 0
        real_primary = f"/proc/self/fd/{self.mount.root_fd}"
        assert_same_tree(real_primary, self.secondary)

    def p(self, rel: str) -> str:
        return os.path.join(self.primary, rel)

    def s(self, rel: str) -> str:
        return os.path.join(self.secondary, rel)


@pytest.fixture(scope="module")
def mirror() -> Iterator[Mirror]:
    base = tempfile.mkdtemp(prefix="rt-repl-", dir="/tmp")
    primary, secondary = os.path.join(base, "primary"), os.path.join(base, "secondary")
    os.chmod(base, 0o755)
    for d in (primary, secondary):
        os.mkdir(d, 0o755)
        os.chmod(d, 0o755)
        os.utime(d, ns=(10**9, 10**9))
    view = loop = mount = None
    try:
        view = protect_readonly(secondary)
        loop = LoopbackReplicator(view.fd)
        mount = mount_replicated(primary, loop)
        yield Mirror(base, primary, secondary, mount, view, loop)
    finally:
        if mount is not None:
            mount.unmount()
        if loop is not None:
            loop.close()
        if view is not None:
            view.unprotect()
        still = mounted_at(primary) + mounted_at(secondary)
        shutil.rmtree(base, ignore_errors=not still)
        assert still == [], f"left mounted: {still}"


def test_the_mount_is_a_rampart_fuse_mount_over_the_same_path(mirror):
    assert [m.fstype for m in mounted_at(mirror.primary)] == ["fuse.rampart"]
    assert [m.options[0] for m in mounted_at(mirror.secondary)] == ["ro"]


def test_file_operations_through_the_mount_replicate_in_order(mirror):
    d = mirror.p("ops")
    os.mkdir(d, 0o755)
    with open(f"{d}/plain", "wb") as f:
        f.write(b"first version, long enough to notice a truncation")
    with open(f"{d}/plain", "wb") as f:  # O_TRUNC
        f.write(b"second")
    with open(f"{d}/log", "ab") as f:
        f.write(b"line 1\n")
    with open(f"{d}/log", "ab") as f:  # O_APPEND lands after what is there
        f.write(b"line 2\n")
    with open(f"{d}/old", "wb") as f:
        f.write(b"replacement")
    with open(f"{d}/target", "wb") as f:
        f.write(b"replaced")
    os.replace(f"{d}/old", f"{d}/target")
    os.mkdir(f"{d}/sub", 0o700)
    os.mkdir(f"{d}/gone")
    os.rmdir(f"{d}/gone")
    os.symlink("../ops/target", f"{d}/sub/link")
    os.link(f"{d}/target", f"{d}/hard")
    os.chmod(f"{d}/plain", 0o600)
    os.chown(f"{d}/plain", 1234, 5678)
    os.lchown(f"{d}/sub/link", 4321, 8765)
    os.utime(f"{d}/log", ns=(1_111_111_111_123_456_789, 1_222_222_222_987_654_321))
    os.utime(f"{d}/hard")  # now
    with open(os.fsencode(d) + b"/not \xff utf-8", "wb") as f:
        f.write(b"bytes name")
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        syscalls.set_times(dfd, "plain", None, 1_333_333_333_000_000_001)  # atime omitted
    finally:
        os.close(dfd)
    mirror.check()
    with open(mirror.s("ops/log"), "rb") as f:
        assert f.read() == b"line 1\nline 2\n"
    with open(mirror.s("ops/target"), "rb") as f:
        assert f.read() == b"replacement"
    assert os.stat(mirror.s("ops/plain")).st_uid == 1234
    assert os.stat(mirror.s("ops/log")).st_mtime_ns == 1_222_222_222_987_654_321
    assert os.readlink(mirror.s("ops/sub/link")) == "../ops/target"
    assert os.path.exists(os.fsencode(mirror.s("ops")) + b"/not \xff utf-8")


def test_unlink_of_an_open_file_then_keep_writing_and_close(mirror):
    d = mirror.p("unlinked")
    os.mkdir(d)
    fd = os.open(f"{d}/tmp", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        os.write(fd, b"written before unlink")
        os.unlink(f"{d}/tmp")
        os.write(fd, b" and after")
        os.ftruncate(fd, 10)
        with pytest.raises(OSError) as info:  # known limit: no handle reaches us for fchmod
            os.fchmod(fd, 0o644)
        assert info.value.errno == errno.ESTALE
        os.fsync(fd)
        assert os.pread(fd, 100, 0) == b"written be"
    finally:
        os.close(fd)
    mirror.check()
    assert os.listdir(mirror.s("unlinked")) == []
    assert wait_until(lambda: mirror.loop.applier.open_handles == 0)


def test_fsync_fallocate_and_a_sparse_file_beyond_4_gib(mirror):
    d = mirror.p("sparse")
    os.mkdir(d)
    fd = os.open(f"{d}/big", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.pwrite(fd, b"\xaa" * (1 << 20), 0)
        os.posix_fallocate(fd, 4 << 20, 1 << 20)
        punch = syscalls.FALLOC_FL_PUNCH_HOLE | syscalls.FALLOC_FL_KEEP_SIZE
        syscalls.fallocate(fd, punch, 256 << 10, 256 << 10)
        os.pwrite(fd, b"beyond four gibibytes", FIVE_GIB)
        os.fsync(fd)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    mirror.check()
    st = os.stat(mirror.s("sparse/big"))
    assert st.st_size == FIVE_GIB + 21
    sfd = os.open(mirror.s("sparse/big"), os.O_RDONLY)
    try:
        extents = data_map(sfd, st.st_size)
    finally:
        os.close(sfd)
    assert extents[0] == (0, 256 << 10), "the punched hole is a hole on the secondary"
    assert extents[-1][1] == st.st_size


def test_concurrent_writers_from_several_threads(mirror):
    d = mirror.p("threads")
    os.mkdir(d)
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            with open(f"{d}/file{i}", "wb") as f:
                for n in range(100):
                    f.write(bytes([48 + i]) * 4096 + str(n).encode())
                f.flush()
                os.fsync(f.fileno())
            with open(f"{d}/shared", "r+b" if os.path.exists(f"{d}/shared") else "wb") as f:
                for n in range(50):
                    f.seek((n * 4096 + i * 100) % 60_000)
                    f.write(bytes([65 + i]) * 3000)
        except BaseException as exc:
            errors.append(exc)

    with open(f"{d}/shared", "wb") as f:
        f.write(b"\0" * 60_000)
    threads = [threading.Thread(target=writer, args=(i,), name=f"rt-app-{i}") for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    mirror.check()
    assert sorted(os.listdir(mirror.s("threads"))) == sorted(
        ["shared", *(f"file{i}" for i in range(6))]
    )


def test_callers_keep_their_identity_and_permissions(mirror):
    d = mirror.p("perms")
    os.mkdir(d, 0o755)
    os.mkdir(f"{d}/open")
    os.chmod(f"{d}/open", 0o777)

    def as_nobody(script: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["sh", "-c", script],
            user=NOBODY,
            group=NOBODY,
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )

    made = as_nobody(f"echo mine > {d}/open/file && mkdir {d}/open/dir")
    assert made.returncode == 0, made.stderr
    refused = as_nobody(f"echo no > {d}/denied")
    assert refused.returncode != 0
    assert "Permission denied" in refused.stderr
    mirror.check()
    for name in ("file", "dir"):
        st = os.stat(mirror.s(f"perms/open/{name}"))
        assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY)
    assert not os.path.exists(mirror.s("perms/denied"))


def test_the_secondarys_view_refuses_local_writes_while_the_applier_applies(mirror):
    with pytest.raises(OSError) as info, open(mirror.s("local-write"), "wb"):
        pass
    assert info.value.errno == errno.EROFS
    with pytest.raises(OSError) as info:
        os.mkdir(mirror.s("local-dir"))
    assert info.value.errno == errno.EROFS
    with open(mirror.p("from-primary"), "wb") as f:
        f.write(b"arrives anyway")
    mirror.check()
    with open(mirror.s("from-primary"), "rb") as f:
        assert f.read() == b"arrives anyway"


def test_unmount_with_a_file_still_open_leaves_nothing_mounted():
    base = tempfile.mkdtemp(prefix="rt-repl-busy-", dir="/tmp")
    primary, secondary = os.path.join(base, "p"), os.path.join(base, "s")
    os.mkdir(primary)
    os.mkdir(secondary)
    sfd = os.open(secondary, os.O_RDONLY | os.O_DIRECTORY)
    loop = LoopbackReplicator(sfd)
    mount = mount_replicated(primary, loop)
    fd = -1
    try:
        fd = os.open(os.path.join(primary, "busy"), os.O_CREAT | os.O_WRONLY, 0o600)
        os.write(fd, b"in use")
        how = mount.unmount(timeout=5)
        assert how in ("aborted the FUSE connection",) or how.startswith("lazy unmount")
        assert mounted_at(primary) == []
        assert not mount.thread.is_alive()
        assert mount.unmount() == "already unmounted"
    finally:
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass  # the connection was aborted under it
        mount.unmount()
        loop.close()
        os.close(sfd)
        shutil.rmtree(base, ignore_errors=True)


def test_a_full_secondary_is_reported_stale_while_the_primary_keeps_working():
    base = tempfile.mkdtemp(prefix="rt-repl-full-", dir="/tmp")
    primary, small = os.path.join(base, "p"), os.path.join(base, "small")
    os.mkdir(primary)
    os.mkdir(small)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "rt-full", small], check=True)
    sfd = os.open(small, os.O_RDONLY | os.O_DIRECTORY)
    loop = LoopbackReplicator(sfd)
    mount = None
    try:
        mount = mount_replicated(primary, loop)
        with open(os.path.join(primary, "big"), "wb") as f:
            for _ in range(16):
                f.write(b"\x55" * 65536)
        assert os.path.getsize(os.path.join(primary, "big")) == 1 << 20
        assert loop.error is not None and loop.error.errno == errno.ENOSPC
        assert "No space left on device" in str(loop.error)
        assert mount.operations.replication_failures > 0
        assert "stale" in (mount.operations.last_failure or "")
    finally:
        if mount is not None:
            mount.unmount()
        loop.close()
        os.close(sfd)
        subprocess.run(["umount", small], check=False)
        shutil.rmtree(base, ignore_errors=True)
    assert mounted_at(small) == [] and mounted_at(primary) == []


def test_mounting_twice_over_one_directory_is_refused_with_a_reason(mirror):
    with pytest.raises(MountError, match="already mounted here; unmount it first"):
        mount_replicated(mirror.primary, mirror.loop)
    with pytest.raises(MountError, match="cannot open the replicated directory"):
        mount_replicated(mirror.p("no/such/dir"), mirror.loop)
    assert [m.fstype for m in mounted_at(mirror.primary)] == ["fuse.rampart"]
