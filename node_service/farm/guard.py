"""Which owned buckets to guard against other nodes' flows, and until when.

When buckets move to this node from a node that is still alive (it comes
back, or the other node goes WAIT), that node keeps serving its
established connections in them (``flows.py``). Their packets reach this
node too (every node receives every frame), and this node's TCP stack,
knowing no such connection, would answer with a reset and kill them. So
buckets this node gains are *guarded* (``nft.py``): conntrack runs for
them and only new flows, flows it saw start and its own held flows pass;
anything else is dropped silently.

A node cannot tell in which bucket another node's held flows are (Python
never computes the kernel's hash), so the guard is lifted for all gained
buckets at once, when every peer that is still there says, in its
heartbeat payload, that it applied the same membership (``alive`` digest)
and holds no flow outside its owned buckets. Peers that are lost or
stopped hold nothing that can still be saved. Until then the cost is
conntrack on the guarded buckets only (everything else stays ``notrack``).

At start everything gained is guarded: a peer may hold flows from before.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

STOPPED = "STOP"


@dataclass(frozen=True)
class PeerHolds:
    """What a peer's heartbeat payload says about the flows it holds."""

    name: str
    reachable: bool
    state: str | None
    alive: str | None  # digest of the membership it applied
    held: int | None  # flows (and UDP buckets) it keeps outside its owned buckets


@dataclass(frozen=True)
class Guard:
    guarded: frozenset[int]
    reason: str


def unguarded() -> Guard:
    return Guard(frozenset(), "no bucket guarded")


def alive_digest(alive: Iterable[str] | None) -> str | None:
    """A short name for a membership, the same on every node that sees it."""
    if alive is None:
        return None
    text = "\n".join(sorted(alive)).encode()
    return hashlib.blake2b(text, digest_size=4).hexdigest()


def after_load(guard: Guard, before: frozenset[int] | None, owned: frozenset[int]) -> Guard:
    """Buckets owned go from ``before`` (None: first load) to ``owned``."""
    gained = owned - (before or frozenset())
    guarded = (guard.guarded | gained) & owned
    if guarded == guard.guarded:
        return guard if guarded else unguarded()
    return Guard(
        frozenset(guarded),
        f"{len(gained)} bucket(s) gained: guarded until no peer holds flows in them",
    )


def after_peers(guard: Guard, peers: Iterable[PeerHolds], mine: str | None) -> Guard:
    """Lift the guard once every reachable, running peer applied ``mine`` and holds nothing."""
    if not guard.guarded:
        return guard
    waiting = sorted(
        p.name
        for p in peers
        if p.reachable and p.state != STOPPED and not (p.alive == mine and p.held == 0)
    )
    if waiting:
        reason = f"{len(guard.guarded)} bucket(s) guarded: {', '.join(waiting)} may hold flows"
        return guard if guard.reason == reason else Guard(guard.guarded, reason)
    return Guard(frozenset(), "no peer holds flows in the gained buckets: guard lifted")
