"""Virtual IPs and gratuitous ARP in real network namespaces.

Two namespaces joined by a veth pair: "a" is the node (va 198.51.100.11/24),
"b" is a neighbour on the LAN (vb 198.51.100.12/24) that captures the ARP
frames and keeps an ARP cache.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import secrets
import socket
import subprocess
import threading
import time
from dataclasses import dataclass

import pytest

from node_service.errors import RetryableError, UserError
from node_service.net import garp, netns
from node_service.net.vip import (
    RAMPART_ADDR_PROTO,
    Address,
    acquire,
    add_vip,
    announce,
    choose_interface,
    has_vip,
    list_addresses,
    parse_vip,
    rampart_vips,
    release,
    remove_leftovers,
    remove_vip,
    vip_label,
)

pytestmark = pytest.mark.node

VIP = "198.51.100.200"


@dataclass(frozen=True)
class Lan:
    a: str
    b: str


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture
def lan():
    tag = secrets.token_hex(3)
    names = Lan(a=f"rt-vip-{tag}-a", b=f"rt-vip-{tag}-b")
    try:
        ip("netns", "add", names.a)
        ip("netns", "add", names.b)
        ip("-n", names.a, "link", "add", "va", "type", "veth", "peer", "vb", "netns", names.b)
        ip("-n", names.a, "addr", "add", "198.51.100.11/24", "dev", "va")
        ip("-n", names.b, "addr", "add", "198.51.100.12/24", "dev", "vb")
        for ns, dev in ((names.a, "va"), (names.b, "vb"), (names.a, "lo"), (names.b, "lo")):
            ip("-n", ns, "link", "set", dev, "up")
        yield names
    finally:
        for ns in (names.a, names.b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


# --- pure helpers ---------------------------------------------------------------------


def addr(interface: str, address: str, prefix: int, proto: int | None = None) -> Address:
    return Address(interface, 2, address, prefix, interface, proto)


def test_choose_interface_by_network():
    addresses = [
        addr("eth0", "198.51.100.11", 24),
        addr("eth1", "203.0.113.11", 24),
        addr("eth1", "198.51.100.201", 24, RAMPART_ADDR_PROTO),  # a leftover VIP: no evidence
    ]
    name, why = choose_interface(parse_vip(VIP, 24), addresses)
    assert (name, why) == ("eth0", "eth0 holds 198.51.100.11/24")
    with pytest.raises(UserError, match="no interface on this node has an address"):
        choose_interface(parse_vip("192.0.2.10", 24), addresses)


def test_a_farm_shared_mac_interface_is_never_chosen_for_another_vip():
    # The farm's macvlan holds the farm VIP in the LAN subnet; a mirror VIP in
    # the same subnet belongs on the LAN interface, not there.
    addresses = [addr("eth0", "198.51.100.11", 24), addr("rf-0a1b2c3d", "198.51.100.201", 24)]
    assert choose_interface(parse_vip(VIP, 24), addresses)[0] == "eth0"


def test_choose_interface_most_specific_then_ambiguous():
    wide = [addr("eth0", "198.51.0.1", 16), addr("eth1", "198.51.100.1", 24)]
    assert choose_interface(parse_vip(VIP, 24), wide)[0] == "eth1"
    tie = [addr("eth0", "198.51.100.1", 24), addr("eth1", "198.51.100.2", 24)]
    with pytest.raises(UserError, match="interfaces eth0, eth1 all have addresses"):
        choose_interface(parse_vip(VIP, 24), tie)


def test_parse_vip_and_label():
    assert parse_vip(VIP, 24) == ipaddress.IPv4Interface("198.51.100.200/24")
    with pytest.raises(UserError, match="only IPv4"):
        parse_vip("2001:db8::1", 64)
    with pytest.raises(UserError, match="not an IPv4 address"):
        parse_vip("198.51.100.300", 24)
    assert vip_label("eth0") == "eth0:rampart"
    assert vip_label("enp0s31f6") == "enp0s31f6:rp"
    assert vip_label("a-very-long-if0") == "a-very-long-if0"


def test_garp_frames_are_well_formed():
    mac = garp.mac_bytes("02:00:5e:10:00:01")
    request, reply = garp.garp_frames(mac, VIP)
    assert len(request) == len(reply) == 60
    assert request[:6] == b"\xff" * 6 and request[6:12] == mac
    assert garp.parse_arp(request) == (1, "02:00:5e:10:00:01", VIP, VIP)
    assert garp.parse_arp(reply) == (2, "02:00:5e:10:00:01", VIP, VIP)
    assert request[32:38] == b"\x00" * 6 and reply[32:38] == mac
    assert garp.parse_arp(b"\x00" * 60) is None
    with pytest.raises(UserError, match="six hex bytes"):
        garp.mac_bytes("02:00")


# --- netlink in a namespace -------------------------------------------------------------


def test_add_is_labelled_and_idempotent(lan):
    with netns.enter(lan.a):
        first = add_vip(VIP, 24)
        again = add_vip(VIP, 24, "va")
        mine = rampart_vips()
        present = has_vip(VIP), has_vip(VIP, "vb")
    assert first == f"virtual IP {VIP}/24 added on va (va holds 198.51.100.11/24)"
    assert again == f"virtual IP {VIP}/24 already on va: nothing to do"
    assert [(a.address, a.prefix, a.label, a.proto) for a in mine] == [
        (VIP, 24, "va:rampart", RAMPART_ADDR_PROTO)
    ]
    assert present == (True, False)
    shown = json.loads(ip("-n", lan.a, "-j", "addr", "show", "dev", "va"))[0]["addr_info"]
    assert {"local": VIP, "label": "va:rampart"}.items() <= next(
        i for i in shown if i["local"] == VIP
    ).items()


def test_remove_is_idempotent_and_spares_admin_addresses(lan):
    with netns.enter(lan.a):
        add_vip(VIP, 24, "va")
        removed = remove_vip(VIP, 24)
        again = remove_vip(VIP, 24)
        admin = remove_vip("198.51.100.11", 24)
        left = [a.address for a in list_addresses()]
        admin_add = add_vip("198.51.100.11", 24)
    assert removed == f"virtual IP {VIP}/24 from va removed"
    assert again == f"virtual IP {VIP} not present: nothing to do"
    assert admin == "virtual IP 198.51.100.11 on va was not added by Rampart: left in place"
    assert "198.51.100.11" in left and VIP not in left
    assert admin_add.endswith("nothing to do (not added by Rampart; left as is)")


def test_wrong_interface_or_network_is_a_clear_error(lan):
    with netns.enter(lan.a):
        with pytest.raises(UserError, match="interface eth9 does not exist on this node"):
            add_vip(VIP, 24, "eth9")
        with pytest.raises(UserError, match="no interface on this node has an address"):
            add_vip("203.0.113.200", 24)
        assert rampart_vips() == []


def test_leftovers_are_cleaned_except_kept(lan):
    with netns.enter(lan.a):
        add_vip(VIP, 24)
        add_vip("198.51.100.201", 24)
        reasons = remove_leftovers(keep=[VIP])
        remaining = [a.address for a in rampart_vips()]
    assert reasons == ["virtual IP 198.51.100.201/24 from va removed"]
    assert remaining == [VIP]


# --- gratuitous ARP on the wire ----------------------------------------------------------


def capture_arp(namespace: str, interface: str, want: int, ready: threading.Event, out: list):
    """Collect ``want`` ARP frames about the VIP seen on ``interface`` (bounded: 5 s)."""
    with netns.enter(namespace):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(garp.ETH_P_ARP))
    with sock:
        sock.bind((interface, garp.ETH_P_ARP))
        sock.settimeout(0.2)
        ready.set()
        deadline = time.monotonic() + 5
        while len(out) < want and time.monotonic() < deadline:
            try:
                frame = sock.recv(2048)
            except TimeoutError:
                continue
            parsed = garp.parse_arp(frame)
            if parsed and parsed[2] == VIP:
                out.append((time.monotonic(), *parsed))


def test_announce_reaches_the_lan_and_updates_caches(lan):
    # The neighbour has a stale entry from the "old primary".
    ip(
        "-n",
        lan.b,
        "neigh",
        "replace",
        VIP,
        "lladdr",
        "02:00:00:00:00:99",
        "dev",
        "vb",
        "nud",
        "stale",
    )
    mac = json.loads(ip("-n", lan.a, "-j", "link", "show", "va"))[0]["address"]
    frames: list = []
    ready = threading.Event()
    catcher = threading.Thread(
        target=capture_arp, args=(lan.b, "vb", 6, ready, frames), name="test: arp capture"
    )
    catcher.start()
    try:
        assert ready.wait(5)
        with netns.enter(lan.a):
            reasons = asyncio.run(acquire(VIP, 24))
    finally:
        catcher.join(10)
    assert reasons[1] == (
        f"announced {VIP} at {mac} on va: 4 gratuitous ARP rounds at 0/100/300/1000 ms"
    )
    assert len(frames) >= 6
    assert {(op, sender) for _, op, sender, _, _ in frames} == {(1, mac), (2, mac)}
    assert all(target == VIP for *_, target in frames)
    # Rounds are spaced: the third round comes at least 0.25 s after the first.
    assert frames[4][0] - frames[0][0] >= 0.25
    neigh = json.loads(ip("-n", lan.b, "-j", "neigh", "show", VIP, "dev", "vb"))
    assert neigh[0]["lladdr"] == mac


def test_announce_fast_schedule_and_errors(lan):
    with netns.enter(lan.a):
        add_vip(VIP, 24)
        started = time.monotonic()
        reason = asyncio.run(announce(VIP, schedule=(0, 0.05)))
        took = time.monotonic() - started
        released = asyncio.run(release(VIP, 24))
        with pytest.raises(UserError, match="not on any interface"):
            asyncio.run(announce("198.51.100.250"))
    assert reason.endswith("2 gratuitous ARP rounds at 0/50 ms")
    assert took < 1
    assert released == f"virtual IP {VIP}/24 from va removed"
    with netns.enter(lan.a):
        add_vip(VIP, 24)
    ip("-n", lan.a, "link", "set", "va", "down")
    with netns.enter(lan.a), pytest.raises(RetryableError, match="stopped after 0 round"):
        asyncio.run(announce(VIP, "va", schedule=(0,)))
