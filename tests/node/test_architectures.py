"""Composed architectures on real labs: several modules on the same nodes.

Each test brings up its own lab (unique ``rt`` name, always taken down) and
builds its modules with the module tools, as an operator would: ``rampart
module new --template mirror|farm``, ``module build`` with the lab's key,
``module install`` and ``start`` on each node through ``rampart lab exec``.

- farm+mirror: farm ``web`` on n1..n3 (VIP A) and mirror ``db`` on n1, n2
  (VIP B); crashing the db primary moves db while the farm absorbs the loss.
- active/active: mirrors ``app1`` (prefers n1) and ``app2`` (prefers n2),
  crossed on two nodes; crash n1, boot it back, no failback by default.
- N-1: mirrors m1, m2, m3 on n1+n4, n2+n4, n3+n4; n4 is the shared backup;
  with ``failback="true"`` each primary takes its module back after a boot.

The mirror modules keep the template's replicated directory (one per module
under the host's private /srv; validation demands one) but the tests never
depend on replicated data: each page is written by ``start_prim`` on the node
that serves it. Waits are event-driven (``rampart wait``, the client's page
fetch, the farm's connection rounds) and every one is bounded.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.node.conftest import lab_running, rampart
from tests.node.test_farm_lab import Client, Farm, deploy, on, state
from tests.node.test_mirror_lab import FETCH

pytestmark = pytest.mark.node

CLI = [sys.executable, "-m", "node_service.cli"]
WAIT_S = 30.0
POLL_S = 0.2  # state re-read interval while waiting for a reason (bounded by a deadline)
FARM_BUDGET_S = 4.0  # farm: crash -> every new connection answered (heartbeat timeout 3 s)
ROUND = 60  # new connections per farm round


# -- mirror modules ---------------------------------------------------------------


@dataclass(frozen=True)
class Mirror:
    name: str
    nodes: tuple[str, str]  # the preferred node first, as listed in the module
    vip: str
    port: int


def make_mirror(
    lab: dict, work: Path, name: str, nodes: tuple[str, str], vip: str, port: int,
    failback: bool = False, interface: str | None = None,
) -> Mirror:  # fmt: skip
    """Create, sign and install a mirror module; ``nodes[0]`` is its preferred node.

    ``interface`` pins the VIP to that interface (needed beside a farm, whose
    shared-MAC interface holds an address in the same network).
    """
    addresses = {n["name"]: n["addresses"] for n in lab["nodes"]}
    source = work / name
    rampart("module", "new", name, "--template", "mirror", "--out", str(source),
            *(f"--node={n}={','.join(addresses[n])}" for n in nodes),
            "--vip", vip, "--port", str(port), "--dir", f"/srv/{name}")  # fmt: skip
    xml = source / "userconfig.xml"
    text = xml.read_text()
    if failback:
        assert 'failback="false"' in text
        text = text.replace('failback="false"', 'failback="true"')
    if interface:
        vip_element = f'<vip address="{vip}" prefix="24"/>'
        assert vip_element in text
        text = text.replace(
            vip_element, f'<vip address="{vip}" prefix="24" interface="{interface}"/>'
        )
    xml.write_text(text)
    safe = work / f"{name}.safe"
    rampart("module", "build", str(source), "--key", lab["signing_key"], "--out", str(safe))
    for node in nodes:
        on(node, *CLI, "module", "install", str(safe))
        # The replicated directory must exist on both nodes before the first start.
        on(node, "mkdir", "-p", f"/srv/{name}")
    return Mirror(name, nodes, vip, port)


def start_together(mirrors: list[Mirror]) -> None:
    """Start every mirror on both its nodes at once, as after a site-wide boot.

    Both nodes then meet in WAIT and the election (preferred node first)
    decides, rather than whichever node happened to be started first.
    """
    jobs = [(node, m.name) for m in mirrors for node in m.nodes]
    with ThreadPoolExecutor(len(jobs), thread_name_prefix="rt-arch-start") as pool:
        done = list(pool.map(lambda job: on(job[0], *CLI, "start", "-m", job[1]), jobs))
    assert all("now WAIT" in out for out in done), done


def wait_state(node: str, module: str, states: str, timeout: float = WAIT_S) -> None:
    done = rampart("lab", "exec", node, "--", *CLI, "wait", "-m", module, "--state", states,
                   "--timeout", str(timeout), check=False, timeout=timeout + 30)  # fmt: skip
    if done.returncode != 0:
        events = on(node, *CLI, "events", "-m", module, "-n", "15", check=False)
        raise AssertionError(f"{node}: {module} not {states}: {done.stderr.strip()}\n{events}")


def wait_reason(node: str, module: str, pattern: str, timeout: float = WAIT_S) -> dict:
    """The module's state on ``node`` once its last decision's reason matches."""
    deadline = time.monotonic() + timeout
    while True:
        seen = state(node, module)
        if re.search(pattern, seen.get("reason", "")):
            return seen
        if time.monotonic() > deadline:
            raise AssertionError(f"{node}: {module} reason {seen.get('reason')!r} !~ {pattern!r}")
        time.sleep(POLL_S)


def page(lab: dict, mirror: Mirror, want: str, timeout: float = WAIT_S) -> str:
    """Fetch the module's node.txt through its VIP from the client until it says ``want``."""
    url = f"http://{mirror.vip}:{mirror.port}/node.txt"
    done = rampart("lab", "exec", lab["client"]["name"], "--", sys.executable, "-c", FETCH,
                   url, want, str(timeout), check=False, timeout=timeout + 30)  # fmt: skip
    body = done.stdout.strip().rpartition(" ")[0]
    assert done.returncode == 0, f"client wanted {want!r} on {url}, last got {body!r}"
    return body


