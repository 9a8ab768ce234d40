"""A 3-node lab with farm modules, and a client that opens connections to their VIP.

The farm benchmarks drive the lab through the `rampart` verbs (``LabDriver``,
quietly), as a person would: modules made with ``rampart module new
--template farm``, signed with the lab's key, installed and started on every
node. Their ``start_both`` runs a small TCP server that greets each client
with the node's name, so the client knows which node took it.

The client side runs in this process: one named thread enters the lab
client's network namespace and runs an asyncio loop there; every connection
is reset (not closed) once greeted, so a fixed source port can be used again
at once (no TIME_WAIT).

Which bucket a source port falls in is asked of the kernel, never computed
here: a scratch nft table on the client stamps each outgoing SYN's conntrack
entry with the farm's own jhash expression (same key, same seed), and the
client's conntrack table is read back. See docs/dev/bench.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import shutil
import socket
import struct
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node_service.demo import DemoError, LabDriver
from node_service.farm.buckets import BUCKETS, module_seed
from node_service.farm.nft import DROPPED, FilterRule, parse_counters, table_name
from node_service.farm.nft import _hash_expr as hash_expr  # the filter's very expression
from node_service.farm.nft import counters as nft_counters

SETTLE_TIMEOUT_S = 60.0
POLL_S = 0.2
CLIENT_TIMEOUT_S = 300.0
ORACLE_TABLE = "rampart_bench_buckets"

Source = tuple[str, int]

GREETER = textwrap.dedent(
    """\
    import asyncio, os, sys

    NODE = (os.environ["RAMPART_NODE"] + "\\n").encode()


    async def greet(reader, writer):
        writer.write(NODE)
        try:
            await writer.drain()
            await reader.read()  # until the client resets or closes
        except OSError:
            pass
        writer.close()


    async def main():
        server = await asyncio.start_server(greet, "0.0.0.0", int(sys.argv[1]), backlog=1024)
        async with server:
            await server.serve_forever()


    asyncio.run(main())
    """
)

START_BOTH = textwrap.dedent(
    """\
    #!/bin/sh
    # The benchmark's greeting server; idempotent; returns once it listens.
    set -eu
    . "$RAMPART_MODULE_DIR/app.env"
    mkdir -p "$RUN_DIR"
    pidfile="$RUN_DIR/greeter.pid"
    if [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then exit 0; fi
    setsid python3 "$RAMPART_MODULE_DIR/app/greeter.py" "$HTTP_PORT" \\
        </dev/null >"$RUN_DIR/greeter.log" 2>&1 &
    echo $! >"$pidfile"
    tries=0
    while [ "$tries" -lt 100 ]; do
        if python3 -c 'import socket, sys
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), 0.5).close()' "$HTTP_PORT" \\
            2>/dev/null; then
            exit 0
        fi
        tries=$((tries + 1))
        sleep 0.1
    done
    echo "greeting server not listening on port $HTTP_PORT after 10 s" >&2
    exit 1
    """
)

STOP_BOTH = textwrap.dedent(
    """\
    #!/bin/sh
    set -eu
    . "$RAMPART_MODULE_DIR/app.env"
    pidfile="$RUN_DIR/greeter.pid"
    if [ -s "$pidfile" ]; then kill "$(cat "$pidfile")" 2>/dev/null || true; fi
    rm -f "$pidfile"
    """
)


@dataclass(frozen=True)
class Farm:
    """One farm module deployed in the lab."""

    name: str
    vip: str
    port: int
    nodes: tuple[str, ...]
    heartbeat_interval_ms: int
    heartbeat_timeout_ms: int

    @property
    def heartbeat_timeout_s(self) -> float:
        return self.heartbeat_timeout_ms / 1000


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` (bounded); DemoError naming ``what`` if it never holds."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / POLL_S) + 1):
        if condition():
            return
        if time.monotonic() > deadline:
            break
        time.sleep(POLL_S)
    raise DemoError(f"not within {timeout:g} s: {what}")


class FarmLab:
    """A running lab (``LabDriver``) plus the farm verbs the benchmarks need."""

    def __init__(self, driver: LabDriver, work: Path) -> None:
        self.driver = driver
        self.work = work
        self.client = LabClient(driver.client)

    @property
    def status(self) -> dict[str, Any]:
        return self.driver.status

    @property
    def client_address(self) -> str:
        return str(self.status["client"]["address"])

    def on(self, node: str, *argv: str, check: bool = True) -> str:
        return self.driver.on(node, *argv, check=check).stdout

    def shell_all(
        self, scripts: dict[str, tuple[str, str]], timeout: float = 60.0
    ) -> dict[str, str]:
        """Run ``{host: (sh script, stdin)}`` in every host's network namespace at once.

        Through ``ip netns exec``, not `rampart lab exec` (a Python start
        each): the rate benchmark switches its filter between short runs and
        wants the switch to take milliseconds. Returns each host's stdout.
        """
        procs = {host: _in_netns(host, script) for host, (script, _) in scripts.items()}
        outputs: dict[str, str] = {}
        problems: list[str] = []
        for host, proc in procs.items():
            try:
                out, err = proc.communicate(scripts[host][1], timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate(timeout=10)
                problems.append(f"{host}: no answer within {timeout:g} s")
                continue
            if proc.returncode != 0:
                problems.append(f"{host}: exit {proc.returncode}: {err.strip()[-200:]}")
            outputs[host] = out
        if problems:
            raise DemoError(f"commands in the lab failed: {'; '.join(problems)}")
        return outputs

    # -- modules -----------------------------------------------------------------

    def deploy(self, name: str, vip: str, port: int, interval_ms: int, timeout_ms: int) -> Farm:
        """Make, sign, install and start farm module ``name``; return once every node is UP."""
        safe = self._build(name, vip, port, interval_ms, timeout_ms)
        nodes = tuple(self.driver.nodes)
        for node in nodes:
            self.on(node, "module", "install", str(safe))
        for node in nodes:
            self.on(node, "start", "-m", name)
        farm = Farm(name, vip, port, nodes, interval_ms, timeout_ms)
        self.wait_serving(farm)
        return farm

    def _build(self, name: str, vip: str, port: int, interval_ms: int, timeout_ms: int) -> Path:
        from node_service.module import userconfig

        source = self.work / name
        node_args = [f"--node={n['name']}={','.join(n['addresses'])}" for n in self.status["nodes"]]
        self.driver.rampart("module", "new", name, "--template", "farm", "--out", str(source),
                            *node_args, "--vip", f"{vip}/24", "--lb", "ip_port",
                            "--port", str(port), quiet=True)  # fmt: skip
        module = userconfig.load_dir(source)
        failover = dataclasses.replace(
            module.failover, heartbeat_interval_ms=interval_ms, heartbeat_timeout_ms=timeout_ms
        )
        (source / "userconfig.xml").write_bytes(
            userconfig.emit(dataclasses.replace(module, failover=failover))
        )
        (source / "app").mkdir(exist_ok=True)
        (source / "app" / "greeter.py").write_text(GREETER)
        for script, text in (("start_both", START_BOTH), ("stop_both", STOP_BOTH)):
            (source / "bin" / script).write_text(text)
            (source / "bin" / script).chmod(0o755)
        safe = self.work / f"{name}.safe"
        self.driver.rampart("module", "build", str(source), "--key", self.status["signing_key"],
                            "--out", str(safe), quiet=True)  # fmt: skip
        return safe

    def state(self, node: str, farm: Farm) -> dict[str, Any]:
        return json.loads(self.on(node, "state", "-m", farm.name, "--json"))

    def serving(self, farm: Farm, nodes: Sequence[str] = ()) -> bool:
        """Every one of ``nodes`` (default: all) UP with a map over exactly those nodes."""
        wanted = sorted(nodes or farm.nodes)
        for node in wanted:
            seen = self.state(node, farm)
            if seen.get("state") != "UP" or seen.get("alive") != wanted:
                return False
        return True

    def wait_serving(self, farm: Farm, nodes: Sequence[str] = ()) -> None:
        wait_until(
            lambda: self.serving(farm, nodes),
            SETTLE_TIMEOUT_S,
            f"farm {farm.name} UP on {', '.join(nodes or farm.nodes)} with one map",
        )

    def counters(self, node: str, farm: Farm) -> dict[str, int]:
        """The node's filter counters (SYNs owned/dropped), read from nft itself.

        ``ingress``: of the dropped packets, those dropped at the interface,
        before IP and conntrack (the farm's netdev table).
        """
        found = nft_counters(farm.name, nft=self.nft_command(node))
        netdev = self.shell_all({node: ("nft -j list ruleset netdev", "")})[node]
        found["ingress"] = parse_counters(netdev, table_name(farm.name))[DROPPED]
        return found

    def vip_device(self, node: str, farm: Farm) -> str:
        """The interface holding the VIP on ``node`` (the farm's shared-MAC macvlan)."""
        for line in self.shell_all({node: ("ip -4 -o addr show", "")})[node].splitlines():
            fields = line.split()
            if len(fields) > 3 and fields[3].startswith(f"{farm.vip}/"):
                return fields[1].split("@", 1)[0]
        raise DemoError(f"farm {farm.name}: no interface holds VIP {farm.vip} on {node}")

    def nft_command(self, node: str) -> tuple[str, ...]:
        """``nft`` run in ``node``'s network namespace, for node_service.farm.nft's ``nft=``."""
        return ("ip", "netns", "exec", node, "nft")

    def events(self, node: str, farm: Farm, limit: int = 300) -> list[dict[str, Any]]:
        done = self.driver.on(
            node, "events", "-m", farm.name, "-n", str(limit), "--json", check=False, quiet=True
        )
        return [json.loads(ln) for ln in done.stdout.splitlines() if ln.startswith("{")]

    @staticmethod
    def table(farm: Farm) -> str:
        return table_name(farm.name)

    # -- buckets -----------------------------------------------------------------

    def bucket_sources(self, farm: Farm, ports: Iterable[int]) -> tuple[Source, ...]:
        """One client source (address, port) per bucket, the kernel's jhash deciding."""
        client = self.driver.client
        self.shell_all({client: ("nft -f -", oracle_ruleset(farm))})
        try:
            candidates = [(self.client_address, p) for p in ports]
            answers = self.client.connect(farm, candidates, timeout=2.0, concurrency=64)
            table = self.shell_all({client: ("cat /proc/net/nf_conntrack", "")})[client]
        finally:
            self.shell_all({client: (f"nft delete table ip {ORACLE_TABLE}", "")})
        unanswered = sum(a is None for a in answers)
        if unanswered:
            raise DemoError(f"farm {farm.name}: {unanswered} connection(s) unanswered while "
                            "mapping client ports to buckets")  # fmt: skip
        return one_source_per_bucket(self.client_address, parse_marks(table, farm.vip, farm.port))


def _in_netns(host: str, script: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["ip", "netns", "exec", host, "sh", "-ec", script],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def oracle_ruleset(farm: Farm) -> str:
    """A client-side table writing the farm filter's own bucket of each SYN into conntrack."""
    rule = FilterRule("tcp", (farm.port,), "ip_port")
    return (
        f"table ip {ORACLE_TABLE} {{\n"
        "  chain out {\n"
        "    type filter hook output priority 0;\n"
        f"    ip daddr {farm.vip} tcp dport {farm.port} ct mark set "
        f"{hash_expr(rule, module_seed(farm.name))}\n"
        "  }\n"
        "}\n"
    )


_CONNTRACK = re.compile(r"src=(\S+) dst=(\S+) sport=(\d+) dport=(\d+) .*?mark=(\d+)")


def parse_marks(conntrack: str, vip: str, port: int) -> dict[int, int]:
    """``{client port: bucket}`` from /proc/net/nf_conntrack lines to ``vip:port``."""
    marks: dict[int, int] = {}
    for line in conntrack.splitlines():
        found = _CONNTRACK.search(line)
        if found and found[2] == vip and int(found[4]) == port:
            marks[int(found[3])] = int(found[5])
    return marks


def one_source_per_bucket(address: str, marks: dict[int, int]) -> tuple[Source, ...]:
    """The lowest client port of each bucket; DemoError if a bucket has none."""
    chosen: dict[int, int] = {}
    for port, bucket in sorted(marks.items()):
        chosen.setdefault(bucket, port)
    missing = [b for b in range(BUCKETS) if b not in chosen]
    if missing or len(chosen) != BUCKETS:
        raise DemoError(
            f"{len(marks)} client ports reached only {len(chosen)} of {BUCKETS} buckets "
            f"(none in {missing[:5]}...): use more candidate ports"
        )
    return tuple((address, chosen[b]) for b in range(BUCKETS))


@contextmanager
def farm_lab(name: str, nodes: int = 3) -> Iterator[FarmLab]:
    """Lab ``name`` with ``nodes`` nodes for the block; taken down however it ends.

    The name is fixed by the caller: node names feed the bucket map, so a
    fixed name gives the same map (and the same client ports) every run.
    """
    driver = LabDriver(name)
    if driver.is_up():
        print(f"bench: lab {name} is up from an earlier run: taking it down first", flush=True)
        driver.down()
    work = Path(tempfile.mkdtemp(prefix=f"rampart-bench-{name}-"))
    work.chmod(0o755)
    lab: FarmLab | None = None
    try:
        driver.rampart("lab", "up", "--name", name, "--nodes", str(nodes), timeout=300.0)
        driver.refresh()
        lab = FarmLab(driver, work)
        yield lab
    finally:
        if lab is not None:
            lab.client.close()
        driver.down()
        shutil.rmtree(work, ignore_errors=True)


# -- the client, inside the lab client's network namespace -------------------------


@dataclass(frozen=True)
class RoundResult:
    """One round of connections: when it started and ended, who answered each."""

    started: float
    ended: float
    answers: tuple[str | None, ...]

    @property
    def served(self) -> bool:
        return None not in self.answers


def _reset(sock: socket.socket) -> None:
    # RST instead of FIN: no TIME_WAIT, so the same client port is free again at once.
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def _greeted(vip: str, port: int, src: Source, timeout: float) -> str | None:
    """Connect from ``src``, read the greeting (the node's name), reset; None on failure."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setblocking(False)
    try:
        sock.bind(src)
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, (vip, port))
            data = b""
            for _ in range(16):  # a node name is one short line
                chunk = await loop.sock_recv(sock, 256)
                if not chunk:
                    return None
                data += chunk
                if b"\n" in data:
                    return data.split(b"\n", 1)[0].decode()
            return None
    except (OSError, TimeoutError):
        return None
    finally:
        _reset(sock)


async def _connections(
    vip: str, port: int, sources: Sequence[Source], timeout: float, concurrency: int
) -> list[str | None]:
    gate = asyncio.Semaphore(concurrency)

    async def bounded(src: Source) -> str | None:
        async with gate:
            return await _greeted(vip, port, src, timeout)

    return list(await asyncio.gather(*(bounded(s) for s in sources)))


class LabClient:
    """Connections opened in the lab client's namespace, from one owned thread."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="bench-farm-client")

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _inside(self, fn: Callable[[], Any]) -> Any:
        from node_service.net import netns

        with netns.enter(self.namespace):
            return fn()

    def connect(
        self, farm: Farm, sources: Sequence[Source], timeout: float, concurrency: int
    ) -> list[str | None]:
        """Who answered each source (None: refused, dropped or timed out)."""

        def run() -> list[str | None]:
            return asyncio.run(_connections(farm.vip, farm.port, sources, timeout, concurrency))

        return self._pool.submit(self._inside, run).result(timeout=CLIENT_TIMEOUT_S)

    def timed(
        self, farm: Farm, sources: Sequence[Source], timeout: float, concurrency: int
    ) -> tuple[float, list[str | None]]:
        """Seconds taken for all ``sources`` (timed inside the namespace thread), answers."""

        def run() -> tuple[float, list[str | None]]:
            began = time.monotonic()
            answers = asyncio.run(_connections(farm.vip, farm.port, sources, timeout, concurrency))
            return time.monotonic() - began, answers

        return self._pool.submit(self._inside, run).result(timeout=CLIENT_TIMEOUT_S)

    def rounds(
        self,
        farm: Farm,
        sources: Sequence[Source],
        timeout: float,
        every_s: float,
        done: Callable[[list[RoundResult]], bool],
        max_rounds: int,
    ) -> Any:
        """Start rounds every ``every_s`` (never overlapping) until ``done`` or ``max_rounds``.

        Returns a Future of the rounds, so the caller can crash a node meanwhile.
        """

        async def loop() -> list[RoundResult]:
            results: list[RoundResult] = []
            for _ in range(max_rounds):
                began = time.monotonic()
                answers = await _connections(farm.vip, farm.port, sources, timeout, len(sources))
                results.append(RoundResult(began, time.monotonic(), tuple(answers)))
                if done(results):
                    break
                # Pacing, not synchronisation: rounds start on an every_s grid.
                await asyncio.sleep(max(0.0, began + every_s - time.monotonic()))
            return results

        return self._pool.submit(self._inside, lambda: asyncio.run(loop()))
