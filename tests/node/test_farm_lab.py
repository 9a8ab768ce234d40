"""Farm modules on a real 3-node lab: sharing, failover, move back, criterion ip.

The modules are made with the module tools (``rampart module new --template
farm``, ``module build`` with the lab's signing key, ``module install`` on
each node through ``rampart lab exec``); their ``start_both`` runs a tiny TCP
server that greets each client with the node's name, logs every accepted
client ``ADDRESS PORT`` to a per-node file under the test's /tmp directory,
and echoes lines back (``NODE LINE``) so a held connection can be checked.

The client side runs in this process: a worker thread enters the lab
client's network namespace and opens the sockets there (a socket stays in
the namespace it was made in, so the test thread can use held ones later).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import struct
import sys
import tempfile
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from node_service.farm.nft import parse_counters, table_name
from node_service.net import netns
from tests.node.conftest import lab_running, rampart

pytestmark = pytest.mark.node

CLI = [sys.executable, "-m", "node_service.cli"]
CONNECTIONS = 600
FAILOVER_BUDGET_S = 4.0
SETTLE_TIMEOUT_S = 30.0

SERVER = textwrap.dedent(
    """\
    import asyncio, os, sys

    node, port, log = os.environ["RAMPART_NODE"], int(sys.argv[1]), sys.argv[2]
    out = open(log, "a", buffering=1)


    async def serve(reader, writer):
        host, cport = writer.get_extra_info("peername")[:2]
        out.write(f"{host} {cport}\\n")
        writer.write(f"{node}\\n".encode())
        try:
            while line := await reader.readline():
                writer.write(f"{node} {line.decode().strip()}\\n".encode())
                await writer.drain()
        except OSError:
            pass
        writer.close()


    async def main():
        server = await asyncio.start_server(serve, "0.0.0.0", port, backlog=1024)
        async with server:
            await server.serve_forever()


    asyncio.run(main())
    """
)

START_BOTH = textwrap.dedent(
    """\
    #!/bin/sh
    # The test's greeting server; idempotent, returns once it listens.
    set -eu
    . "$RAMPART_MODULE_DIR/app.env"
    mkdir -p "$RUN_DIR"
    pidfile="$RUN_DIR/greet.pid"
    if [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then exit 0; fi
    setsid python3 "$RAMPART_MODULE_DIR/app/greet.py" "$HTTP_PORT" \\
        "$LOG_DIR/$RAMPART_NODE.log" </dev/null >"$RUN_DIR/greet.out" 2>&1 &
    echo $! >"$pidfile"
    tries=0
    while [ "$tries" -lt 100 ]; do
        if python3 -c 'import socket, sys
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), 0.5).close()' "$HTTP_PORT" \\
            2>/dev/null; then
            echo "greeting server on port $HTTP_PORT"
            exit 0
        fi
        tries=$((tries + 1))
        sleep 0.1
    done
    echo "greeting server not listening after 10 s" >&2
    exit 1
    """
)

STOP_BOTH = textwrap.dedent(
    """\
    #!/bin/sh
    set -eu
    . "$RAMPART_MODULE_DIR/app.env"
    pidfile="$RUN_DIR/greet.pid"
    if [ -s "$pidfile" ]; then kill "$(cat "$pidfile")" 2>/dev/null || true; fi
    rm -f "$pidfile"
    """
)


# -- helpers -------------------------------------------------------------------


def on(host: str, *command: str, check: bool = True, timeout: float = 60) -> str:
    return rampart("lab", "exec", host, "--", *command, check=check, timeout=timeout).stdout


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(0.1)


def state(node: str, module: str) -> dict:
    return json.loads(on(node, *CLI, "state", "-m", module, "--json"))


def counters(node: str, module: str) -> dict[str, int]:
    # Both of the module's tables: the TCP gate counts at the interface (netdev).
    return parse_counters(on(node, "nft", "-j", "list", "ruleset"), table_name(module))


@dataclass(frozen=True)
class Farm:
    name: str
    vip: str
    port: int
    nodes: tuple[str, ...]
    logs: Path

    def accepted(self) -> dict[str, list[str]]:
        """Each node's accept log, as lines ``ADDRESS PORT``."""
        out = {}
        for node in self.nodes:
            path = self.logs / f"{node}.log"
            out[node] = path.read_text().splitlines() if path.exists() else []
        return out

    def serving(self) -> bool:
        """Every node UP and every node's map over all nodes."""
        for node in self.nodes:
            seen = state(node, self.name)
            if seen["state"] != "UP" or seen["alive"] != sorted(self.nodes):
                return False
        return True


