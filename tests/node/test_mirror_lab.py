"""Mirror failover on a real lab: two namespaced nodes running rampartd, one client.

One lab and one module for the whole file (tests run in sequence and each
starts from ``baseline()``: every node booted and connected, the module
started on both, one PRIM and one SECOND). The module is the ``mirror``
template's web server on a VIP from the lab's pool, with a process checker
(restarts=2 window=60) instead of the template's tcp checker and the client
as split-brain witness. Waits are event-driven (`rampart wait`, journal
entries, the page's content) and every one is bounded.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from tests.node.conftest import rampart

pytestmark = pytest.mark.node

MODULE = "web"
PORT = 8080
WAIT_S = 30.0
POLL_S = 0.2  # journal re-read interval while waiting for an entry (bounded by a deadline)
RAMPART_IN_HOST = [sys.executable, "-m", "node_service.cli"]
PROCESS_CHECKER = (
    '<process pattern="http[.]server" interval="1" timeout="0.5" failures="1" '
    'restarts="2" window="60"/>'
)

FETCH = """
import sys, time, urllib.request
url, want, deadline = sys.argv[1], sys.argv[2], time.monotonic() + float(sys.argv[3])
began, body = time.monotonic(), ""
while time.monotonic() < deadline:
    try:
        body = urllib.request.urlopen(url, timeout=0.5).read().decode().strip()
    except OSError as exc:
        body = f"error: {exc}"
    if want in ("", body):
        print(f"{body} {time.monotonic() - began:.2f}")
        sys.exit(0)
    time.sleep(0.05)
print(f"{body} timeout")
sys.exit(1)
"""

FORGE = """
import os, secrets, socket, sys, time
from node_service.cluster.heartbeat import Heartbeat, encode
from node_service.cluster.pki import heartbeat_key
claimed, source, target, how = sys.argv[1:5]
key = os.urandom(32) if how == "random-key" else heartbeat_key(secrets.token_bytes(32), "web")
packet = Heartbeat(claimed, "web", time.time_ns() * 2, 1, source, time.monotonic_ns(),
                   {"state": "STOP"})
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    s.bind((source, 0))
    for _ in range(3):
        s.sendto(encode(packet, key), (target, 7810))
