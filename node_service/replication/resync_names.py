"""The names of a resync pass's planned files, followed through the application's renames.

A pass plans its data phase by path, from what the namespace phase listed
while it held the namespace lock. Once that lock is released the application
may rename, link or unlink any of those files before the data phase reaches
them; the secondary applies the same operations to its (stale) copy, so the
data must go to the file's *new* name, and a comparison made while the file
changed name proves nothing.

``PlannedNames`` is fed every application ``Rename``, ``Link`` and
``Unlink`` of one replicated dir in operation order (``Sender.watch``, called
under the sender's lock, after the namespace phase and before any such
operation can follow it) and answers, for each planned path, the names its
file has now. Sound because these are the only operations that change which
names lead to an existing file: a name can only be taken over by another
file (create, symlink, mknod, link, rename onto it) after the operation that
took it from ours, which we followed; ``rmdir`` needs an empty directory;
``RENAME_EXCHANGE`` is refused by the FUSE layer. Pure apart from its lock.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterable

from node_service.replication import ops


def _parents(name: str) -> Iterable[str]:
    parts = name.split("/")
    for k in range(1, len(parts)):
        yield "/".join(parts[:k])


class PlannedNames:
    """planned path → the current names of the file it named (see module doc)."""

    def __init__(self, planned: Iterable[str]):
        self._lock = threading.Lock()
        self._names: dict[str, set[str]] = {}  # planned path -> current names
        self._owner: dict[str, str] = {}  # current name -> planned path
        # directories holding a followed name, with how many: a rename of one
        # that holds none costs a dict lookup, not a pass over every name
        self._dirs: collections.Counter[str] = collections.Counter()
        self.moved: set[str] = set()  # planned paths whose file lost or changed a name
        for path in planned:
            self._add(path, path)

    def follow(self, op: ops.Op) -> bool:
        """Take one application operation; True when it touched a followed file."""
        with self._lock:
            if isinstance(op, ops.Rename):
                return self._rename(op.src, op.dst)
            if isinstance(op, ops.Link) and op.src in self._owner:
                self._add(self._owner[op.src], op.dst)
                return True
            if isinstance(op, ops.Unlink) and op.path in self._owner:
                self.moved.add(self._drop(op.path))
                return True
            return False

    def names(self, planned: str) -> list[str]:
        """The names the file planned as ``planned`` has now (none: it was unlinked)."""
        with self._lock:
            return sorted(self._names.get(planned, ()))

    def forget(self, planned: str) -> None:
        """Stop following ``planned`` (its file is open on the secondary, or not wanted)."""
        with self._lock:
            for name in self._names.pop(planned, set()):
                self._drop(name, keep_key=True)

    def touched(self, planned: Iterable[str]) -> set[str]:
        with self._lock:
            return {p for p in planned if p in self.moved}

    # ---- under the lock ------------------------------------------------------------

    def _rename(self, src: str, dst: str) -> bool:
        if src == dst:  # rename(2) does nothing (one name, or two links of one file)
            return False
        touched = False
        if dst in self._owner:  # replaced: our file loses that name
            self.moved.add(self._drop(dst))
            touched = True
        if src in self._owner:
            key = self._drop(src)
            self._add(key, dst)
            self.moved.add(key)
            return True
        if src not in self._dirs:
            return touched
        prefix = src + "/"
        for name in [n for n in self._owner if n.startswith(prefix)]:
            key = self._drop(name)
            self._add(key, dst + name[len(src) :])
            self.moved.add(key)
        return True

    def _add(self, key: str, name: str) -> None:
        self._names.setdefault(key, set()).add(name)
        self._owner[name] = key
        self._dirs.update(_parents(name))

    def _drop(self, name: str, *, keep_key: bool = False) -> str:
        key = self._owner.pop(name)
        if not keep_key:
            self._names[key].discard(name)
        self._dirs.subtract(_parents(name))
        for parent in _parents(name):
            if self._dirs[parent] <= 0:
                del self._dirs[parent]
        return key