def deploy(lab: dict, work: Path, name: str, vip: str, port: int, lb: str) -> Farm:
    nodes = tuple(n["name"] for n in lab["nodes"])
    safe, logs = build(lab, work, name, vip, port, lb)
    for node in nodes:
        on(node, *CLI, "module", "install", str(safe))
    for node in nodes:
        on(node, *CLI, "start", "-m", name)
    farm = Farm(name, vip, port, nodes, logs)
    wait_for(farm.serving, SETTLE_TIMEOUT_S, f"{name} UP on {', '.join(nodes)} with one map")
    return farm


def build(lab: dict, work: Path, name: str, vip: str, port: int, lb: str) -> tuple[Path, Path]:
    """The signed module (made with the module tools) and its accept-log directory."""
    source = work / name
    node_args = [f"--node={n['name']}={','.join(n['addresses'])}" for n in lab["nodes"]]
    rampart("module", "new", name, "--template", "farm", "--out", str(source), *node_args,
            "--vip", f"{vip}/24", "--lb", lb, "--port", str(port))  # fmt: skip
    logs = work / f"{name}-logs"
    logs.mkdir()
    (source / "app").mkdir()
    (source / "app" / "greet.py").write_text(SERVER)
    for script, text in (("start_both", START_BOTH), ("stop_both", STOP_BOTH)):
        (source / "bin" / script).write_text(text)
        (source / "bin" / script).chmod(0o755)
    with (source / "app.env").open("a") as env:
        env.write(f"LOG_DIR={logs}\n")
    safe = work / f"{name}.safe"
    rampart("module", "build", str(source), "--key", lab["signing_key"], "--out", str(safe))
    return safe, logs


def _abort(sock: socket.socket) -> None:
    # RST instead of FIN: no TIME_WAIT, so the same client port can be reused.
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def _readline(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> str:
    data = b""
    while b"\n" not in data:
        chunk = await loop.sock_recv(sock, 256)
        if not chunk:
            raise ConnectionError("closed before the greeting")
        data += chunk
    return data.split(b"\n", 1)[0].decode()


Source = tuple[str, int]


async def _one(vip: str, port: int, src: Source, timeout: float, hold: bool):
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setblocking(False)
    try:
        sock.bind(src)
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, (vip, port))
            node = await _readline(loop, sock)
    except (OSError, TimeoutError):
        _abort(sock)
        return None, None
    if hold:
        return node, sock
    _abort(sock)
    return node, None


async def _round(vip, port, sources, timeout, hold):
    gate = asyncio.Semaphore(200)

    async def bounded(src):
        async with gate:
            return await _one(vip, port, src, timeout, hold)

    return await asyncio.gather(*(bounded(s) for s in sources))


