"""The farm VIP behind a shared MAC on a learning switch (real macvlan + nft).

Unlike test_farm_filter.py (a bridge that never learns), this switch learns
like a real one; the nodes have their own addresses and MACs, and the VIP
sits on a macvlan with the module's shared MAC. The test proves the LAN
still floods every client frame to all nodes because the switch never
learns the shared MAC, and that the farm filter on top splits the clients.
``setup`` runs inside each node namespace, as rampartd would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from node_service.farm.buckets import bucket_map, module_seed
from node_service.farm.macvlan import egress_table, link_name, shared_mac
from node_service.farm.nft import FilterRule, apply, build, counters, node_filter
from tests.node.test_farm_filter import CLIENT_SCRIPT, SERVER, LineReader, sh

pytestmark = pytest.mark.node

REPO = Path(__file__).resolve().parents[2]
MODULE = "shop"
SEED = module_seed(MODULE)
VIP = "198.51.100.201"
PORT = 8081
CLIENT = "198.51.100.100"
NODES = {"n1": "198.51.100.11", "n2": "198.51.100.12", "n3": "198.51.100.13"}

IN_NODE = r"""
import json, sys
from node_service.farm import macvlan
spec = macvlan.plan(sys.argv[1], "eth0", [(sys.argv[2], 24)])
print(json.dumps(macvlan.teardown(spec) if sys.argv[3] == "down" else macvlan.setup(spec)))
"""


@dataclass
class Lan:
    prefix: str
    namespaces: list[str] = field(default_factory=list)
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def ns(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def nft(self, node: str) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.ns(node), "nft")

    def shared_mac(self, node: str, action: str = "up") -> str:
        out = sh(
            "ip", "netns", "exec", self.ns(node), sys.executable, "-c", IN_NODE, MODULE, VIP,
            action, timeout=30,
        )  # fmt: skip
        return json.loads(out)


def _build(lan: Lan) -> None:
    sw = lan.ns("sw")
    for name in ("sw", *NODES, "client"):
        sh("ip", "netns", "add", lan.ns(name))
        lan.namespaces.append(lan.ns(name))
        sh("ip", "netns", "exec", lan.ns(name), "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
    # A learning bridge with the default ageing: a switch as found on a LAN.
    sh("ip", "-n", sw, "link", "add", "br0", "type", "bridge", "stp_state", "0")
    sh("ip", "-n", sw, "link", "set", "br0", "up")
    for index, (name, address) in enumerate([*NODES.items(), ("client", CLIENT)]):
        sh("ip", "-n", sw, "link", "add", f"p{index}", "type", "veth", "peer", "name", "eth0",
           "netns", lan.ns(name))  # fmt: skip
        sh("ip", "-n", sw, "link", "set", f"p{index}", "master", "br0", "up")
        sh("ip", "-n", lan.ns(name), "addr", "add", f"{address}/24", "dev", "eth0")
        sh("ip", "-n", lan.ns(name), "link", "set", "eth0", "up")


@pytest.fixture(scope="module")
def lan() -> Iterator[Lan]:
    lan = Lan(prefix=f"rt-farm-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        _build(lan)
        yield lan
    finally:
        for proc in lan.procs:
            proc.kill()
            proc.wait(timeout=10)
        for ns in reversed(lan.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10, check=False)


def test_shared_mac_is_flooded_and_the_filter_splits_clients(lan):
    for node in NODES:
        reason = lan.shared_mac(node)
        assert reason == (
            f"{VIP}/24 on {link_name(MODULE)} ({shared_mac(MODULE)}) over eth0, shared MAC flooded"
        )
        # Idempotent: a second setup changes nothing and still succeeds.
        assert lan.shared_mac(node) == reason
        addresses = sh("ip", "-n", lan.ns(node), "-br", "addr", "show", link_name(MODULE))
        assert addresses.split()[2:] == [f"{VIP}/24"]
    owners = bucket_map(dict.fromkeys(NODES, 1), set(NODES), SEED)
    for node in NODES:
        rule = FilterRule("tcp", (PORT,), "ip_port")
        apply(build(node_filter(MODULE, [VIP], [rule], SEED, owners, node)), nft=lan.nft(node))
        proc = subprocess.Popen(
            ["ip", "netns", "exec", lan.ns(node), sys.executable, "-c", SERVER, node, VIP,
             str(PORT)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        lan.procs.append(proc)
        assert LineReader(proc, f"rt-farm-server-{node}").next().strip() == "ready"

    sources = [(CLIENT, port) for port in range(30000, 30090)]
    cfg = {"vip": VIP, "port": PORT, "sources": sources, "hold": False, "timeout": 5}
    client = subprocess.Popen(
        ["ip", "netns", "exec", lan.ns("client"), sys.executable, "-c", CLIENT_SCRIPT,
         json.dumps(cfg)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    lan.procs.append(client)
    result = json.loads(LineReader(client, "rt-farm-client").next())
    client.wait(timeout=20)
    per_node = Counter(answer[0] for answer in result)
    assert set(per_node) == set(NODES), result
    assert sum(per_node.values()) == len(sources)
    accepted = {node: counters(MODULE, nft=lan.nft(node))["owned"] for node in NODES}
    assert accepted == dict(per_node)

    mac = shared_mac(MODULE)
    neighbour = sh("ip", "-n", lan.ns("client"), "neigh", "show", VIP)
    assert f"lladdr {mac}" in neighbour
    # The switch learnt every node's own MAC but never the shared one, so
    # frames to the VIP keep reaching every node.
    fdb = sh("bridge", "-n", lan.ns("sw"), "fdb", "show", "br", "br0")
    assert mac not in fdb
    for node in NODES:
        own = sh("ip", "-n", lan.ns(node), "-br", "link", "show", "eth0").split()[2]
        assert own in fdb
        rewrite = sh(*lan.nft(node), "list", "table", "netdev", egress_table(MODULE))
        assert f"ether saddr {mac} ether saddr set {own}" in rewrite
        assert "counter packets 0 " not in rewrite, "nothing left with the shared MAC"


def test_teardown_removes_the_interface_and_the_rewrite(lan):
    lan.shared_mac("n3")
    assert lan.shared_mac("n3", "down") == f"{link_name(MODULE)} and its VIPs removed from eth0"
    links = sh("ip", "-n", lan.ns("n3"), "-br", "link", "show")
    assert link_name(MODULE) not in links
    tables = sh(*lan.nft("n3"), "list", "tables")
    assert egress_table(MODULE) not in tables
    assert lan.shared_mac("n3", "down").endswith("removed from eth0")
