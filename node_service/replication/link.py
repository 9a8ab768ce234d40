"""Replication link vocabulary shared by the sender, resync and the node's status.

Pure: the link states, the ticket a ``submit`` returns, the counters a
sender reports, and how they become the ``replication`` object of
``rampart state --json`` (status with a reason, throughput, lag). Plus
``Releases``, the one piece of shared bookkeeping both ends of the stream
use to hand acknowledged regions to their dirty tracker.
"""

from __future__ import annotations

import collections
import enum
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from node_service.errors import ModuleError

RATE_WINDOW_S = 2.0
# Acknowledged regions reach the tracker at most this often: each release
# wakes its commit thread, which on two CPUs sat on the 4 KiB write+fsync
# round trip once per operation on each node.
RELEASE_EVERY_S = 0.05


class Mode(enum.StrEnum):
    SYNC = "sync"
    SEMI = "semi"
    ASYNC = "async"


class Link(enum.StrEnum):
    IDLE = "idle"  # not connected yet
    CONNECTED = "connected"
    ABSENT = "absent"  # peer slow or gone: regions recorded, nothing sent
    STALE = "stale"  # the secondary failed to apply: same, until a resync
    CLOSED = "closed"


@dataclass(frozen=True)
class Ticket:
    """What ``wait`` needs: the operation's sequence (0: not sent) and record commit."""

    seq: int
    epoch: int


@dataclass(frozen=True)
class SenderStats:
    link: str
    reason: str
    ops: int
    bytes_sent: int
    acks: int
    bytes_per_s: float
    lag_ops: int
    lag_bytes: int
    resent_bytes: int


def parse_mode(text: str | None) -> Mode:
    try:
        return Mode(text or Mode.SYNC)
    except ValueError:
        raise ModuleError(f"replication mode {text!r}; expected sync, semi or async") from None


def replication_status(link: Link | str, resyncing: bool, reason: str) -> tuple[str, str]:
    """The ``replication.status`` of ``rampart state`` and why (pure)."""
    if resyncing and link == Link.CONNECTED:
        return "resyncing", f"resync in progress ({reason})"
    if link == Link.CONNECTED:
        return "uptodate", reason
    if link in (Link.ABSENT, Link.STALE):
        return "stale", f"secondary behind, changes tracked for resync: {reason}"
    return "off", reason


def state_fields(
    mode: Mode | str, stats: SenderStats, resyncing: bool = False, remaining: int = 0
) -> dict[str, object]:
    """The ``replication`` object of ``rampart state --json`` on the primary (pure)."""
    status, reason = replication_status(stats.link, resyncing, stats.reason)
    return {
        "mode": str(mode),
        "status": status,
        "reason": reason,
        "bytes_per_s": round(stats.bytes_per_s),
        "lag_bytes": stats.lag_bytes,
        "resync_remaining_bytes": remaining if resyncing else 0,
    }


def rate(samples: collections.deque[tuple[float, int]], now: float) -> float:
    """Bytes per second over the samples of the last RATE_WINDOW_S (pure)."""
    recent = [(t, b) for t, b in samples if now - t <= RATE_WINDOW_S]
    if len(recent) < 2:
        return 0.0
    span = max(recent[-1][0] - recent[0][0], 0.25)
    return (recent[-1][1] - recent[0][1]) / span


class Releases:
    """Regions whose operations were acknowledged, released to the tracker in bunches.

    Releasing later than possible is always safe (a region kept longer only
    costs resync; dirty-log rule 3): the tracker then forgets it at most
    ``every`` later. Whoever holds the regions calls ``flush`` when the link
    changes or when idle, so none is held longer than one poll interval.
    """

    def __init__(self, release: Callable[[list], None], every: float = RELEASE_EVERY_S):
        self._release = release
        self._every = every
        self._lock = threading.Lock()
        self._held: list = []
        self._last = time.monotonic()

    def add(self, regions: Iterable, now: float) -> None:
        with self._lock:
            self._held.extend(regions)
            due = now - self._last >= self._every
        if due:
            self.flush(now)

    def flush(self, now: float | None = None) -> None:
        with self._lock:
            held, self._held = self._held, []
            self._last = time.monotonic() if now is None else now
            if held:
                # under the lock: a later flush must not overtake this one
                self._release(held)