def vips_held(node: str) -> set[str]:
    """Addresses on the node's interfaces (the farm's VIP sits on its macvlan)."""
    links = json.loads(on(node, "ip", "-j", "-4", "addr"))
    return {a["local"] for link in links for a in link.get("addr_info", [])}


def transitions(node: str, module: str) -> list[str]:
    """The module's journaled transitions on ``node``, oldest first."""
    lines = on(node, *CLI, "events", "-m", module, "-n", "200", "--json").splitlines()
    entries = [json.loads(line) for line in lines if line.strip()]
    return [e["message"] for e in entries if e.get("kind") == "transition"]


def roles(mirror: Mirror) -> dict[str, str]:
    return {node: state(node, mirror.name)["state"] for node in mirror.nodes}


# -- farm rounds -------------------------------------------------------------------


class Ports:
    """Fresh client source ports, so every round's connections are new flows."""

    def __init__(self, first: int) -> None:
        self.next = first

    def take(self, count: int) -> list[int]:
        taken = list(range(self.next, self.next + count))
        self.next += count
        return taken


def recover(client: Client, farm: Farm, me: str, ports: Ports, since: float) -> float:
    """Seconds from ``since`` until a whole round of new connections is answered."""
    for _ in range(80):  # bounded: 80 rounds of at most 0.5 s each
        answers = client.connect(farm, [(me, p) for p in ports.take(ROUND)], timeout=0.5)
        if None not in answers.values():
            return time.monotonic() - since
    raise AssertionError(f"farm {farm.name}: new connections never all answered again")


# -- fixtures -----------------------------------------------------------------------


@pytest.fixture
def work() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="rt-arch-", dir="/tmp"))
    path.chmod(0o755)  # the farm's servers log here from inside the lab hosts
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def names(lab: dict) -> list[str]:
    return [n["name"] for n in lab["nodes"]]


# -- farm + mirror ------------------------------------------------------------------


