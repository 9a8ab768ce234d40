"""rampartd fixes as a real process: remove closes the runner, stopstart picks up a
reinstall, and leftover VIPs are removed at start except a resumed primary's.

The daemon runs ``ClosingRunner`` (below) through the test-only
RAMPART_TEST_RUNNERS hook. The VIP test runs the daemon inside its own network
namespace with a veth pair; nothing leaves that namespace.
"""

from __future__ import annotations

import json
import secrets
import subprocess
from pathlib import Path

import pytest

from node_service.module import keys
from node_service.net import netns, vip
from tests.node.daemon_fakes import ROOT, VENV_BIN, FakeRunner, Rampartd

pytestmark = pytest.mark.node

LAN = "198.51.100.11"


class ClosingRunner(FakeRunner):
    """FakeRunner that leaves a note when the daemon closes it (outside module_dir)."""

    async def close(self) -> None:
        present = "files present" if self.files_dir.exists() else "files gone"
        note = self.node.state_dir / f"closed-{self.module.name}"
        with note.open("a") as out:
            out.write(f"{present} in {self.current_state}\n")


class FixesDaemon(Rampartd):
    """Rampartd with ClosingRunner, optionally inside a network namespace."""

    def __init__(self, namespace: str | None = None) -> None:
        super().__init__(heartbeat_port=20000 + secrets.randbelow(30000))
        self.namespace = namespace

    def env(self) -> dict[str, str]:
        env = super().env()
        env["RAMPART_TEST_RUNNERS"] = "mirror=tests.node.test_fixes_daemon:ClosingRunner"
        return env

    def start(self, timeout: float = 20.0) -> None:
        argv = [str(VENV_BIN / "rampartd"), "--config", str(self.config)]
        if self.namespace:
            argv = ["ip", "netns", "exec", self.namespace, *argv]
        with self.stderr_path.open("ab") as err:
            self.proc = subprocess.Popen(
                argv, env=self.env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err
            )
        message = self.next_notify(timeout)
        assert message.startswith("READY=1"), message

    def crash(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self.proc = None

    def ok(self, *argv: str) -> dict:
        done = self.rampart(*argv, "--json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout) if done.stdout.strip() else {}

    def state(self, module: str) -> dict:
        return self.ok("state", "-m", module)

    def journal(self) -> list[str]:
        lines = (self.log_dir / "journal.jsonl").read_text().splitlines()
        return [json.loads(line)["message"] for line in lines]


def build(daemon: FixesDaemon, key: Path, name: str, version: str = "1.0", vip_address: str = ""):
    """A signed mirror module for node rt-n1 (its own VIP, its own version)."""
    from node_service.module import safe, userconfig
    from node_service.module.model import Module, Node, Replication, VirtualIP

    module = Module(
        name=name,
        kind="mirror",
        version=version,
        nodes=(Node("rt-n1", (LAN,)), Node("rt-other", ("198.51.100.12",))),
        vips=(VirtualIP(vip_address or "198.51.100.200", 24),),
        replication=Replication((f"/srv/{name}",)),
    )
    src = daemon.base / f"src-{name}-{secrets.token_hex(3)}"
    (src / "bin").mkdir(parents=True)
    (src / "userconfig.xml").write_bytes(userconfig.emit(module))
    out = daemon.base / f"{name}-{version}.safe"
    safe.build(src, key, out)
    return out


def trust(daemon: FixesDaemon) -> Path:
    daemon.trust_dir.mkdir(exist_ok=True)
    key, pub = keys.generate(daemon.base / "keys")
    (daemon.trust_dir / "site.pub").write_bytes(pub.read_bytes())
    return key


@pytest.fixture
def daemon():
    d = FixesDaemon()
    try:
        key = trust(d)
        d.start()
        yield d, key
    finally:
        d.close()


def test_remove_closes_the_stopped_runner_before_deleting_it(daemon):
    d, key = daemon
    d.ok("module", "install", str(build(d, key, "web")))
    d.ok("start", "-m", "web")
    d.ok("stop", "-m", "web")
    note = d.state_dir / "closed-web"
    assert not note.exists()
    d.ok("module", "remove", "web")
    # Closed once, while its files were still there and it was stopped.
    assert note.read_text() == "files present in STOP\n"
    assert not (d.state_dir / "modules" / "web").exists()


def test_stopstart_after_a_reinstall_runs_the_new_version(daemon):
    d, key = daemon
    d.ok("module", "install", str(build(d, key, "web", "1.0")))
    d.ok("start", "-m", "web")
    assert d.state("web")["version"] == "1.0"
    upgrade = d.ok("module", "install", str(build(d, key, "web", "2.0")))
    assert "keeps its old files until it is stopped" in upgrade["reason"]
    assert d.state("web")["version"] == "1.0"  # still running the old files

    done = d.ok("stopstart", "-m", "web")
    assert done["reason"] == "started alone"
    assert done["state"]["version"] == "2.0"
    assert done["state"]["state"] == "ALONE"
    assert d.state("web")["version"] == "2.0"
    starts = d.state_dir / "modules" / "web" / "state" / "fake-app-starts"
    assert starts.read_text() == "2"
    journal = d.journal()
    assert "new files loaded (version 2.0)" in journal
    assert "ALONE -> STOP (stopstart command from root)" in journal

    again = d.ok("stopstart", "-m", "web")  # no reload pending: same runner, same files
    assert again["state"]["version"] == "2.0"
    assert journal.count("new files loaded (version 2.0)") == 1
    assert starts.read_text() == "3"


def _ip(*argv: str) -> str:
    done = subprocess.run(["ip", *argv], capture_output=True, text=True, timeout=10)
    assert done.returncode == 0, f"ip {' '.join(argv)}: {done.stderr}"
    return done.stdout


@pytest.fixture
def lan_namespace():
    name = f"rt-fxd-{secrets.token_hex(3)}"
    try:
        _ip("netns", "add", name)
        _ip("-n", name, "link", "set", "lo", "up")
        # A veth pair with both ends inside (no dummy driver on every kernel).
        _ip("-n", name, "link", "add", "rt0", "type", "veth", "peer", "name", "rt0p")
        _ip("-n", name, "addr", "add", f"{LAN}/24", "dev", "rt0")
        _ip("-n", name, "link", "set", "rt0", "up")
        _ip("-n", name, "link", "set", "rt0p", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


def _addresses(namespace: str) -> set[str]:
    out = _ip("-n", namespace, "-4", "-o", "addr", "show", "dev", "rt0")
    return {line.split()[3].split("/")[0] for line in out.splitlines()}


def test_start_removes_leftover_vips_except_a_resumed_primarys(lan_namespace):
    d = FixesDaemon(namespace=lan_namespace)
    try:
        key = trust(d)
        d.start()
        d.ok("module", "install", str(build(d, key, "web", vip_address="198.51.100.200")))
        d.ok("module", "install", str(build(d, key, "db", vip_address="198.51.100.201")))
        d.ok("module", "install", str(build(d, key, "old", vip_address="198.51.100.204")))
        d.ok("start", "-m", "web")
        d.ok("prim", "-m", "web")  # resumed as PRIM: keeps its VIP
        d.ok("start", "-m", "db")
        d.ok("swap", "-m", "db")  # ALONE -> SECOND: its VIP must go
        d.ok("start", "-m", "old")  # ALONE, then stopped by the admin: its VIP must go
        d.ok("stop", "-m", "old")
        d.crash()

        # What a crashed run leaves: Rampart-marked VIPs, plus one an admin added.
        with netns.enter(lan_namespace):
            for address in ("198.51.100.200", "198.51.100.201", "198.51.100.202",
                            "198.51.100.204"):  # fmt: skip
                vip.add_vip(address, 24, "rt0")
        _ip("-n", lan_namespace, "addr", "add", "198.51.100.203/24", "dev", "rt0")
        before = _addresses(lan_namespace)
        assert {"198.51.100.200", "198.51.100.201", "198.51.100.202"} <= before

        d.start()  # READY comes after the cleanup
        assert _addresses(lan_namespace) == {LAN, "198.51.100.200", "198.51.100.203"}
        assert d.state("web")["state"] == "PRIM"
        assert d.state("db")["state"] == "SECOND"
        keeping = "(keeping 198.51.100.200 (web resumes as PRIM))"
        journal = d.journal()
        for address in ("198.51.100.201", "198.51.100.202", "198.51.100.204"):
            line = f"at start, leftover virtual IP {address}/24 from rt0 removed {keeping}"
            assert line in journal, journal[-20:]
    finally:
        d.close()
