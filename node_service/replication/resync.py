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
2. data phase, file by file. What must go is planned first: a file this
   pass created on the secondary is empty there, so all of it goes without
   comparing anything; data blocks this primary recorded in runs of at least
   ``KNOWN_RUN`` (a stream rewrote them while the peer was away) go without
   comparing too; every other candidate block (the secondary's own in-flight
   regions, short runs such as random writes, blocks the held-open files
   were written while waiting, a full sync) is compared by blake2b digests
   per 4 KiB sub-block (SCAN), and only the differing sub-blocks go. Sending
   a block without comparing is always correct (it is the primary's content
   under the lock), comparing only saves bytes. Per file: its size first,
   then the data in pieces of at most 2 MiB, each read and submitted while
   holding the file's inode lock: each application write to the file lands
   either before our read (and is in what we send) or after our submit (and
   its own operation follows ours on the secondary), so concurrent writes
   end up correct. The application may rename a planned file (or a
   directory above it) before its turn: the pass follows every rename, link
   and unlink from the end of the namespace phase (``resync_names``) and
   opens each file by the name it has now, under the namespace lock; a file
   that changed names before both sides were scanned is sent without trusting
   the comparison.
3. fix attributes and directory times, RESYNC_END; once everything is
   acknowledged as written both sides forget the pass's regions and the
   secondary clears its 'stale' flag.

SCANs travel in operation order, so the secondary's answer reflects exactly
the operations before it.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from node_service.replication import frames, ops, verify
from node_service.replication.dirty import DirtyRegion, decode_regions, dirty_regions, plan
from node_service.replication.frames import Frame, FrameType
from node_service.replication.resync_names import PlannedNames
from node_service.replication.resync_pieces import PIECE, read_piece
from node_service.replication.sender import Link, Sender
from node_service.replication.transport import PeerGone
from node_service.replication.verify import DIR, FILE, OTHER, SYMLINK, Difference

log = logging.getLogger("rampart.replication.resync")

REGION = ops.REGION_SIZE
# One Write op per piece, larger than the secondary applies inline (resync_pieces.py)
CHUNK = PIECE
# This many consecutive data regions (2 MiB) recorded by the primary itself
# mean a stream rewrote them: comparing would read and hash both sides for
# nothing. Shorter runs are compared by sub-block: random writes, the ends of
# a stream, and the tracker's look-ahead (a write to a new region records the
# next 15 too, forgotten a second later if unused: a run of 16 is no proof).
KNOWN_RUN = 32
# What a path not described in the namespace phase is taken for (a held-open file)
FILE_ENTRY = verify.Entry("", FILE, 0, 0, 0, 0, 0)
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


def split_known(
    blocks: Iterable[int], ours: Iterable[int], run: int = KNOWN_RUN
) -> tuple[list[int], list[int]]:
    """(blocks to send without comparing, blocks to compare) of one file (pure).

    ``ours``: the file's data regions this primary recorded; a block lying in a
    run of at least ``run`` consecutive ones of them was rewritten here.
    """
    mine = sorted(set(ours))
    known: set[int] = set()
    start = 0
    for k in range(1, len(mine) + 1):
        if k == len(mine) or mine[k] != mine[k - 1] + 1:
            if k - start >= run:
                known.update(mine[start:k])
            start = k
    wanted_blocks = sorted(set(blocks) | known)
    return [i for i in wanted_blocks if i in known], [i for i in wanted_blocks if i not in known]


def block_ranges(blocks: Iterable[int]) -> tuple[tuple[int, int], ...]:
    """(offset, length) byte ranges of data blocks, adjacent ones joined (pure)."""
    out: list[list[int]] = []
    for i in sorted(set(blocks)):
        if out and out[-1][0] + out[-1][1] == i * REGION:
            out[-1][1] += REGION
        else:
            out.append([i * REGION, REGION])
    return tuple((start, length) for start, length in out)


def join_ranges(*parts: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """The union of byte ranges, sorted, overlapping and adjacent ones joined (pure)."""
    out: list[list[int]] = []
    for start, length in sorted(r for part in parts for r in part):
        if out and start <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], start + length - out[-1][0])
        else:
            out.append([start, length])
    return tuple((start, length) for start, length in out)


def pieces(ranges: Iterable[tuple[int, int]], chunk: int = CHUNK) -> Iterable[tuple[int, int]]:
    """The ranges cut into reads of at most ``chunk`` bytes (pure)."""
    for start, length in ranges:
        for at in range(start, start + length, chunk):
            yield at, min(chunk, start + length - at)


