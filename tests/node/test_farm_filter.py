"""The farm packet filter on real nftables: three nodes share a VIP, one accepts.

Topology (all namespaces created here, names ``rt-farm-<id>-*``): a switch
namespace with a bridge that never learns (every frame reaches every port,
as a flooded LAN does), three node namespaces whose interface carries the
same unicast MAC and the same VIP, and a client namespace. Each node runs a
tiny TCP server that answers with its node name and the kernel bucket of the
connection; the bucket is read back through the socket mark (a test-only
probe table marks each packet with the same jhash the farm filter uses, and
``tcp_fwmark_accept`` copies the SYN's mark to the accepted socket).
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from node_service.farm.buckets import bucket_map, module_seed, owned_by
from node_service.farm.nft import (
    FilterRule,
    PacketFilterError,
    Ruleset,
    apply,
    build,
    counters,
    listing,
    node_filter,
    remove,
)

pytestmark = pytest.mark.node

MODULE = "web"
SEED = module_seed(MODULE)
VIP = "198.51.100.200"
PORT = 8080
CLIENT = "198.51.100.100"
SHARED_MAC = "02:52:4d:00:00:01"
NODES = ("n1", "n2", "n3")
WEIGHTS = dict.fromkeys(NODES, 1)
STEP_TIMEOUT_S = 20.0

SERVER = r"""
import asyncio, socket, sys
node, vip, port = sys.argv[1], sys.argv[2], int(sys.argv[3])

async def handle(reader, writer):
    mark = writer.get_extra_info("socket").getsockopt(socket.SOL_SOCKET, socket.SO_MARK)
    writer.write(f"{node} {mark}\n".encode())
    try:
        await writer.drain()
        while line := await asyncio.wait_for(reader.readline(), 60):
            writer.write(f"{node} {line.decode().strip()}\n".encode())
            await writer.drain()
    except (OSError, asyncio.TimeoutError):
        pass
    finally:
        writer.close()

async def main():
    server = await asyncio.start_server(handle, vip, port, reuse_address=True, backlog=512)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()

asyncio.run(main())
"""

# Opens one connection per (address, port) source, reports the first line of
# each answer; with "hold" it keeps them open until a line on stdin, then
# sends "ping" on each and reports the echoes.
CLIENT_SCRIPT = r"""
import asyncio, json, sys
cfg = json.loads(sys.argv[1])
limit = asyncio.Semaphore(40)

async def one(src, sport):
    async with limit:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(
                cfg["vip"], cfg["port"], local_addr=(src, sport)), cfg["timeout"])
            line = await asyncio.wait_for(reader.readline(), cfg["timeout"])
            return reader, writer, line.decode().split() or ["closed"]
        except (OSError, asyncio.TimeoutError) as error:
            return None, None, ["error", type(error).__name__]

