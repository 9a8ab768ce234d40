"""The FUSE operations class called directly (no mount), replicating to a loopback secondary.

Every test ends with the consistency check: the primary's and the
secondary's trees have the same names, types, sizes, contents, modes,
owners, modification times (ns), symlink targets and sparse-hole maps.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import mfusepy
import pytest

from node_service.replication import syscalls
from node_service.replication.applier import LoopbackReplicator
from node_service.replication.fs import NOW, ReplicatedOperations
from node_service.replication.ops import Fsync, Op, Open, ReplicationUnavailable, Write

FIVE_GIB = 5 * 1024**3
CALLER = (1234, 5678)
FileInfo = mfusepy.fuse_file_info


# -- the consistency check ----------------------------------------------------


def data_map(fd: int, size: int) -> tuple[tuple[int, int], ...]:
    """The (start, end) extents that hold data, by SEEK_DATA/SEEK_HOLE."""
    extents, pos = [], 0
    for _ in range(100_000):
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        extents.append((start, end))
        if end >= size:
            break
        pos = end
    return tuple(extents)


def file_digest(fd: int, size: int) -> str:
    """sha256 of the contents, reading only data extents (holes are zeros)."""
    h = hashlib.sha256()
    pos = 0
    for start, end in data_map(fd, size):
        h.update(f"hole:{start - pos}".encode())
        for off in range(start, end, 1 << 20):
            h.update(os.pread(fd, min(1 << 20, end - off), off))
        pos = end
    h.update(f"hole:{size - pos}".encode())
    return h.hexdigest()


def snapshot_tree(root: str, *, times: bool = True) -> dict[str, tuple]:
    """Everything the consistency check compares, per relative path ('' = root)."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in ["", *dirnames, *filenames]:
            if name == "" and dirpath != root:
                continue
            path = os.path.join(dirpath, name) if name else dirpath
            rel = os.path.relpath(path, root) if name else os.path.relpath(dirpath, root)
            rel = "" if rel == "." else rel
            st = os.stat(path) if not name else os.lstat(path)  # the root may be a /proc link
            extra: tuple = ()
            if stat.S_ISREG(st.st_mode):
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
                try:
                    extra = (file_digest(fd, st.st_size), data_map(fd, st.st_size))
                finally:
                    os.close(fd)
            elif stat.S_ISLNK(st.st_mode):
                extra = (os.readlink(path),)
            size = st.st_size if not stat.S_ISDIR(st.st_mode) else None
            mtime = st.st_mtime_ns if times else None
            out[rel] = (st.st_mode, st.st_uid, st.st_gid, size, mtime, st.st_nlink, *extra)
    return out


def assert_same_tree(primary: str, secondary: str, *, times: bool = True) -> None:
    a, b = snapshot_tree(primary, times=times), snapshot_tree(secondary, times=times)
    assert sorted(a) == sorted(b), "names differ"
    for rel in a:
        assert a[rel] == b[rel], f"{rel or '<root>'} differs: primary {a[rel]} secondary {b[rel]}"


# -- fixtures ---------------------------------------------------------------------


class Recording:
    """Wraps a Replicator and keeps every submitted operation, in order."""

    def __init__(self, inner):
        self.inner = inner
        self.ops: list[Op] = []
        self.waited = 0

    def submit(self, op):
        self.ops.append(op)
        return self.inner.submit(op)

    def wait(self, ticket):
        self.waited += 1
        self.inner.wait(ticket)


@dataclass
class Pair:
    primary: str
    secondary: str
    fs: ReplicatedOperations
    loop: LoopbackReplicator
    rec: Recording

    def fi(self, flags: int) -> mfusepy.fuse_file_info:
        fi = mfusepy.fuse_file_info()
        fi.flags = flags
        return fi

    def create(self, path: str, mode: int = 0o644, flags: int = os.O_WRONLY) -> FileInfo:
        fi = self.fi(flags | os.O_CREAT)
        assert self.fs.create(path, mode, fi) == 0
        return fi

    def open(self, path: str, flags: int) -> mfusepy.fuse_file_info:
        fi = self.fi(flags)
        assert self.fs.open(path, fi) == 0
        return fi

    def write(self, fi, data: bytes, offset: int) -> None:
        assert self.fs.write(None, data, offset, fi) == len(data)

    def check(self, *, times: bool = True) -> None:
        self.loop.drain()
        assert self.loop.error is None
        assert_same_tree(self.primary, self.secondary, times=times)

    def p(self, rel: str) -> str:
        return os.path.join(self.primary, rel)

    def s(self, rel: str) -> str:
        return os.path.join(self.secondary, rel)


