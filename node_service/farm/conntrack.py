"""Strict TCP pickup on farm nodes: ``nf_conntrack_tcp_loose=0`` while a farm module runs.

Every node of a farm receives every client packet. By default (``loose=1``)
conntrack "picks up" a mid-stream TCP packet it has no entry for: it sets
up a new entry with window tracking as if the flow had just started, the
filter's last rule drops the packet, and the entry is freed. On a
non-owner that is every packet of every other node's flows. With
``loose=0`` TCP tracking refuses such a packet at once: it is marked
invalid and the filter's first rule drops it (see ``nft.py``). Measured
here about 0.15 us less per such packet (of ~1 us the IP stack, conntrack
and the filter cost a non-owner per dropped packet); small, but it is paid
on two thirds of a three-node farm's packets. Flows this node accepted
keep their entries and are unaffected.

The setting belongs to the node's whole network namespace, not to the
module: see docs/dev/farm.md for what it means on a real node. So the value
found before the first farm module started is saved (in memory, and in each
farm module's state directory so a daemon that died does not later "restore"
its own 0) and put back when the last farm module of this daemon stops,
unless somebody changed it meanwhile.

``plan_start``/``plan_stop`` are the pure decisions; ``TcpPickup`` applies
them (one per daemon process, shared by its farm modules).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path

from node_service.errors import RampartError

LOOSE = Path("/proc/sys/net/netfilter/nf_conntrack_tcp_loose")
STRICT = "0"
SETTING = "net.netfilter.nf_conntrack_tcp_loose"


class PickupError(RampartError):
    """The conntrack setting could not be read or written (the filter still works)."""


@dataclass(frozen=True)
class PickupChange:
    """What to write (``None``: nothing), the value to keep for later, and why."""

    write: str | None
    saved: str | None
    reason: str


def plan_start(
    holders: frozenset[str], current: str, saved: str | None, left_over: str | None
) -> PickupChange:
    """A farm module starts; ``holders`` are the farm modules already running here.

    ``left_over`` is the value a previous run of ``module`` saved and never
    restored (its daemon died): it, not the current 0, is the node's own value.
    """
    keep = saved if holders and saved is not None else (left_over or current)
    if current == STRICT:
        return PickupChange(None, keep, f"{SETTING} already {STRICT}")
    return PickupChange(
        STRICT, keep,
        f"{SETTING} {current} -> {STRICT}: other nodes' mid-stream packets are dropped "
        "as invalid instead of creating conntrack entries",
    )  # fmt: skip


def plan_stop(holders: frozenset[str], current: str, saved: str | None) -> PickupChange:
    """A farm module stops; ``holders`` are the farm modules still running after it."""
    if holders:
        names = ", ".join(sorted(holders))
        return PickupChange(None, saved, f"{SETTING} stays {current}: farm {names} still running")
    if saved is None or saved == current:
        return PickupChange(None, None, f"{SETTING} left at {current}")
    if current != STRICT:
        return PickupChange(
            None,
            None,
            f"{SETTING} left at {current}: changed by someone else since the farm set it",
        )
    return PickupChange(saved, None, f"{SETTING} {current} -> {saved} (its value before the farm)")


class TcpPickup:
    """Applies the plans to ``path`` (the /proc/sys file); one per daemon process."""

    def __init__(self, path: Path = LOOSE) -> None:
        self.path = path
        self.holders: frozenset[str] = frozenset()
        self.saved: str | None = None
        self._lock = asyncio.Lock()

    def _read(self) -> str:
        try:
            return self.path.read_text().strip()
        except OSError as exc:
            raise PickupError(
                f"cannot read {self.path}: {exc.strerror}; expected nf_conntrack loaded "
                "(the farm filter loads it)"
            ) from None

    def _write(self, value: str) -> None:
        try:
            self.path.write_text(value + "\n")
        except OSError as exc:
            raise PickupError(f"cannot set {SETTING}={value}: {exc.strerror}") from None

    async def start(self, module: str, memo: Path) -> str:
        """Make pickup strict for ``module``; ``memo`` keeps the node's value across crashes."""
        async with self._lock:
            left_over = None
            with contextlib.suppress(OSError):
                left_over = memo.read_text().strip() or None
            current = await asyncio.to_thread(self._read)
            change = plan_start(self.holders, current, self.saved, left_over)
            if change.write is not None:
                await asyncio.to_thread(self._write, change.write)
            self.holders, self.saved = self.holders | {module}, change.saved
            if change.saved is not None:
                with contextlib.suppress(OSError):
                    memo.parent.mkdir(parents=True, exist_ok=True)
                    memo.write_text(change.saved + "\n")
            return change.reason

    async def stop(self, module: str, memo: Path) -> str:
        """``module`` no longer needs strict pickup; the last one puts the old value back."""
        async with self._lock:
            if module not in self.holders:
                return f"{SETTING}: not changed by farm {module}"
            rest = self.holders - {module}
            current = await asyncio.to_thread(self._read)
            change = plan_stop(rest, current, self.saved)
            if change.write is not None:
                await asyncio.to_thread(self._write, change.write)
            self.holders, self.saved = rest, change.saved
            with contextlib.suppress(OSError):
                memo.unlink(missing_ok=True)
            return change.reason