async def ping(reader, writer):
    if writer is None:
        return ["error", "not-connected"]
    try:
        writer.write(b"ping\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), cfg["timeout"])
        return line.decode().split() or ["closed"]
    except (OSError, asyncio.TimeoutError) as error:
        return ["error", type(error).__name__]

async def main():
    conns = await asyncio.gather(*(one(s, p) for s, p in cfg["sources"]))
    print(json.dumps([c[2] for c in conns]), flush=True)
    if cfg["hold"]:
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        print(json.dumps(await asyncio.gather(*(ping(r, w) for r, w, _ in conns))), flush=True)
    for _, writer, _ in conns:
        if writer is not None:
            writer.close()

asyncio.run(main())
"""


def sh(*args: str, timeout: float = 10.0) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"{' '.join(args)}: {done.stderr.strip()}"
    return done.stdout


class LineReader:
    """Lines of a child's stdout, read with a bounded wait."""

    def __init__(self, proc: subprocess.Popen[str], name: str):
        self.lines: queue.Queue[str] = queue.Queue()
        self.thread = threading.Thread(target=self._pump, args=(proc,), name=name, daemon=True)
        self.thread.start()

    def _pump(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.lines.put(line)

    def next(self, timeout: float = STEP_TIMEOUT_S) -> str:
        return self.lines.get(timeout=timeout)


@dataclass
class Site:
    prefix: str
    namespaces: list[str] = field(default_factory=list)
    procs: list[subprocess.Popen[str]] = field(default_factory=list)
    next_port: int = 20000

    def ns(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def nft(self, node: str) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.ns(node), "nft")

    def ports(self, count: int) -> range:
        # Fresh source ports for every round so no old TIME_WAIT or
        # conntrack entry stands in for a new flow.
        start, self.next_port = self.next_port, self.next_port + count
        return range(start, start + count)


def _build_site(site: Site) -> None:
    sw = site.ns("sw")
    for name in ("sw", *NODES, "client"):
        sh("ip", "netns", "add", site.ns(name))
        site.namespaces.append(site.ns(name))
        sh(
            "ip",
            "netns",
            "exec",
            site.ns(name),
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.disable_ipv6=1",
        )
    sh("ip", "-n", sw, "link", "add", "br0", "type", "bridge", "ageing_time", "0", "stp_state", "0")
    for index, name in enumerate((*NODES, "client")):
        port = f"p{index}"
        sh("ip", "-n", sw, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns",
           site.ns(name))  # fmt: skip
        sh("ip", "-n", sw, "link", "set", port, "master", "br0", "up")
        # A bridge that does not learn floods every frame to every port.
        sh("ip", "-n", sw, "link", "set", port, "type", "bridge_slave", "learning", "off")
    sh("ip", "-n", sw, "link", "set", "br0", "up")
    for name in NODES:
        ns = site.ns(name)
        sh("ip", "-n", ns, "link", "set", "eth0", "address", SHARED_MAC)
        sh("ip", "-n", ns, "addr", "add", f"{VIP}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.tcp_fwmark_accept=1")
    client = site.ns("client")
    sh("ip", "-n", client, "addr", "add", f"{CLIENT}/24", "dev", "eth0")
    for host in range(101, 113):
        sh("ip", "-n", client, "addr", "add", f"198.51.100.{host}/24", "dev", "eth0")
    sh("ip", "-n", client, "link", "set", "eth0", "up")
    for name in NODES:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", site.ns(name), sys.executable, "-c", SERVER, name, VIP,
             str(PORT)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        site.procs.append(proc)
        assert LineReader(proc, f"rt-farm-server-{name}").next().strip() == "ready"


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    site = Site(prefix=f"rt-farm-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        _build_site(site)
        yield site
    finally:
        for proc in site.procs:
            proc.kill()
            proc.wait(timeout=10)
        for ns in reversed(site.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10, check=False)


def load(site: Site, owners: tuple[str | None, ...], criterion: str, nodes=NODES,
         kept=None, guarded=None) -> None:  # fmt: skip
    """Apply the farm filter (no device: all in the ip table) and the bucket probe."""
    rule = FilterRule("tcp", (PORT,), criterion)
    key = "ip saddr" if criterion == "ip" else "ip saddr . tcp sport"
    probe = Ruleset(
        "probe",
        "rt_probe",
        "table ip rt_probe\ndelete table ip rt_probe\ntable ip rt_probe {\n"
        " chain pre { type filter hook prerouting priority raw; policy accept;\n"
        f"  ip daddr {VIP} tcp dport {PORT} meta mark set jhash {key} mod 256 seed 0x{SEED:08x}\n"
        " }\n}\n",
    )
    for node in nodes:
        apply(probe, nft=site.nft(node))
        farm = node_filter(
            MODULE, [VIP], [rule], SEED, owners, node,
            held_flows=(kept or {}).get(node, frozenset()),
            guarded=(guarded or {}).get(node, frozenset()),
        )  # fmt: skip
        apply(build(farm), nft=site.nft(node))


def connect(site: Site, sources: list[tuple[str, int]], hold: bool = False):
    cfg = {"vip": VIP, "port": PORT, "sources": sources, "hold": hold, "timeout": 5}
    proc = subprocess.Popen(
        ["ip", "netns", "exec", site.ns("client"), sys.executable, "-c", CLIENT_SCRIPT,
         json.dumps(cfg)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    site.procs.append(proc)
    return proc, LineReader(proc, "rt-farm-client")


def echo_held(proc: subprocess.Popen[str], lines: LineReader) -> list[list[str]]:
    """Let a ``connect(hold=True)`` client send "ping" on every held connection; its answers."""
    assert proc.stdin is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()
    echoes = json.loads(lines.next())
    proc.wait(timeout=STEP_TIMEOUT_S)
    return echoes


def answers(site: Site, sources: list[tuple[str, int]]) -> list[list[str]]:
    proc, lines = connect(site, sources)
    result = json.loads(lines.next())
    proc.wait(timeout=STEP_TIMEOUT_S)
    return result


def syn_accepts(site: Site, nodes=NODES) -> dict[str, int]:
    return {node: counters(MODULE, nft=site.nft(node))["owned"] for node in nodes}


def check_owners(result: list[list[str]], owners: tuple[str | None, ...]) -> Counter[str]:
    """Every connection answered by the node that owns its kernel bucket."""
    for answer in result:
        assert answer[0] in NODES, f"connection not answered: {answer}"
        assert owners[int(answer[1])] == answer[0], f"bucket {answer[1]} answered by {answer[0]}"
    return Counter(answer[0] for answer in result)


def test_each_connection_is_accepted_by_exactly_one_node(site):
    owners = bucket_map(WEIGHTS, set(NODES), SEED)
    load(site, owners, "ip_port")
    sources = [(CLIENT, port) for port in site.ports(150)]
    result = answers(site, sources)
    per_node = check_owners(result, owners)
    assert sum(per_node.values()) == 150
    assert all(25 <= per_node[node] <= 80 for node in NODES), per_node
    # Exactly one node let each SYN in: a second acceptor would show here.
    assert syn_accepts(site) == {node: per_node[node] for node in NODES}


def test_criterion_ip_keeps_each_client_address_on_one_node(site):
    owners = bucket_map(WEIGHTS, set(NODES), SEED)
    load(site, owners, "ip")
    addresses = [f"198.51.100.{host}" for host in range(101, 113)]
    sources = [(address, port) for address in addresses for port in site.ports(4)]
    result = answers(site, sources)
    check_owners(result, owners)
    by_address: dict[str, set[str]] = {}
    for (address, _), answer in zip(sources, result, strict=True):
        by_address.setdefault(address, set()).add(answer[0])
    assert all(len(nodes) == 1 for nodes in by_address.values()), by_address
    assert len({next(iter(nodes)) for nodes in by_address.values()}) >= 2


def test_failed_node_share_moves_and_established_flows_stay_when_it_returns(site):
    full = bucket_map(WEIGHTS, set(NODES), SEED)
    without_n3 = bucket_map(WEIGHTS, {"n1", "n2"}, SEED)
    load(site, full, "ip_port")
    sh("ip", "-n", site.ns("n3"), "link", "set", "eth0", "down")
    try:
        load(site, without_n3, "ip_port", nodes=("n1", "n2"))
        result = answers(site, [(CLIENT, port) for port in site.ports(60)])
        assert set(check_owners(result, without_n3)) == {"n1", "n2"}

        # Hold connections on n1/n2, some in buckets that go back to n3.
        sources = [(CLIENT, port) for port in site.ports(60)]
        proc, lines = connect(site, sources, hold=True)
        held = json.loads(lines.next())
        check_owners(held, without_n3)
        moving = [a for a in held if full[int(a[1])] == "n3"]
        assert moving, "no held connection sits in a bucket that returns to n3"
    finally:
        sh("ip", "-n", site.ns("n3"), "link", "set", "eth0", "up")
    # Each node keeps the connections it has (its sockets), n3 guards what it takes back.
    kept = {
        node: frozenset(src for src, a in zip(sources, held, strict=True) if a[0] == node)
        for node in ("n1", "n2")
    }
    load(site, full, "ip_port", kept=kept, guarded={"n3": owned_by(full, "n3")})
    echoes = echo_held(proc, lines)
    # Every held flow still answers from the node where it started, and n3
    # neither took nor reset any of them.
    assert echoes == [[answer[0], "ping"] for answer in held]
    result = answers(site, [(CLIENT, port) for port in site.ports(60)])
    assert "n3" in check_owners(result, full)


def test_a_bad_ruleset_leaves_the_previous_one_in_place(site):
    owners = bucket_map(WEIGHTS, set(NODES), SEED)
    load(site, owners, "ip_port", nodes=("n1",))
    before = listing(MODULE, nft=site.nft("n1"))
    assert "jhash ip saddr . tcp sport mod 256" in before
    good = build(node_filter(MODULE, [VIP], [FilterRule("tcp", (PORT,))], SEED, owners, "n1"))
    # Broken after the delete: if nft were not atomic the table would be gone.
    broken = Ruleset(MODULE, good.table, good.text.replace("policy accept;", "policy maybe;"))
    with pytest.raises(PacketFilterError) as caught:
        apply(broken, nft=site.nft("n1"))
    assert str(caught.value).startswith("farm module web: nft exited 1: ")
    assert "previous rules left in place" in str(caught.value)
    assert "\n" not in str(caught.value)
    after = listing(MODULE, nft=site.nft("n1"))
    strip = [line for line in after.splitlines() if "counter" not in line]
    assert strip == [line for line in before.splitlines() if "counter" not in line]


def test_remove_drops_the_table_and_is_idempotent(site):
    owners = bucket_map(WEIGHTS, set(NODES), SEED)
    load(site, owners, "ip_port", nodes=("n2",))
    assert listing(MODULE, nft=site.nft("n2"))
    remove(MODULE, nft=site.nft("n2"))
    assert listing(MODULE, nft=site.nft("n2")) == ""
    remove(MODULE, nft=site.nft("n2"))
    assert listing(MODULE, nft=site.nft("n2")) == ""
    with pytest.raises(PacketFilterError, match="table ip rampart_farm_web is not loaded"):
        counters(MODULE, nft=site.nft("n2"))