class Client:
    """Sockets opened inside the lab client's network namespace."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="rt-farm-client")

    def _inside(self, fn, *args):
        with netns.enter(self.namespace):
            return fn(*args)

    def connect(self, farm: Farm, sources: list[Source], timeout: float = 2.0) -> dict:
        """``{source: node or None}``; every connection is reset right after."""
        run = lambda: asyncio.run(_round(farm.vip, farm.port, sources, timeout, False))  # noqa: E731
        answers = self.pool.submit(self._inside, run).result(timeout=120)
        return {src: node for src, (node, _) in zip(sources, answers, strict=True)}

    def hold(self, farm: Farm, sources: list[Source]) -> dict:
        """``{source: (node, socket)}`` for connections kept open."""
        run = lambda: asyncio.run(_round(farm.vip, farm.port, sources, 2.0, True))  # noqa: E731
        answers = self.pool.submit(self._inside, run).result(timeout=120)
        return dict(zip(sources, answers, strict=True))


def echo(sock: socket.socket, text: str) -> str:
    sock.setblocking(True)
    sock.settimeout(3.0)
    sock.sendall(f"{text}\n".encode())
    data = b""
    while b"\n" not in data:
        chunk = sock.recv(256)
        if not chunk:
            raise ConnectionError("closed by the server")
        data += chunk
    return data.split(b"\n", 1)[0].decode()


# -- fixtures --------------------------------------------------------------------


@pytest.fixture(scope="module")
def farm_lab() -> Iterator[dict]:
    # A fixed lab name: node names feed the bucket map, and with fixed client
    # ports and a fixed seed the kernel's jhash spreads the 600 connections
    # the same way on every run, so the ±15% share check cannot flap.
    with lab_running(3, name="rtfarm") as status:
        yield status


@pytest.fixture(scope="module")
def work() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="rt-farm-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def client(farm_lab) -> Iterator[Client]:
    c = Client(farm_lab["client"]["name"])
    try:
        yield c
    finally:
        c.pool.shutdown(wait=True)


@pytest.fixture(scope="module")
def web(farm_lab, work) -> Farm:
    return deploy(farm_lab, work, "web", farm_lab["vip_pool"][0], 8080, "ip_port")


# -- tests -----------------------------------------------------------------------------


def test_ip_port_shares_600_connections_and_one_node_answers_each(farm_lab, client, web):
    me = farm_lab["client"]["address"]
    sources = [(me, 30000 + i) for i in range(CONNECTIONS)]
    before_logs = {n: len(lines) for n, lines in web.accepted().items()}
    before = {n: counters(n, web.name) for n in web.nodes}

    answers = client.connect(web, sources)

    assert [s for s, node in answers.items() if node is None] == []
    per_node = Counter(answers.values())
    third = CONNECTIONS / 3
    for node in web.nodes:
        assert abs(per_node[node] - third) <= 0.15 * third, per_node
    # Each SYN was accepted by exactly one node's filter...
    wait_for(
        lambda: (
            sum(len(v) for v in web.accepted().values()) - sum(before_logs.values()) >= CONNECTIONS
        ),
        10,
        "every accepted connection logged",
    )
    after = {n: counters(n, web.name) for n in web.nodes}
    assert sum(after[n]["owned"] - before[n]["owned"] for n in web.nodes) == CONNECTIONS
    # ...and reached the application of the node that greeted the client, only.
    logged: dict[Source, list[str]] = {}
    for node, lines in web.accepted().items():
        for line in lines[before_logs[node] :]:
            address, port = line.split()
            if address == me:  # not the checker's connections from 127.0.0.1
                logged.setdefault((address, int(port)), []).append(node)
    assert {src: [node] for src, node in answers.items()} == logged
    # The state JSON reports the map (every bucket owned once) and the peers.
    states = {n: state(n, web.name) for n in web.nodes}
    shares = [s["buckets"] for s in states.values()]
    assert sum(shares) == 256 and sorted(shares) == [85, 85, 86]
    for node, seen in states.items():
        assert seen["kind"] == "farm"
        for peer in farm_lab["nodes"]:
            if peer["name"] != node:
                view = seen["peers"][peer["name"]]
                assert view["state"] == "UP" and view["reachable"] is True
                assert view["networks"] == dict.fromkeys(peer["addresses"], True)


def test_ip_keeps_every_connection_of_one_address_on_one_node(farm_lab, work, client):
    farm = deploy(farm_lab, work, "webip", farm_lab["vip_pool"][1], 8081, "ip")
    addresses = [f"198.51.100.{101 + i}" for i in range(60)]
    add = [f"addr add {a}/24 dev eth0" for a in addresses]
    rampart("lab", "exec", farm_lab["client"]["name"], "--", "ip", "-batch", "-",
            input="\n".join(add) + "\n")  # fmt: skip
    try:
        results = client_results_by_address(client, farm, addresses)
        for address, nodes in results.items():
            assert len(nodes) == 1, f"{address} went to {nodes}"
        per_node = Counter(next(iter(n)) for n in results.values())
        assert set(per_node) == set(farm.nodes) and min(per_node.values()) >= 8, per_node
    finally:
        delete = [f"addr del {a}/24 dev eth0" for a in addresses]
        rampart("lab", "exec", farm_lab["client"]["name"], "--", "ip", "-batch", "-",
                input="\n".join(delete) + "\n", check=False)  # fmt: skip
        for node in farm.nodes:
            on(node, *CLI, "stop", "-m", farm.name, check=False)


def client_results_by_address(client: Client, farm: Farm, addresses: list[str]) -> dict:
    """Five connections per address, each from its own ephemeral port."""
    seen: dict[str, set[str]] = {a: set() for a in addresses}
    for _ in range(5):
        answers = client.connect(farm, [(a, 0) for a in addresses])
        for (address, _port), node in answers.items():
            assert node is not None, f"{address}: no answer"
            seen[address].add(node)
    return seen


def test_second_farm_on_the_same_vip_and_port_is_refused_and_the_first_untouched(
    farm_lab, work, client, web
):
    node = web.nodes[0]
    before = state(node, web.name)
    rules = on(node, "nft", "list", "table", "ip", table_name(web.name))
    safe, _ = build(farm_lab, work, "clash", web.vip, web.port, "ip")
    on(node, *CLI, "module", "install", str(safe))
    refused = rampart("lab", "exec", node, "--", *CLI, "start", "-m", "clash", check=False)
    assert refused.returncode == 3
    assert (
        f"farm module clash cannot start: farm module web already filters tcp {web.port} "
        f"on VIP {web.vip}" in refused.stderr
    )
    assert state(node, "clash")["state"] == "STOP"
    assert on(node, "nft", "list", "table", "ip", table_name(web.name)) == rules
    assert state(node, web.name)["buckets"] == before["buckets"]
    me = farm_lab["client"]["address"]
    answers = client.connect(web, [(me, 33000 + i) for i in range(60)])
    assert None not in answers.values()


def test_crash_moves_only_its_clients_and_boot_breaks_no_established_flow(farm_lab, client, web):
    me = farm_lab["client"]["address"]
    sources = [(me, 31000 + i) for i in range(CONNECTIONS)]
    first = client.connect(web, sources)
    assert None not in first.values()
    victim, survivors = web.nodes[2], web.nodes[:2]

    # Crash: new connections must all succeed within the budget.
    crashed_at = time.monotonic()
    rampart("lab", "crash", victim)
    fresh = iter(range(40000, 60000, 60))
    recovered_after = None
    for _ in range(80):  # bounded: 80 rounds of at most 0.5 s
        round_sources = [(me, p) for p in range(next(fresh), next(fresh))]
        answers = client.connect(web, round_sources, timeout=0.5)
        if None not in answers.values():
            recovered_after = time.monotonic() - crashed_at
            break
    assert recovered_after is not None, "new connections never all succeeded after the crash"
    assert recovered_after <= FAILOVER_BUDGET_S, f"took {recovered_after:.2f} s"
    for node in survivors:
        assert state(node, web.name)["alive"] == sorted(survivors)
        journal = on(node, *CLI, "events", "-m", web.name, "-n", "500")
        assert f"bucket map: {victim} lost; buckets over " in journal

    # Clients of the survivors keep their node; the victim's go to a survivor.
    again = client.connect(web, sources)
    for src, node in first.items():
        if node == victim:
            assert again[src] in survivors, (src, again[src])
        else:
            assert again[src] == node, (src, node, again[src])

    # Hold connections open (a third of them in buckets the victim will take
    # back), boot the victim, and check every one still answers afterwards.
    held = client.hold(web, sources[:300])
    try:
        assert all(node in survivors for node, _ in held.values())
        moving = [src for src in held if first[src] == victim]
        assert len(moving) >= 50, "too few held connections in the victim's buckets"
        rampart("lab", "boot", victim)
        wait_for(web.serving, SETTLE_TIMEOUT_S, f"{victim} back in every node's map")
        back = client.connect(web, [(me, p) for p in range(32000, 32300)])
        assert None not in back.values()
        assert Counter(back.values())[victim] > 50, "the victim did not take its buckets back"
        broken = {}
        for src, (node, sock) in held.items():
            try:
                reply = echo(sock, f"still {src[1]}")
            except OSError as exc:
                broken[src] = repr(exc)
                continue
            if reply != f"{node} still {src[1]}":
                broken[src] = reply
        assert broken == {}, f"{len(broken)} of {len(held)} held connections broken"
    finally:
        for _node, sock in held.values():
            if sock is not None:
                _abort(sock)


LOOSE = "/proc/sys/net/netfilter/nf_conntrack_tcp_loose"


def test_the_farm_leaves_the_nodes_conntrack_setting_alone(farm_lab, web):
    """Runs last: it stops ``web``. A TCP farm tracks nothing in its steady
    state, so it has no reason to change a host-wide conntrack setting."""
    # Once nobody holds flows any more (the crash test's connections are
    # closed), every node lifts its guard: no conntrack rule is left.
    wait_for(
        lambda: all(state(n, web.name).get("guarded") == 0 for n in web.nodes),
        30,
        "every node's guard lifted",
    )
    before = {node: on(node, "cat", LOOSE).strip() for node in web.nodes}
    assert set(before.values()) == {"1"}, before
    for node in web.nodes:
        ruleset = on(node, "nft", "list", "table", "ip", table_name(web.name))
        assert " ct " not in ruleset and "notrack" not in ruleset, node
        on(node, *CLI, "stop", "-m", web.name)
    for node in web.nodes:
        assert on(node, "cat", LOOSE).strip() == "1", node
        assert state(node, web.name)["state"] == "STOP"
