"""Reintegration and full sync: bring the secondary to the primary's content, online.

A pass runs on the primary while the application keeps writing:

1. namespace phase, holding the FUSE layer's namespace lock (no create,
   rename, unlink... is applied meanwhile): connect with ``resync=True``,
   get the secondary's dirty regions (their union with ours is what may
   differ; a full sync, for a first start or unknown history, takes every
   path), compare names, kinds and attributes of those paths on both sides
   (SCAN without hashes), remove what only the secondary has (children
   first) and create what it lacks; then re-open on the secondary the files
   the application holds open. From here on every application operation
   applies cleanly on the secondary.
2. data phase, file by file: SCAN with blake2b hashes of the blocks that may
   differ (the dirty ones, every block of a created file, the blocks the
   held-open files were written while waiting), compare, and send again only
   the differing 64 KiB blocks, reading them while holding the file's inode
   lock: each application write to the file lands either before our read
   (and is in what we send) or after our submit (and its own operation
   follows ours on the secondary), so concurrent writes end up correct.
3. fix attributes and directory times, RESYNC_END; once everything is
   acknowledged as written both sides forget the pass's regions and the
   secondary clears its 'stale' flag.

SCANs travel in operation order, so the secondary's answer reflects exactly
the operations before it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from node_service.replication import frames, ops, verify
from node_service.replication.dirty import DirtyRegion, decode_regions, plan
from node_service.replication.frames import Frame, FrameType
from node_service.replication.sender import Link, Sender
from node_service.replication.transport import PeerGone
from node_service.replication.verify import DIR, FILE, OTHER, SYMLINK, Difference

REGION = ops.REGION_SIZE
# Handles of resync opens, far above the FUSE layer's counter so they never clash.
RESYNC_HANDLES = itertools.count(2**62)


class Ordering(Protocol):
    """The FUSE layer's ordering locks (``fs.ReplicatedOperations`` is one)."""

    def namespace(self) -> AbstractContextManager[object]:
        """No namespace or path-based operation is applied and submitted while held."""
        ...

    def inode(self, ino: int) -> AbstractContextManager[object]:
        """No data or attribute operation on inode ``ino`` is applied and submitted while held."""
        ...


def _distinct(orderings: Sequence[Ordering]) -> list[Ordering]:
    out: list[Ordering] = []
    for o in orderings:
        if all(o is not seen for seen in out):
            out.append(o)
    return out


class SingleLock:
    """An Ordering with one lock for everything (tests, a directory without FUSE)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()

    def namespace(self) -> AbstractContextManager[object]:
        return self.lock

    def inode(self, ino: int) -> AbstractContextManager[object]:
        return self.lock


@dataclass(frozen=True)
class ResyncResult:
    full: bool
    regions: int  # dirty regions in the union (0 for a full sync)
    differences: int
    bytes_resent: int
    seconds: float
    reason: str


def wanted(regions: Iterable[DirtyRegion], dir: str) -> dict[str, list[int] | None]:
    """What to describe on both sides for one dir's dirty regions (pure)."""
    want: dict[str, list[int] | None] = {}
    for f in plan(r for r in regions if r.dir == dir):
        want[f.path] = None if f.entry else list(f.indexes)
    return want


def merge_want(a: dict[str, list[int] | None], b: dict[str, list[int] | None]):
    """Union of two wants; None (everything) wins (pure)."""
    out = dict(a)
    for path, blocks in b.items():
        if path in out and (out[path] is None or blocks is None):
            out[path] = None
        else:
            out[path] = sorted(set(out.get(path) or ()) | set(blocks or ()))
    return out


def repair_order(diffs: Sequence[Difference], theirs: Mapping[str, object]) -> tuple[list, list]:
    """(paths to remove on the secondary, children first; paths to create, parents first)."""
    removals = [d.path for d in diffs if d.what == "extra"]
    removals += [d.path for d in diffs if d.what == "kind" and d.path in theirs]
    removals.sort(reverse=True)
    creations = [d.path for d in diffs if d.what in ("missing", "kind")]
    return removals, creations


