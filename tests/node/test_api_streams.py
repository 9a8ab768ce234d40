"""Streams of the management API: events --follow, watch --json, wait, /metrics."""

from __future__ import annotations

import itertools
import json
import queue
import subprocess
import threading
import time

import pytest

from node_service.api.client import Client
from node_service.module import keys
from tests.node.daemon_fakes import VENV_BIN, Rampartd, build_safe

pytestmark = pytest.mark.node


@pytest.fixture
def daemon():
    d = Rampartd()
    try:
        d.trust_dir.mkdir()
        d.start()
        key, pub = keys.generate(d.base / "keys")
        (d.trust_dir / "site.pub").write_bytes(pub.read_bytes())
        installed = d.rampart("module", "install", str(build_safe(d.base, "web", "rt-n1", key)))
        assert installed.returncode == 0, installed.stderr
        yield d
    finally:
        d.close()


class Lines:
    """Reads a child's stdout in a thread so the test can wait with a deadline."""

    def __init__(self, daemon: Rampartd, *argv: str) -> None:
        self.proc = subprocess.Popen([str(VENV_BIN / "rampart"), *argv], env=daemon.env(),
                                     stdout=subprocess.PIPE, text=True)  # fmt: skip
        self.queue: queue.Queue[str] = queue.Queue()
        self.thread = threading.Thread(target=self._pump, name="test-lines", daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.queue.put(line)

    def until(self, predicate, timeout: float) -> list[dict]:
        """Collect JSON lines until predicate(seen) is true; fail after timeout."""
        seen: list[dict] = []
        deadline = time.monotonic() + timeout
        while not predicate(seen):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"condition not met in {timeout}s; saw {seen[-5:]}")
            try:
                seen.append(json.loads(self.queue.get(timeout=remaining)))
            except queue.Empty:
                continue
        return seen

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


def test_events_follow_receives_new_entries(daemon):
    follow = Lines(daemon, "events", "--follow", "--json", "-m", "web", "-n", "1")
    try:
        # The daemon subscribes before it sends the backlog, so the first line
        # proves that every later entry will reach this reader.
        backlog = follow.until(lambda s: len(s) >= 1, 10)
        assert backlog[0]["message"].startswith("module web installed")
        assert daemon.rampart("start", "-m", "web").returncode == 0
        seen = follow.until(
            lambda s: any(e["message"] == "WAIT -> ALONE (fake: no peer in tests)" for e in s), 10
        )
        assert any(e["kind"] == "command" and e["module"] == "web" for e in seen)
    finally:
        follow.close()


def test_watch_emits_states_and_a_metrics_sample_each_second(daemon):
    watch = Lines(daemon, "watch", "--json")
    try:
        first = watch.until(lambda s: len(s) >= 2, 10)
        assert first[0]["type"] == "hello" and first[0]["modules"] == ["web"]
        assert first[1]["type"] == "state" and first[1]["state"]["state"] == "STOP"
        assert daemon.rampart("start", "-m", "web").returncode == 0
        seen = watch.until(
            lambda s: (
                sum(1 for x in s if x["type"] == "metrics") >= 3
                and any(x["type"] == "state" and x["state"]["state"] == "ALONE" for x in s)
            ),
            10,
        )
        samples = [x for x in seen if x["type"] == "metrics"]
        assert samples[-1]["metrics"]["heartbeat_rtt_seconds"] == {"198.51.100.12": 0.0004}
        gaps = [b["ts"] - a["ts"] for a, b in itertools.pairwise(samples)]
        assert all(0.7 < gap < 1.5 for gap in gaps), gaps
        change = next(x for x in seen if x["type"] == "state")
        assert change["reason"] in ("start command", "fake: no peer in tests")
        assert any(x["type"] == "event" and x["entry"]["kind"] == "transition" for x in seen)
    finally:
        watch.close()


def test_wait_returns_on_reach_and_times_out(daemon):
    quick = daemon.rampart("wait", "-m", "web", "--state", "PRIM", "--timeout", "1.5")
    assert quick.returncode == 1
    assert "did not reach PRIM within 1.5s (state STOP)" in quick.stderr
    waiter = subprocess.Popen(
        [str(VENV_BIN / "rampart"), "wait", "-m", "web", "--state", "PRIM,ALONE",
         "--timeout", "20"],
        env=daemon.env(), stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert daemon.rampart("start", "-m", "web").returncode == 0
        out, _ = waiter.communicate(timeout=20)
        assert waiter.returncode == 0
        assert out.strip() == "web: ALONE"
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait(10)


def test_metrics_and_health(daemon):
    assert daemon.rampart("start", "-m", "web").returncode == 0
    client = Client(str(daemon.socket))
    text = client.metrics_text()
    assert 'rampart_module_state{module="web",state="ALONE"} 1.0' in text
    assert 'rampart_module_state{module="web",state="PRIM"} 0.0' in text
    assert 'rampart_module_transitions_total{module="web"} 2.0' in text
    assert 'rampart_module_heartbeat_rtt_seconds{key="198.51.100.12",module="web"} 0.0004' in text
    health = client.health()
    assert health["status"] == "ok" and health["modules"] == {"web": "ALONE"}
