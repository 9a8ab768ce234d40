"""Checkers against real things: namespaces, sockets, links and processes.

Namespace "a" is the node running the checkers (va 198.51.100.11/24);
namespace "b" is a neighbour (vb 198.51.100.12/24) holding the services.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import subprocess
import time
from dataclasses import dataclass

import pytest

from node_service.checkers.decide import ACT_RESTART, FAILED, FAILOVER, OK, Policy
from node_service.checkers.probes import InterfaceCheck, PingCheck, TcpCheck, WitnessCheck
from node_service.checkers.process import ProcessCheck, process_alive
from node_service.checkers.runner import CheckerRunner
from node_service.net import netns

pytestmark = pytest.mark.node

PEER = "198.51.100.12"
UNUSED = "198.51.100.99"


@dataclass(frozen=True)
class Lan:
    a: str
    b: str


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def lan():
    tag = secrets.token_hex(3)
    names = Lan(a=f"rt-vip-{tag}-a", b=f"rt-vip-{tag}-b")
    try:
        ip("netns", "add", names.a)
        ip("netns", "add", names.b)
        ip("-n", names.a, "link", "add", "va", "type", "veth", "peer", "vb", "netns", names.b)
        ip("-n", names.a, "addr", "add", "198.51.100.11/24", "dev", "va")
        ip("-n", names.b, "addr", "add", f"{PEER}/24", "dev", "vb")
        for ns, dev in ((names.a, "va"), (names.b, "vb"), (names.a, "lo"), (names.b, "lo")):
            ip("-n", ns, "link", "set", dev, "up")
        yield names
    finally:
        for ns in (names.a, names.b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def listener(namespace: str, port: int) -> socket.socket:
    with netns.enter(namespace):
        return socket.create_server((PEER, port))


def in_node(lan: Lan, coro_fn):
    with netns.enter(lan.a):
        return asyncio.run(coro_fn())


def test_tcp_check(lan):
    server = listener(lan.b, 8080)
    with server:

        async def scenario():
            up = await TcpCheck(PEER, 8080, timeout_s=1).check()
            closed = await TcpCheck(PEER, 8081, timeout_s=1).check()
            return up, closed

        up, closed = in_node(lan, scenario)
    assert up.ok and up.reason == f"tcp {PEER}:8080 accepts connections"
    assert not closed.ok and closed.reason == f"tcp {PEER}:8081 refused"


def test_ping_and_witness(lan):
    async def scenario():
        started = time.monotonic()
        missing = await PingCheck(UNUSED, timeout_s=0.5).check()
        took = time.monotonic() - started
        return (
            await PingCheck(PEER, timeout_s=1).check(),
            missing,
            took,
            await WitnessCheck(PEER, timeout_s=1).check(),
            await WitnessCheck(UNUSED, timeout_s=0.3).check(),
        )

    up, missing, took, witness_up, witness_down = in_node(lan, scenario)
    assert up.ok and up.reason.startswith(f"ping {PEER} answered in ")
    assert not missing.ok and missing.reason == f"ping {UNUSED}: no reply within 0.5 s"
    assert took < 1.5
    assert witness_up.ok and witness_up.reason.startswith(f"witness {PEER} reachable")
    assert not witness_down.ok and witness_down.reason.startswith(f"witness {UNUSED} unreachable")


def test_interface_check_follows_the_link(lan):
    async def check(name: str = "va"):
        return await InterfaceCheck(name).check()

    async def until(want_ok: bool, timeout_s: float = 5.0):
        deadline = time.monotonic() + timeout_s
        result = await check()
        while result.ok != want_ok and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            result = await check()
        return result

    with netns.enter(lan.a):
        up = asyncio.run(until(True))
        ip("-n", lan.a, "link", "set", "va", "down")
        down = asyncio.run(until(False))
        ip("-n", lan.a, "link", "set", "va", "up")
        ip("-n", lan.b, "link", "set", "vb", "down")
        no_carrier = asyncio.run(until(False))
        ip("-n", lan.b, "link", "set", "vb", "up")
        back = asyncio.run(until(True))
        missing = asyncio.run(check("eth9"))
    assert up.reason == "interface va up with carrier"
    assert down.reason == "interface va is down (administratively)"
    assert no_carrier.reason == "interface va is up but has no carrier"
    assert back.ok
    assert missing.reason == "interface eth9 does not exist"


def test_runner_fails_over_when_the_service_goes(lan):
    server = listener(lan.b, 8080)

    async def scenario():
        events = []
        changed = asyncio.Event()

        def on_event(event):
            events.append(event)
            changed.set()

        check = TcpCheck(PEER, 8080, interval_s=0.05, timeout_s=0.5, policy=Policy(failures=2))
        async with CheckerRunner([check], on_event, name="web"):
            async with asyncio.timeout(10):
                while not events:
                    changed.clear()
                    await changed.wait()
                server.close()
                while events[-1].verdict != FAILOVER:
                    changed.clear()
                    await changed.wait()
        return events

    try:
        events = in_node(lan, scenario)
    finally:
        server.close()
    assert [e.verdict for e in events] == [OK, FAILED, FAILOVER]
    assert events[1].reason == f"tcp {PEER}:8080 refused (failure 1 of 2 before failover)"
    assert events[2].reason == f"tcp {PEER}:8080 refused: failing over (2 consecutive failures)"


def test_process_restarts_then_fails_over(tmp_path):
    pidfile = tmp_path / "app.pid"
    started: list[subprocess.Popen] = []

    def launch() -> int:
        proc = subprocess.Popen(["sleep", "120"])
        started.append(proc)
        pidfile.write_text(f"{proc.pid}\n")
        return proc.pid

    async def restart() -> str:
        return f"started app again as pid {launch()}"

    async def scenario():
        events = []
        queue: asyncio.Queue = asyncio.Queue()
        check = ProcessCheck(
            pidfile=str(pidfile),
            restart=restart,
            interval_s=0.05,
            timeout_s=1,
            policy=Policy(failures=1, action=ACT_RESTART, restarts=2, window_s=60),
        )
        async with CheckerRunner([check], queue.put_nowait, name="app"):
            async with asyncio.timeout(10):
                for _ in range(10):
                    events.append(await queue.get())
                    if events[-1].verdict == FAILOVER:
                        break
                    # The application is running (first start or restart): crash it.
                    os.kill(started[-1].pid, signal.SIGKILL)
                    started[-1].wait()
        return events

    launch()
    try:
        events = asyncio.run(scenario())
    finally:
        for proc in started:
            proc.kill()
            proc.wait()
    assert [(e.verdict, e.restarted) for e in events] == [
        (OK, False),
        (FAILED, True),
        (FAILED, True),
        (FAILOVER, False),
    ]
    assert "restart 1 of 2 within 60 s" in events[1].reason
    assert events[1].reason.endswith(f"started app again as pid {started[1].pid}")
    assert "already restarted 2 time(s) within 60 s: failing over" in events[3].reason
    assert len(started) == 3 and not any(process_alive(p.pid) for p in started)


def test_process_pattern_sees_only_this_node(lan):
    # The same command runs on the neighbour host: it must not count as ours.
    with netns.enter(lan.b):
        neighbour = subprocess.Popen(["sleep", "97.25"])
    try:
        with netns.enter(lan.a):
            alone = asyncio.run(ProcessCheck(pattern=r"^sleep 97\.25$").check())
            ours = subprocess.Popen(["sleep", "97.25"])
            try:
                both = asyncio.run(ProcessCheck(pattern=r"^sleep 97\.25$").check())
            finally:
                ours.kill()
                ours.wait()
    finally:
        neighbour.kill()
        neighbour.wait()
    assert not alone.ok and alone.reason.endswith("no running process matches")
    assert both.ok and both.reason.endswith(f"running (pid {ours.pid})")
