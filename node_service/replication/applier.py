"""The secondary's applier: operation records → the replicated directory.

``Applier(root_fd)`` applies operations strictly in the order given, with
*at() calls relative to a descriptor of the replicated directory opened
before its read-only bind mount (see mount.protect_readonly), so local
processes see a read-only tree while the applier still writes.

Paths are resolved one component at a time with O_PATH|O_NOFOLLOW|O_DIRECTORY
and final names are acted on without following symlinks: a record can never
make the applier write outside the tree, even if the tree holds a symlink
to /etc. The descriptors of recently used directories are kept
(``DirCache``): nothing but this applier changes the tree, so a directory's
descriptor stays right until the applier itself renames or removes that
directory or one above it, which drops it.

Failures (ENOSPC, EIO, a name that should exist and does not...) raise
SecondaryApplyError; they are never swallowed, because the transport must
mark the secondary stale. ``replay=True`` is for re-applying records that may
already have been applied before a crash: namespace operations whose effect
is already present (mkdir of an existing directory, unlink of a missing name,
rename whose source is gone and destination present) then count as done.

``LoopbackReplicator`` is a Replicator that applies to a second local
directory through an Applier — for tests and the local benchmark.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import queue
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from node_service.replication import syscalls
from node_service.replication.ops import (
    Chmod,
    Chown,
    Fallocate,
    Fsync,
    Link,
    Mkdir,
    Mknod,
    Op,
    Open,
    Release,
    Rename,
    ReplicationUnavailable,
    Rmdir,
    SecondaryApplyError,
    Stamp,
    Symlink,
    Truncate,
    UnknownHandleError,
    Unlink,
    Utimens,
    Write,
    decode,
    describe,
    encode,
)

log = logging.getLogger(__name__)

_WALK = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Flags from the primary's open that matter on the secondary; O_APPEND is
# dropped on purpose: writes carry the offset the primary actually used.
_KEPT_FLAGS = os.O_SYNC | os.O_DSYNC | os.O_TRUNC
DIR_CACHE_SIZE = 256  # directory descriptors kept open (1,000 files per dir: one walk per dir)


class DirCache:
    """Descriptors of directories below ``root_fd``, by relative path (least recently used out).

    Each one was reached by a walk that never followed a symlink; it stays
    valid while the directory keeps its path, so ``forget`` must be called
    before a directory (or one above it) is renamed or removed. ``get`` never
    closes anything (a descriptor handed out stays open while an operation
    uses it, even one naming two deep paths); ``trim`` after each operation.
    """

    def __init__(self, root_fd: int, size: int = DIR_CACHE_SIZE):
        self.root_fd = root_fd
        self.size = size
        self._fds: collections.OrderedDict[str, int] = collections.OrderedDict()

    def get(self, rel: str) -> int:
        """The descriptor of directory ``rel`` ('' = the root); owned by the cache."""
        if not rel:
            return self.root_fd
        fd = self._fds.get(rel)
        if fd is not None:
            self._fds.move_to_end(rel)
            return fd
        up, _, name = rel.rpartition("/")
        fd = os.open(name, _WALK, dir_fd=self.get(up))
        self._fds[rel] = fd
        return fd

    def trim(self) -> None:
        """Close the least recently used beyond ``size``."""
        while len(self._fds) > self.size:
            os.close(self._fds.popitem(last=False)[1])

    def forget(self, rel: str) -> None:
        """Drop ``rel`` and everything below it."""
        prefix = rel + "/"
        for path in [p for p in self._fds if p == rel or p.startswith(prefix)]:
            os.close(self._fds.pop(path))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class Applier:
    """Applies operation records to the tree under ``root_fd``; owns the handle table."""

    def __init__(self, root_fd: int, *, replay: bool = False):
        self.root_fd = root_fd
        self.replay = replay
        self._handles: dict[int, int] = {}
        self._dirs = DirCache(root_fd)

    # -- plumbing ---------------------------------------------------------

    @contextmanager
    def _parent(self, path: str) -> Iterator[tuple[int, str]]:
        """Yield (descriptor of the parent directory, final name) without following symlinks."""
        up, _, name = path.rpartition("/")
        yield self._dirs.get(up), name

    def _fd(self, op: Op, handle: int) -> int:
        try:
            return self._handles[handle]
        except KeyError:
            raise UnknownHandleError(
                op, None, f"secondary has no open handle {handle} for {describe(op)}; resync needed"
            ) from None

    def _stamp(self, stamps: tuple[Stamp, ...], opened: tuple[str, int] | None = None) -> None:
        """Set each stamped mtime; ``opened``: (path, fd) of a file just opened."""
        for s in stamps:
            if s.path == "":
                syscalls.set_times(self.root_fd, "", None, s.mtime_ns, fd=self.root_fd)
                continue
            if opened is not None and s.path == opened[0]:
                syscalls.set_times(-1, "", None, s.mtime_ns, fd=opened[1])
                continue
            with self._parent(s.path) as (parent, name):
                try:
                    syscalls.set_times(parent, name, None, s.mtime_ns)
                except FileNotFoundError:
                    # a later operation already removed it (replay) or the
                    # stamped name was the one just removed: nothing to stamp
                    if not self.replay:
                        raise

    @property
    def open_handles(self) -> int:
        return len(self._handles)

    def close(self) -> None:
        for fd in self._handles.values():
            os.close(fd)
        self._handles.clear()
        self._dirs.close()

    # -- the one entry point ------------------------------------------------

    def apply(self, op: Op) -> None:
        """Apply ``op``; raise SecondaryApplyError (never anything else from the OS)."""
        method = getattr(self, "_apply_" + type(op).__name__.lower())
        try:
            method(op)
        except SecondaryApplyError:
            raise
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise SecondaryApplyError(
                op, exc.errno, f"secondary could not apply {describe(op)}: {reason}"
            ) from exc
        finally:
            self._dirs.trim()  # only now: the op may have used any descriptor it got

    # -- data operations ----------------------------------------------------

    def _apply_open(self, op: Open) -> None:
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | (op.flags & _KEPT_FLAGS)
        if op.created:
            flags |= os.O_CREAT
        with self._parent(op.path) as (parent, name):
            fd = os.open(name, flags, op.mode & 0o7777, dir_fd=parent)
        old = self._handles.pop(op.handle, None)
        if old is not None:  # replay of an Open already applied
            os.close(old)
        self._handles[op.handle] = fd
        if op.created:
            st = os.fstat(fd)
            chowned = (st.st_uid, st.st_gid) != (op.uid, op.gid)
            if chowned:
                os.fchown(fd, op.uid, op.gid)
            # after a chown always: it clears set-id bits that the chmod restores
            if chowned or stat.S_IMODE(st.st_mode) != op.mode & 0o7777:
                os.fchmod(fd, op.mode & 0o7777)
        self._stamp(op.stamps, (op.path, fd))

    def _apply_write(self, op: Write) -> None:
        fd = self._fd(op, op.handle)
        view = memoryview(op.data)
        done = 0
        while done < len(view):
            n = os.pwrite(fd, view[done:], op.offset + done)
            if n == 0:
                raise OSError(errno.EIO, "short write")
            done += n
        syscalls.set_times(-1, "", None, op.mtime_ns, fd=fd)

    def _apply_truncate(self, op: Truncate) -> None:
        if op.handle:
            fd = self._fd(op, op.handle)
            os.ftruncate(fd, op.size)
            syscalls.set_times(-1, "", None, op.mtime_ns, fd=fd)
            return
        with self._parent(op.path) as (parent, name):
            fd = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        try:
            os.ftruncate(fd, op.size)
            syscalls.set_times(-1, "", None, op.mtime_ns, fd=fd)
        finally:
            os.close(fd)

    def _apply_fsync(self, op: Fsync) -> None:
        fd = self._fd(op, op.handle)
        (os.fdatasync if op.datasync else os.fsync)(fd)

    def _apply_fallocate(self, op: Fallocate) -> None:
        fd = self._fd(op, op.handle)
        syscalls.fallocate(fd, op.mode, op.offset, op.length)
        syscalls.set_times(-1, "", None, op.mtime_ns, fd=fd)

    def _apply_release(self, op: Release) -> None:
        fd = self._handles.pop(op.handle, None)
        if fd is not None:
            os.close(fd)

    # -- namespace operations -----------------------------------------------

    def _owner_and_mode(self, parent: int, name: str, uid: int, gid: int, mode: int) -> None:
        os.chown(name, uid, gid, dir_fd=parent, follow_symlinks=False)
        os.chmod(name, mode & 0o7777, dir_fd=parent, follow_symlinks=False)

    def _apply_mkdir(self, op: Mkdir) -> None:
        with self._parent(op.path) as (parent, name):
            try:
                os.mkdir(name, op.mode & 0o7777, dir_fd=parent)
            except FileExistsError:
                st = os.stat(name, dir_fd=parent, follow_symlinks=False)
                if not (self.replay and stat.S_ISDIR(st.st_mode)):
                    raise
            self._owner_and_mode(parent, name, op.uid, op.gid, op.mode)
        self._stamp(op.stamps)

    def _apply_mknod(self, op: Mknod) -> None:
        kind = stat.S_IFMT(op.mode)
        if kind not in (stat.S_IFIFO, stat.S_IFSOCK):
            raise SecondaryApplyError(
                op, errno.EPERM, f"refusing to create device node {op.path!r}"
            )
        with self._parent(op.path) as (parent, name):
            try:
                os.mknod(name, op.mode, 0, dir_fd=parent)
            except FileExistsError:
                if not self.replay:
                    raise
            self._owner_and_mode(parent, name, op.uid, op.gid, op.mode)
        self._stamp(op.stamps)

    def _apply_rmdir(self, op: Rmdir) -> None:
        self._dirs.forget(op.path)
        with self._parent(op.path) as (parent, name):
            try:
                os.rmdir(name, dir_fd=parent)
            except FileNotFoundError:
                if not self.replay:
                    raise
        self._stamp(op.stamps)

    def _apply_unlink(self, op: Unlink) -> None:
        with self._parent(op.path) as (parent, name):
            try:
                os.unlink(name, dir_fd=parent)
            except FileNotFoundError:
                if not self.replay:
                    raise
        self._stamp(op.stamps)

    def _apply_rename(self, op: Rename) -> None:
        self._dirs.forget(op.src)
        self._dirs.forget(op.dst)  # a directory it replaces
        with self._parent(op.src) as (sp, sname), self._parent(op.dst) as (dp, dname):
            try:
                os.rename(sname, dname, src_dir_fd=sp, dst_dir_fd=dp)
            except FileNotFoundError:
                # replay: already renamed if the source is gone and the destination exists
                if not (self.replay and _exists(dp, dname) and not _exists(sp, sname)):
                    raise
        self._stamp(op.stamps)

    def _apply_symlink(self, op: Symlink) -> None:
        with self._parent(op.path) as (parent, name):
            try:
                os.symlink(op.target, name, dir_fd=parent)
            except FileExistsError:
                if not (self.replay and _readlink(parent, name) == op.target):
                    raise
            os.chown(name, op.uid, op.gid, dir_fd=parent, follow_symlinks=False)
        self._stamp(op.stamps)

    def _apply_link(self, op: Link) -> None:
        with self._parent(op.src) as (sp, sname), self._parent(op.dst) as (dp, dname):
            try:
                os.link(sname, dname, src_dir_fd=sp, dst_dir_fd=dp, follow_symlinks=False)
            except FileExistsError:
                same = _same_inode(sp, sname, dp, dname)
                if not (self.replay and same):
                    raise
        self._stamp(op.stamps)

    # -- attributes ----------------------------------------------------------

    @contextmanager
    def _target(self, op: Chmod | Chown | Utimens) -> Iterator[tuple[int, str, int | None]]:
        """(dir fd, name, fd or None): what a setattr operation acts on."""
        if op.handle:
            yield -1, "", self._fd(op, op.handle)
        elif op.path == "":
            yield -1, "", self.root_fd
        else:
            with self._parent(op.path) as (parent, name):
                yield parent, name, None

    def _apply_chmod(self, op: Chmod) -> None:
        with self._target(op) as (parent, name, fd):
            if fd is not None:
                os.fchmod(fd, op.mode & 0o7777)
            elif not stat.S_ISLNK(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode):
                # a symlink has no mode of its own on Linux: nothing to do
                os.chmod(name, op.mode & 0o7777, dir_fd=parent, follow_symlinks=False)

    def _apply_chown(self, op: Chown) -> None:
        with self._target(op) as (parent, name, fd):
            if fd is not None:
                os.fchown(fd, op.uid, op.gid)
            else:
                os.chown(name, op.uid, op.gid, dir_fd=parent, follow_symlinks=False)

    def _apply_utimens(self, op: Utimens) -> None:
        with self._target(op) as (parent, name, fd):
            syscalls.set_times(parent, name, op.atime_ns, op.mtime_ns, fd=fd)


def _exists(parent: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _readlink(parent: int, name: str) -> str | None:
    try:
        return os.readlink(name, dir_fd=parent)
    except OSError:
        return None


def _same_inode(p1: int, n1: str, p2: int, n2: str) -> bool:
    try:
        a = os.stat(n1, dir_fd=p1, follow_symlinks=False)
        b = os.stat(n2, dir_fd=p2, follow_symlinks=False)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class LoopbackReplicator:
    """A Replicator that applies every operation to a local directory, in order.

    Each submitted operation goes through the wire codec (encode, decode) as it
    would over the network. ``threaded=True`` applies in a named worker thread
    so submitters pipeline as with the real transport, and ``wait`` returns
    once the operation is applied (the ``sync`` mode). After an apply error the
    replicator is stale: ``error`` holds it, and submit/wait raise
    ReplicationUnavailable.
    """

    WAIT_TIMEOUT_S = 30.0

    def __init__(self, dest_root_fd: int, *, threaded: bool = True, maxsize: int = 4096):
        self.applier = Applier(dest_root_fd)
        self.error: SecondaryApplyError | None = None
        self._submitted = 0
        self._applied = 0
        self._cond = threading.Condition()
        self._submit_lock = threading.Lock()
        self._queue: queue.Queue[tuple[int, bytes] | None] | None = None
        self._thread: threading.Thread | None = None
        if threaded:
            self._queue = queue.Queue(maxsize)
            self._thread = threading.Thread(
                target=self._run, name="rampart-repl-loopback", daemon=True
            )
            self._thread.start()

    def submit(self, op: Op) -> int:
        if self.error is not None:
            raise ReplicationUnavailable(f"loopback secondary is stale: {self.error}")
        record = encode(op)
        with self._submit_lock:
            self._submitted += 1
            seq = self._submitted
            if self._queue is not None:
                self._queue.put((seq, record))
                return seq
            self._apply(seq, record)
        return seq

    def wait(self, ticket: object) -> None:
        assert isinstance(ticket, int)
        with self._cond:
            done = self._cond.wait_for(
                lambda: self._applied >= ticket or self.error is not None, self.WAIT_TIMEOUT_S
            )
        if self.error is not None:
            raise ReplicationUnavailable(f"loopback secondary is stale: {self.error}")
        if not done:
            raise ReplicationUnavailable(f"operation {ticket} not applied within the timeout")

    def drain(self) -> None:
        """Wait until everything submitted so far is applied (or failed)."""
        with self._submit_lock:
            last = self._submitted
        if last:
            self.wait(last)

    def _apply(self, seq: int, record: bytes) -> None:
        try:
            if self.error is None:
                self.applier.apply(decode(record))
        except SecondaryApplyError as exc:
            log.warning("loopback secondary stale: %s", exc)
            self.error = exc
        with self._cond:
            self._applied = seq
            self._cond.notify_all()

    def _run(self) -> None:
        assert self._queue is not None
        while (item := self._queue.get()) is not None:
            self._apply(*item)

    def close(self) -> None:
        if self._thread is not None and self._queue is not None:
            self._queue.put(None)
            self._thread.join(self.WAIT_TIMEOUT_S)
            self._thread = None
        self.applier.close()

    def __enter__(self) -> LoopbackReplicator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
