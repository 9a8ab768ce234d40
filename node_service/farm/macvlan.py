"""The farm VIP behind one unicast MAC shared by every node.

Every node of a farm must receive every client packet; the packet filter
(``nft.py``) then lets exactly one of them accept it. The LAN delivers a
frame to every node when its destination MAC is one the switches have never
seen as a *source*: an unknown unicast is flooded to every port. So:

- each node puts the VIP on a macvlan interface over its LAN interface, with
  the same locally administered MAC on every node, derived from the module
  name (``shared_mac``) so no node needs to be told it;
- ARP replies for the VIP carry that MAC in their payload, so clients send
  to it;
- an nftables ``netdev`` egress rule on the LAN interface rewrites the
  Ethernet source of every frame leaving with the shared MAC to the node's
  own MAC, so no switch ever learns where the shared MAC "is" and it stays
  flooded (the ARP payload keeps the shared MAC);
- ``arp_ignore=1`` / ``arp_announce=2`` on both interfaces so the LAN
  interface never answers ARP for the VIP with its own MAC (Linux by default
  answers for any local address on any interface).

The parent's ARP settings are left in place on teardown: they are harmless
without the macvlan and another farm module may rely on them.

``plan`` and ``egress_ruleset`` are pure; ``setup``/``teardown`` act on the
network namespace of the calling process (pyroute2, /proc/sys, nft).
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from node_service.errors import RetryableError, UserError
from node_service.farm.nft import DEFAULT_TIMEOUT_S, NFT, Ruleset, apply
from node_service.net.vip import SHARED_MAC_PREFIX

_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
ARP_SYSCTLS = (("arp_ignore", "1"), ("arp_announce", "2"))
SYSCTL_ROOT = Path("/proc/sys/net/ipv4/conf")


class SharedMacError(RetryableError):
    """The shared-MAC interface could not be set up or removed."""


def shared_mac(module: str) -> str:
    """The module's MAC: locally administered (bit 1), unicast (bit 0 clear)."""
    digest = bytearray(
        hashlib.blake2b(module.encode(), digest_size=6, person=b"rampart-mac").digest()
    )
    digest[0] = (digest[0] & 0b1111_1100) | 0b0000_0010
    return ":".join(f"{byte:02x}" for byte in digest)


def link_name(module: str) -> str:
    """The macvlan's name: ``rf-`` + 8 hex digits (interface names max 15)."""
    return SHARED_MAC_PREFIX + hashlib.blake2b(module.encode(), digest_size=4).hexdigest()


@dataclass(frozen=True)
class SharedMac:
    """One module's shared-MAC interface on one node."""

    module: str
    parent: str
    link: str
    mac: str
    vips: tuple[tuple[str, int], ...]


def plan(module: str, parent: str, vips: Sequence[tuple[str, int]]) -> SharedMac:
    """Check the inputs and name everything; raises ``UserError`` on bad input."""
    where = f"farm module {module!r}"
    if not _IFNAME.match(parent):
        raise UserError(f"{where}: interface {parent!r} is not an interface name (1-15 chars)")
    if not vips:
        raise UserError(f"{where} has no virtual IP: expected at least one IPv4 address")
    for address, prefix in vips:
        try:
            ipaddress.IPv4Interface(f"{address}/{prefix}")
        except ValueError:
            raise UserError(
                f"{where}: VIP {address}/{prefix} is not an IPv4 address with a prefix 0-32"
            ) from None
    return SharedMac(module, parent, link_name(module), shared_mac(module), tuple(vips))


def egress_table(module: str) -> str:
    return "rampart_mac_" + hashlib.blake2b(module.encode(), digest_size=4).hexdigest()


