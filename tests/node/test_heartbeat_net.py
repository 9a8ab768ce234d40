"""Heartbeats between two network namespaces joined by two networks.

Each namespace runs a real HeartbeatService in its own process; the test
cuts links with `ip link set ... down` and reads each service's status file.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from node_service.cluster import heartbeat as hb
from node_service.cluster.pki import heartbeat_key

pytestmark = pytest.mark.node

PORT = 7810
N1 = ("198.51.100.11", "203.0.113.11")
N2 = ("198.51.100.12", "203.0.113.12")
INTERVAL, TIMEOUT = 0.1, 1.0
SECRET = secrets.token_bytes(32)

# One node: a HeartbeatService writing its status (and journal) to a file.
NODE_SCRIPT = r"""
import asyncio, json, os, signal, sys
from node_service.cluster.pki import heartbeat_key
from node_service.cluster.transport import HeartbeatService

node, peer, local, remote, port, status_path, secret, interval, timeout = sys.argv[1:]
journal = []

async def main():
    svc = HeartbeatService(
        node, local.split(","), int(port),
        lambda m: heartbeat_key(bytes.fromhex(secret), m),
        incarnation=int.from_bytes(os.urandom(4), "big") + 1,
        journal=lambda sev, line: journal.append(f"{sev}: {line}"),
    )
    svc.add_module("web", {peer: remote.split(",")}, float(interval), float(timeout),
                   lambda: {"state": "PRIM" if node.endswith("1") else "SECOND"})
    await svc.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 120  # never outlive a broken test
    try:
        while not stop.is_set() and loop.time() < deadline:
            status = svc.status("web")
            status["journal"] = journal
            tmp = status_path + ".tmp"
            with open(tmp, "w") as out:
                json.dump(status, out)
            os.replace(tmp, status_path)
            try:
                await asyncio.wait_for(stop.wait(), 0.05)
            except TimeoutError:
                pass
    finally:
        await svc.close()

asyncio.run(main())
"""

# Capture one heartbeat datagram from SRC to PORT on an interface (AF_PACKET).
CAPTURE_SCRIPT = r"""
import socket, sys, time
ifname, src, port = sys.argv[1], socket.inet_aton(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0800))
s.bind((ifname, 0x0800))
s.settimeout(5)
end = time.monotonic() + 5
while time.monotonic() < end:
    ip = s.recv(2048)
    ihl = (ip[0] & 0x0F) * 4
    if ip[9] == 17 and ip[12:16] == src and int.from_bytes(ip[ihl + 2:ihl + 4], "big") == port:
        print(ip[ihl + 8:].hex())
        break
"""

# Send raw bytes (hex) from a given source address to a destination.
SEND_SCRIPT = r"""
import socket, sys
src, dst, port, data = sys.argv[1], sys.argv[2], int(sys.argv[3]), bytes.fromhex(sys.argv[4])
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    s.bind((src, 0))
    s.sendto(data, (dst, port))
"""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def _in_ns(ns: str, script: str, *args: str, timeout: float = 10) -> str:
    run = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert run.returncode == 0, run.stderr
    return run.stdout.strip()


@pytest.fixture
def site(tmp_path):
    """Two namespaces, two veth pairs (LAN and second heartbeat network), two nodes."""
    tag = secrets.token_hex(3)
    ns1, ns2 = f"rt-hb-{tag}-1", f"rt-hb-{tag}-2"
    veth = {net: (f"rh{tag}{net}a", f"rh{tag}{net}b") for net in (0, 1)}
    procs: list[subprocess.Popen] = []
    made: list[str] = []
    try:
        for ns in (ns1, ns2):
            _ip("netns", "add", ns)
            made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        for net, (a, b) in veth.items():
            _ip("link", "add", a, "netns", ns1, "type", "veth", "peer", "name", b, "netns", ns2)
            _ip("-n", ns1, "addr", "add", f"{N1[net]}/24", "dev", a)
            _ip("-n", ns2, "addr", "add", f"{N2[net]}/24", "dev", b)
            _ip("-n", ns1, "link", "set", a, "up")
            _ip("-n", ns2, "link", "set", b, "up")
        status = {}
        for ns, node, peer, local, remote in (
            (ns1, "rt-n1", "rt-n2", N1, N2),
            (ns2, "rt-n2", "rt-n1", N2, N1),
        ):
            status[node] = tmp_path / f"{node}.json"
            procs.append(
                subprocess.Popen(
                    [
                        "ip", "netns", "exec", ns, sys.executable, "-c", NODE_SCRIPT,
                        node, peer, ",".join(local), ",".join(remote), str(PORT),
                        str(status[node]), SECRET.hex(), str(INTERVAL), str(TIMEOUT),
                    ],
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )  # fmt: skip
        yield {"ns": (ns1, ns2), "veth": veth, "status": status, "procs": procs}
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def _wait(site, node: str, predicate, timeout: float, what: str) -> dict:
    """Poll a node's status file until predicate(status) holds (bounded)."""
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        for proc in site["procs"]:
            assert proc.poll() is None, f"heartbeat node exited: {proc.stderr.read()}"
        status = _read(site["status"][node])
        if status is not None and predicate(status):
            return status
        time.sleep(0.05)
    pytest.fail(f"{node}: {what} not seen within {timeout} s; last status: {status}")


