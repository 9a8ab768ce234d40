"""Putting back ``nf_conntrack_tcp_loose`` where an earlier version of the farm left it.

Earlier versions ran every farm packet through conntrack and set
``net.netfilter.nf_conntrack_tcp_loose=0`` on the node while a farm module
ran ("strict pickup": a non-owner then dropped other nodes' mid-stream
packets as invalid instead of setting up an entry for each). They saved
the node's own value in the module's state directory
(``state/conntrack_tcp_loose``) and wrote it back when the last farm module
stopped.

The farm filter no longer needs it: a TCP farm runs conntrack only in
guarded buckets, whose last rule drops another node's packets in any state
(``nft.py``), and the setting belongs to the whole host, where it changes
how the node's own firewall sees connections it did not see start
(docs/dev/farm.md). So nothing sets it any more. What is left is the one
case the old code could not finish: a daemon that died while a farm ran
left ``0`` and the saved value behind. At the next start of that module
the saved value is written back (unless somebody changed the setting since)
and the file removed.

``plan_restore`` is the pure decision; ``restore_left_over`` applies it.
"""

from __future__ import annotations

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
class Restore:
    """What to write (``None``: nothing) and why."""

    write: str | None
    reason: str


def plan_restore(current: str | None, left_over: str | None) -> Restore | None:
    """``left_over``: the node's value an earlier version saved and never wrote back.

    None: nothing was left over, nothing to say.
    """
    if left_over is None:
        return None
    if current is None:
        return Restore(None, f"{SETTING}: saved value {left_over} left over, setting unreadable")
    if current != STRICT:
        return Restore(None, f"{SETTING} left at {current}: changed since an earlier farm set it")
    if left_over == current:
        return Restore(None, f"{SETTING} left at {current} (its value before the farm)")
    return Restore(
        left_over,
        f"{SETTING} {current} -> {left_over}: put back, left strict by an earlier farm version",
    )


def restore_left_over(memo: Path, path: Path = LOOSE) -> str | None:
    """Apply ``plan_restore`` for the value saved in ``memo``; what to journal, if anything."""
    try:
        left_over = memo.read_text().strip() or None
    except OSError:
        return None
    current = None
    with contextlib.suppress(OSError):
        current = path.read_text().strip()
    change = plan_restore(current, left_over)
    if change is None:
        return None
    if change.write is not None:
        try:
            path.write_text(change.write + "\n")
        except OSError as exc:
            raise PickupError(f"cannot set {SETTING}={change.write}: {exc.strerror}") from None
    with contextlib.suppress(OSError):
        memo.unlink()
    return change.reason
