"""Which buckets the ingress drop must let through: owned ones, and those this node holds flows in.

The farm's ``netdev`` table (``nft.py``) drops a packet at the LAN
interface, before IP and conntrack, when its bucket is neither owned by
this node nor *held*: a bucket in which this node may still have a live
flow. Held buckets exist because established flows stay where they started
when their bucket moves (docs/dev/farm.md): the old owner must keep
receiving their packets until they end.

How a node knows: the filter's "owned" rule writes each accepted flow's
bucket into its conntrack mark (``nft.MARK_BASE`` + bucket), and
``read_held`` asks conntrack (netlink, filtered by mark in the kernel) for
the marked entries to the module's VIPs and ports. The decision is pure:

- when buckets stop being owned they become held at once, in the same nft
  transaction that stops accepting their new flows, so no flow this node
  accepted is ever cut at the interface;
- conntrack is read again ``GRACE_S`` after the last such change (by then
  no new flow of those buckets can be accepted here, so the reading is
  complete) and then every ``EVERY_S`` while some bucket is held; a held
  bucket is let go once no entry of this node's is left in it;
- at start nothing is known (a daemon restart keeps the kernel's entries),
  so every bucket is held until the first reading;
- a failed reading keeps what is held: it costs CPU, never a flow.

``read_held`` is the only side effect; the runner calls it off the event loop.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from node_service.errors import RetryableError
from node_service.farm.buckets import BUCKETS
from node_service.farm.nft import ALL_BUCKETS, MARK_BASE, MARK_MASK, FilterRule

GRACE_S = 1.0  # after the last bucket lost: every flow this node accepted is in conntrack
EVERY_S = 1.0  # while some bucket is held
PROTOCOL_NUMBERS = {"tcp": 6, "udp": 17}


class HeldFlowsError(RetryableError):
    """Conntrack could not be read; the held buckets stay as they were."""


@dataclass(frozen=True)
class Entry:
    """One conntrack entry as far as the farm cares: where it goes, and its mark."""

    daddr: str
    protocol: int
    dport: int
    mark: int


@dataclass(frozen=True)
class Hold:
    """Buckets let through at ingress besides the owned ones, when to look again, why."""

    held: frozenset[int]
    check_at: float | None  # monotonic seconds; None: nothing held, nothing to read
    reason: str


def starting(now: float) -> Hold:
    """Nothing known yet: hold every bucket until conntrack has been read."""
    return Hold(ALL_BUCKETS, now, "every bucket let through until conntrack is read")


def after_load(before: frozenset[int], owned: frozenset[int], hold: Hold, now: float) -> Hold:
    """Owned buckets change from ``before`` to ``owned``: the ones lost are held at once."""
    lost = before - owned
    held = (hold.held | lost) - owned
    if not held:
        return Hold(frozenset(), None, "no bucket held beyond the owned ones")
    check_at = now + GRACE_S if lost else hold.check_at
    reason = hold.reason if not lost else f"{len(lost)} bucket(s) moved away: held until read"
    return Hold(frozenset(held), now if check_at is None else check_at, reason)


def after_reading(owned: frozenset[int], found: frozenset[int], hold: Hold, now: float) -> Hold:
    """Conntrack says this node has flows in ``found``; ``hold`` is what was held."""
    if hold.check_at is not None and now < hold.check_at:
        return hold  # a bucket was lost meanwhile: this reading may predate its last flows
    held = frozenset(found - owned)
    if not held:
        return Hold(held, None, "no flow of this node left outside its owned buckets")
    return Hold(
        held,
        now + EVERY_S,
        f"{len(held)} bucket(s) not owned still hold flows of this node: let through",
    )


def held_buckets(
    entries: Iterable[Entry], vips: Iterable[str], rules: Iterable[FilterRule]
) -> frozenset[int]:
    """Buckets of the marked entries going to the module's VIPs and ports."""
    addresses = {str(ipaddress.IPv4Address(v)) for v in vips}
    wanted = {(PROTOCOL_NUMBERS[r.protocol], p) for r in rules for p in r.ports}
    found = set()
    for entry in entries:
        bucket = entry.mark - MARK_BASE
        if (
            entry.mark & MARK_MASK == MARK_BASE
            and 0 <= bucket < BUCKETS
            and entry.daddr in addresses
            and (entry.protocol, entry.dport) in wanted
        ):
            found.add(bucket)
    return frozenset(found)


def read_entries() -> list[Entry]:
    """The conntrack entries of this network namespace marked by a farm filter."""
    from pyroute2 import NFCTSocket
    from pyroute2.netlink.exceptions import NetlinkError

    entries = []
    try:
        with NFCTSocket() as ct:
            for msg in ct.dump(mark=MARK_BASE, mark_mask=MARK_MASK):
                orig = msg.get_attr("CTA_TUPLE_ORIG")
                if orig is None:
                    continue
                ip, proto = orig.get_attr("CTA_TUPLE_IP"), orig.get_attr("CTA_TUPLE_PROTO")
                if ip is None or proto is None:
                    continue
                entries.append(
                    Entry(
                        str(ip.get_attr("CTA_IP_V4_DST")),
                        int(proto.get_attr("CTA_PROTO_NUM") or 0),
                        int(proto.get_attr("CTA_PROTO_DST_PORT") or 0),
                        int(msg.get_attr("CTA_MARK") or 0),
                    )
                )
    except (OSError, NetlinkError) as exc:
        raise HeldFlowsError(
            f"cannot read conntrack entries: {exc}; every bucket that moved away stays "
            "let through at the interface"
        ) from None
    return entries


def read_held(vips: Iterable[str], rules: Iterable[FilterRule]) -> frozenset[int]:
    """Buckets in which this node still has flows of the module (reads conntrack)."""
    return held_buckets(read_entries(), vips, rules)