@pytest.fixture
def pair(tmp_path) -> Iterator[Pair]:
    primary, secondary = tmp_path / "primary", tmp_path / "secondary"
    primary.mkdir()
    secondary.mkdir()
    for d in (primary, secondary):
        os.chmod(d, 0o755)
        os.utime(d, ns=(1_000_000_000, 1_000_000_000))
    pfd = os.open(primary, os.O_RDONLY | os.O_DIRECTORY)
    sfd = os.open(secondary, os.O_RDONLY | os.O_DIRECTORY)
    loop = LoopbackReplicator(sfd)
    rec = Recording(loop)
    fs = ReplicatedOperations(pfd, rec, caller=lambda: CALLER)
    try:
        yield Pair(str(primary), str(secondary), fs, loop, rec)
    finally:
        fs.destroy("/")
        loop.close()
        os.close(pfd)
        os.close(sfd)


# -- tests ---------------------------------------------------------------------------


def test_create_write_release_replicates_content_owner_and_mode(pair):
    fi = pair.create("/f", 0o640)
    pair.write(fi, b"hello ", 0)
    pair.write(fi, b"world", 6)
    pair.fs.release(None, fi)
    pair.check()
    st = os.stat(pair.s("f"))
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (*CALLER, 0o640)
    with open(pair.s("f"), "rb") as f:
        assert f.read() == b"hello world"
    assert pair.loop.applier.open_handles == 0


def test_open_with_o_trunc_empties_the_file_on_both_sides(pair):
    fi = pair.create("/f")
    pair.write(fi, b"x" * 100_000, 0)
    pair.fs.release(None, fi)
    fi = pair.open("/f", os.O_WRONLY | os.O_TRUNC)
    pair.write(fi, b"new", 0)
    pair.fs.release(None, fi)
    pair.check()
    assert os.path.getsize(pair.s("f")) == 3


def test_o_append_writes_land_at_the_offset_the_kernel_chose(pair):
    fi = pair.create("/log")
    pair.write(fi, b"one\n", 0)
    pair.fs.release(None, fi)
    fi = pair.open("/log", os.O_WRONLY | os.O_APPEND)
    # with FUSE the kernel turns O_APPEND into the current size as offset
    pair.write(fi, b"two\n", 4)
    pair.fs.release(None, fi)
    pair.check()
    with open(pair.s("log"), "rb") as f:
        assert f.read() == b"one\ntwo\n"


def test_rename_over_an_existing_open_file(pair):
    a, b = pair.create("/a"), pair.create("/b")
    pair.write(a, b"AAAA", 0)
    pair.write(b, b"BBBBBBBB", 0)
    assert pair.fs.rename("/a", "/b") == 0
    pair.write(b, b"still open", 0)  # the replaced inode keeps its handle
    pair.write(a, b"!", 4)
    pair.fs.release(None, a)
    pair.fs.release(None, b)
    pair.check()
    with open(pair.s("b"), "rb") as f:
        assert f.read() == b"AAAA!"
    assert not os.path.exists(pair.s("a"))


def test_unlink_of_an_open_file_then_keep_writing(pair):
    fi = pair.create("/doomed")
    pair.write(fi, b"before", 0)
    pair.fs.unlink("/doomed")
    pair.write(fi, b"after unlink", 6)
    assert pair.fs.getattr(None, fi)["st_size"] == 18
    pair.fs.fsync(None, 0, fi)
    pair.fs.release(None, fi)
    pair.check()
    assert os.listdir(pair.s("")) == []
    assert pair.loop.applier.open_handles == 0


def test_mkdir_rmdir_and_set_gid_directories(pair):
    pair.fs.mkdir("/d", 0o2775)
    pair.fs.mkdir("/d/e", 0o755)
    pair.fs.mkdir("/gone", 0o700)
    pair.fs.rmdir("/gone")
    fi = pair.create("/d/e/f")
    pair.fs.release(None, fi)
    pair.check()
    st = os.stat(pair.s("d/e"))
    assert st.st_mode & stat.S_ISGID, "set-gid directories pass the bit on"
    assert os.stat(pair.s("d/e/f")).st_gid == os.stat(pair.s("d")).st_gid