def egress_ruleset(spec: SharedMac, parent_mac: str) -> Ruleset:
    """Rewrite the shared MAC out of every frame's Ethernet source on the LAN."""
    if not _MAC.match(parent_mac):
        raise UserError(f"interface {spec.parent} has MAC {parent_mac!r}: expected xx:xx:..:xx")
    table = egress_table(spec.module)
    text = "\n".join(
        [
            f"table netdev {table}",
            f"delete table netdev {table}",
            f"table netdev {table} {{",
            "\tchain egress {",
            f'\t\ttype filter hook egress device "{spec.parent}" priority filter; policy accept;',
            f"\t\tether saddr {spec.mac} ether saddr set {parent_mac} counter"
            ' comment "keep the shared MAC unknown to switches"',
            "\t}",
            "}",
            "",
        ]
    )
    return Ruleset(spec.module, table, text)


def _set_arp(interface: str) -> None:
    for key, value in ARP_SYSCTLS:
        try:
            (SYSCTL_ROOT / interface / key).write_text(value)
        except OSError as error:
            raise SharedMacError(
                f"cannot set {key}={value} on {interface}: {error.strerror}"
            ) from None


def _no_ipv6(interface: str) -> None:
    # Every node would derive the same link-local address from the shared
    # MAC and fail duplicate address detection against the others.
    knob = Path("/proc/sys/net/ipv6/conf") / interface / "disable_ipv6"
    if knob.exists():
        try:
            knob.write_text("1")
        except OSError as error:
            raise SharedMacError(f"cannot disable IPv6 on {interface}: {error.strerror}") from None


def setup(spec: SharedMac, *, nft: Sequence[str] = NFT, timeout: float = DEFAULT_TIMEOUT_S) -> str:
    """Create or repair the interface; idempotent. Returns a reason sentence."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with IPRoute() as ipr:
            parents = ipr.link_lookup(ifname=spec.parent)
            if not parents:
                raise SharedMacError(
                    f"farm module {spec.module}: LAN interface {spec.parent} does not exist"
                )
            parent_mac = ipr.get_links(parents[0])[0].get("address")
            found = ipr.link_lookup(ifname=spec.link)
            if found and ipr.get_links(found[0])[0].get("address") != spec.mac:
                # Someone changed it; a macvlan's MAC is its identity here.
                ipr.link("del", index=found[0])
                found = []
            if not found:
                ipr.link(
                    "add",
                    ifname=spec.link,
                    kind="macvlan",
                    link=parents[0],
                    macvlan_mode="private",
                    address=spec.mac,
                )
                found = ipr.link_lookup(ifname=spec.link)
            # Egress rewrite and ARP settings go in before the link is up,
            # so the shared MAC is never seen as a source, not even once.
            apply(egress_ruleset(spec, parent_mac), nft=nft, timeout=timeout)
            _set_arp(spec.parent)
            _set_arp(spec.link)
            _no_ipv6(spec.link)
            ipr.link("set", index=found[0], state="up")
            for address, prefix in spec.vips:
                ipr.addr("replace", index=found[0], address=address, prefixlen=prefix)
    except NetlinkError as error:
        raise SharedMacError(
            f"farm module {spec.module}: netlink refused {spec.link} on {spec.parent}: {error}"
        ) from None
    vips = ", ".join(f"{a}/{p}" for a, p in spec.vips)
    return f"{vips} on {spec.link} ({spec.mac}) over {spec.parent}, shared MAC flooded"


def teardown(
    spec: SharedMac, *, nft: Sequence[str] = NFT, timeout: float = DEFAULT_TIMEOUT_S
) -> str:
    """Remove the interface (its VIPs go with it) and the egress rewrite."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    table = egress_table(spec.module)
    try:
        with IPRoute() as ipr:
            for index in ipr.link_lookup(ifname=spec.link):
                ipr.link("del", index=index)
    except NetlinkError as error:
        raise SharedMacError(
            f"farm module {spec.module}: cannot remove {spec.link}: {error}"
        ) from None
    apply(
        Ruleset(spec.module, table, f"table netdev {table}\ndelete table netdev {table}\n"),
        nft=nft,
        timeout=timeout,
    )
    return f"{spec.link} and its VIPs removed from {spec.parent}"