"""


class Site:
    """The lab, the module on it, and the operations the tests use."""

    def __init__(self, lab: dict, workdir: Path) -> None:
        self.lab = lab
        self.name = lab["name"]
        self.nodes = [n["name"] for n in lab["nodes"]]
        self.lan = {n["name"]: n["addresses"][0] for n in lab["nodes"]}
        self.run_dir = {n["name"]: Path(n["api_socket"]).parent for n in lab["nodes"]}
        self.log_dir = {n["name"]: Path(n["log_dir"]) for n in lab["nodes"]}
        self.client = lab["client"]["name"]
        self.client_address = lab["client"]["address"]
        self.vip = lab["vip_pool"][0]
        self.workdir = workdir

    # -- running things ---------------------------------------------------------

    def exec(self, host: str, *argv: str, check: bool = True, timeout: float = 90):
        return rampart("lab", "exec", host, "--", *argv, check=check, timeout=timeout)

    def r(self, host: str, *args: str, check: bool = True, timeout: float = 90):
        return self.exec(host, *RAMPART_IN_HOST, *args, check=check, timeout=timeout)

    def lab_verb(self, verb: str, host: str, *extra: str):
        return rampart("lab", verb, host, *extra)

    # -- the module -----------------------------------------------------------------

    def build(self) -> Path:
        src = self.workdir / "web"
        nodes = [f"--node={n['name']}={','.join(n['addresses'])}" for n in self.lab["nodes"]]
        rampart("module", "new", MODULE, "--template", "mirror", "--out", str(src),
                *nodes, "--vip", self.vip, "--port", str(PORT))  # fmt: skip
        xml = src / "userconfig.xml"
        text = re.sub(r"<tcp [^>]*/>", PROCESS_CHECKER, xml.read_text())
        text = text.replace("<failover ", f'<failover witness="{self.client_address}" ')
        xml.write_text(text)
        safe = self.workdir / "web.safe"
        rampart("module", "build", str(src), "--key", self.lab["signing_key"], "--out", str(safe))
        return safe

    def install_and_start(self) -> None:
        safe = self.build()
        for node in self.nodes:
            self.r(node, "module", "install", str(safe))
        for node in self.nodes:
            self.r(node, "start", "-m", MODULE)

    # -- looking ------------------------------------------------------------------

    def state(self, node: str) -> dict:
        return json.loads(self.r(node, "state", "-m", MODULE, "--json").stdout)

    def wait(self, node: str, states: str, timeout: float = WAIT_S) -> None:
        done = self.r(node, "wait", "-m", MODULE, "--state", states, "--timeout",
                      str(timeout), check=False, timeout=timeout + 30)  # fmt: skip
        assert done.returncode == 0, f"{node}: {done.stderr.strip()}\n{self.tail(node)}"

    def transitions(self, node: str) -> list[str]:
        return [e["message"] for e in self.journal(node)
                if e["kind"] == "transition" and e.get("module") == MODULE]  # fmt: skip

    def tail(self, node: str) -> str:
        return "\n".join(f"  {e['kind']}: {e['message']}" for e in self.journal(node)[-15:])

    def journal(self, node: str) -> list[dict]:
        """The node's journal, read from its private log dir (no process to spawn)."""
        entries = []
        for line in (self.log_dir[node] / "journal.jsonl").read_text().splitlines():
            if line.strip():
                entries.append(json.loads(line))
        return entries

    def wait_entry(self, node: str, pattern: str, since: float, timeout: float = WAIT_S) -> dict:
        """The first journal entry at or after ``since`` whose message matches ``pattern``."""
        deadline = time.monotonic() + timeout
        while True:
            for entry in self.journal(node):
                if entry["ts"] >= since and re.search(pattern, entry["message"]):
                    return entry
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{node}: no journal entry matching {pattern!r} within {timeout:g} s\n"
                    + self.tail(node)
                )
            time.sleep(POLL_S)

    def page(self, want: str = "", timeout: float = WAIT_S) -> tuple[str, float]:
        """Fetch node.txt through the VIP from the client until it names ``want``."""
        url = f"http://{self.vip}:{PORT}/node.txt"
        done = self.exec(self.client, sys.executable, "-c", FETCH, url, want, str(timeout),
                         check=False, timeout=timeout + 30)  # fmt: skip
        body, _, took = done.stdout.strip().rpartition(" ")
        assert done.returncode == 0, f"client wanted {want!r} on {url}, last got {body!r}"
        return body, float(took)

    def holds_vip(self, node: str) -> bool:
        return f" {self.vip}/" in self.exec(node, "ip", "-br", "-4", "addr").stdout

    def http_pid(self, node: str) -> int | None:
        try:
            return int((self.run_dir[node] / "modules" / MODULE / "http.pid").read_text())
        except (OSError, ValueError):
            return None

    def daemon_pid(self, node: str) -> int:
        ns = os.stat(f"/run/netns/{node}")
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                st = os.stat(f"/proc/{entry}/ns/net")
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (ns.st_dev, ns.st_ino) and b"bin/rampartd" in cmdline:
                return int(entry)
        raise AssertionError(f"no rampartd running in {node}")

    # -- a known starting point -----------------------------------------------------

    def baseline(self) -> tuple[str, str]:
        """Every node up and connected, the module running: returns (PRIM, SECOND)."""
        status = json.loads(rampart("lab", "status", "--name", self.name, "--json").stdout)
        for node in status["nodes"]:
            if not node["up"] or not node["rampartd"]:
                self.lab_verb("boot", node["name"])
            if not all(node["networks"].values()):
                self.lab_verb("heal", node["name"])
        for node in self.nodes:
            if self.state(node)["state"] == "STOP":
                self.r(node, "start", "-m", MODULE)
        for node in self.nodes:
            self.wait(node, "PRIM,SECOND")
        states = {n: self.state(n)["state"] for n in self.nodes}
        prim = next(n for n, s in states.items() if s == "PRIM")
        second = next(n for n in self.nodes if n != prim)
        self.wait(second, "SECOND")
        # A SECOND that just joined adopts the primary's generation a tick later.
        deadline = time.monotonic() + WAIT_S
        while self.state(second)["stale"]:
            assert time.monotonic() < deadline, f"{second} still stale\n{self.tail(second)}"
            time.sleep(POLL_S)
        return prim, second


