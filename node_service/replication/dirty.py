"""Persistent dirty tracking: which regions of which files the peer may lack.

Both nodes of a mirror module keep one SQLite database (WAL mode,
``synchronous=FULL``) under the module's state dir. A row names a region:
(replicated dir, path inside it, region index) where the index is an
``ops.Region`` index: a ``REGION_SIZE`` block of data, or the ``META`` /
``ENTRY`` markers of the path (attributes; existence and type). The same
database keeps the module's data generation, the 'stale' flag and whether
the node stopped cleanly.

The rule that makes the union of both sides' records cover every possible
gap (docs/dev/replication.md, "Transport and dirty tracking"):

- primary: a region is durable in its log before the operation touching it
  leaves the node and before ``wait`` acknowledges it to the application;
  it is forgotten only after the secondary acknowledged every operation on
  it as written. While the peer is absent, regions are never forgotten.
- secondary: a region is durable in its log before the operation touching
  it is acknowledged as written; it is forgotten only after the applied data
  was flushed to disk (the ``before_clear`` hook).

Recording costs an fsync, so ``DirtyTracker`` batches records into group
commits and keeps recently used regions recorded for ``clear_delay``
seconds: a hot region costs one commit, not one per write (the same idea as
DRBD's activity log). A region recorded longer than necessary only costs a
little extra resync; a region forgotten too early would be a silent gap.
A file written in order gets a look-ahead that doubles, extended before the
writer reaches its end (``readahead.py``): a few commits, none waited for.

A region below a directory whose ENTRY is already recorded needs no row of
its own: that ENTRY (to a resync, the directory's whole subtree) is its
*cover*, kept on disk as long as any region it covers is remembered. A
directory just created or renamed thus costs one commit, not one per file
created in it (``COVER_BUDGET`` bounds how much one cover takes on).
"""

from __future__ import annotations

import collections
import heapq
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from node_service.errors import FatalError, RetryableError
from node_service.replication import ops, readahead

log = logging.getLogger("rampart.replication.dirty")

REGION_SIZE = ops.REGION_SIZE
META = ops.META
ENTRY = ops.ENTRY
DB_NAME = "dirty.sqlite"
PRIMARY_ROLE, SECONDARY_ROLE = "primary", "secondary"
READAHEAD = 15  # regions recorded after a new one no stream explains (a stream's first 1 MiB)
MAX_AHEAD = readahead.MAX_AHEAD
# Regions one ENTRY covers before the paths below it need rows of their own
# again (a nearer directory's ENTRY, else one row per region): the work a
# resync after a cut spends on a busy directory stays bounded by activity
# within the last few seconds, not by everything ever created in it.
COVER_BUDGET = 4096
COVER_LINGER = 5  # clear_delays a cover stays after the last region it covered is forgotten
SCHEMA = """
CREATE TABLE IF NOT EXISTS region (
    dir TEXT NOT NULL,
    path TEXT NOT NULL,
    idx INTEGER NOT NULL,
    PRIMARY KEY (dir, path, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
"""


class DirtyLogError(FatalError):
    """The dirty log cannot be written: replication can no longer promise anything."""


class DirtyTimeout(RetryableError):
    """A region record did not become durable in time."""


class DirtyRegion(NamedTuple):
    """An ``ops.Region`` of one replicated dir (its configured path); a tuple: hashed in C."""

    dir: str
    path: str
    index: int


def dirty_regions(dir: str, regions: Iterable[ops.Region]) -> tuple[DirtyRegion, ...]:
    return tuple(DirtyRegion(dir, r.path, r.index) for r in regions)


@dataclass(frozen=True)
class FileDirt:
    """What a resync must bring over for one path.

    ``entry``: the path's existence and type (and, for a directory, its whole
    subtree); ``meta``: size, mode, owner, times; ``indexes``: data regions.
    Any data region implies ``meta``.
    """

    dir: str
    path: str
    entry: bool
    meta: bool
    indexes: tuple[int, ...]


def opening_ahead(dir: str, op: ops.Op, count: int = READAHEAD + 1) -> tuple[DirtyRegion, ...]:
    """Data regions a created or truncated file is about to get (``DirtyTracker.add`` ahead)."""
    if not isinstance(op, ops.Open) or not (op.created or op.flags & os.O_TRUNC):
        return ()
    return tuple(DirtyRegion(dir, op.path, k) for k in range(count))


