"""Which node serves which share of a farm module's clients (pure).

A farm module splits its clients into ``BUCKETS`` buckets; the kernel puts
each client packet in a bucket (nftables ``jhash`` of the client address, or
address and port, with the module's seed) and each node accepts only the
buckets it owns. This module decides the owners.

Each bucket has a home node, chosen once from the module's nodes and
weights so that every node's share of homes matches its weight exactly; a
bucket whose home is not alive goes to the alive node with the highest
weighted rendezvous score (the logarithmic method: ``score = -weight /
ln(h)`` with ``h`` a stable hash of seed, bucket and node mapped into
(0, 1)); homes are picked by the same scores, under each node's capacity.
Why not "bucket modulo alive count": every node computes the same map from
the same membership with no coordination, and because each bucket's
preference order is fixed, when a node fails only its own buckets move;
when it comes back it takes back exactly those. The hash is blake2b, never Python's
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


def _capacities(nodes: Mapping[str, int]) -> dict[str, int]:
    """Buckets per weighted node, proportional to weight, summing to ``BUCKETS``.

    Largest remainder: each node gets the floor of its quota, the buckets
    left go to the largest fractional parts (the name breaks ties).
    """
    weighted = sorted(n for n, w in nodes.items() if w > 0)
    total = sum(nodes[n] for n in weighted)
    quotas = {n: BUCKETS * nodes[n] / total for n in weighted}
    caps = {n: int(q) for n, q in quotas.items()}
    left = BUCKETS - sum(caps.values())
    for name in sorted(weighted, key=lambda n: (caps[n] - quotas[n], n))[:left]:
        caps[name] += 1
    return caps


def home_map(nodes: Mapping[str, int], seed: Seed) -> BucketMap:
    """Each bucket's home: its owner when every weighted node is alive.

    Plain rendezvous leaves each node's share to chance (with 3 nodes and 256
    buckets, shares of 75-95 are common), which shows as unequal load. Homes
    are balanced exactly: (bucket, node) pairs are taken by descending score,
    a pair being kept while its bucket has no home and its node has room.
    """
    _check_weights(nodes, ())
    caps = _capacities(nodes)
    if not caps:
        return (None,) * BUCKETS
    raw = _seed_bytes(seed)
    pairs = sorted(
        ((_score(raw, b, n, nodes[n]), n, b) for b in range(BUCKETS) for n in caps), reverse=True
    )
    home: list[str | None] = [None] * BUCKETS
    for _, name, bucket in pairs:
        if home[bucket] is None and caps[name] > 0:
            home[bucket] = name
            caps[name] -= 1
    return tuple(home)


def bucket_map(nodes: Mapping[str, int], alive: Collection[str], seed: Seed) -> BucketMap:
    """The owner of each of the ``BUCKETS`` buckets (``None``: nobody eligible).

    Each bucket has a fixed preference list: its home first, then the other
    nodes by descending rendezvous score; its owner is the first alive node
    of that list. A fixed list per bucket is what makes a failure move only
    the failed node's buckets, and a return take back exactly those.
    """
    candidates = eligible(nodes, alive)
    if not candidates:
        return (None,) * BUCKETS
    raw = _seed_bytes(seed)
    homes = home_map(nodes, seed)
    owners: list[str | None] = []
    for bucket in range(BUCKETS):
        if homes[bucket] in candidates:
            owners.append(homes[bucket])
            continue
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
