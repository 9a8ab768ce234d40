"""Replication between two network namespaces, with the link cut in the middle.

A cut link drops packets silently (no reset, no close): only the sender's
timeout can notice. The primary must release the application within the
timeout, go ABSENT with the regions recorded, and replicate again after the
link is healed and the connection reopened, with the files it still holds
open reopened on the secondary.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import secrets
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from node_service.cluster import pki
from node_service.replication.dirty import DirtyRegion
from node_service.replication.sender import Link
from node_service.replication.transport import Endpoint, ReplicationServer
from tests.unit.repl_pair import DIR, MODULE, Pair, make_site, open_op, real_appliers, write_op

pytestmark = pytest.mark.node

CLONE_NEWNET = 0x40000000
PRIMARY_ADDR = "198.51.100.11"
SECONDARY_ADDR = "198.51.100.12"
T = TypeVar("T")

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, timeout=30, capture_output=True)


def in_netns(name: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a thread that joined netns ``name``: sockets it makes live there."""
    box: dict[str, object] = {}

    def run() -> None:
        fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns {name}")
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc
        finally:
            os.close(fd)

    thread = threading.Thread(target=run, name=f"test-netns-{name}")
    thread.start()
    thread.join(60)
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


@dataclass(frozen=True)
class Link2:
    primary_ns: str
    secondary_ns: str
    secondary_if: str


@pytest.fixture
def netns_pair() -> Iterator[Link2]:
    tag = "rt-" + secrets.token_hex(2)
    p_ns, s_ns = f"{tag}p", f"{tag}s"
    p_if, s_if = f"{tag}p0", f"{tag}s0"
    try:
        ip("netns", "add", p_ns)
        ip("netns", "add", s_ns)
        ip("link", "add", p_if, "type", "veth", "peer", "name", s_if)
        ip("link", "set", p_if, "netns", p_ns)
        ip("link", "set", s_if, "netns", s_ns)
        for ns, ifname, addr in ((p_ns, p_if, PRIMARY_ADDR), (s_ns, s_if, SECONDARY_ADDR)):
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", ifname)
            ip("-n", ns, "link", "set", ifname, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield Link2(p_ns, s_ns, s_if)
    finally:
        for ns in (p_ns, s_ns):
            subprocess.run(["ip", "netns", "del", ns], check=False, timeout=30)


@pytest.fixture
def pair(tmp_path, netns_pair) -> Iterator[tuple[Pair, Path]]:
    root = make_site(tmp_path / "site")
    dest = tmp_path / "secondary"
    dest.mkdir()
    fd, appliers = real_appliers(dest)
    made = Pair(root, appliers=appliers, timeout=1.0)
    # move the secondary's listener into its namespace
    made.server.close()
    ctx = pki.tls_context(root / "n2", server=True)
    made.server = in_netns(
        netns_pair.secondary_ns,
        lambda: ReplicationServer((SECONDARY_ADDR, 0), ctx, node="n2").start(),
    )
    made.server.serve(Endpoint(MODULE, "n1", made.receiver.accept))
    try:
        yield made, dest
    finally:
        made.close()
        os.close(fd)


def connect(pair: Pair, ns: str) -> None:
    ctx = pki.tls_context(pair.root / "n1", server=False)
    in_netns(ns, lambda: pair.sender.connect((SECONDARY_ADDR, pair.server.address[1]), ctx))


def test_a_cut_link_releases_the_application_and_a_heal_resumes(pair, netns_pair):
    pair, dest = pair
    connect(pair, netns_pair.primary_ns)
    r = pair.replicator
    r.wait(r.submit(open_op(1, "db")))
    r.wait(r.submit(write_op(1, 0, b"one")))
    assert (dest / "db").read_bytes() == b"one"

    ip("-n", netns_pair.secondary_ns, "link", "set", netns_pair.secondary_if, "down")
    started = time.monotonic()
    r.wait(r.submit(write_op(1, 5 * 64 * 1024, b"cut")))
    assert time.monotonic() - started < pair.sender.timeout + 1.5
    assert pair.sender.link == Link.ABSENT
    assert DirtyRegion(DIR, "db", 5) in pair.log1.regions()

    ip("-n", netns_pair.secondary_ns, "link", "set", netns_pair.secondary_if, "up")
    connect(pair, netns_pair.primary_ns)
    r.wait(r.submit(write_op(1, 3, b"two")))
    assert pair.sender.link == Link.CONNECTED
    assert (dest / "db").read_bytes()[:6] == b"onetwo"
    # the region written while cut is still recorded for the resync
    assert DirtyRegion(DIR, "db", 5) in pair.log1.regions()
