"""Replication link vocabulary shared by the sender, resync and the node's status.

Pure: the link states, the ticket a ``submit`` returns, the counters a
sender reports, and how they become the ``replication`` object of
``rampart state --json`` (status with a reason, throughput, lag).
"""

from __future__ import annotations

import collections
import enum
from dataclasses import dataclass

from node_service.errors import ModuleError

RATE_WINDOW_S = 2.0


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
