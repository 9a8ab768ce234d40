"""The primary's FUSE filesystem: passthrough to the real directory, plus replication.

``ReplicatedOperations`` is an mfusepy ``Operations`` class and only
translates: each call is applied to the real directory through a descriptor
opened before the mount (so the mount does not hide it), with *at() calls,
and every mutating call is handed to a ``Replicator`` as an operation record
(ops.py) in the same order it was applied locally. No networking and no
storage here: the Replicator (transport, dirty tracking) lives elsewhere.

Ordering, without serialising the whole filesystem (docs/dev/replication.md):

- namespace operations (and anything that names a path) apply and submit
  under one short namespace lock, so their records are totally ordered;
- operations on an inode's data or attributes (write, truncate, fallocate,
  chmod, chown, utimens, O_TRUNC) apply and submit under that inode's stripe
  lock, so records touching one inode are in local order;
- waiting for the Replicator happens after the locks are released, so many
  writes are in flight at once.

If the Replicator raises, the local operation still succeeds (the transport
has gone ALONE and tracks dirty regions); only local errors reach the
application, as the errno of the failed syscall. The exception is a
``FatalError`` (the dirty log cannot be written): then nothing would remember
what the secondary lacks, so that call and every later mutating call fail
with EIO and ``on_fatal`` is told once, so the module stops or fails over.

Open files get a *handle* id (never reused) as FUSE ``fh``; the real
descriptor stays here. The file info of mfusepy's raw_fi mode is used so
``direct_io`` can be set per open.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mfusepy

from node_service.errors import FatalError
from node_service.replication import syscalls
from node_service.replication.fs_namespace import NamespaceCalls
from node_service.replication.fs_namespace import at_path as _at
from node_service.replication.fs_namespace import parent_path as _parent
from node_service.replication.fs_namespace import rel_path as _rel
from node_service.replication.ops import (
    Chmod,
    Chown,
    Fallocate,
    Fsync,
    Op,
    Open,
    Release,
    Replicator,
    Stamp,
    Truncate,
    Utimens,
    Write,
    describe,
)

__all__ = ["NOW", "ReplicatedOperations", "Replicator"]

log = logging.getLogger(__name__)

NOW = syscalls.NOW
STRIPES = 64
# How long the kernel may trust a lookup, a missing name and attributes. Safe
# to cache: on the primary every change goes through this mount (resync
# writes only to the secondary), and each change through the mount refreshes
# or invalidates what the kernel cached for the names and inodes it touched.
CACHE_TIMEOUT_S = 1.0
# Flags that must not reach the real descriptor: the offset of every write is
# the one the kernel chose (O_APPEND would make pwrite ignore it), creation is
# done explicitly, a truncation is done under the inode lock, and FUSE hands
# us buffers with no O_DIRECT alignment.
_DROPPED = os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_NOCTTY | os.O_DIRECT
_STAT_KEYS = ("st_mode", "st_ino", "st_nlink", "st_uid", "st_gid", "st_size", "st_blocks")


def fuse_caller() -> tuple[int, int]:
    """uid, gid of the process making the current FUSE request."""
    try:
        uid, gid, _pid = mfusepy.fuse_get_context()
    except ValueError:  # not inside a FUSE request (direct calls)
        return os.getuid(), os.getgid()
    return uid, gid


@dataclass
class _File:
    fd: int
    ino: int
    replicated: bool  # opened for writing: the secondary has this handle too


def _mode(entry: os.DirEntry[str]) -> int:
    return entry.stat(follow_symlinks=False).st_mode


def _writing(flags: int) -> bool:
    return (flags & os.O_ACCMODE) != os.O_RDONLY or bool(flags & os.O_TRUNC)


class ReplicatedOperations(NamespaceCalls, mfusepy.Operations):
    """Passthrough over ``root_fd`` that reports every change to ``replicator``."""

    use_ns = True

    def __init__(
        self,
        root_fd: int,
        replicator: Replicator,
        *,
        caller: Callable[[], tuple[int, int]] = fuse_caller,
        on_fatal: Callable[[str], None] | None = None,
    ):
        self.root_fd = root_fd
        self.replicator = replicator
        self.caller = caller
        self.on_fatal = on_fatal
        self.mounted = threading.Event()
        self.replication_failures = 0
        self.last_failure: str | None = None
        # Set once a FatalError came back: mutating calls fail with EIO from then on.
        self.fatal: str | None = None
        self._ns_lock = threading.Lock()
        self._stripes = tuple(threading.Lock() for _ in range(STRIPES))
        self._files: dict[int, _File] = {}
        self._handles = itertools.count(1)

    # -- ordering locks (also used by online resync: namespace before inode) ----

    def namespace(self) -> threading.Lock:
        """While held, no path-naming operation is applied and submitted."""
        return self._ns_lock

    def inode(self, ino: int) -> threading.Lock:
        """While held, no data or attribute operation on ``ino`` is applied and submitted."""
        return self._stripes[ino % STRIPES]

    _stripe = inode

    # -- replication plumbing -------------------------------------------------

    def _submit(self, op: Op) -> object | None:
        """Hand ``op`` over; call with the ordering lock held. None if refused."""
        try:
            return self.replicator.submit(op)
        except FatalError as exc:  # reported by the _wait that follows
            self._fatal(op, exc)
            return None
        except Exception as exc:  # the peer's trouble never fails the local call
            self._failed(op, exc)
            return None

    def _wait(self, ticket: object | None, op: Op) -> None:
        """Wait outside the locks; EIO once the dirty log has failed."""
        if ticket is not None:
            try:
                self.replicator.wait(ticket)
            except FatalError as exc:
                self._fatal(op, exc)
            except Exception as exc:
                self._failed(op, exc)
        if self.fatal is not None:
            raise mfusepy.FuseOSError(errno.EIO)

    def _push(self, ticket: object | None, op: Op) -> None:
        """Start sending ``op`` from this thread (outside the locks), if the Replicator can.

        Optional in the protocol: a Replicator without ``push`` sends when
        waited for. Failures are the transport's, as in ``_wait``.
        """
        push = getattr(self.replicator, "push", None)
        if ticket is None or push is None:
            return
        try:
            push(ticket)
        except FatalError as exc:
            self._fatal(op, exc)
        except Exception as exc:
            self._failed(op, exc)

    def _wait_open(self, handle: int, ticket: object | None, op: Op) -> None:
        """``_wait`` for open/create: a failed open must not leave its descriptor behind."""
        try:
            self._wait(ticket, op)
        except OSError:
            entry = self._files.pop(handle, None)
            if entry is not None:
                os.close(entry.fd)
            raise

    def _fatal(self, op: Op, exc: Exception) -> None:
        # Swallowing this would let the application believe in writes that no
        # dirty log remembers: a silent gap after the next failover.
        self.replication_failures += 1
        self.last_failure = f"{describe(op)} not replicated: {exc}"
        if self.fatal is None:  # the first cause is the one worth reporting
            self.fatal = self.last_failure
            log.error("replication failed for good, writes now fail with EIO: %s", self.fatal)
            if self.on_fatal is not None:
                self.on_fatal(self.fatal)

    def _failed(self, op: Op, exc: Exception) -> None:
        self.replication_failures += 1
        reason = f"{describe(op)} not replicated: {exc}"
        if self.last_failure is None:
            log.warning("replication degraded: %s", reason)
        self.last_failure = reason

    def _stamps(self, *rels: str) -> tuple[Stamp, ...]:
        out: dict[str, Stamp] = {}
        for rel in rels:
            if rel not in out:
                st = os.stat(_at(rel), dir_fd=self.root_fd, follow_symlinks=False)
                out[rel] = Stamp(rel, st.st_mtime_ns)
        return tuple(out.values())

    def _owner_for(self, parent_rel: str) -> tuple[int, int]:
        return self._owner_in(os.stat(_at(parent_rel), dir_fd=self.root_fd))

    def _owner_in(self, parent: os.stat_result) -> tuple[int, int]:
        uid, gid = self.caller()
        if parent.st_mode & stat.S_ISGID:  # BSD group semantics of a set-gid directory
            gid = parent.st_gid
        return uid, gid

    def _own(self, fd: int, mode: int, parent: os.stat_result) -> os.stat_result:
        """Give a file just created the caller's owner and ``mode``; return its stat.

        Only the syscalls that change something: a root caller's file already
        has the right owner, and this process's umask usually left the mode
        as asked.
        """
        uid, gid = self._owner_in(parent)
        st = os.fstat(fd)
        chowned = (st.st_uid, st.st_gid) != (uid, gid)
        if chowned:
            os.fchown(fd, uid, gid)
        # after a chown always: it clears set-id bits that the chmod restores
        if chowned or stat.S_IMODE(st.st_mode) != mode:
            os.fchmod(fd, mode)
            st = os.fstat(fd)
        return st

    def _file(self, fi: Any) -> _File:
        return self._files[fi.fh]

    # -- lifecycle ------------------------------------------------------------

    def init_with_config(self, conn_info: Any, config_3: Any) -> None:
        if config_3 is not None:
            config_3.use_ino = 1  # hard links show one inode, as on the real fs
            config_3.hard_remove = 1  # unlink for real; open handles keep the inode
            config_3.direct_io = 1
            config_3.entry_timeout = CACHE_TIMEOUT_S
            config_3.attr_timeout = CACHE_TIMEOUT_S
            config_3.negative_timeout = CACHE_TIMEOUT_S
        self.mounted.set()

    def destroy(self, path: str) -> None:
        for handle in list(self._files):
            os.close(self._files.pop(handle).fd)

    # -- reading (not replicated) ----------------------------------------------

    def getattr(self, path: str | None, fh: Any = None) -> dict[str, Any]:
        if fh is not None and fh.fh in self._files:
            st = os.fstat(self._files[fh.fh].fd)
        else:
            st = os.stat(_at(_rel(path)), dir_fd=self.root_fd, follow_symlinks=False)
        attrs = {key: getattr(st, key) for key in _STAT_KEYS}
        attrs.update(
            st_atime=st.st_atime_ns,
            st_mtime=st.st_mtime_ns,
            st_ctime=st.st_ctime_ns,
            st_rdev=st.st_rdev,
            st_blksize=st.st_blksize,
        )
        return attrs

    def readlink(self, path: str) -> str:
        return os.readlink(_rel(path), dir_fd=self.root_fd)

    def readdir(self, path: str, fh: int) -> list[Any]:
        rel = _rel(path)
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
        fd = os.open(_at(rel), flags, dir_fd=self.root_fd)
        try:
            here = os.fstat(fd).st_ino
            with os.scandir(fd) as entries:
                listed = [(e.name, {"st_mode": _mode(e), "st_ino": e.inode()}, 0) for e in entries]
        finally:
            os.close(fd)
        # with use_ino the kernel drops entries whose inode is 0, so '.' and '..' need theirs
        up = os.stat(_at(_parent(rel)), dir_fd=self.root_fd).st_ino if rel else here
        dots = [(".", {"st_mode": stat.S_IFDIR, "st_ino": here}, 0)]
        dots.append(("..", {"st_mode": stat.S_IFDIR, "st_ino": up}, 0))
        return dots + listed

    def statfs(self, path: str) -> dict[str, int]:
        sv = os.fstatvfs(self.root_fd)
        keys = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files")
        return {k: getattr(sv, k) for k in (*keys, "f_flag", "f_frsize", "f_namemax")}

    def read(self, path: str | None, size: int, offset: int, fh: Any) -> bytes:
        return os.pread(self._file(fh).fd, size, offset)

    # No flush: writes are done (and waited for) when write returns, so FLUSH
    # would have nothing to do. Left undefined, libfuse answers ENOSYS once
    # and the kernel stops sending it: one round trip less per close(2).

    # -- open, create, release -----------------------------------------------

    def _register(self, fd: int, replicated: bool, fi: Any, ino: int | None = None) -> int:
        handle = next(self._handles)
        self._files[handle] = _File(fd, os.fstat(fd).st_ino if ino is None else ino, replicated)
        fi.fh = handle
        fi.direct_io = 1
        return handle

    def open(self, path: str, fi: Any) -> int:
        rel, flags = _rel(path), fi.flags
        real = (flags & ~_DROPPED) | os.O_NOFOLLOW | os.O_CLOEXEC
        if not _writing(flags):
            self._register(os.open(rel, real, dir_fd=self.root_fd), False, fi)
            return 0
        if (flags & os.O_ACCMODE) == os.O_RDONLY:
            real = (real & ~os.O_ACCMODE) | os.O_RDWR  # O_RDONLY|O_TRUNC still truncates
        with self._ns_lock:
            fd = os.open(rel, real, dir_fd=self.root_fd)
            handle = self._register(fd, True, fi)
            ticket, op = self._open_record(handle, rel, flags, fd, created=False)
        self._wait_open(handle, ticket, op)
        return 0

    def create(self, path: str, mode: int, fi: Any) -> int:
        rel, flags = _rel(path), fi.flags
        real = (flags & ~_DROPPED) | os.O_NOFOLLOW | os.O_CLOEXEC
        if (flags & os.O_ACCMODE) == os.O_RDONLY:
            real = (real & ~os.O_ACCMODE) | os.O_RDWR
        with self._ns_lock:
            try:
                fd = os.open(rel, real | os.O_CREAT | os.O_EXCL, mode & 0o7777, dir_fd=self.root_fd)
            except FileExistsError:
                if flags & os.O_EXCL:
                    raise
                fd = os.open(rel, real, dir_fd=self.root_fd)
                handle = self._register(fd, True, fi)
                ticket, op = self._open_record(handle, rel, flags, fd, created=False)
            else:
                try:
                    # read after the create: its mtime is the one to stamp
                    parent = os.stat(_at(_parent(rel)), dir_fd=self.root_fd)
                    st = self._own(fd, mode & 0o7777, parent)
                except OSError:
                    os.close(fd)
                    os.unlink(rel, dir_fd=self.root_fd)
                    raise
                handle = self._register(fd, True, fi, st.st_ino)
                with self._stripe(st.st_ino):
                    stamps = (Stamp(_parent(rel), parent.st_mtime_ns), Stamp(rel, st.st_mtime_ns))
                    op = self._open_op(handle, rel, flags, st, True, stamps)
                    ticket = self._submit(op)
        self._wait_open(handle, ticket, op)
        return 0

    @staticmethod
    def _open_op(
        handle: int,
        rel: str,
        flags: int,
        st: os.stat_result,
        created: bool,
        stamps: tuple[Stamp, ...],
    ) -> Open:
        mode = st.st_mode & 0o7777
        return Open(handle, rel, flags, mode, st.st_uid, st.st_gid, created, stamps)

    def _open_record(
        self, handle: int, rel: str, flags: int, fd: int, created: bool
    ) -> tuple[object | None, Op]:
        """Truncate if asked, then submit the Open record (namespace lock held)."""
        ino = self._files[handle].ino
        with self._stripe(ino):
            if flags & os.O_TRUNC and not created:
                os.ftruncate(fd, 0)
            st = os.fstat(fd)
            touched = created or bool(flags & os.O_TRUNC)
            stamps = self._stamps(*((_parent(rel), rel) if created else (rel,) if touched else ()))
            op = self._open_op(handle, rel, flags, st, created, stamps)
            return self._submit(op), op

    def release(self, path: str | None, fh: Any) -> int:
        handle = fh.fh
        entry = self._files.pop(handle, None)
        if entry is None:
            return 0
        os.close(entry.fd)
        if entry.replicated:
            # Every operation on this handle has returned before release is
            # called, so Release follows them; nobody waits on a close.
            self._submit(Release(handle))
        return 0

    # -- data ---------------------------------------------------------------

    def write(self, path: str | None, data: bytes, offset: int, fh: Any) -> int:
        handle = fh.fh
        entry = self._files[handle]
        with self._stripe(entry.ino):
            n = os.pwrite(entry.fd, data, offset)
            op = Write(handle, offset, os.fstat(entry.fd).st_mtime_ns, data[:n])
            ticket = self._submit(op) if entry.replicated else None
        self._wait(ticket, op)
        return n

    def truncate(self, path: str | None, length: int, fh: Any = None) -> int:
        if fh is not None and fh.fh in self._files:
            entry = self._files[fh.fh]
            with self._stripe(entry.ino):
                os.ftruncate(entry.fd, length)
                op: Op = Truncate(fh.fh, "", length, os.fstat(entry.fd).st_mtime_ns)
                ticket = self._submit(op) if entry.replicated else None
            self._wait(ticket, op)
            return 0
        rel = _rel(path)
        flags = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        with self._ns_lock:
            fd = os.open(rel, flags, dir_fd=self.root_fd)
            try:
                with self._stripe(os.fstat(fd).st_ino):
                    os.ftruncate(fd, length)
                    op = Truncate(0, rel, length, os.fstat(fd).st_mtime_ns)
                    ticket = self._submit(op)
            finally:
                os.close(fd)
        self._wait(ticket, op)
        return 0

    def fallocate(self, path: str | None, mode: int, offset: int, size: int, fh: Any) -> int:
        handle = fh.fh
        entry = self._files[handle]
        with self._stripe(entry.ino):
            syscalls.fallocate(entry.fd, mode, offset, size)
            op = Fallocate(handle, mode, offset, size, os.fstat(entry.fd).st_mtime_ns)
            ticket = self._submit(op) if entry.replicated else None
        self._wait(ticket, op)
        return 0

    def fsync(self, path: str | None, datasync: int, fh: Any) -> int:
        entry = self._files[fh.fh]
        op = Fsync(fh.fh, bool(datasync))
        ticket = None
        if entry.replicated:
            # Submitted and sent first so the secondary's fsync runs while ours
            # does. It still follows every write that returned before this call
            # (those were submitted under the same stripe lock), which is all
            # an fsync promises; the application hears back after both.
            with self._stripe(entry.ino):
                ticket = self._submit(op)
            self._push(ticket, op)
        (os.fdatasync if datasync else os.fsync)(entry.fd)
        if entry.replicated:
            self._wait(ticket, op)
        return 0

    # -- attributes --------------------------------------------------------------

    def _setattr(self, path: str | None, fh: Any, apply: Callable[[int | None, str], Op]) -> int:
        """Run ``apply(fd or None, rel)`` under the right locks and submit its record."""
        if fh is not None and fh.fh in self._files:
            entry = self._files[fh.fh]
            with self._stripe(entry.ino):
                op = apply(entry.fd, "")
                ticket = self._submit(op) if entry.replicated else None
            self._wait(ticket, op)
            return 0
        rel = _rel(path)
        with self._ns_lock:
            ino = os.stat(_at(rel), dir_fd=self.root_fd, follow_symlinks=False).st_ino
            with self._stripe(ino):
                op = apply(None, rel)
                ticket = self._submit(op)
        self._wait(ticket, op)
        return 0

    def chmod(self, path: str | None, mode: int, fh: Any = None) -> int:
        def apply(fd: int | None, rel: str) -> Op:
            if fd is not None:
                os.fchmod(fd, mode & 0o7777)
            else:
                os.chmod(_at(rel), mode & 0o7777, dir_fd=self.root_fd, follow_symlinks=False)
            return Chmod(fh.fh if fd is not None else 0, rel, mode & 0o7777)

        return self._setattr(path, fh, apply)

    def chown(self, path: str | None, uid: int, gid: int, fh: Any = None) -> int:
        def apply(fd: int | None, rel: str) -> Op:
            if fd is not None:
                os.fchown(fd, uid, gid)
            else:
                os.chown(_at(rel), uid, gid, dir_fd=self.root_fd, follow_symlinks=False)
            return Chown(fh.fh if fd is not None else 0, rel, uid, gid)

        return self._setattr(path, fh, apply)

    def utimens(
        self, path: str | None, times: tuple[Any, Any] | None = None, fh: Any = None
    ) -> int:
        """``times``: (atime, mtime), each ns, NOW or None (leave as is); None = both NOW."""
        atime, mtime = times if times is not None else (NOW, NOW)

        def apply(fd: int | None, rel: str) -> Op:
            syscalls.set_times(self.root_fd, _at(rel), atime, mtime, fd=fd)
            if fd is not None:
                st = os.fstat(fd)
            else:
                st = os.stat(_at(rel), dir_fd=self.root_fd, follow_symlinks=False)
            handle = fh.fh if fd is not None else 0
            return Utimens(handle, rel, st.st_atime_ns, st.st_mtime_ns)

        return self._setattr(path, fh, apply)