def test_symlinks_and_hard_links(pair):
    pair.fs.symlink("/out", "/etc/passwd")  # points outside: stored, never followed
    pair.fs.symlink("/rel", "f")
    fi = pair.create("/f")
    pair.write(fi, b"linked", 0)
    pair.fs.release(None, fi)
    pair.fs.link("/hard", "/f")
    pair.check()
    assert os.readlink(pair.s("out")) == "/etc/passwd"
    assert os.stat(pair.s("hard")).st_ino == os.stat(pair.s("f")).st_ino
    assert os.lstat(pair.s("out")).st_uid == CALLER[0]


def test_chmod_chown_utimens_by_path_and_by_handle(pair):
    fi = pair.create("/f")
    pair.fs.chmod("/f", 0o4711)
    pair.fs.chown("/f", 42, -1)
    pair.fs.chown(None, -1, 43, fh=fi)
    pair.fs.chmod(None, 0o600, fh=fi)
    pair.fs.utimens("/f", (123_456_789_012_345_678, 987_654_321_987_654_321))
    pair.fs.mkdir("/d", 0o755)
    pair.fs.utimens("/d", (None, 5_000_000_001))  # atime left alone
    pair.fs.utimens("/", (NOW, NOW))
    pair.fs.chmod("/", 0o711)
    pair.fs.release(None, fi)
    pair.check()
    st = os.stat(pair.s("f"))
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (42, 43, 0o600)
    assert st.st_mtime_ns == 987_654_321_987_654_321
    assert os.stat(pair.s("d")).st_mtime_ns == 5_000_000_001
    assert stat.S_IMODE(os.stat(pair.s("")).st_mode) == 0o711


def test_truncate_by_path_and_by_handle_grows_and_shrinks(pair):
    fi = pair.create("/f")
    pair.write(fi, os.urandom(300_000), 0)
    pair.fs.truncate(None, 70_000, fh=fi)
    pair.fs.truncate(None, 1_000_000, fh=fi)
    pair.fs.release(None, fi)
    pair.fs.truncate("/f", 99_999)
    pair.check()
    assert os.path.getsize(pair.s("f")) == 99_999


def test_fsync_is_replicated_and_waited_for(pair):
    fi = pair.create("/f")
    pair.write(fi, b"durable", 0)
    before = pair.rec.waited
    pair.fs.fsync(None, 1, fi)
    pair.fs.fsync(None, 0, fi)
    assert pair.rec.waited == before + 2
    assert [op for op in pair.rec.ops if isinstance(op, Fsync)] == [
        Fsync(fi.fh, True),
        Fsync(fi.fh, False),
    ]
    pair.fs.release(None, fi)
    pair.check()


def test_the_secondary_fsyncs_while_the_primary_does(pair, monkeypatch):
    fi = pair.create("/f")
    pair.write(fi, b"durable", 0)
    seen: list[bool] = []
    real_fsync = os.fsync

    primary_fd = pair.fs._files[fi.fh].fd

    def fsync(fd: int) -> None:
        if fd == primary_fd:  # the loopback secondary fsyncs too
            seen.append(any(isinstance(op, Fsync) for op in pair.rec.ops))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    waited = pair.rec.waited
    pair.fs.fsync(None, 0, fi)
    assert seen == [True], "the Fsync record is submitted before the local fsync"
    assert pair.rec.waited == waited + 1, "and waited for after it"
    pair.fs.release(None, fi)
    pair.check()


@pytest.mark.parametrize("caller", [CALLER, (0, 0)])
def test_created_files_get_the_callers_owner_and_every_mode_bit(pair, caller):
    pair.fs.caller = lambda: caller
    made = {}
    for name, mode in (("setid", 0o6755), ("open", 0o777), ("private", 0o600)):
        fi = pair.create(f"/{name}", mode)
        pair.fs.release(None, fi)
        made[name] = mode
    pair.check()
    for name, mode in made.items():
        for st in (os.stat(pair.p(name)), os.stat(pair.s(name))):
            assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (*caller, mode), name
    opened = [op for op in pair.rec.ops if isinstance(op, Open)]
    assert [(op.uid, op.gid, op.mode) for op in opened] == [(*caller, m) for m in made.values()]