def expand(want: Mapping[str, list[int] | None], files: Mapping[str, int]):
    """The data phase's want: a path wanted whole (its entry changed, or a
    directory's subtree) becomes every block of every file at or under it (pure).

    ``files``: the primary's files among the paths compared, with their sizes.
    """
    out = {path: blocks for path, blocks in want.items() if blocks is not None}
    whole = {path for path, blocks in want.items() if blocks is None}
    for path, size in files.items():
        parts = path.split("/")
        if "" in whole or any("/".join(parts[:k]) in whole for k in range(1, len(parts) + 1)):
            everything = range((size + REGION - 1) // REGION)
            out[path] = sorted(set(out.get(path) or ()) | set(everything))
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
        self.compare_seconds = 0.0  # of the last pass: SCANs with digests, both sides
        # bytes of differing blocks not sent yet (rampart state's resync_remaining_bytes)
        self.remaining_bytes = 0

    def run(self, connect: Callable[[], None], *, full: bool | None = None) -> ResyncResult:
        """``connect()`` opens the sender's connection with ``resync=True``.

        ``full`` None: a full sync when either side's history is unknown (first
        start, or a crash: see dirty.py), else a resync of the dirty regions.
        """
        self.running = True
        self.compare_seconds = 0.0
        self._names: list[PlannedNames] = []
        self._pins: set[DirtyRegion] = set()
        self._pins_lock = threading.Lock()
        try:
            return self._run(connect, full)
        finally:
            self.sender.watch = None
            self.running = False
            self.remaining_bytes = 0

    def _run(self, connect: Callable[[], None], full: bool | None) -> ResyncResult:
        started = time.monotonic()
        before = self.sender.stats().resent_bytes
        data_want: list[dict[str, list[int] | None]] = []
        fresh: list[set[str]] = []
        seen: list[dict[str, verify.Entry]] = []
        wants: list[dict[str, list[int] | None]] = []
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
            ours = self.sender.tracker.recorded()
            union = ours | theirs_dirty
            count = 0
            for index, dir in enumerate(self.sender.dirs):
                want = None if full else wanted(union, dir)
                created, mine, n = self._namespace(index, want) if want != {} else (set(), {}, 0)
                count += n
                fresh.append(created)
                seen.append(mine)
                data_want.append({} if want is None else want)
            missed = self.sender.reopen_pending()
            settled = set(union)
            for index, dir in enumerate(self.sender.dirs):
                extra = missed.get(index, set())
                settled |= extra
                files = {p: e.size for p, e in seen[index].items() if e.kind == FILE}
                want = merge_want(data_want[index], wanted(extra, dir))
                # only files carry data; the namespace phase did the rest's attributes
                want = {
                    p: b
                    for p, b in expand(want, files).items()
                    if seen[index].get(p, FILE_ENTRY).kind == FILE
                }
                if full:  # every file, every block
                    want = dict.fromkeys(files)
                wants.append(want)
                self._names.append(PlannedNames({*want, *fresh[index]}))
            # From here the application may rename what we planned: follow it
            # (still under the namespace lock, so no such operation is missed).
            self.sender.watch = self._watch
        namespace_s = time.monotonic() - started
        for index, dir in enumerate(self.sender.dirs):
            known = {} if full else _data_regions(ours, dir)
            count += self._data(index, wants[index], fresh[index], known)
        data_s = time.monotonic() - started - namespace_s
        # answered once the secondary applied everything before it and settled
        self.sender.request(Frame(FrameType.RESYNC_END, 0), self.timeout)
        if not self.sender.drain(self.timeout) or self.sender.link != Link.CONNECTED:
            raise PeerGone(f"resync interrupted: {self.sender.reason}")
        self.sender.watch = None
        with self._pins_lock:
            settled |= self._pins
        if self.sender.settle_if_connected(settled):
            self.sender.tracker.history_known = True
        resent = self.sender.stats().resent_bytes - before
        seconds = time.monotonic() - started
        kind = "full sync" if full else f"resync of {len(union)} dirty regions"
        log.info(
            "%s: namespace %.1f s, data %.1f s (compare %.1f s), end %.1f s, %d bytes sent",
            kind,
            namespace_s,
            data_s,
            self.compare_seconds,
            seconds - namespace_s - data_s,
            resent,
        )
        return ResyncResult(
            full=full,
            regions=0 if full else len(union),
            differences=count,
            bytes_resent=resent,
            seconds=seconds,
            reason=f"{kind}: {count} differences repaired, {resent} bytes sent again",
        )

    def verify(self) -> list[str]:
        """Every path that differs between the two trees (``rampart repl verify``)."""
        lines = []
        for index, dir in enumerate(self.sender.dirs):
            lines += verify.report(self._compare(index, None, hashes=True)[0], dir)
        return lines

    # ---- phases -----------------------------------------------------------------

    def _watch(self, index: int, op: ops.Op) -> None:
        """An application rename, link or unlink (under the sender's lock, in op order).

        One that touched a planned file is pinned in the dirty log until the
        pass ends: a pass cut short leaves the file's new name to the next one
        (the operation's own regions would be forgotten once acknowledged).
        """
        if not self._names[index].follow(op):
            return
        regions = dirty_regions(self.sender.dirs[index], ops.regions(op, lambda handle: None))
        self.sender.tracker.add(regions)
        self.sender.tracker.keep(regions)
        with self._pins_lock:
            self._pins.update(regions)

    def _compare(self, index: int, want, *, hashes: bool):
        reply = self.sender.request(frames.scan(0, index, want, hashes), self.timeout)
        theirs = verify.assemble(e for chunk in reply for e in verify.decode_entries(chunk))
        mine = verify.scan(self.roots[index], want, hashes=hashes)
        return verify.diff(mine, theirs), mine, theirs

    def _namespace(self, index: int, want) -> tuple[set[str], dict[str, verify.Entry], int]:
        """Remove and create entries (namespace lock held).

        Returns the files created, the primary's entries of the paths compared,
        and the number of differences.
        """
        diffs, mine, theirs = self._compare(index, want, hashes=False)
        removals, creations = repair_order(diffs, theirs)
        submit = self._submitter(index)
        for path in removals:
            submit(ops.Rmdir(path) if theirs[path].kind == DIR else ops.Unlink(path))
        created: set[str] = set()
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
                created.add(path)
        # attributes of entries that exist on both sides, and every directory time
        for d in diffs:
            if d.what in ("meta", "content") and mine[d.path].kind != FILE:
                self._attributes(index, d.path)
        dirs = {p.rpartition("/")[0] for p in (*removals, *creations)}
        dirs |= {p for p in creations if mine[p].kind == DIR}
        for path in sorted(dirs, reverse=True):
            self._attributes(index, path)
        return created, mine, len(diffs)

    def _data(
        self,
        index: int,
        want: dict[str, list[int] | None],
        fresh: set[str],
        known: Mapping[str, set[int]],
    ) -> int:
        """Send every file's differing data and attributes; return how many files."""
        # None: the whole file. A file this pass created is empty on the
        # secondary: there is nothing to compare it with.
        names = self._names[index]
        plans: dict[str, tuple[tuple[int, int], ...] | None] = dict.fromkeys(fresh)
        compare: dict[str, list[int] | None] = {}
        for path, blocks in want.items():
            if path in fresh:
                continue
            if blocks is None:  # full sync: compared whole first, then by sub-block
                compare[path] = None
                continue
            direct, rest = split_known(blocks, known.get(path, ()))
            if direct:
                plans[path] = block_ranges(direct)
            if rest or not direct:
                compare[path] = [verify.sub_block(i) for i in rest]
        if compare != {}:
            for path, ranges in self._differing(index, compare, fresh).items():
                if ranges is None or plans.get(path, ()) is None:
                    plans[path] = None
                else:
                    plans[path] = join_ranges(plans.get(path, ()), ranges)
            # A file renamed, linked away or unlinked before both scans were
            # done may have been compared under a name that was no longer its
            # own: that comparison proves nothing, so all its candidate blocks
            # go. Read under the namespace lock: every such op applied so far
            # has been submitted, hence followed.
            with self.orderings[index].namespace():
                touched = names.touched(compare)
            for path in touched:
                blocks = compare[path]
                if blocks is None or plans.get(path, ()) is None:
                    plans[path] = None
                else:
                    whole = (i - verify.SUB_BLOCKS for i in blocks)
                    plans[path] = join_ranges(plans.get(path, ()), block_ranges(whole))
        for path in want:
            if path not in plans:
                names.forget(path)
        self.remaining_bytes += sum(self._planned_bytes(index, p, r) for p, r in plans.items())
        for path in sorted(plans):
            self._file(index, path, plans[path])
        return len(plans)

    def _differing(
        self, index: int, want, fresh: set[str]
    ) -> dict[str, tuple[tuple[int, int], ...] | None]:
        """Files whose data or attributes differ, and the byte ranges to send (None: all).

        Blocks first compared whole (a full sync, a changed entry) are compared
        again by sub-block, so only the differing 4 KiB go.
        """
        began = time.monotonic()
        diffs, mine, _theirs = self._compare(index, want, hashes=True)
        out: dict[str, tuple[tuple[int, int], ...] | None] = {}
        coarse: dict[str, list[int]] = {}
        for d in diffs:
            entry = mine.get(d.path)
            if entry is None or entry.kind != FILE or d.what == "extra" or d.path in fresh:
                continue
            if d.what in ("missing", "kind"):
                out[d.path] = None  # nothing of it there: all of it
                continue
            out[d.path] = d.ranges
            named = None if want is None else want.get(d.path)
            if d.blocks and (named is None or not all(i >= verify.SUB_BLOCKS for i in named)):
                coarse[d.path] = [verify.sub_block(i) for i in d.blocks]
        if coarse:
            finer, _mine, _theirs = self._compare(index, coarse, hashes=True)
            ranges = {d.path: d.ranges for d in finer}
            for path in coarse:
                out[path] = ranges.get(path, ())
        self.compare_seconds += time.monotonic() - began
        return out

    def _planned_bytes(self, index: int, path: str, ranges) -> int:
        if ranges is not None:
            return sum(length for _, length in ranges)
        try:
            return os.stat(path, dir_fd=self.roots[index], follow_symlinks=False).st_size
        except OSError:
            return 0

    def _file(self, index: int, planned: str, ranges: tuple[tuple[int, int], ...] | None) -> None:
        """Send ``ranges`` of the file (None: all of it), then its size and attributes.

        ``planned``: its name in the namespace phase; the file is opened (on
        both sides) by the name it has now, and followed by its handle from then on.
        """
        root = self.roots[index]
        submit = self._submitter(index)
        handle = next(RESYNC_HANDLES)
        with self.orderings[index].namespace():
            names = self._names[index]
            fd, path = self._open_named(root, names.names(planned))
            names.forget(planned)
            if fd is None:
                return  # unlinked since the scan: so it is on the secondary, in order
            submit(ops.Open(handle, path, os.O_WRONLY, 0, -1, -1, False, ()))
        lock = self.orderings[index].inode(os.fstat(fd).st_ino)
        try:
            with lock:
                # Same size on both sides from here on: an application truncate
                # or extension that follows applies alike to both.
                now = os.fstat(fd)
                submit(ops.Truncate(handle, "", now.st_size, now.st_mtime_ns))
            # Bounded by the size seen at the start: whatever the application
            # writes beyond it goes to the secondary as its own operations.
            for at, length in pieces(((0, now.st_size),) if ranges is None else ranges):
                # The lock per piece, not per file: the application waits at most
                # one piece's read and submit, and a piece read under it is exact.
                with lock:
                    piece = read_piece(fd, index, handle, at, length, now.st_mtime_ns)
                    if piece is not None:
                        self.sender.submit(index, piece.op, resync=True, payload=piece.payload)
                self.remaining_bytes = max(0, self.remaining_bytes - length)
            with lock:
                now = os.fstat(fd)
                submit(ops.Truncate(handle, "", now.st_size, now.st_mtime_ns))
                submit(ops.Chown(handle, "", now.st_uid, now.st_gid))
                submit(ops.Chmod(handle, "", stat.S_IMODE(now.st_mode)))
                submit(ops.Utimens(handle, "", now.st_atime_ns, now.st_mtime_ns))
                submit(ops.Release(handle))
        finally:
            os.close(fd)

    @staticmethod
    def _open_named(root: int, names: Sequence[str]) -> tuple[int | None, str]:
        """The file open by the first of its names that still leads to a regular file."""
        for path in names:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root)
            except (FileNotFoundError, NotADirectoryError):
                continue
            if stat.S_ISREG(os.fstat(fd).st_mode):
                return fd, path
            os.close(fd)
        return None, ""

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


def _data_regions(regions: Iterable[DirtyRegion], dir: str) -> dict[str, set[int]]:
    """Data region indexes per path of one dir (pure)."""
    out: dict[str, set[int]] = {}
    for r in regions:
        if r.dir == dir and r.index >= 0:
            out.setdefault(r.path, set()).add(r.index)
    return out
