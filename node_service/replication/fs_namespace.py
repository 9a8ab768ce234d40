"""The primary's namespace calls: mkdir, mknod, rmdir, unlink, rename, symlink, link.

Part of ``fs.ReplicatedOperations`` (a mixin, split out only for size): each
call applies locally and submits its record under the namespace lock, then
waits outside it (docs/dev/replication.md, "Ordering invariant"). New
entries get the caller's owner, as the real filesystem would have given them.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Callable

import mfusepy

from node_service.replication.ops import (
    Link,
    Mkdir,
    Mknod,
    Op,
    Rename,
    Rmdir,
    Stamp,
    Symlink,
    Unlink,
)


def rel_path(path: str | None) -> str:
    """FUSE path '/a/b' → 'a/b'; the root → ''."""
    return (path or "/").lstrip("/")


def at_path(rel: str) -> str:
    return rel or "."


def parent_path(rel: str) -> str:
    return rel.rpartition("/")[0]


class NamespaceCalls:
    """What ``ReplicatedOperations`` provides to these calls."""

    root_fd: int
    _ns_lock: threading.Lock

    def _submit(self, op: Op) -> object | None:
        raise NotImplementedError

    def _wait(self, ticket: object | None, op: Op) -> None:
        raise NotImplementedError

    def _owner_for(self, parent_rel: str) -> tuple[int, int]:
        raise NotImplementedError

    def _stamps(self, *rels: str) -> tuple[Stamp, ...]:
        raise NotImplementedError

    def _namespace(self, apply: Callable[[], Op]) -> int:
        """Apply locally and submit under the namespace lock; wait outside it."""
        with self._ns_lock:
            op = apply()
            ticket = self._submit(op)
        self._wait(ticket, op)
        return 0

    def mkdir(self, path: str, mode: int) -> int:
        rel = rel_path(path)

        def apply() -> Op:
            os.mkdir(rel, mode & 0o7777, dir_fd=self.root_fd)
            uid, gid = self._owner_for(parent_path(rel))
            os.chown(rel, uid, gid, dir_fd=self.root_fd, follow_symlinks=False)
            inherited = (
                os.stat(at_path(parent_path(rel)), dir_fd=self.root_fd).st_mode & stat.S_ISGID
            )
            os.chmod(rel, (mode & 0o7777) | inherited, dir_fd=self.root_fd)
            st = os.stat(rel, dir_fd=self.root_fd, follow_symlinks=False)
            stamps = self._stamps(parent_path(rel), rel)
            return Mkdir(rel, st.st_mode & 0o7777, st.st_uid, st.st_gid, stamps)

        return self._namespace(apply)

    def mknod(self, path: str, mode: int, dev: int) -> int:
        rel = rel_path(path)
        if stat.S_IFMT(mode) not in (stat.S_IFIFO, stat.S_IFSOCK):
            raise mfusepy.FuseOSError(errno.EPERM)  # device nodes stay out of replicated dirs

        def apply() -> Op:
            os.mknod(rel, mode, 0, dir_fd=self.root_fd)
            uid, gid = self._owner_for(parent_path(rel))
            os.chown(rel, uid, gid, dir_fd=self.root_fd, follow_symlinks=False)
            os.chmod(rel, mode & 0o7777, dir_fd=self.root_fd)
            st = os.stat(rel, dir_fd=self.root_fd, follow_symlinks=False)
            stamps = self._stamps(parent_path(rel), rel)
            return Mknod(rel, st.st_mode, st.st_uid, st.st_gid, stamps)

        return self._namespace(apply)

    def rmdir(self, path: str) -> int:
        rel = rel_path(path)

        def apply() -> Op:
            os.rmdir(rel, dir_fd=self.root_fd)
            return Rmdir(rel, self._stamps(parent_path(rel)))

        return self._namespace(apply)

    def unlink(self, path: str) -> int:
        rel = rel_path(path)

        def apply() -> Op:
            os.unlink(rel, dir_fd=self.root_fd)
            return Unlink(rel, self._stamps(parent_path(rel)))

        return self._namespace(apply)

    def rename(self, old: str, new: str) -> int:
        src, dst = rel_path(old), rel_path(new)

        def apply() -> Op:
            os.rename(src, dst, src_dir_fd=self.root_fd, dst_dir_fd=self.root_fd)
            return Rename(src, dst, self._stamps(parent_path(src), parent_path(dst)))

        return self._namespace(apply)

    def symlink(self, target: str, source: str) -> int:
        """mfusepy's naming: create the link ``target`` whose content is ``source``."""
        rel = rel_path(target)

        def apply() -> Op:
            os.symlink(source, rel, dir_fd=self.root_fd)
            uid, gid = self._owner_for(parent_path(rel))
            os.chown(rel, uid, gid, dir_fd=self.root_fd, follow_symlinks=False)
            return Symlink(rel, source, uid, gid, self._stamps(parent_path(rel), rel))

        return self._namespace(apply)

    def link(self, target: str, source: str) -> int:
        """mfusepy's naming: create the hard link ``target`` to the existing ``source``."""
        src, dst = rel_path(source), rel_path(target)

        def apply() -> Op:
            root = self.root_fd
            os.link(src, dst, src_dir_fd=root, dst_dir_fd=root, follow_symlinks=False)
            return Link(src, dst, self._stamps(parent_path(dst)))

        return self._namespace(apply)