def test_farm_web_tier_and_mirror_db_tier_on_the_same_nodes(work):
    with lab_running(3) as lab:
        n1, n2, n3 = names(lab)
        me = lab["client"]["address"]
        web = deploy(lab, work, "web", lab["vip_pool"][0], 8080, "ip_port")
        db = make_mirror(lab, work, "db", (n1, n2), lab["vip_pool"][1], 8090, interface="eth0")
        start_together([db])
        wait_state(n1, "db", "PRIM")
        wait_state(n2, "db", "SECOND")
        client = Client(lab["client"]["name"])
        try:
            # Both tiers answer on their own VIPs; the db tier's VIP is on its PRIM only.
            ports = Ports(31000)
            before = client.connect(web, [(me, p) for p in ports.take(3 * ROUND)])
            assert None not in before.values()
            assert set(before.values()) == {n1, n2, n3}
            assert page(lab, db, n1) == n1
            held = {n: vips_held(n) for n in (n1, n2, n3)}
            assert all(web.vip in held[n] for n in (n1, n2, n3)), held
            assert [n for n in (n1, n2, n3) if db.vip in held[n]] == [n1], held
            assert state(n3, "web")["alive"] == [n1, n2, n3]

            # Power cut on the db primary, which is also a farm node.
            crashed = time.monotonic()
            rampart("lab", "crash", n1)
            took = recover(client, web, me, ports, crashed)
            print(f"\nfarm: every new connection answered {took:.2f} s after the crash")
            assert took <= FARM_BUDGET_S
            assert page(lab, db, n2) == n2
            wait_state(n2, "db", "ALONE")
            assert db.vip in vips_held(n2)
            for node in (n2, n3):
                assert state(node, "web")["alive"] == [n2, n3]
            # Only the crashed node's clients moved; nobody answers for it.
            again = client.connect(web, list(before))
            for src, node in before.items():
                expected = (n2, n3) if node == n1 else (node,)
                assert again[src] in expected, (src, node, again[src])

            # Back after a boot: db SECOND (no failback by default), farm over three.
            rampart("lab", "boot", n1)
            wait_state(n1, "db", "SECOND")
            wait_state(n2, "db", "PRIM")
            deadline = time.monotonic() + WAIT_S
            while not web.serving():
                assert time.monotonic() < deadline, f"{n1} not back in the farm's map"
                time.sleep(POLL_S)
            after = client.connect(web, [(me, p) for p in ports.take(3 * ROUND)])
            assert None not in after.values() and set(after.values()) == {n1, n2, n3}
            assert page(lab, db, n2) == n2
            assert db.vip not in vips_held(n1)
        finally:
            client.pool.shutdown(wait=True)


# -- active/active --------------------------------------------------------------------


def test_active_active_two_crossed_mirrors_on_two_nodes(work):
    with lab_running(2) as lab:
        n1, n2 = names(lab)
        app1 = make_mirror(lab, work, "app1", (n1, n2), lab["vip_pool"][0], 8081)
        app2 = make_mirror(lab, work, "app2", (n2, n1), lab["vip_pool"][1], 8082)
        start_together([app1, app2])
        for mirror in (app1, app2):
            prim, second = mirror.nodes
            wait_state(prim, mirror.name, "PRIM")
            wait_state(second, mirror.name, "SECOND")
        # Each node is PRIM of one module and SECOND of the other: both work.
        assert roles(app1) == {n1: "PRIM", n2: "SECOND"}
        assert roles(app2) == {n1: "SECOND", n2: "PRIM"}
        assert page(lab, app1, n1) == n1 and page(lab, app2, n2) == n2
        assert app1.vip in vips_held(n1) and app2.vip not in vips_held(n1)
        assert app2.vip in vips_held(n2) and app1.vip not in vips_held(n2)
        for mirror in (app1, app2):
            prim = mirror.nodes[0]
            elected = [t for t in transitions(prim, mirror.name) if "-> PRIM" in t]
            assert f"{prim} is the preferred node" in elected[-1], elected

        rampart("lab", "crash", n1)
        wait_state(n2, "app1", "ALONE")
        wait_state(n2, "app2", "ALONE")
        assert page(lab, app1, n2) == n2 and page(lab, app2, n2) == n2
        assert {app1.vip, app2.vip} <= vips_held(n2)

        # n1 comes back as SECOND of both; failback="false" (the template's
        # default): app1 stays on n2 although n1 is its preferred node.
        rampart("lab", "boot", n1)
        wait_state(n1, "app1", "SECOND")
        wait_state(n1, "app2", "SECOND")
        stays = wait_reason(n2, "app1", rf"serving as PRIM with SECOND {n1} up to date")
        assert stays["state"] == "PRIM"
        assert page(lab, app1, n2) == n2 and page(lab, app2, n2) == n2
        assert not {app1.vip, app2.vip} & vips_held(n1)

        # The operator restores the crossed layout with one swap.
        on(n2, *CLI, "swap", "-m", "app1")
        wait_state(n1, "app1", "PRIM")
        wait_state(n2, "app1", "SECOND")
        assert page(lab, app1, n1) == n1 and page(lab, app2, n2) == n2
        assert roles(app1) == {n1: "PRIM", n2: "SECOND"}
        assert roles(app2) == {n1: "SECOND", n2: "PRIM"}


