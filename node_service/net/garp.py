"""Gratuitous ARP: tell the LAN that a virtual IP now lives at this node's MAC.

Without it, switches and clients keep sending to the old primary until their
ARP entry expires (minutes). Each announcement round sends two broadcast
frames crafted here and sent on an AF_PACKET socket:

- an ARP request with sender = target = VIP and target MAC zero (the
  RFC 5227 "ARP announcement"), which every Linux and most other stacks use
  to update an existing entry;
- an ARP reply with sender = target = VIP and target MAC = our MAC (the
  form Linux itself treats as gratuitous), broadcast, for older devices that
  only learn from replies.

Rounds go out at 0, 100, 300 and 1000 ms after the VIP is added: the first
reaches everyone within a millisecond; the later ones cover frames lost while
a switch port was still learning and clients that were busy.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
from collections.abc import Sequence

from pyroute2 import IPRoute

from node_service.errors import RetryableError, UserError

ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
ARP_REQUEST = 1
ARP_REPLY = 2
BROADCAST_MAC = b"\xff" * 6
ZERO_MAC = b"\x00" * 6
ETH_MIN_FRAME = 60  # without FCS; veth does not pad short frames itself
ANNOUNCE_SCHEDULE_S: tuple[float, ...] = (0.0, 0.1, 0.3, 1.0)


def mac_bytes(mac: str) -> bytes:
    """``"3e:84:c4:ca:cd:6b"`` as six bytes."""
    parts = mac.split(":")
    if len(parts) != 6:
        raise UserError(f"MAC address {mac!r}: expected six hex bytes separated by ':'")
    return bytes(int(p, 16) for p in parts)


def arp_frame(op: int, mac: bytes, address: str, target_mac: bytes) -> bytes:
    """One Ethernet broadcast frame carrying a gratuitous ARP for ``address``."""
    ip = ipaddress.IPv4Address(address).packed
    eth = BROADCAST_MAC + mac + struct.pack("!H", ETH_P_ARP)
    arp = struct.pack("!HHBBH", 1, ETH_P_IP, 6, 4, op) + mac + ip + target_mac + ip
    return (eth + arp).ljust(ETH_MIN_FRAME, b"\x00")


def garp_frames(mac: bytes, address: str) -> tuple[bytes, bytes]:
    """The request and the reply sent in each announcement round."""
    return (
        arp_frame(ARP_REQUEST, mac, address, ZERO_MAC),
        arp_frame(ARP_REPLY, mac, address, mac),
    )


def parse_arp(frame: bytes) -> tuple[int, str, str, str] | None:
    """``(op, sender MAC, sender IP, target IP)`` of an ARP frame, else None."""
    if len(frame) < 42 or frame[12:14] != struct.pack("!H", ETH_P_ARP):
        return None
    op = struct.unpack("!H", frame[20:22])[0]
    sender_mac = frame[22:28].hex(":")
    sender_ip = str(ipaddress.IPv4Address(frame[28:32]))
    target_ip = str(ipaddress.IPv4Address(frame[38:42]))
    return op, sender_mac, sender_ip, target_ip


def interface_mac(interface: str) -> bytes:
    """The MAC address of ``interface`` (synchronous netlink: not on the event loop)."""
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=interface)
        if not found:
            raise UserError(f"interface {interface} does not exist on this node")
        link = next(iter(ipr.get_links(found[0])))
    mac = link.get("IFLA_ADDRESS")
    if not mac:
        raise UserError(f"interface {interface} has no MAC address: cannot send ARP")
    return mac_bytes(mac)


async def announce(
    address: str,
    interface: str,
    *,
    schedule: Sequence[float] = ANNOUNCE_SCHEDULE_S,
) -> str:
    """Send the gratuitous ARP rounds for ``address`` on ``interface``.

    Returns a reason; raises RetryableError when the interface cannot send
    (down, gone meanwhile). ``vip.announce`` finds the interface for you.
    """
    mac = await asyncio.to_thread(interface_mac, interface)
    frames = garp_frames(mac, address)
    loop = asyncio.get_running_loop()
    start = loop.time()
    sent = 0
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP)) as sock:
        sock.setblocking(False)
        try:
            sock.bind((interface, ETH_P_ARP))
            for at in schedule:
                delay = start + at - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                for frame in frames:
                    await loop.sock_sendall(sock, frame)
                sent += 1
        except OSError as exc:
            raise RetryableError(
                f"gratuitous ARP for {address} on {interface} stopped after {sent} "
                f"round(s): {exc.strerror or exc}"
            ) from None
    spacing = "/".join(f"{int(at * 1000)}" for at in schedule)
    return (
        f"announced {address} at {mac.hex(':')} on {interface}: "
        f"{sent} gratuitous ARP rounds at {spacing} ms"
    )
