"""Mounting: the primary's FUSE layer over a replicated directory, the secondary's read-only view.

``mount_replicated(directory, replicator)`` opens the directory *before*
mounting over the same path, so applications keep their paths while the
FUSE layer reaches the real files through that descriptor. libfuse runs in a
named thread of the calling process (the module's replication process);
``unmount()`` always leaves the path unmounted: fusermount3 -u, then a lazy
unmount, then aborting the FUSE connection, each bounded in time.

Permissions: the FUSE process runs as root and acts on the real files as
root, so the kernel must check the caller's rights against the attributes we
report: the mount uses ``default_permissions`` (and ``allow_other`` so every
user reaches it). New files, directories, symlinks and nodes get the
caller's uid/gid (the parent's gid in a set-gid directory), as the real
filesystem would have given them.

``protect_readonly(directory)`` is the secondary's side: it opens the
directory for the applier, then bind-mounts the directory read-only over
itself. Local writers get EROFS; the applier writes through the descriptor,
which still refers to the writable mount underneath.

libfuse installs handlers for SIGHUP/SIGTERM while mounted if the process
left them at their default; a process that wants its own SIGTERM behaviour
sets a handler before mounting (rampartd's replication process does).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import subprocess
import threading
from dataclasses import dataclass, field
from typing import Any

import mfusepy

from node_service.replication import syscalls
from node_service.replication.fs import ReplicatedOperations
from node_service.replication.ops import ReplicationError, Replicator

log = logging.getLogger(__name__)

MOUNT_TIMEOUT_S = 10.0
UNMOUNT_TIMEOUT_S = 10.0
# libfuse's worker threads. They stay alive once started (idle ones are kept)
# because each one holds a Python thread state for its whole life (see
# _RampartFUSE._wrapper); 10 is libfuse 3.14's effective default.
FUSE_THREADS = 10
_ID_UNCHANGED = 2**32 - 1  # (uid_t)-1 as libfuse hands it over


class MountError(ReplicationError):
    """A replicated directory could not be mounted, protected or unmounted."""


class _RampartFUSE(mfusepy.FUSE):
    """mfusepy's bridge, with the file handle passed to setattr calls.

    mfusepy drops the fuse_file_info of chmod/chown/truncate/utimens, which a
    file that is unlinked but still open needs (it has no path any more), and
    it turns UTIME_NOW/UTIME_OMIT into bogus numbers; rename flags
    (RENAME_EXCHANGE, RENAME_NOREPLACE) are refused rather than ignored.

    libfuse's worker threads are not Python threads, so ctypes creates a
    Python thread state for every callback and destroys it on return; that
    was about a third of the FUSE layer's CPU per small file. Each worker
    takes one thread state on its first callback and keeps it (workers do not
    exit while mounted: max_idle_threads = max_threads).
    """

    def __init__(self, operations: Any, mountpoint: str, **kwargs: Any):
        # the serving thread is a Python thread: it has its own state already
        self._with_state = {threading.get_native_id()}
        super().__init__(operations, mountpoint, **kwargs)  # serves until unmounted

    def _wrapper(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        native = threading.get_native_id()
        if native not in self._with_state:  # the GIL is held: no race on the set
            self._with_state.add(native)
            ctypes.pythonapi.PyGILState_Ensure()  # never released: the state stays
        return super()._wrapper(func, *args, **kwargs)

    def _path(self, path: bytes | None) -> str | None:
        return None if path is None else path.decode(self.encoding, self.errors)

    @staticmethod
    def _fi(fip: Any) -> Any:
        return fip.contents if fip else None

    def chmod_fuse_3(self, path: bytes | None, mode: int, fip: Any) -> int:
        return self.operations.chmod(self._path(path), mode, fh=self._fi(fip))

    def chown_fuse_3(self, path: bytes | None, uid: int, gid: int, fip: Any) -> int:
        uid = -1 if uid == _ID_UNCHANGED else uid
        gid = -1 if gid == _ID_UNCHANGED else gid
        return self.operations.chown(self._path(path), uid, gid, fh=self._fi(fip))

    def truncate_fuse_3(self, path: bytes | None, length: int, fip: Any) -> int:
        return self.operations.truncate(self._path(path), length, fh=self._fi(fip))

    def utimens_fuse_3(self, path: bytes | None, buf: Any, fip: Any) -> int:
        times = None
        if buf:
            pair = buf.contents

            def value(ts: Any) -> Any:
                if ts.tv_nsec == syscalls.UTIME_NOW:
                    return syscalls.NOW
                if ts.tv_nsec == syscalls.UTIME_OMIT:
                    return None
                return ts.tv_sec * 10**9 + ts.tv_nsec

            times = (value(pair.actime), value(pair.modtime))
        return self.operations.utimens(self._path(path), times, fh=self._fi(fip))

    def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
        if flags:
            return -errno.EINVAL
        return self.operations.rename(self._path(old), self._path(new))


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(args, -1, "", f"{args[0]}: no answer in {timeout:g} s")


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo."""

    mount_id: int
    parent_id: int
    device: str  # major:minor
    point: str
    options: tuple[str, ...]  # per-mount options (ro/rw, nosuid...)
    fstype: str