def plan(regions: Iterable[DirtyRegion]) -> tuple[FileDirt, ...]:
    """Group dirty regions per path, in path order (parents before children)."""
    per_path: dict[tuple[str, str], set[int]] = collections.defaultdict(set)
    for r in regions:
        per_path[(r.dir, r.path)].add(r.index)
    out = []
    for (d, p), idx in sorted(per_path.items()):
        data = tuple(sorted(i for i in idx if i >= 0))
        out.append(FileDirt(d, p, ENTRY in idx, META in idx or bool(data), data))
    return tuple(out)


def encode_regions(regions: Iterable[DirtyRegion]) -> bytes:
    """Regions as JSON (sent by the secondary at reintegration)."""
    return json.dumps([[r.dir, r.path, r.index] for r in sorted(regions)]).encode()


def decode_regions(data: bytes) -> frozenset[DirtyRegion]:
    try:
        rows = json.loads(data.decode("utf-8"))
        ok = isinstance(rows, list) and all(
            isinstance(row, list)
            and len(row) == 3
            and isinstance(row[0], str)
            and isinstance(row[1], str)
            and type(row[2]) is int
            and row[2] >= ENTRY
            for row in rows
        )
    except (UnicodeDecodeError, ValueError):
        ok = False
    if not ok:
        raise RetryableError("dirty region list from peer is malformed: expected [[dir, path, n]]")
    return frozenset(DirtyRegion(d, p, i) for d, p, i in rows)