def test_fallocate_modes_and_punched_holes(pair):
    fi = pair.create("/f")
    pair.write(fi, b"\xab" * (1 << 20), 0)
    pair.fs.fallocate(None, 0, 2 << 20, 1 << 20, fi)
    keep = syscalls.FALLOC_FL_KEEP_SIZE
    pair.fs.fallocate(None, keep, 8 << 20, 1 << 20, fi)
    pair.fs.fallocate(None, keep | syscalls.FALLOC_FL_PUNCH_HOLE, 256 << 10, 256 << 10, fi)
    pair.fs.release(None, fi)
    pair.check()
    fd = os.open(pair.s("f"), os.O_RDONLY)
    try:
        assert os.pread(fd, 4, 300 << 10) == b"\0\0\0\0"
        assert data_map(fd, os.fstat(fd).st_size)[0] == (0, 256 << 10)
    finally:
        os.close(fd)


def test_sparse_file_with_a_write_beyond_4_gib(pair):
    fi = pair.create("/sparse")
    pair.write(fi, b"head", 0)
    pair.write(fi, b"tail beyond four gibibytes", FIVE_GIB)
    pair.fs.release(None, fi)
    pair.check()
    st = os.stat(pair.s("sparse"))
    assert st.st_size == FIVE_GIB + 26
    assert st.st_blocks * 512 < 1 << 20, "the hole stays a hole on the secondary"