def _unescape(field_: str) -> str:
    # mountinfo writes space, tab, newline and backslash as \ooo octal
    out, i = [], 0
    while i < len(field_):
        if field_[i] == "\\" and field_[i + 1 : i + 4].isdigit():
            out.append(chr(int(field_[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field_[i])
            i += 1
    return "".join(out)


def mount_table() -> list[MountEntry]:
    entries = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            parts = left.split()
            entries.append(
                MountEntry(
                    int(parts[0]),
                    int(parts[1]),
                    parts[2],
                    _unescape(parts[4]),
                    tuple(parts[5].split(",")),
                    right.split()[0],
                )
            )
    return entries


def mounted_at(path: str) -> list[MountEntry]:
    """The mounts stacked exactly at ``path``, bottom first."""
    real = os.path.realpath(path)
    return [m for m in mount_table() if m.point == real]


FUSECTL = "/sys/fs/fuse/connections"


def abort_connection(connection: int) -> None:
    """Abort a FUSE connection: every pending and future request fails at once.

    The last resort for a server that cannot answer — notably this very
    process at exit while one of its own files on the mount is still open,
    which otherwise waits forever. Mounts fusectl first if nobody has.
    """
    if not os.path.exists(f"{FUSECTL}/{connection}"):
        _run(["mount", "-t", "fusectl", "fusectl", FUSECTL], MOUNT_TIMEOUT_S)
    try:
        with open(f"{FUSECTL}/{connection}/abort", "w") as f:
            f.write("1")
    except OSError as exc:
        log.warning("cannot abort FUSE connection %s: %s", connection, exc)


@dataclass
class ReplicatedMount:
    """A FUSE mount over ``path`` whose operations replicate; ``unmount()`` ends it."""

    path: str
    root_fd: int
    operations: ReplicatedOperations
    thread: threading.Thread
    connection: int  # minor number of the FUSE device: /sys/fs/fuse/connections/N
    failure: list[BaseException] = field(default_factory=list)

    def unmount(self, timeout: float = UNMOUNT_TIMEOUT_S) -> str:
        """Unmount for sure; returns how (a reason for the log)."""
        if self.root_fd < 0:
            return "already unmounted"
        how = self._detach(timeout)
        os.close(self.root_fd)
        self.root_fd = -1
        log.info("unmounted %s (%s)", self.path, how)
        return how

    def _detach(self, timeout: float) -> str:
        done = _run(["fusermount3", "-u", self.path], timeout)
        if done.returncode == 0:
            self.thread.join(timeout)
        if done.returncode == 0 and not self.thread.is_alive():
            return "fusermount3 -u"
        # busy (open files) or hung: detach lazily, then cut the connection
        _run(["fusermount3", "-u", "-z", self.path], timeout)
        self.thread.join(min(timeout, 0.5))  # a file closing right now may still finish
        if not self.thread.is_alive():
            return f"lazy unmount after: {done.stderr.strip() or 'timeout'}"
        abort_connection(self.connection)
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise MountError(f"{self.path}: FUSE thread did not stop after abort")
        return "aborted the FUSE connection"

    def __enter__(self) -> ReplicatedMount:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unmount()


def mount_replicated(
    directory: str,
    replicator: Replicator,
    *,
    timeout: float = MOUNT_TIMEOUT_S,
    name: str | None = None,
) -> ReplicatedMount:
    """Mount the replicating FUSE layer over ``directory``; raise MountError if it fails."""
    path = os.path.realpath(directory)
    try:
        root_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise MountError(f"{path}: cannot open the replicated directory: {exc.strerror}") from None
    if any(m.fstype.startswith("fuse") for m in mounted_at(path)):
        os.close(root_fd)
        raise MountError(f"{path}: a FUSE filesystem is already mounted here; unmount it first")
    operations = ReplicatedOperations(root_fd, replicator)
    failure: list[BaseException] = []

    def serve() -> None:
        try:
            _RampartFUSE(
                operations,
                path,
                raw_fi=True,
                foreground=True,
                allow_other=True,
                default_permissions=True,
                fsname=f"rampart:{name or os.path.basename(path)}",
                subtype="rampart",
                max_threads=FUSE_THREADS,
                max_idle_threads=FUSE_THREADS,
            )
        except BaseException as exc:  # reported to the mounting thread
            failure.append(exc)
            operations.mounted.set()

    thread = threading.Thread(target=serve, name=f"rampart-fuse:{path}", daemon=True)
    thread.start()
    if not operations.mounted.wait(timeout) or failure:
        reason = f"{failure[0]}" if failure else f"not mounted within {timeout:g} s"
        _run(["fusermount3", "-u", "-z", path], timeout)
        thread.join(timeout)
        os.close(root_fd)
        raise MountError(f"{path}: FUSE mount failed: {reason}")
    connection = os.minor(os.stat(path).st_dev)
    log.info("mounted replicating FUSE layer over %s", path)
    return ReplicatedMount(path, root_fd, operations, thread, connection, failure)


# -- the secondary's read-only view ------------------------------------------------


@dataclass
class ReadOnlyView:
    """``fd`` reaches the writable directory under the read-only bind mount at ``path``."""

    path: str
    fd: int

    def unprotect(self) -> str:
        reason = unprotect(self.path)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        return reason

    def __enter__(self) -> ReadOnlyView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unprotect()


def protect_readonly(directory: str, *, timeout: float = MOUNT_TIMEOUT_S) -> ReadOnlyView:
    """Open ``directory`` for the applier, then make it read-only for everyone else."""
    path = os.path.realpath(directory)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise MountError(f"{path}: cannot open the replicated directory: {exc.strerror}") from None
    bound = _run(["mount", "--bind", path, path], timeout)
    if bound.returncode == 0:
        done = _run(["mount", "-o", "remount,bind,ro", path], timeout)
        if done.returncode == 0:
            return ReadOnlyView(path, fd)
        _run(["umount", path], timeout)  # the writable bind we just made
    else:
        done = bound
    os.close(fd)
    raise MountError(f"{path}: cannot make the secondary's view read-only: {done.stderr.strip()}")


def _our_view(path: str) -> MountEntry | None:
    """The top mount at ``path`` if it is a read-only bind of the same filesystem.

    Only such a mount is ever removed: a real filesystem mounted at a
    replicated directory must survive ``unprotect``.
    """
    table = mount_table()
    stacked = [m for m in table if m.point == path]
    if not stacked:
        return None
    top = stacked[-1]
    parent = next((m for m in table if m.mount_id == top.parent_id), None)
    same_fs = parent is not None and parent.device == top.device
    return top if "ro" in top.options and same_fs else None


def unprotect(directory: str, *, timeout: float = UNMOUNT_TIMEOUT_S) -> str:
    """Remove the read-only view(s) so the directory is writable again (idempotent)."""
    path = os.path.realpath(directory)
    removed = remove_views(path, timeout=timeout)
    return (
        f"removed {removed} read-only view(s) at {path}" if removed else f"{path} was not protected"
    )


def remove_views(directory: str, *, timeout: float = UNMOUNT_TIMEOUT_S) -> int:
    """``unprotect`` for callers that need the count: how many read-only views were removed."""
    path = os.path.realpath(directory)
    removed = 0
    for _ in range(8):  # bounded: views stacked by repeated protect calls
        if _our_view(path) is None:
            break
        done = _run(["umount", path], timeout)
        if done.returncode != 0:
            done = _run(["umount", "-l", path], timeout)
        if done.returncode != 0:
            raise MountError(f"{path}: cannot remove the read-only view: {done.stderr.strip()}")
        removed += 1
    return removed
