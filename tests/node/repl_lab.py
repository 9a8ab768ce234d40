"""A replicated mirror module on a real lab, and the operations the repl lab tests use.

Shared by tests/node/test_repl_lab*.py. The module is the ``mirror``
template with one replicated dir (``/srv/data``) and no application checker,
so only replication and the state machine decide. Every wait is bounded and
event-driven (``rampart wait``, status polls with a deadline).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

from tests.node.conftest import rampart

MODULE = "data"
DIR = "/srv/data"
WAIT_S = 40.0
POLL_S = 0.2
IN_HOST = [sys.executable, "-m", "node_service.cli"]

# Appends fixed-size records, fsyncs each, and logs the sequence number only
# after fsync returned: the log is the list of acknowledged writes.
WRITER = """
import hashlib, os, sys, time
data, acked, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
fd = os.open(data, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
log = open(acked, "a", buffering=1)
end, seq = time.monotonic() + seconds, 0
while time.monotonic() < end:
    seq += 1
    os.write(fd, f"{seq:08d} {hashlib.sha256(str(seq).encode()).hexdigest()}\\n".encode())
    os.fsync(fd)
    log.write(f"{seq}\\n")
"""

# Rewrites whole 64 KiB blocks (random data, aligned) with fsync: the bytes
# modified are exactly blocks x 64 KiB, which a resync should resend.
BLOCK_WRITER = """
import os, sys
path, first, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
for block in range(first, first + count):
    os.pwrite(fd, os.urandom(65536), block * 65536)
os.fsync(fd)
print(count * 65536)
"""


def record(seq: int) -> str:
    import hashlib

    return f"{seq:08d} {hashlib.sha256(str(seq).encode()).hexdigest()}"


class ReplSite:
    def __init__(self, lab: dict, workdir: Path) -> None:
        self.lab = lab
        self.nodes = [n["name"] for n in lab["nodes"]]
        self.workdir = workdir
        self.writer = workdir / "writer.py"
        self.writer.write_text(WRITER)
        self.block_writer = workdir / "block_writer.py"
        self.block_writer.write_text(BLOCK_WRITER)

    # -- running things ---------------------------------------------------------

    def sh(self, host: str, script: str, check: bool = True, timeout: float = 90):
        return rampart("lab", "exec", host, "--", "sh", "-c", script, check=check, timeout=timeout)

    def r(self, host: str, *args: str, check: bool = True, timeout: float = 90):
        return rampart("lab", "exec", host, "--", *IN_HOST, *args, check=check, timeout=timeout)

    def lab_verb(self, verb: str, host: str) -> None:
        rampart("lab", verb, host)

    def background(self, host: str, *argv: str) -> subprocess.Popen:
        return subprocess.Popen(
            [*IN_HOST, "lab", "exec", host, "--", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    # -- the module ---------------------------------------------------------------

    def install_and_start(self, *, tweak=None) -> None:
        src = self.workdir / MODULE
        nodes = [f"--node={n['name']}={','.join(n['addresses'])}" for n in self.lab["nodes"]]
        rampart("module", "new", MODULE, "--template", "mirror", "--out", str(src),
                *nodes, "--vip", self.lab["vip_pool"][0], "--dir", DIR)  # fmt: skip
        xml = src / "userconfig.xml"
        text = re.sub(r"\s*<checkers>.*?</checkers>", "", xml.read_text(), flags=re.S)
        xml.write_text(tweak(text) if tweak else text)
        safe = self.workdir / f"{MODULE}.safe"
        rampart("module", "build", str(src), "--key", self.lab["signing_key"], "--out", str(safe))
        for node in self.nodes:
            self.sh(node, f"mkdir -p {DIR}")
            self.r(node, "module", "install", str(safe))
        for node in self.nodes:
            self.r(node, "start", "-m", MODULE)

    # -- looking --------------------------------------------------------------------

    def state(self, node: str) -> dict:
        return json.loads(self.r(node, "state", "-m", MODULE, "--json").stdout)

    def repl_status(self, node: str) -> dict:
        return json.loads(self.r(node, "repl", "status", "-m", MODULE, "--json").stdout)

    def wait(self, node: str, states: str, timeout: float = WAIT_S) -> None:
        done = self.r(node, "wait", "-m", MODULE, "--state", states, "--timeout",
                      str(timeout), check=False, timeout=timeout + 30)  # fmt: skip
        assert done.returncode == 0, f"{node}: {done.stderr.strip()}\n{self.tail(node)}"

    def wait_uptodate(self, node: str, timeout: float = WAIT_S) -> dict:
        """Until ``node`` is SECOND and its replication says uptodate."""
        self.wait(node, "SECOND", timeout)
        deadline = time.monotonic() + timeout
        state = self.state(node)
        while time.monotonic() < deadline:
            state = self.state(node)
            if state["replication"]["status"] == "uptodate" and not state["stale"]:
                return state
            time.sleep(POLL_S)
        raise AssertionError(f"{node} not up to date: {state['replication']}\n{self.tail(node)}")

    def wait_status(self, node: str, status: str, timeout: float = WAIT_S) -> dict:
        deadline = time.monotonic() + timeout
        seen = self.repl_status(node)
        while time.monotonic() < deadline and seen.get("status") != status:
            time.sleep(POLL_S)
            seen = self.repl_status(node)
        assert seen.get("status") == status, f"{node}: {seen}\n{self.tail(node)}"
        return seen

    def primary(self) -> tuple[str, str]:
        """(primary, secondary) as the nodes report it now."""
        for node in self.nodes:
            if self.state(node)["state"] in ("PRIM", "ALONE"):
                return node, next(n for n in self.nodes if n != node)
        raise AssertionError("no primary")

    def verify(self, node: str) -> subprocess.CompletedProcess:
        return self.r(node, "repl", "verify", "-m", MODULE, check=False, timeout=300)

    def journal(self, node: str) -> list[dict]:
        return [json.loads(line) for line in
                self.r(node, "events", "-m", MODULE, "-n", "400", "--json").stdout.splitlines()
                if line.strip()]  # fmt: skip

    def tail(self, node: str) -> str:
        return "\n".join(f"  {e['kind']}: {e['message']}" for e in self.journal(node)[-20:])

    def wait_journal(self, node: str, pattern: str, timeout: float = WAIT_S) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for entry in self.journal(node):
                if re.search(pattern, entry["message"]):
                    return entry
            time.sleep(POLL_S * 2)
        raise AssertionError(f"{node}: no journal entry like {pattern!r}\n{self.tail(node)}")


def started_site(lab: dict, workdir: Path) -> ReplSite:
    """The mirror module installed with a 2 s heartbeat timeout, PRIM on the first node, the
    second node up to date."""
    s = ReplSite(lab, workdir)
    s.install_and_start(
        tweak=lambda xml: xml.replace('heartbeat_timeout_ms="3000"', 'heartbeat_timeout_ms="2000"')
    )
    s.wait(s.nodes[0], "PRIM")
    s.wait_uptodate(s.nodes[1])
    return s