class Resync:
    """One reintegration or full-sync pass of a module's ``Sender``."""

    def __init__(
        self,
        sender: Sender,
        roots: Sequence[int],
        *,
        ordering: Ordering | Sequence[Ordering] | None = None,
        timeout: float = 600.0,
    ):
        self.sender = sender
        self.roots = roots
        # one Ordering per replicated dir (each dir has its own FUSE mount)
        if ordering is None:
            ordering = SingleLock()
        if isinstance(ordering, Sequence):
            self.orderings = list(ordering)
        else:
            self.orderings = [ordering] * len(roots)
        self.timeout = timeout
        self.running = False
        # bytes of differing blocks not sent yet (rampart state's resync_remaining_bytes)
        self.remaining_bytes = 0

    def run(self, connect: Callable[[], None], *, full: bool | None = None) -> ResyncResult:
        """``connect()`` opens the sender's connection with ``resync=True``.

        ``full`` None: a full sync when either side's history is unknown (first
        start, or a crash: see dirty.py), else a resync of the dirty regions.
        """
        self.running = True
        try:
            return self._run(connect, full)
        finally:
            self.running = False
            self.remaining_bytes = 0

    def _run(self, connect: Callable[[], None], full: bool | None) -> ResyncResult:
        started = time.monotonic()
        before = self.sender.stats().resent_bytes
        data_want: list[dict[str, list[int] | None]] = []
        with contextlib.ExitStack() as held:
            for ordering in _distinct(self.orderings):
                held.enter_context(ordering.namespace())
            connect()
            if self.sender.link != Link.CONNECTED:
                raise PeerGone(f"cannot resync: {self.sender.reason}")
            if full is None:
                full = not (self.sender.tracker.history_known and self.sender.peer_history_known)
            theirs_dirty: frozenset[DirtyRegion] = frozenset()
            for chunk in self.sender.request(Frame(FrameType.DIRTY_REQUEST, 0), self.timeout):
                theirs_dirty |= decode_regions(chunk)
            union = self.sender.tracker.recorded() | theirs_dirty
            count = 0
            for index, dir in enumerate(self.sender.dirs):
                want = None if full else wanted(union, dir)
                created, n = self._namespace(index, want) if want != {} else ({}, 0)
                count += n
                data_want.append(created if want is None else merge_want(want, created))
            missed = self.sender.reopen_pending()
        settled = set(union)
        for index, dir in enumerate(self.sender.dirs):
            extra = missed.get(index, set())
            settled |= extra
            want = merge_want(data_want[index], wanted(extra, dir))
            if full:
                want = None  # every block of every file
            if want != {}:
                count += self._data(index, want)
        # answered once the secondary applied everything before it and settled
        self.sender.request(Frame(FrameType.RESYNC_END, 0), self.timeout)
        if not self.sender.drain(self.timeout) or self.sender.link != Link.CONNECTED:
            raise PeerGone(f"resync interrupted: {self.sender.reason}")
        if self.sender.settle_if_connected(settled):
            self.sender.tracker.history_known = True
        resent = self.sender.stats().resent_bytes - before
        kind = "full sync" if full else f"resync of {len(union)} dirty regions"
        return ResyncResult(
            full=full,
            regions=0 if full else len(union),
            differences=count,
            bytes_resent=resent,
            seconds=time.monotonic() - started,
            reason=f"{kind}: {count} differences repaired, {resent} bytes sent again",
        )

    def verify(self) -> list[str]:
        """Every path that differs between the two trees (``rampart repl verify``)."""
        lines = []
        for index, dir in enumerate(self.sender.dirs):
            lines += verify.report(self._compare(index, None, hashes=True)[0], dir)
        return lines

    # ---- phases -----------------------------------------------------------------

    def _compare(self, index: int, want, *, hashes: bool):
        reply = self.sender.request(frames.scan(0, index, want, hashes), self.timeout)
        theirs = verify.assemble(e for chunk in reply for e in verify.decode_entries(chunk))
        mine = verify.scan(self.roots[index], want, hashes=hashes)
        return verify.diff(mine, theirs), mine, theirs

    def _namespace(self, index: int, want) -> tuple[dict[str, list[int] | None], int]:
        """Remove and create entries (namespace lock held); return files needing data."""
        diffs, mine, theirs = self._compare(index, want, hashes=False)
        removals, creations = repair_order(diffs, theirs)
        submit = self._submitter(index)
        for path in removals:
            submit(ops.Rmdir(path) if theirs[path].kind == DIR else ops.Unlink(path))
        needs_data: dict[str, list[int] | None] = {}
        for path in creations:
            e = mine[path]
            stamps = (ops.Stamp(path, e.mtime_ns),)
            if e.kind == DIR:
                submit(ops.Mkdir(path, e.mode, e.uid, e.gid, stamps))
            elif e.kind == SYMLINK:
                submit(ops.Symlink(path, e.target, e.uid, e.gid, stamps))
            elif e.kind == OTHER:
                submit(ops.Mknod(path, e.mode, e.uid, e.gid, stamps))
            else:
                handle = next(RESYNC_HANDLES)
                submit(ops.Open(handle, path, os.O_WRONLY, e.mode, e.uid, e.gid, True, ()))
                submit(ops.Release(handle))
                needs_data[path] = None
        # attributes of entries that exist on both sides, and every directory time
        for d in diffs:
            if d.what in ("meta", "content") and mine[d.path].kind != FILE:
                self._attributes(index, d.path)
        dirs = {p.rpartition("/")[0] for p in (*removals, *creations)}
        dirs |= {p for p in creations if mine[p].kind == DIR}
        for path in sorted(dirs, reverse=True):
            self._attributes(index, path)
        return needs_data, len(diffs)

    def _data(self, index: int, want) -> int:
        diffs, mine, _theirs = self._compare(index, want, hashes=True)
        self.remaining_bytes += sum(len(d.blocks) * REGION for d in diffs)
        count = 0
        for d in diffs:
            entry = mine.get(d.path)
            if entry is None or entry.kind != FILE or d.what not in ("content", "meta", "missing"):
                continue
            count += 1
            self._file(index, d.path, d.blocks)
        return count

    def _file(self, index: int, path: str, blocks: Iterable[int]) -> None:
        root = self.roots[index]
        submit = self._submitter(index)
        handle = next(RESYNC_HANDLES)
        with self.orderings[index].namespace():
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root)
            except (FileNotFoundError, NotADirectoryError):
                return  # removed since the scan: the application's Unlink follows in order
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                os.close(fd)
                return
            submit(ops.Open(handle, path, os.O_WRONLY, 0, -1, -1, False, ()))
        try:
            with self.orderings[index].inode(st.st_ino):
                for i in blocks:
                    data = os.pread(fd, REGION, i * REGION)
                    if data:
                        submit(ops.Write(handle, i * REGION, st.st_mtime_ns, data))
                    self.remaining_bytes = max(0, self.remaining_bytes - REGION)
                now = os.fstat(fd)
                submit(ops.Truncate(handle, "", now.st_size, now.st_mtime_ns))
                submit(ops.Chown(handle, "", now.st_uid, now.st_gid))
                submit(ops.Chmod(handle, "", stat.S_IMODE(now.st_mode)))
                submit(ops.Utimens(handle, "", now.st_atime_ns, now.st_mtime_ns))
                submit(ops.Release(handle))
        finally:
            os.close(fd)

    def _attributes(self, index: int, path: str) -> None:
        try:
            st = os.stat(path or ".", dir_fd=self.roots[index], follow_symlinks=False)
        except FileNotFoundError:
            return
        submit = self._submitter(index)
        submit(ops.Chown(0, path, st.st_uid, st.st_gid))
        submit(ops.Chmod(0, path, stat.S_IMODE(st.st_mode)))  # a no-op on a symlink
        submit(ops.Utimens(0, path, st.st_atime_ns, st.st_mtime_ns))

    def _submitter(self, index: int) -> Callable[[ops.Op], object]:
        return lambda op: self.sender.submit(index, op, resync=True)