@pytest.fixture(scope="module")
def site(fresh_lab, tmp_path_factory) -> Site:
    s = Site(fresh_lab, tmp_path_factory.mktemp("mirror"))
    s.install_and_start()
    return s


def test_start_elects_one_prim_and_the_client_reaches_it_on_the_vip(site: Site):
    prim, second = site.baseline()
    assert site.page(prim)[0] == prim
    state = site.state(prim)
    assert (state["module"], state["kind"], state["node"], state["state"]) == (
        MODULE, "mirror", prim, "PRIM",
    )  # fmt: skip
    peer = state["peers"][second]
    assert peer["state"] == "SECOND" and peer["reachable"] is True
    assert set(peer["networks"].values()) == {True} and len(peer["networks"]) == 2
    # The sample module replicates /srv/data: the SECOND has finished its resync.
    assert state["replication"]["status"] == "uptodate"
    assert state["witness"] == {"target": site.client_address, "reachable": True}
    assert site.holds_vip(prim) and not site.holds_vip(second)


def test_crash_of_prim_moves_the_page_and_the_old_prim_rejoins_as_second(site: Site):
    prim, second = site.baseline()
    began = time.monotonic()
    site.lab_verb("crash", prim)
    body, _ = site.page(second)
    outage = time.monotonic() - began
    print(f"\nfailover (crash of {prim} -> page served by {second}): {outage:.2f} s")
    assert body == second
    site.wait(second, "ALONE,PRIM")
    assert any("SECOND -> ALONE" in t for t in site.transitions(second))
    site.lab_verb("boot", prim)
    site.wait(prim, "SECOND")
    site.wait(second, "PRIM")
    assert not site.holds_vip(prim)
    assert site.page(second)[0] == second


def test_swap_exchanges_roles_and_the_page_follows(site: Site):
    prim, second = site.baseline()
    began = time.monotonic()
    out = site.r(prim, "swap", "-m", MODULE).stdout
    print(f"\nswap {prim} -> {second} (CLI included): {time.monotonic() - began:.2f} s")
    assert f"{second} is now PRIM" in out, out
    site.wait(second, "PRIM")
    site.wait(prim, "SECOND")
    assert site.page(second)[0] == second
    assert not site.holds_vip(prim)


def test_killed_application_is_restarted_twice_then_fails_over(site: Site):
    prim, second = site.baseline()
    for attempt in (1, 2):
        pid = site.http_pid(prim)
        assert pid is not None
        killed = time.time()
        os.kill(pid, signal.SIGKILL)
        site.wait_entry(prim, r"application restarted locally", killed)
        assert site.http_pid(prim) not in (None, pid), f"restart {attempt} did not happen"
        assert site.state(prim)["state"] == "PRIM"
    os.kill(site.http_pid(prim), signal.SIGKILL)
    site.wait(second, "PRIM")
    site.wait(prim, "SECOND")
    assert site.page(second)[0] == second
    failed = [t for t in site.transitions(prim) if "PRIM -> SECOND" in t]
    assert failed and "application failed" in failed[-1]


def test_losing_one_heartbeat_network_warns_and_nothing_fails_over(site: Site):
    prim, second = site.baseline()
    before = {n: site.state(n) for n in site.nodes}
    cut = time.time()
    site.lab_verb("cut", prim, "--net", "hb2")
    try:
        warning = site.wait_entry(second, r"network to .* lost; still heard .*no failover", cut)
        assert warning["severity"] == "warning"
        after = {n: site.state(n) for n in site.nodes}
        for node in site.nodes:
            assert after[node]["state"] == before[node]["state"]
            assert after[node]["since"] == before[node]["since"]
        nets = after[second]["peers"][prim]["networks"]
        assert sorted(nets.values()) == [False, True]
    finally:
        site.lab_verb("heal", prim, "--net", "hb2")