# -- N-1 -------------------------------------------------------------------------------


def test_n_minus_one_three_mirrors_share_one_backup_node(work):
    with lab_running(4) as lab:
        n1, n2, n3, n4 = names(lab)
        pool = lab["vip_pool"]
        m1, m2, m3 = (
            make_mirror(lab, work, f"m{i}", (prim, n4), pool[i - 1], 8080 + i, failback=True)
            for i, prim in ((1, n1), (2, n2), (3, n3))
        )
        start_together([m1, m2, m3])
        for mirror in (m1, m2, m3):
            wait_state(mirror.nodes[0], mirror.name, "PRIM")
            wait_state(n4, mirror.name, "SECOND")
            assert page(lab, mirror, mirror.nodes[0]) == mirror.nodes[0]
        assert not {m1.vip, m2.vip, m3.vip} & vips_held(n4)
        since = {(m.name, n): state(n, m.name)["since"] for m in (m1, m3) for n in m.nodes}

        # One primary fails: the backup serves its module, nothing else moves.
        rampart("lab", "crash", n2)
        wait_state(n4, "m2", "ALONE")
        assert page(lab, m2, n4) == n4
        assert page(lab, m1, n1) == n1 and page(lab, m3, n3) == n3
        for mirror in (m1, m3):
            assert roles(mirror) == {mirror.nodes[0]: "PRIM", n4: "SECOND"}
            for node in mirror.nodes:
                assert state(node, mirror.name)["since"] == since[(mirror.name, node)]
        assert vips_held(n4) & {m1.vip, m2.vip, m3.vip} == {m2.vip}

        # A second primary fails: the backup now runs two modules.
        rampart("lab", "crash", n1)
        wait_state(n4, "m1", "ALONE")
        assert page(lab, m1, n4) == n4 and page(lab, m2, n4) == n4
        assert page(lab, m3, n3) == n3
        assert roles(m3) == {n3: "PRIM", n4: "SECOND"}
        assert vips_held(n4) & {m1.vip, m2.vip, m3.vip} == {m1.vip, m2.vip}

        # failback="true": each primary takes its module back once it is an
        # up-to-date SECOND, freeing the backup for the next failure.
        rampart("lab", "boot", n1)
        rampart("lab", "boot", n2)
        for mirror in (m1, m2):
            wait_state(mirror.nodes[0], mirror.name, "PRIM")
            wait_state(n4, mirror.name, "SECOND")
            assert page(lab, mirror, mirror.nodes[0]) == mirror.nodes[0]
        assert not {m1.vip, m2.vip, m3.vip} & vips_held(n4)
        for mirror in (m1, m2):
            gave_back = [t for t in transitions(n4, mirror.name) if "-> SECOND" in t]
            assert "failback" in gave_back[-1], gave_back
