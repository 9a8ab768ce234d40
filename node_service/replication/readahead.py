"""Adaptive look-ahead of the dirty log: how far ahead of a file's writer to record.

Recording a region costs a durable commit of the dirty log, and a frame of
an operation may not leave (a secondary may not acknowledge it) before its
regions are durable (docs/dev/replication.md, "The dirty-log rule"). A
writer that streams through a file would pay one commit per look-ahead
window, in series with its writes. So a file written sequentially gets a
look-ahead that doubles, and is extended *before* the writer reaches its
end: once the writer is in the second half of the last extension, the next
one is recorded by a commit nobody waits for, and by the time the writer
gets there it is durable. Pure: ``DirtyTracker`` keeps one ``Stream`` per
file and records what ``extend`` returns.

Bounds: the look-ahead never reaches more than ``MAX_AHEAD`` regions
(64 MiB) beyond the highest region written; unused look-ahead is forgotten
``clear_delay`` after the writer last touched the file, so a resync after a
crash sends or compares at most that much beyond what was really written.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import TypeVar

MAX_AHEAD = 1024  # regions (64 KiB each): 64 MiB
K = TypeVar("K", bound=Hashable)  # how the caller names a file

STARTED = "a new region: look-ahead starts"
EXTENDED = "written in order into the look-ahead's second half: extended, doubled up to the bound"
WITHIN = "within the look-ahead: nothing to record"
OUTSIDE = "a recorded region outside the stream: the stream is kept"


@dataclass(frozen=True, slots=True)
class Stream:
    """What one file's look-ahead has recorded so far.

    ``end``: first region index not recorded ahead; ``step``: regions the
    last extension (or the start) recorded; ``pos``: one past the highest
    region written; ``touched``: monotonic time of the last write.
    """

    end: int
    step: int
    pos: int
    touched: float

    def holds(self, index: int, now: float, idle: float) -> bool:
        """A region ahead of the writer, which wrote within ``idle`` seconds: keep it."""
        return self.pos <= index < self.end and now - self.touched < idle


def opened(ahead: Iterable[tuple[K, int]], now: float) -> dict[K, Stream]:
    """The streams of files whose first regions were recorded ahead at their open.

    ``ahead``: (file, region index) pairs; markers (negative indexes) are left out.
    """
    lo: dict[K, int] = {}
    hi: dict[K, int] = {}
    for key, index in ahead:
        if index >= 0:
            lo[key] = min(lo.get(key, index), index)
            hi[key] = max(hi.get(key, index), index)
    return {key: Stream(hi[key] + 1, hi[key] + 1 - lo[key], lo[key], now) for key in lo}


def active(streams: dict[K, Stream], now: float, idle: float) -> dict[K, Stream]:
    """The streams whose writer wrote within ``idle`` seconds; the others start afresh."""
    return {key: s for key, s in streams.items() if now - s.touched < idle}


def extend(
    stream: Stream | None,
    first: int,
    last: int,
    new: bool,
    now: float,
    start: int,
    max_ahead: int = MAX_AHEAD,
) -> tuple[Stream | None, range, str]:
    """After a write of data regions ``first``..``last`` (``new``: one was not recorded).

    Returns the file's stream from now on, the region indexes to record
    ahead now (possibly empty) and why. ``start``: regions recorded beyond
    a new region that no stream explains (the old fixed read-ahead).
    """
    # In the stream: the write begins where the writer was (or a little
    # behind: writes that arrive out of order). A write that skips ahead is
    # not sequential, even inside the look-ahead (random writes must not
    # grow it: a long unused run costs a resync bytes).
    if stream is not None and stream.pos - stream.step <= first <= stream.pos:
        pos = max(stream.pos, last + 1)
        if stream.end - last > stream.step // 2:
            return Stream(stream.end, stream.step, pos, now), range(0), WITHIN
        base = max(stream.end, last + 1)  # past the look-ahead if the write outran it
        # never more than max_ahead beyond the region written: the resync's bound
        step = max(1, min(2 * stream.step, max_ahead - (base - last - 1)))
        return Stream(base + step, step, pos, now), range(base, base + step), EXTENDED
    if not new:
        # a rewrite elsewhere (a header updated while a log grows) leaves the stream alone
        return stream, range(0), OUTSIDE
    end = last + 1 + start
    return Stream(end, start + 1, last + 1, now), range(last + 1, end), STARTED