def test_full_isolation_with_witness_leaves_exactly_one_side_serving(site: Site):
    prim, second = site.baseline()
    site.lab_verb("cut", prim)
    try:
        site.wait(second, "ALONE")
        site.wait(prim, "WAIT")
        assert site.page(second)[0] == second
        assert not site.holds_vip(prim) and site.holds_vip(second)
        gave_up = site.transitions(prim)[-1]
        assert "PRIM -> WAIT" in gave_up and "witness unreachable" in gave_up
    finally:
        site.lab_verb("heal", prim)
    site.wait(prim, "SECOND")
    site.wait(second, "PRIM")


def test_rampartd_restart_leaves_the_application_undisturbed(site: Site):
    prim, second = site.baseline()
    app = site.http_pid(prim)
    counts = {n: len(site.transitions(n)) for n in site.nodes}
    killed = time.time()
    os.kill(site.daemon_pid(prim), signal.SIGKILL)
    site.lab_verb("boot", prim)  # starts rampartd again where it is not running
    resumed = site.wait_entry(prim, r"resumed", killed)
    assert "resumed as PRIM (application left running)" in resumed["message"]
    site.wait_entry(second, rf"peer {prim} restarted", killed)
    site.wait(prim, "PRIM")
    assert site.http_pid(prim) == app
    assert os.path.exists(f"/proc/{app}")
    assert site.page(prim)[0] == prim
    # The restart went unnoticed by the state machines: no transition anywhere.
    assert {n: len(site.transitions(n)) for n in site.nodes} == counts


def test_rampartd_sigterm_stops_the_module_and_the_second_takes_over_at_once(site: Site):
    prim, second = site.baseline()
    stopped, daemon = time.time(), site.daemon_pid(prim)
    os.kill(daemon, signal.SIGTERM)
    site.wait(second, "ALONE")
    took_over = site.wait_entry(second, "SECOND -> ALONE", stopped)
    # The peer said STOP: no heartbeat timeout (3 s) to wait for.
    assert "is stopped" in took_over["message"], took_over
    assert took_over["ts"] - stopped < 3.0
    assert site.wait_entry(prim, r"-> STOP \(rampartd is shutting down\)", stopped)
    deadline = time.monotonic() + WAIT_S
    while os.path.exists(f"/proc/{daemon}"):  # boot starts rampartd only where none runs
        assert time.monotonic() < deadline, f"rampartd {daemon} still running"
        time.sleep(POLL_S)
    site.lab_verb("boot", prim)  # rampartd again: intent "started", so it starts again
    site.wait(prim, "SECOND")
    site.wait(second, "PRIM")


def test_unknown_module_and_swap_while_alone_are_clear_refusals(site: Site):
    prim, second = site.baseline()
    done = site.r(prim, "swap", "-m", "nosuch", check=False)
    assert done.returncode == 3
    assert "nosuch" in done.stderr and "not installed" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    site.r(second, "stop", "-m", MODULE)
    site.wait(prim, "ALONE")
    before = site.state(prim)
    done = site.r(prim, "swap", "-m", MODULE, check=False)
    assert done.returncode == 3
    assert "swap refused: module web is ALONE, there is no SECOND" in done.stderr
    after = site.state(prim)
    assert (after["state"], after["since"]) == (before["state"], before["since"])
    assert site.page(prim)[0] == prim


def test_forged_heartbeats_are_journaled_and_change_nothing(site: Site):
    prim, second = site.baseline()
    before = site.state(prim)
    target, sent = site.lan[prim], time.time()
    # A packet with a random key from the client, and one from the real peer's
    # address signed with another site's secret.
    site.exec(site.client, sys.executable, "-c", FORGE, second, site.client_address, target,
              "random-key")  # fmt: skip
    site.exec(second, sys.executable, "-c", FORGE, second, site.lan[second], target,
              "other-site")  # fmt: skip
    for source in (site.client_address, site.lan[second]):
        entry = site.wait_entry(prim, f"dropped heartbeat from {source}", sent)
        assert "authentication" in entry["message"], entry
    after = site.state(prim)
    assert (after["state"], after["since"]) == (before["state"], before["since"])
    assert after["peers"][second]["state"] == "SECOND" and after["peers"][second]["reachable"]
