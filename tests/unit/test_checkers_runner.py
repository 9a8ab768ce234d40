"""CheckerRunner with small fake checks, plus the checks that need no root."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import subprocess

import pytest

from node_service.checkers.base import Check, CheckResult
from node_service.checkers.decide import ACT_RESTART, FAILED, FAILOVER, OK, Policy
from node_service.checkers.probes import ScriptCheck, TcpCheck
from node_service.checkers.process import ProcessCheck, matching_pids, process_alive, read_pidfile
from node_service.checkers.runner import CheckerRunner, from_model
from node_service.module import model


class Scripted(Check):
    """Returns the given results in turn, then keeps returning the last one."""

    kind = "fake"

    def __init__(self, label: str, results: list[bool], **settings):
        settings.setdefault("interval_s", 0.01)
        super().__init__(label, **settings)
        self.results = list(results)
        self.calls = 0
        self.restarts = 0

    async def check(self) -> CheckResult:
        ok = self.results[min(self.calls, len(self.results) - 1)]
        self.calls += 1
        return CheckResult(ok, f"{self.label} {'ok' if ok else 'down'} #{self.calls}")

    async def restart(self) -> str:
        self.restarts += 1
        return f"restarted ({self.restarts})"


async def collect(checks, until, timeout_s: float = 5.0):
    """Run the checks until ``until(events)`` holds; returns the events."""
    events = []
    changed = asyncio.Event()

    def on_event(event):
        events.append(event)
        changed.set()

    async with CheckerRunner(checks, on_event, name="test") as runner:
        async with asyncio.timeout(timeout_s):
            while not until(events):
                changed.clear()
                await changed.wait()
        tasks = dict(runner._tasks)
    assert all(t.done() for t in tasks.values())
    return events, tasks


def test_events_on_changes_and_every_failure():
    check = Scripted("tcp 198.51.100.200:80", [True, True, True, False, False, True, True, True])
    check.policy = Policy(failures=3)
    events, tasks = asyncio.run(collect([check], lambda ev: len(ev) >= 4))
    assert [(e.ok, e.verdict) for e in events[:4]] == [
        (True, OK),
        (False, FAILED),
        (False, FAILED),
        (True, OK),
    ]
    assert events[1].reason == "tcp 198.51.100.200:80 down #4 (failure 1 of 3 before failover)"
    assert "recovered after 2 failed check(s)" in events[3].reason
    assert list(tasks) == ["tcp 198.51.100.200:80"]
    assert tasks["tcp 198.51.100.200:80"].get_name() == "test: tcp 198.51.100.200:80"


def test_restart_then_failover():
    check = Scripted("process app", [False])
    check.policy = Policy(failures=1, action=ACT_RESTART, restarts=2, window_s=60)
    events, _ = asyncio.run(collect([check], lambda ev: any(e.verdict == FAILOVER for e in ev)))
    assert [(e.verdict, e.restarted) for e in events] == [
        (FAILED, True),
        (FAILED, True),
        (FAILOVER, False),
    ]
    assert check.restarts == 2
    assert events[0].reason.endswith("; restarted (1)")


class Hangs(Check):
    kind = "fake"

    async def check(self) -> CheckResult:
        await asyncio.sleep(3600)
        return CheckResult(True, "never")


class Raises(Check):
    kind = "fake"

    async def check(self) -> CheckResult:
        raise RuntimeError("bug in checker")


def test_hanging_and_broken_checks_become_failures(monkeypatch):
    monkeypatch.setattr("node_service.checkers.runner.DEADLINE_MARGIN_S", 0.0)
    hang = Hangs("hang", interval_s=0.01, timeout_s=0.1, policy=Policy(failures=5))
    bug = Raises("bug", interval_s=0.01, timeout_s=1, policy=Policy(failures=5))
    events, _ = asyncio.run(
        collect([hang, bug], lambda ev: {e.checker for e in ev} == {"hang", "bug"})
    )
    by_name = {e.checker: e for e in events}
    assert by_name["hang"].reason.startswith("hang no answer within 0.1 s")
    assert "checker error RuntimeError('bug in checker')" in by_name["bug"].reason
    assert not by_name["hang"].ok and not by_name["bug"].ok


def test_latest_and_async_consumer():
    async def scenario():
        seen = []
        got = asyncio.Event()

        async def on_event(event):
            seen.append(event)
            got.set()

        check = Scripted("witness 198.51.100.1", [True])
        async with CheckerRunner([check], on_event) as runner:
            await asyncio.wait_for(got.wait(), 5)
            return seen, runner.latest("witness 198.51.100.1"), runner.latest("other")

    seen, latest, other = asyncio.run(scenario())
    assert seen[0].verdict == OK and latest.ok and other is None


def test_duplicate_labels_are_refused():
    with pytest.raises(ValueError, match="share a label"):
        CheckerRunner([Scripted("a", [True]), Scripted("a", [True])], print)


def test_tcp_check_on_loopback():
    async def scenario():
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            up = await TcpCheck("127.0.0.1", port, timeout_s=1).check()
        down = await TcpCheck("127.0.0.1", port, timeout_s=1).check()
        return port, up, down

    port, up, down = asyncio.run(scenario())
    assert up == CheckResult(True, f"tcp 127.0.0.1:{port} accepts connections")
    assert down == CheckResult(False, f"tcp 127.0.0.1:{port} refused")


def test_script_check(tmp_path):
    (tmp_path / "bin").mkdir()
    good = tmp_path / "bin" / "check_app"
    good.write_text('#!/bin/sh\necho "checking"\necho "queue depth $DEPTH"\n')
    good.chmod(0o755)
    bad = tmp_path / "bin" / "check_db"
    bad.write_text("#!/bin/sh\necho 'db not answering'\nexit 2\n")
    bad.chmod(0o755)
    slow = tmp_path / "bin" / "check_slow"
    slow.write_text("#!/bin/sh\nsleep 30\n")
    slow.chmod(0o755)

    async def scenario():
        env = {"DEPTH": "3"}
        return (
            await ScriptCheck(str(tmp_path), "check_app", env=env).check(),
            await ScriptCheck(str(tmp_path), "check_db", env=env).check(),
            await ScriptCheck(str(tmp_path), "check_slow", env=env, timeout_s=0.3).check(),
            await ScriptCheck(str(tmp_path), "check_none", env=env).check(),
        )

    good_r, bad_r, slow_r, none_r = asyncio.run(scenario())
    assert good_r == CheckResult(True, "script check_app ok: queue depth 3")
    assert bad_r == CheckResult(False, "script check_db failed (exit 2): db not answering")
    assert slow_r == CheckResult(False, "script check_slow gave no verdict within 0.3 s")
    assert not none_r.ok and "missing or not executable" in none_r.reason


@pytest.fixture
def sleeper():
    # A duration no other test run uses, so the pattern matches only this process.
    proc = subprocess.Popen(["sleep", f"61.{secrets.randbelow(10**6):06d}"])
    proc.pattern = "^" + re.escape(" ".join(proc.args)) + "$"
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_process_helpers(sleeper, tmp_path):
    assert process_alive(sleeper.pid)
    assert matching_pids(re.compile(sleeper.pattern)) == [sleeper.pid]
    pidfile = tmp_path / "app.pid"
    pidfile.write_text(f"{sleeper.pid}\n")
    assert read_pidfile(str(pidfile)) == sleeper.pid
    pidfile.write_text("garbage")
    assert read_pidfile(str(pidfile)) is None
    assert read_pidfile(str(tmp_path / "none.pid")) is None
    sleeper.kill()
    sleeper.wait()
    assert not process_alive(sleeper.pid)
    assert matching_pids(re.compile(sleeper.pattern)) == []


def test_process_check_by_pattern_and_pidfile(sleeper, tmp_path):
    pidfile = tmp_path / "app.pid"
    pidfile.write_text(str(sleeper.pid))
    by_pattern = ProcessCheck(pattern=sleeper.pattern)
    by_pidfile = ProcessCheck(pidfile=str(pidfile))
    up = asyncio.run(by_pattern.check()), asyncio.run(by_pidfile.check())
    sleeper.kill()
    sleeper.wait()
    down = asyncio.run(by_pattern.check()), asyncio.run(by_pidfile.check())
    assert up[0] == CheckResult(True, f"process {sleeper.pattern}: running (pid {sleeper.pid})")
    assert up[1].ok and str(sleeper.pid) in up[1].reason
    assert down[0] == CheckResult(False, f"process {sleeper.pattern}: no running process matches")
    assert down[1] == CheckResult(
        False, f"process pid file {pidfile}: process {sleeper.pid} is not running"
    )


def test_process_check_refuses_bad_settings():
    from node_service.errors import UserError

    with pytest.raises(UserError, match="exactly one"):
        ProcessCheck()
    with pytest.raises(UserError, match="not a valid regular expression"):
        ProcessCheck(pattern="(")


def test_from_model_maps_every_kind(tmp_path):
    async def restart():
        return "restarted"

    kinds = {
        "tcp": model.TcpChecker(address="198.51.100.200", port=80, failures=2),
        "ping": model.PingChecker(target="198.51.100.1"),
        "interface": model.InterfaceChecker(interface="eth0"),
        "script": model.ScriptChecker(script="check_app"),
        "process": model.ProcessChecker(pattern="nginx", restarts=4, window=120, interval=1),
    }
    built = {
        k: from_model(c, module_dir=str(tmp_path), env={}, restart=restart)
        for k, c in kinds.items()
    }
    assert {k: c.kind for k, c in built.items()} == {k: k for k in kinds}
    assert built["tcp"].label == "tcp 198.51.100.200:80" and built["tcp"].policy.failures == 2
    assert built["process"].policy == Policy(
        failures=3, action=ACT_RESTART, restarts=4, window_s=120
    )
    assert built["process"].interval_s == 1
    assert os.fspath(tmp_path) in built["script"].path