class DirtyLog:
    """The module's SQLite dirty log; every method is one durable transaction."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # autocommit (isolation_level=None): we open transactions ourselves.
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise DirtyLogError(f"{self.path}: SQLite refused WAL mode (got {mode})")
            # FULL: a commit is on disk when it returns; NORMAL would lose the
            # last records at a power cut, which is exactly when they matter.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise DirtyLogError(f"{self.path}: cannot open the dirty log: {exc}") from None

    def journal_mode(self) -> str:
        with self._lock:
            return self._db.execute("PRAGMA journal_mode").fetchone()[0]

    def apply(self, record: Iterable[DirtyRegion] = (), clear: Iterable[DirtyRegion] = ()) -> None:
        """Record and forget regions in one transaction (one fsync)."""
        add = [(r.dir, r.path, r.index) for r in record]
        drop = [(r.dir, r.path, r.index) for r in clear]
        if not add and not drop:
            return
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                if drop:
                    self._db.executemany(
                        "DELETE FROM region WHERE dir=? AND path=? AND idx=?", drop
                    )
                if add:
                    self._db.executemany("INSERT OR IGNORE INTO region VALUES (?, ?, ?)", add)
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise DirtyLogError(f"{self.path}: cannot write the dirty log: {exc}") from None

    def record(self, regions: Iterable[DirtyRegion]) -> None:
        self.apply(record=regions)

    def clear(self, regions: Iterable[DirtyRegion]) -> None:
        self.apply(clear=regions)

    def regions(self) -> frozenset[DirtyRegion]:
        with self._lock:
            rows = self._db.execute("SELECT dir, path, idx FROM region").fetchall()
        return frozenset(DirtyRegion(d, p, i) for d, p, i in rows)

    def count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT count(*) FROM region").fetchone()[0]

    def get(self, key: str, default: str | None = None) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else default

    def set(self, key: str, value: str) -> None:
        with self._lock:
            try:
                self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))
            except sqlite3.Error as exc:
                raise DirtyLogError(f"{self.path}: cannot write {key}: {exc}") from None

    @property
    def generation(self) -> int:
        return int(self.get("generation", "0") or 0)

    def set_generation(self, generation: int) -> None:
        self.set("generation", str(int(generation)))

    @property
    def stale(self) -> str | None:
        """None when the data is usable, else the reason it is stale."""
        reason = self.get("stale", "")
        return reason or None

    def set_stale(self, reason: str | None) -> None:
        self.set("stale", reason or "")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _rollback(self) -> None:
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass


class DirtyTracker:
    """Group-committed region records with in-flight reference counts.

    ``add`` registers regions an operation touches and returns the commit
    epoch that makes them durable (0: already durable); ``wait_durable`` blocks
    until that commit is done. ``release`` says the peer holds the operation
    (the region may be forgotten after ``clear_delay``); ``keep`` says it may
    not (peer absent: the region stays until a resync settles it).
    ``readahead``: regions recorded beyond a new one (0: no look-ahead at all);
    ``max_ahead``: a stream's bound beyond its writer; ``commits``: commits made.
    """

    def __init__(
        self,
        dirty_log: DirtyLog,
        *,
        name: str,
        clear_delay: float = 1.0,
        before_clear: Callable[[], None] | None = None,
        readahead: int = READAHEAD,
        max_ahead: int = MAX_AHEAD,
    ):
        self.log = dirty_log
        self.clear_delay = clear_delay
        self.readahead = readahead
        self.max_ahead = max_ahead
        self._before_clear = before_clear
        self._cond = threading.Condition()
        self._known: dict[DirtyRegion, int] = dict.fromkeys(dirty_log.regions(), 0)
        self._refs: collections.Counter[DirtyRegion] = collections.Counter()
        self._pending: set[DirtyRegion] = set()
        # Regions the peer may lack with no operation in flight (absent peer,
        # stale peer, records found at start): only settle() forgets them.
        self._pinned: set[DirtyRegion] = set(self._known)
        # (when, region) to forget, a heap: lingering covers come due later than the rest
        self._clear_due: list[tuple[float, DirtyRegion]] = []
        # covered region -> the recorded ENTRY standing in for it (never itself covered)
        self._cover_of: dict[DirtyRegion, DirtyRegion] = {}
        self._covering: collections.Counter[DirtyRegion] = collections.Counter()  # remembered now
        self._covered: collections.Counter[DirtyRegion] = collections.Counter()  # budget used
        # (dir, path) -> its look-ahead, for files written within clear_delay
        self._streams: dict[tuple[str, str], readahead.Stream] = {}
        self._next_epoch = 1
        self._last_clear = 0.0
        self._done_epoch = 0
        self._failure: DirtyLogError | None = None
        self._stopping = False
        self.commits = 0
        # History is known if the last run closed the log cleanly, or ran as
        # the secondary (whose records are durable before it acknowledges).
        # After a crash of a primary, writes applied locally whose record was
        # still in a group commit may be on neither side's log: full sync.
        self.history_known = (
            dirty_log.get("clean") == "1" or dirty_log.get("role") == SECONDARY_ROLE
        )
        dirty_log.set("clean", "0")
        self._thread = threading.Thread(target=self._run, name=f"repl-dirty-{name}", daemon=True)
        self._thread.start()

    # ---- callers -----------------------------------------------------------

    def add(self, regions: Iterable[DirtyRegion], ahead: Iterable[DirtyRegion] = ()) -> int:
        """Register an operation's regions; ``ahead``: likely next ones, recorded unreferenced.

        ``ahead`` rides the same commit (a file just created or truncated is
        written next: recording its first data regions now saves that write a
        commit on each side) and is forgotten after ``clear_delay`` if unused.
        """
        with self._cond:
            self._raise_failure()
            idle = not self._pending
            epoch = 0
            reach: dict[tuple[str, str], tuple[int, int, bool]] = {}  # file: data regions, new
            for r in regions:
                self._refs[r] += 1
                at = self._known.get(r)
                new = at is None
                if new:
                    at = self._remember(r)
                if at > self._done_epoch:
                    epoch = max(epoch, at)
                if r.index >= 0 and self.readahead:
                    lo, hi, was = reach.get((r.dir, r.path), (r.index, r.index, new))
                    reach[(r.dir, r.path)] = (min(lo, r.index), max(hi, r.index), was or new)
            if ahead:  # after: a cover the regions brought along serves these too
                self._record_ahead(ahead)
                if self.readahead:  # a file just opened is written from its start
                    pairs = (((r.dir, r.path), r.index) for r in ahead)
                    self._streams.update(readahead.opened(pairs, time.monotonic()))
            for key, (lo, hi, new) in reach.items():
                self._follow(key, lo, hi, new)
            if idle and self._pending:  # else the commit thread was woken already
                self._cond.notify_all()
            return epoch

    def _remember(self, r: DirtyRegion) -> int:
        """Start remembering ``r``: under a cover if one stands in, else as a new row."""
        cover = self._cover_for(r)
        if cover is not None:
            self._cover_of[r] = cover
            self._covering[cover] += 1
            self._covered[cover] += 1
            at = self._known[r] = self._known[cover]  # durable once the cover is
            return at
        at = self._known[r] = self._next_epoch
        self._pending.add(r)
        return at

    def _cover_for(self, r: DirtyRegion, *, promote: bool = True) -> DirtyRegion | None:
        """The recorded ENTRY that may stand in for ``r`` (None: ``r`` needs its own row).

        The nearest remembered ENTRY of a directory above ``r`` decides: its
        row, or if it has none, the row of its own cover. Once that cover has
        taken on ``COVER_BUDGET`` regions, ``r``'s parent directory — inside
        the spent cover's subtree, so no wider — gets a row of its own (one
        commit) and a fresh budget; only the spent cover's own children get
        rows of their own. A file's own ENTRY never covers its data, and the
        root's ENTRY is never recorded: top-level files keep exact rows.
        ``promote=False`` (regions ahead, which nothing refers to) never makes a row.
        """
        path = r.path.rpartition("/")[0]
        near = None
        while path and near is None:
            if DirtyRegion(r.dir, path, ENTRY) in self._known:
                near = DirtyRegion(r.dir, path, ENTRY)
            path = path.rpartition("/")[0]
        if near is None:
            return None
        cover = self._cover_of.get(near, near)
        if self._covered[cover] < COVER_BUDGET:
            return cover
        parent = DirtyRegion(r.dir, r.path.rpartition("/")[0], ENTRY)
        if parent == cover or not promote:
            return None
        if parent in self._cover_of:
            self._uncover(parent)
        self._known[parent] = self._next_epoch
        self._pending.add(parent)
        return parent

    def _uncover(self, r: DirtyRegion) -> None:
        """``r`` no longer leans on its cover; a cover nobody leans on may be forgotten."""
        cover = self._cover_of.pop(r)
        self._covering[cover] -= 1
        if self._covering[cover] <= 0:
            del self._covering[cover]
            # kept a while longer: a writer that pauses finds its directory
            # still covered instead of paying a commit per file from then on
            linger = COVER_LINGER * self.clear_delay
            heapq.heappush(self._clear_due, (time.monotonic() + linger, cover))

    def _follow(self, key: tuple[str, str], lo: int, hi: int, new: bool) -> None:
        # Files grow and are copied in order: regions recorded ahead save the
        # writes that follow a commit each (readahead.py). Unused, they are
        # forgotten clear_delay after the writer last touched the file.
        old, now = self._streams.get(key), time.monotonic()
        stream, more, _why = readahead.extend(old, lo, hi, new, now, self.readahead, self.max_ahead)
        if stream is not None:
            self._streams[key] = stream
        self._record_ahead([DirtyRegion(*key, k) for k in more])

    def _record_ahead(self, regions: Iterable[DirtyRegion]) -> None:
        due = time.monotonic() + self.clear_delay
        covered: dict[tuple[str, str], bool] = {}  # per path: a stream's extension is one file
        for ahead in regions:
            if ahead in self._known:
                continue
            key = (ahead.dir, ahead.path)
            if key not in covered:
                # a region ahead that a cover already stands for needs nothing now
                covered[key] = self._cover_for(ahead, promote=False) is not None
            if not covered[key]:
                self._known[ahead] = self._next_epoch
                self._pending.add(ahead)
                heapq.heappush(self._clear_due, (due, ahead))

    def wait_durable(self, epoch: int, timeout: float) -> None:
        if epoch == 0:
            return
        with self._cond:
            ok = self._cond.wait_for(
                lambda: self._done_epoch >= epoch or self._failure or self._stopping, timeout
            )
            self._raise_failure()
            if not ok or self._done_epoch < epoch:
                raise DirtyTimeout(f"{self.log.path}: region record not durable in {timeout:.1f}s")

    def mark(self, regions: Iterable[DirtyRegion], timeout: float = 30.0) -> None:
        self.wait_durable(self.add(regions), timeout)

    def release(self, regions: Iterable[DirtyRegion]) -> None:
        due = time.monotonic() + self.clear_delay
        with self._cond:
            first = self._clear_due[0][0] if self._clear_due else None
            for r in regions:
                if self._drop_ref(r) == 0:
                    heapq.heappush(self._clear_due, (due, r))
            # The commit thread sleeps until the earliest due region: waking it
            # for a later one is a hand-off for nothing, per bunch of acks.
            if self._clear_due and (first is None or self._clear_due[0][0] < first):
                self._cond.notify_all()

    def keep(self, regions: Iterable[DirtyRegion]) -> None:
        with self._cond:
            for r in regions:
                self._drop_ref(r)
                self._pinned.add(r)

    def settle(self, regions: Iterable[DirtyRegion]) -> None:
        """A resync brought these regions up to date on the peer: unpin them.

        They are forgotten after ``clear_delay`` unless an operation in flight
        (or a new absence) still needs them.
        """
        due = time.monotonic() + self.clear_delay
        with self._cond:
            for r in regions:
                self._pinned.discard(r)
                heapq.heappush(self._clear_due, (due, r))
            self._cond.notify_all()

    def recorded(self) -> frozenset[DirtyRegion]:
        """Regions recorded or about to be (the in-memory view of the log)."""
        with self._cond:
            return frozenset(self._known)

    def set_role(self, role: str) -> None:
        """Which side this run is; read back after a crash (see history_known)."""
        self.log.set("role", role)

    def close(self) -> None:
        """Stop after the last commit; a clean close keeps the history known."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=10)
        if self._failure is None and not self._thread.is_alive():
            try:
                self.log.set("clean", "1")
            except DirtyLogError as exc:
                log.error("%s", exc)

    # ---- the commit thread -------------------------------------------------

    def _drop_ref(self, r: DirtyRegion) -> int:
        left = self._refs[r] - 1
        if left <= 0:
            del self._refs[r]
            return 0
        self._refs[r] = left
        return left

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._work_or_stop():
                    self._cond.wait(timeout=self._idle_wait())
                if self._stopping and not self._pending:
                    return
                record = self._pending
                self._pending = set()
                epoch = self._next_epoch
                self._next_epoch += 1
                now = time.monotonic()
                clear = []
                if self._clear_allowed(now, bool(record)):
                    clear = self._take_due(now)
                    self._last_clear = now
            try:
                if clear and self._before_clear is not None:
                    try:
                        self._before_clear()
                    except OSError as exc:
                        log.warning("cannot flush before forgetting regions: %s", exc)
                        clear = []
                self.log.apply(record=record, clear=clear)
            except Exception as exc:  # the thread must never die silently
                if not isinstance(exc, DirtyLogError):
                    exc = DirtyLogError(f"{self.log.path}: dirty log commit failed: {exc}")
                log.error("%s", exc)
                with self._cond:
                    self._failure = exc
                    self._cond.notify_all()
                return
            with self._cond:
                self.commits += 1 if (record or clear) else 0
                self._done_epoch = epoch
                self._cond.notify_all()

    def _work_or_stop(self) -> bool:
        return bool(self._pending) or self._stopping or self._clear_allowed(time.monotonic(), False)

    def _clear_allowed(self, now: float, recording: bool) -> bool:
        # Forgetting is never urgent (a region kept longer only costs resync)
        # but each forgetting commit costs an fsync, and on the secondary a
        # syncfs of the whole filesystem first: forget at most once per
        # clear_delay, and not in a commit someone waits for unless the due
        # regions have waited another clear_delay already.
        if not self._clear_due or self._clear_due[0][0] > now:
            return False
        if now - self._last_clear < self.clear_delay:
            return False
        return not recording or now - self._clear_due[0][0] >= self.clear_delay

    def _idle_wait(self) -> float | None:
        if not self._clear_due:
            return None
        at = max(self._clear_due[0][0], self._last_clear + self.clear_delay)
        return max(0.0, at - time.monotonic()) + 0.001

    def _take_due(self, now: float) -> list[DirtyRegion]:
        clear, later = [], []
        while self._clear_due and self._clear_due[0][0] <= now:
            _, r = heapq.heappop(self._clear_due)
            # Re-used since the release, or already forgotten: keep it as is.
            if r in self._refs or r in self._pinned or r not in self._known:
                continue
            if self._known[r] > self._done_epoch:  # a slow commit of regions ahead
                later.append((now + self.clear_delay, r))
                continue
            stream = self._streams.get((r.dir, r.path)) if r.index >= 0 else None
            if stream is not None and stream.holds(r.index, now, self.clear_delay):
                # ahead of a writer at work: forgotten, it would cost a commit in series
                later.append((stream.touched + self.clear_delay, r))
                continue
            if r in self._covering:
                continue  # still stands in for others: queued again when they go
            del self._known[r]
            self._covered.pop(r, None)
            if r in self._cover_of:
                self._uncover(r)  # it has no row of its own: nothing to delete
            else:
                clear.append(r)
        for item in later:  # not in the loop: with clear_delay 0 they would be due again
            heapq.heappush(self._clear_due, item)
        self._streams = readahead.active(self._streams, now, self.clear_delay)
        return clear
