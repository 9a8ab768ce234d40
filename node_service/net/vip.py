"""Virtual IP addresses on this node's interfaces (pyroute2 netlink).

Every call works in the network namespace of the calling thread, which is the
node's own. The plain functions are short synchronous netlink exchanges;
pyroute2's synchronous API runs its own event loop, so they must not be
called from a coroutine. The runner uses the async API at the end of this
file (``acquire``, ``release``, ``announce``), which runs them in a worker
thread (threads inherit the network namespace of the thread starting them).

Rampart marks the addresses it adds twice, so it can recognise its own VIPs
after a crash and clean up leftovers without touching an administrator's
addresses:

- the address protocol (``IFA_PROTO``, ``ip -d addr`` shows ``proto 82``)
  is ``RAMPART_ADDR_PROTO``; this is the mark the code trusts;
- the label is ``IFNAME:rampart`` (``ip addr`` shows it next to the address)
  when it fits the kernel's 15-character limit, else ``IFNAME:rp``, so a
  person reading ``ip addr`` sees which addresses belong to Rampart.

Add and remove are idempotent: adding a VIP that is already there is a no-op
with a reason saying so (the kernel call uses ``replace``), removing a VIP
that is absent likewise. Only IPv4 VIPs are supported (clients find them by
ARP; see ``garp.py``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from node_service.errors import RetryableError, UserError
from node_service.net import garp

RAMPART_ADDR_PROTO = 82  # ASCII "R"; kernel values 0-3 are taken, the rest is free
LABEL_SUFFIXES = (":rampart", ":rp")
IFNAMSIZ = 16  # labels and interface names are at most 15 characters
# A farm's shared-MAC interface (farm/macvlan.link_name) holds that farm's
# VIP, not a LAN address of the node: another module's VIP never goes there.
SHARED_MAC_PREFIX = "rf-"


@dataclass(frozen=True)
class Address:
    """One IPv4 address as netlink reports it."""

    interface: str
    index: int
    address: str
    prefix: int
    label: str
    proto: int | None = None

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.ip_interface(f"{self.address}/{self.prefix}").network

    @property
    def is_rampart(self) -> bool:
        return self.proto == RAMPART_ADDR_PROTO


# --- pure helpers -----------------------------------------------------------


def parse_vip(address: str, prefix: int) -> ipaddress.IPv4Interface:
    """The VIP as an interface address, or a UserError saying what is wrong."""
    try:
        vip = ipaddress.ip_interface(f"{address}/{prefix}")
    except ValueError:
        raise UserError(
            f"virtual IP {address}/{prefix}: not an IPv4 address with a prefix length 0-32"
        ) from None
    if not isinstance(vip, ipaddress.IPv4Interface):
        raise UserError(f"virtual IP {address}/{prefix}: only IPv4 virtual IPs are supported")
    return vip


def vip_label(interface: str) -> str:
    """The label Rampart gives its addresses on ``interface``."""
    for suffix in LABEL_SUFFIXES:
        label = interface + suffix
        if len(label) < IFNAMSIZ:
            return label
    return interface


def choose_interface(vip: ipaddress.IPv4Interface, addresses: Sequence[Address]) -> tuple[str, str]:
    """Pick the interface whose own address network contains the VIP.

    Rampart's own VIPs are not evidence (they may be leftovers); the most
    specific network wins, and a tie between interfaces is refused rather
    than guessed. Returns ``(interface, reason)``.
    """
    candidates = [
        a
        for a in addresses
        if not a.is_rampart
        and not a.interface.startswith(SHARED_MAC_PREFIX)
        and vip.ip in a.network
        and a.prefix > 0
    ]
    if not candidates:
        raise UserError(
            f"virtual IP {vip}: no interface on this node has an address in the same network; "
            "set the VIP's interface in userconfig.xml or add an address on that network"
        )
    best = max(a.prefix for a in candidates)
    names = sorted({a.interface for a in candidates if a.prefix == best})
    if len(names) > 1:
        raise UserError(
            f"virtual IP {vip}: interfaces {', '.join(names)} all have addresses in "
            f"{vip.network}; set the VIP's interface in userconfig.xml"
        )
    owner = next(a for a in candidates if a.prefix == best)
    return owner.interface, f"{owner.interface} holds {owner.address}/{owner.prefix}"


def find(addresses: Iterable[Address], address: str, interface: str | None = None) -> list[Address]:
    """The entries for ``address`` (on ``interface`` when given)."""
    return [
        a
        for a in addresses
        if a.address == address and (interface is None or a.interface == interface)
    ]


# --- netlink side -------------------------------------------------------------


def _netlink_error(what: str, exc: NetlinkError) -> RetryableError:
    return RetryableError(f"{what}: netlink error {exc.code} ({exc.args[-1]})")


def _links(ipr: IPRoute) -> dict[int, str]:
    return {link["index"]: link.get("IFLA_IFNAME") for link in ipr.get_links()}


def list_addresses(ipr: IPRoute | None = None) -> list[Address]:
    """Every IPv4 address in this network namespace."""
    if ipr is None:
        with IPRoute() as own:
            return list_addresses(own)
    names = _links(ipr)
    return [
        Address(
            interface=names.get(msg["index"], f"#{msg['index']}"),
            index=msg["index"],
            address=msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS"),
            prefix=msg["prefixlen"],
            label=msg.get("IFA_LABEL") or "",
            proto=msg.get("IFA_PROTO"),
        )
        for msg in ipr.get_addr(family=socket.AF_INET)
    ]


def _index(ipr: IPRoute, interface: str, vip: ipaddress.IPv4Interface) -> int:
    found = ipr.link_lookup(ifname=interface)
    if not found:
        raise UserError(f"virtual IP {vip}: interface {interface} does not exist on this node")
    return found[0]


def add_vip(address: str, prefix: int, interface: str | None = None) -> str:
    """Put the VIP on its interface; a no-op if it is already there."""
    return _add(address, prefix, interface)[1]


def _add(address: str, prefix: int, interface: str | None) -> tuple[str, str]:
    """``(interface the VIP is on, reason)``."""
    vip = parse_vip(address, prefix)
    with IPRoute() as ipr:
        addresses = list_addresses(ipr)
        present = find(addresses, str(vip.ip), interface)
        if present:
            where = present[0]
            whose = "" if where.is_rampart else " (not added by Rampart; left as is)"
            reason = f"virtual IP {vip} already on {where.interface}: nothing to do{whose}"
            return where.interface, reason
        if interface is None:
            interface, why = choose_interface(vip, addresses)
        else:
            why = "configured interface"
        index = _index(ipr, interface, vip)
        try:
            ipr.addr(
                "replace",
                index=index,
                address=str(vip.ip),
                prefixlen=vip.network.prefixlen,
                label=vip_label(interface),
                proto=RAMPART_ADDR_PROTO,
            )
        except NetlinkError as exc:
            raise _netlink_error(f"cannot add virtual IP {vip} on {interface}", exc) from None
    return interface, f"virtual IP {vip} added on {interface} ({why})"


def remove_vip(address: str, prefix: int | None = None, interface: str | None = None) -> str:
    """Take the VIP off; a no-op if it is not there.

    Only addresses Rampart added are removed: an address an administrator
    configured by hand is reported and left in place.
    """
    vip = parse_vip(address, prefix if prefix is not None else 32)
    with IPRoute() as ipr:
        present = find(list_addresses(ipr), str(vip.ip), interface)
        if not present:
            return f"virtual IP {vip.ip} not present: nothing to do"
        removed = []
        for entry in present:
            if not entry.is_rampart:
                return (
                    f"virtual IP {vip.ip} on {entry.interface} was not added by Rampart: "
                    "left in place"
                )
            if prefix is not None and entry.prefix != prefix:
                continue
            try:
                ipr.addr("del", index=entry.index, address=entry.address, prefixlen=entry.prefix)
            except NetlinkError as exc:
                # Removed meanwhile (another path, an admin): the goal is reached.
                if exc.code != 99:  # EADDRNOTAVAIL
                    raise _netlink_error(f"cannot remove virtual IP {vip.ip}", exc) from None
            removed.append(f"{entry.address}/{entry.prefix} from {entry.interface}")
    if not removed:
        return f"virtual IP {vip.ip} present with another prefix: left in place"
    return f"virtual IP {', '.join(removed)} removed"


def has_vip(address: str, interface: str | None = None) -> bool:
    """Whether ``address`` is configured on this node (on ``interface`` when given)."""
    return bool(find(list_addresses(), address, interface))


def rampart_vips() -> list[Address]:
    """Every address Rampart added in this namespace (for crash cleanup)."""
    return [a for a in list_addresses() if a.is_rampart]


def remove_leftovers(keep: Iterable[str] = ()) -> list[str]:
    """Remove Rampart's VIPs except those in ``keep``; one reason per address.

    Called when the daemon starts: a VIP left by a crashed daemon would make
    two nodes answer for the same address.
    """
    kept = set(keep)
    return [
        remove_vip(a.address, a.prefix, a.interface)
        for a in rampart_vips()
        if a.address not in kept
    ]


# --- async API for the module runner -------------------------------------------------


async def announce(
    address: str,
    interface: str | None = None,
    *,
    schedule: Sequence[float] = garp.ANNOUNCE_SCHEDULE_S,
) -> str:
    """Gratuitous ARP for ``address`` (on the interface holding it when None)."""
    if interface is None:
        holders = find(await asyncio.to_thread(list_addresses), address)
        if not holders:
            raise UserError(f"cannot announce {address}: it is not on any interface here")
        interface = holders[0].interface
    return await garp.announce(address, interface, schedule=schedule)


async def acquire(
    address: str,
    prefix: int,
    interface: str | None = None,
    *,
    schedule: Sequence[float] = garp.ANNOUNCE_SCHEDULE_S,
) -> list[str]:
    """Add the VIP, then announce it: what a node does when it becomes PRIM.

    The announcement is sent even when the VIP was already there: after a
    failover the LAN may still point at the old primary.
    """
    interface, added = await asyncio.to_thread(_add, address, prefix, interface)
    return [added, await garp.announce(address, interface, schedule=schedule)]


async def release(address: str, prefix: int | None = None, interface: str | None = None) -> str:
    """Remove the VIP (idempotent): what a node does when it stops being PRIM."""
    return await asyncio.to_thread(remove_vip, address, prefix, interface)