def _peer(status: dict, name: str) -> dict:
    return status["peers"][name]


def test_two_networks_loss_of_one_then_all(site):
    lan2, hb2 = N2
    both_up = {lan2: True, hb2: True}
    s = _wait(
        site,
        "rt-n1",
        lambda st: (
            _peer(st, "rt-n2")["networks"] == both_up
            and all(v is not None for v in _peer(st, "rt-n2")["rtt_ms"].values())
        ),
        10,
        "both networks up with RTT",
    )
    assert _peer(s, "rt-n2")["state"] == "SECOND"
    assert all(0 <= v < 500 for v in _peer(s, "rt-n2")["rtt_ms"].values())
    _wait(site, "rt-n2", lambda st: _peer(st, "rt-n1")["reachable"], 10, "rt-n1 reachable")

    ns2 = site["ns"][1]
    # One network lost: a warning, the peer stays reachable.
    _ip("-n", ns2, "link", "set", site["veth"][1][1], "down")
    s = _wait(
        site,
        "rt-n1",
        lambda st: _peer(st, "rt-n2")["networks"] == {lan2: True, hb2: False},
        TIMEOUT + 3,
        "second network lost",
    )
    assert _peer(s, "rt-n2")["reachable"] is True
    s = _wait(
        site,
        "rt-n1",
        lambda st: any("network to rt-n2 at 203.0.113.12 lost" in j for j in st["journal"]),
        3,
        "network lost warning",
    )
    warning = next(j for j in s["journal"] if "203.0.113.12 lost" in j)
    assert warning == (
        "warning: module web: network to rt-n2 at 203.0.113.12 lost; "
        "still heard on 198.51.100.12 (warning, no failover)"
    )
    assert not any("peer rt-n2 lost" in j for j in s["journal"])

    # Every network lost: the peer is lost within the timeout (plus margin).
    _ip("-n", ns2, "link", "set", site["veth"][0][1], "down")
    cut = time.monotonic()
    s = _wait(
        site,
        "rt-n1",
        lambda st: not _peer(st, "rt-n2")["reachable"],
        TIMEOUT + 3,
        "peer lost",
    )
    assert time.monotonic() - cut <= TIMEOUT + 2.0
    assert _peer(s, "rt-n2")["networks"] == {lan2: False, hb2: False}
    _wait(
        site,
        "rt-n1",
        lambda st: any("peer rt-n2 lost: silent on all networks" in j for j in st["journal"]),
        3,
        "peer lost journal line",
    )

    # Links back: the peer returns on both networks.
    for net in (0, 1):
        _ip("-n", ns2, "link", "set", site["veth"][net][1], "up")
    _wait(
        site,
        "rt-n1",
        lambda st: _peer(st, "rt-n2")["networks"] == both_up,
        TIMEOUT + 5,
        "peer back on both networks",
    )


def test_forged_and_replayed_packets_are_dropped(site):
    lan1 = N1[0]
    lan2 = N2[0]
    ns1, ns2 = site["ns"]
    _wait(site, "rt-n2", lambda st: _peer(st, "rt-n1")["reachable"], 10, "rt-n1 reachable")

    # A real heartbeat captured on the wire, replayed later from the same address.
    captured = _in_ns(ns2, CAPTURE_SCRIPT, site["veth"][0][1], lan1, str(PORT))
    assert captured, "no heartbeat captured on the LAN"
    assert hb.decode(bytes.fromhex(captured), heartbeat_key(SECRET, "web")).node == "rt-n1"
    # rt-n2 received the original too (the capture only listened), so this is a replay.
    _in_ns(ns1, SEND_SCRIPT, lan1, lan2, str(PORT), captured)

    # A third party with another site secret, using rt-n1's address.
    forged = hb.Heartbeat("rt-n1", "web", 2**63, 1, lan1, 0, {"state": "PRIM"})
    data = hb.encode(forged, heartbeat_key(secrets.token_bytes(32), "web"))
    _in_ns(ns1, SEND_SCRIPT, lan1, lan2, str(PORT), data.hex())

    s = _wait(
        site,
        "rt-n2",
        lambda st: st["dropped"].get("replay", 0) >= 1 and st["dropped"].get("bad_tag", 0) >= 1,
        5,
        "replay and forgery dropped",
    )
    assert any(
        line.startswith(f"dropped heartbeat from {lan1}: replayed heartbeat from rt-n1")
        for line in s["recent_drops"]
    )
    assert (
        f"dropped heartbeat from {lan1}: bad authentication tag (another site secret?)"
        in s["recent_drops"]
    )
    assert any("bad authentication tag" in j for j in s["journal"])
    # Neither disturbed the real peer.
    assert _peer(s, "rt-n1")["reachable"] is True
    assert _peer(s, "rt-n1")["incarnation"] != 2**63