def test_fifo_nodes_replicate_and_device_nodes_are_refused(pair):
    pair.fs.mknod("/fifo", stat.S_IFIFO | 0o600, 0)
    with pytest.raises(OSError) as info:
        pair.fs.mknod("/dev", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    assert info.value.errno == errno.EPERM
    pair.check()
    assert stat.S_ISFIFO(os.lstat(pair.s("fifo")).st_mode)


def test_read_only_opens_are_not_replicated(pair):
    fi = pair.create("/f")
    pair.write(fi, b"data", 0)
    pair.fs.release(None, fi)
    count = len(pair.rec.ops)
    ro = pair.open("/f", os.O_RDONLY)
    assert pair.fs.read(None, 10, 0, ro) == b"data"
    pair.fs.release(None, ro)
    assert len(pair.rec.ops) == count
    pair.check()


def test_readdir_getattr_statfs_readlink_pass_through(pair):
    pair.fs.mkdir("/d", 0o755)
    pair.fs.symlink("/d/l", "target")
    listing = pair.fs.readdir("/d", 0)
    assert [name for name, _attrs, _off in listing] == [".", "..", "l"]
    assert listing[0][1]["st_ino"] == os.stat(pair.p("d")).st_ino
    assert listing[1][1]["st_ino"] == os.stat(pair.primary).st_ino
    assert pair.fs.readlink("/d/l") == "target"
    attrs = pair.fs.getattr("/d")
    assert stat.S_ISDIR(attrs["st_mode"])
    assert attrs["st_mtime"] == os.stat(pair.p("d")).st_mtime_ns
    assert pair.fs.statfs("/")["f_bsize"] > 0
    with pytest.raises(FileNotFoundError):
        pair.fs.getattr("/missing")
    pair.check()


def test_local_errors_reach_the_application_and_replicate_nothing(pair):
    count = len(pair.rec.ops)
    with pytest.raises(FileNotFoundError):
        pair.fs.unlink("/missing")
    pair.fs.mkdir("/d", 0o755)
    with pytest.raises(FileExistsError):
        pair.fs.mkdir("/d", 0o755)
    assert len(pair.rec.ops) == count + 1  # only the first mkdir
    pair.check()


class Failing:
    """A Replicator whose peer is gone."""

    def __init__(self):
        self.calls = 0

    def submit(self, op):
        self.calls += 1
        raise ReplicationUnavailable("peer n2 is unreachable")

    def wait(self, ticket):  # pragma: no cover - submit never returns a ticket
        raise AssertionError("wait without ticket")


def test_a_failing_replicator_never_fails_the_local_operation(tmp_path):
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    failing = Failing()
    fs = ReplicatedOperations(fd, failing, caller=lambda: CALLER)
    try:
        fi = mfusepy.fuse_file_info()
        fi.flags = os.O_WRONLY | os.O_CREAT
        fs.create("/f", 0o600, fi)
        assert fs.write(None, b"kept locally", 0, fi) == 12
        fs.fsync(None, 0, fi)
        fs.release(None, fi)
        fs.mkdir("/d", 0o700)
    finally:
        fs.destroy("/")
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == b"kept locally"
    assert (tmp_path / "d").is_dir()
    assert failing.calls == 5  # Open, Write, Fsync, Release, Mkdir
    assert fs.replication_failures == 5
    assert "peer n2 is unreachable" in (fs.last_failure or "")


def test_concurrent_writers_on_one_file_and_many_files_stay_in_order(pair):
    shared = [pair.create("/shared") for _ in range(4)]
    own = [pair.create(f"/own{i}") for i in range(4)]
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            for n in range(150):
                pair.write(shared[i], bytes([65 + i]) * 5000, (n * 7 + i * 13) % 40 * 1000)
                pair.write(own[i], os.urandom(3000), n * 3000)
                if n % 50 == 49:
                    pair.fs.truncate(None, 20_000 + i, fh=shared[i])
                    pair.fs.truncate(f"/own{i}", n * 1000)
        except BaseException as exc:  # surfaced in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,), name=f"rt-writer-{i}") for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    for fi in shared + own:
        pair.fs.release(None, fi)
    pair.check()


def test_open_records_carry_the_owner_and_the_real_mode(pair):
    fi = pair.create("/d.txt", 0o664)
    pair.fs.release(None, fi)
    opens = [op for op in pair.rec.ops if isinstance(op, Open)]
    assert opens[0].created and (opens[0].uid, opens[0].gid, opens[0].mode) == (*CALLER, 0o664)
    assert [s.path for s in opens[0].stamps] == ["", "d.txt"]
    writes = [op for op in pair.rec.ops if isinstance(op, Write)]
    assert writes == []
    pair.check()


def test_resync_can_hold_the_ordering_locks_to_freeze_an_inode(pair):
    fi = pair.create("/f")
    ino = os.stat(pair.p("f")).st_ino
    writer = threading.Thread(
        target=pair.write, args=(fi, b"blocked", 0), name="rt-blocked-writer", daemon=True
    )
    with pair.fs.namespace(), pair.fs.inode(ino):
        writer.start()
        writer.join(0.3)  # the observation window: the write must not get through
        assert writer.is_alive()
        assert not any(isinstance(op, Write) for op in pair.rec.ops)
    writer.join(10)
    assert not writer.is_alive()
    assert [op.data for op in pair.rec.ops if isinstance(op, Write)] == [b"blocked"]
    pair.fs.release(None, fi)
    pair.check()


def test_o_direct_opens_accept_unaligned_buffers(pair):
    fi = pair.create("/direct", flags=os.O_WRONLY | os.O_DIRECT)
    pair.write(fi, b"unaligned", 3)
    pair.fs.release(None, fi)
    pair.check()


class Pushing:
    """A Replicator with ``push``: notes the order of submit, push and wait."""

    def __init__(self, events: list[str], fail_push: bool = False):
        self.events = events
        self.fail_push = fail_push

    def submit(self, op):
        self.events.append(f"submit {type(op).__name__}")
        return type(op).__name__

    def push(self, ticket):
        self.events.append(f"push {ticket}")
        if self.fail_push:
            raise ReplicationUnavailable("peer n2 is unreachable")

    def wait(self, ticket):
        self.events.append(f"wait {ticket}")


@pytest.mark.parametrize("fail_push", [False, True])
def test_the_fsync_record_is_pushed_before_the_local_fsync(tmp_path, monkeypatch, fail_push):
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    events: list[str] = []
    fs = ReplicatedOperations(fd, Pushing(events, fail_push), caller=lambda: CALLER)
    real_fsync = os.fsync
    try:
        fi = mfusepy.fuse_file_info()
        fi.flags = os.O_WRONLY | os.O_CREAT
        fs.create("/f", 0o600, fi)
        fs.write(None, b"pushed", 0, fi)
        local = fs._files[fi.fh].fd

        def fsync(f: int) -> None:
            if f == local:
                events.append("local fsync")
            real_fsync(f)

        monkeypatch.setattr(os, "fsync", fsync)
        del events[:]
        assert fs.fsync(None, 0, fi) == 0
        fs.release(None, fi)
    finally:
        fs.destroy("/")
        os.close(fd)
    # writes are not pushed (they are sent by the wait that follows at once)
    assert events == [
        "submit Fsync",
        "push Fsync",
        "local fsync",
        "wait Fsync",
        "submit Release",
    ]
    assert fs.replication_failures == (1 if fail_push else 0)
    assert (tmp_path / "f").read_bytes() == b"pushed"
