"""Which node serves which share of a farm module's clients (pure).

A farm module splits its clients into ``BUCKETS`` buckets; the kernel puts
each client packet in a bucket (nftables ``jhash`` of the client address, or
address and port, with the module's seed) and each node accepts only the
buckets it owns. This module decides the owners.

Each bucket goes to the alive node with the highest weighted rendezvous
score (the logarithmic method: ``score = -weight / ln(h)`` with ``h`` a
stable hash of seed, bucket and node mapped into (0, 1)). Why rendezvous and
not "bucket modulo alive count": every node computes the same map from the
same membership with no coordination, and when a node fails only its own
buckets move (every other bucket's highest scorer is unchanged); when it
comes back it takes back exactly those. The hash is blake2b, never Python's
``hash()``, which is salted per process and would differ between nodes.

No alive node with a weight above zero is a normal state for a farm (every
node stopped), not an error: the map is then all ``None`` (nobody accepts)
and the reason says so. Malformed input (negative weight, unknown alive
node) is a ``UserError``.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from node_service.errors import UserError

BUCKETS = 256

Seed = int | str | bytes
BucketMap = tuple[str | None, ...]


def module_seed(module: str) -> int:
    """The 32-bit seed every node derives from the module name alone.

    The same value seeds the kernel's jhash and the rendezvous scores, so no
    node needs extra configuration to agree with the others.
    """
    digest = hashlib.blake2b(module.encode(), digest_size=4, person=b"rampart-farm").digest()
    return int.from_bytes(digest, "big")


def _seed_bytes(seed: Seed) -> bytes:
    if isinstance(seed, bytes):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int | str):
        raise UserError(f"farm seed {seed!r} is not usable: expected an int, str or bytes")
    return str(seed).encode()


def _check_weights(nodes: Mapping[str, int], alive: Collection[str]) -> None:
    for name, weight in nodes.items():
        if not isinstance(name, str) or not name:
            raise UserError(f"farm node name {name!r} is not usable: expected a non-empty string")
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
            raise UserError(
                f"farm node {name!r} has weight {weight!r}: expected an integer 0 or more"
            )
    unknown = sorted(set(alive) - set(nodes))
    if unknown:
        raise UserError(
            f"alive node {unknown[0]!r} is not a node of this farm: expected one of "
            f"{', '.join(sorted(nodes)) or '(none)'}"
        )


def _unit_hash(seed: bytes, bucket: int, node: str) -> float:
    """A stable value strictly inside (0, 1) for (seed, bucket, node)."""
    digest = hashlib.blake2b(
        seed + b"\0" + bucket.to_bytes(2, "big") + b"\0" + node.encode(), digest_size=8
    ).digest()
    # +0.5 keeps the value off both 0 (ln -> -inf) and 1 (ln -> 0).
    return (int.from_bytes(digest, "big") + 0.5) / 2.0**64


def _score(seed: bytes, bucket: int, node: str, weight: int) -> float:
    return -weight / math.log(_unit_hash(seed, bucket, node))


def eligible(nodes: Mapping[str, int], alive: Collection[str]) -> tuple[str, ...]:
    """Alive nodes that may own buckets (weight above zero), sorted."""
    _check_weights(nodes, alive)
    return tuple(sorted(n for n in set(alive) if nodes[n] > 0))


def bucket_map(nodes: Mapping[str, int], alive: Collection[str], seed: Seed) -> BucketMap:
    """The owner of each of the ``BUCKETS`` buckets (``None``: nobody eligible)."""
    candidates = eligible(nodes, alive)
    if not candidates:
        return (None,) * BUCKETS
    raw = _seed_bytes(seed)
    owners: list[str | None] = []
    for bucket in range(BUCKETS):
        # The name breaks (astronomically unlikely) score ties so the result
        # never depends on iteration order.
        best = max(candidates, key=lambda n: (_score(raw, bucket, n, nodes[n]), n))
        owners.append(best)
    return tuple(owners)


def owned_by(owners: BucketMap, node: str) -> frozenset[int]:
    """The bucket numbers ``node`` accepts in this map."""
    return frozenset(b for b, owner in enumerate(owners) if owner == node)


def shares(owners: BucketMap) -> dict[str, int]:
    """Bucket count per owning node (nodes with no bucket are absent)."""
    return dict(Counter(o for o in owners if o is not None))


@dataclass(frozen=True)
class Move:
    """One bucket changing owner between two maps."""

    bucket: int
    old: str | None
    new: str | None


def moves(old: BucketMap, new: BucketMap) -> tuple[Move, ...]:
    """Buckets whose owner differs between ``old`` and ``new``, in bucket order."""
    if len(old) != BUCKETS or len(new) != BUCKETS:
        raise UserError(
            f"bucket maps have {len(old)} and {len(new)} entries: expected {BUCKETS} each"
        )
    return tuple(Move(b, o, n) for b, (o, n) in enumerate(zip(old, new, strict=True)) if o != n)


def describe_moves(changes: Collection[Move]) -> str:
    """One sentence for the journal: how many buckets went from whom to whom."""
    if not changes:
        return "bucket map unchanged"
    flows = Counter((m.old or "nobody", m.new or "nobody") for m in changes)
    parts = ", ".join(f"{src} -> {dst} ({count})" for (src, dst), count in sorted(flows.items()))
    noun = "bucket moves" if len(changes) == 1 else "buckets move"
    return f"{len(changes)} {noun}: {parts}"


@dataclass(frozen=True)
class BucketPlan:
    """A new bucket map, what changed from the previous one, and why."""

    owners: BucketMap
    moves: tuple[Move, ...]
    reason: str


def plan(
    previous: BucketMap | None,
    nodes: Mapping[str, int],
    alive: Collection[str],
    seed: Seed,
) -> BucketPlan:
    """Decide the bucket map for the current membership, with a reason.

    ``previous`` is the map in force (``None`` at start, read as all
    unowned); the reason names the membership and the buckets that move.
    """
    owners = bucket_map(nodes, alive, seed)
    before = previous if previous is not None else (None,) * BUCKETS
    changes = moves(before, owners)
    candidates = eligible(nodes, alive)
    if not candidates:
        idle = sorted(set(alive) - set(candidates))
        why = "no alive node with weight above zero"
        if idle:
            why += f" ({', '.join(idle)} alive with weight 0)"
        reason = f"{why}: every bucket unowned, no client is accepted; {describe_moves(changes)}"
    else:
        split = ", ".join(f"{n}={c}" for n, c in sorted(shares(owners).items()))
        reason = f"buckets over {', '.join(candidates)} ({split}); {describe_moves(changes)}"
    return BucketPlan(owners, changes, reason)
