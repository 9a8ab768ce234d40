"""Heartbeat service over real UDP sockets on loopback (fast timings)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from node_service.cluster import heartbeat as hb
from node_service.cluster.pki import heartbeat_key
from node_service.cluster.transport import HeartbeatService, next_incarnation

SECRET = b"s" * 32
A, B = "127.0.0.1", "127.0.0.2"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((A, 0))
        return s.getsockname()[1]


def _service(name, address, port, peer, peer_address, journal, state="PRIM", inc=1):
    svc = HeartbeatService(
        name,
        [address],
        port,
        lambda m: heartbeat_key(SECRET, m),
        incarnation=inc,
        journal=lambda sev, line: journal.append((sev, line)),
    )
    svc.add_module(
        "web",
        {peer: [peer_address]},
        interval=0.05,
        timeout=0.5,
        payload_fn=lambda: {"state": state},
    )
    return svc


async def _until(predicate, timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.02)
    return predicate()


def test_two_services_see_each_other_then_loss():
    async def scenario():
        port = _free_port()
        ja: list = []
        jb: list = []
        a = _service("n1", A, port, "n2", B, ja, "PRIM")
        b = _service("n2", B, port, "n1", A, jb, "SECOND")
        await a.start()
        await b.start()
        try:
            assert await a.wait_changed("web", timeout=2.0)
            assert await _until(lambda: a.peer_reachable("web", "n2"), 2.0)
            assert await _until(lambda: b.peer_reachable("web", "n1"), 2.0)
            assert a.peer_payload("web", "n2") == {"state": "SECOND"}
            assert b.networks("web", "n1") == {A: True}
            assert await _until(
                lambda: a.status("web")["peers"]["n2"]["rtt_ms"][B] is not None, 2.0
            )
            rtt = a.status("web")["peers"]["n2"]["rtt_ms"][B]
            assert 0 <= rtt < 100
            names = {t.get_name() for t in asyncio.all_tasks()}
            assert "heartbeat-send:web" in names

            await b.close()
            assert await _until(lambda: not a.peer_reachable("web", "n2"), 1.5)
            assert await _until(lambda: any("peer n2 lost" in line for _, line in ja), 1.0)
        finally:
            await a.close()
            await b.close()
        assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("heartbeat")]

    asyncio.run(scenario())


def test_forged_and_replayed_datagrams_are_dropped_and_journaled():
    async def scenario():
        port = _free_port()
        ja: list = []
        a = _service("n1", A, port, "n2", B, ja)
        await a.start()
        try:
            good = hb.Heartbeat("n2", "web", 5, 1, B, 0, {"state": "SECOND"})
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind((B, 0))
                s.sendto(hb.encode(good, heartbeat_key(b"x" * 32, "web")), (A, port))
                s.sendto(hb.encode(good, heartbeat_key(SECRET, "web")), (A, port))
                s.sendto(hb.encode(good, heartbeat_key(SECRET, "web")), (A, port))
                s.sendto(b"hello", (A, port))
            assert await _until(lambda: sum(a.drops.values()) >= 3, 2.0)
            assert a.drops == {"bad_tag": 1, "replay": 1, "malformed": 1}
            assert a.peer_payload("web", "n2") == {"state": "SECOND"}
            lines = [line for _, line in ja]
            assert (
                f"dropped heartbeat from {B}: bad authentication tag (another site secret?)"
                in lines
            )
            assert any(line.startswith(f"dropped heartbeat from {B}: replayed") for line in lines)
        finally:
            await a.close()

    asyncio.run(scenario())


def test_incarnation_rises_at_every_start(tmp_path):
    path = tmp_path / "state" / "incarnation"
    first = next_incarnation(path)
    second = next_incarnation(path)
    assert second > first
    path.write_text(str(2**62))  # clock stepped back far below the stored value
    assert next_incarnation(path) == 2**62 + 1


def test_bad_address_is_a_config_error():
    from node_service.errors import ConfigError

    with pytest.raises(ConfigError, match="is not an IP address"):
        HeartbeatService("n1", ["lab-n1"], 7810, lambda m: b"k", incarnation=1)


def test_failing_payload_is_journaled_once_and_heartbeats_go_on():
    async def scenario():
        port = _free_port()
        ja: list = []
        jb: list = []
        calls = {"n": 0}

        def broken():
            calls["n"] += 1
            if calls["n"] > 1:
                raise ValueError("generation file unreadable")
            return {"state": "PRIM"}

        a = HeartbeatService(
            "n1",
            [A],
            port,
            lambda m: heartbeat_key(SECRET, m),
            incarnation=3,
            journal=lambda sev, line: ja.append((sev, line)),
        )
        a.add_module("web", {"n2": [B]}, interval=0.05, timeout=0.5, payload_fn=broken)
        b = _service("n2", B, port, "n1", A, jb)
        await a.start()
        await b.start()
        try:
            assert await _until(lambda: calls["n"] >= 10, 3.0)
            assert b.peer_reachable("web", "n1")
            assert b.peer_payload("web", "n1") == {"state": "PRIM"}
            failures = [line for _, line in ja if "payload failed" in line]
            assert failures == ["module web: heartbeat payload failed: generation file unreadable"]
        finally:
            await a.close()
            await b.close()

    asyncio.run(scenario())


def test_send_now_does_not_wait_for_the_interval():
    async def scenario():
        port = _free_port()
        ja: list = []
        jb: list = []
        state = {"value": "SECOND"}
        a = HeartbeatService(
            "n1",
            [A],
            port,
            lambda m: heartbeat_key(SECRET, m),
            incarnation=3,
            journal=lambda sev, line: ja.append((sev, line)),
        )
        # A long interval: only send_now can deliver the change quickly.
        a.add_module("web", {"n2": [B]}, interval=5.0, timeout=20.0, payload_fn=lambda: dict(state))
        b = _service("n2", B, port, "n1", A, jb)
        await b.start()  # listening before a's first round
        await a.start()
        try:
            assert await b.wait_changed("web", timeout=2.0)
            assert b.peer_payload("web", "n1") == {"value": "SECOND"}
            state["value"] = "PRIM"
            a.send_now("web")
            # Well before the 5 s interval would have sent it.
            assert await _until(lambda: b.peer_payload("web", "n1") == {"value": "PRIM"}, 2.0)
        finally:
            await a.close()
            await b.close()

    asyncio.run(scenario())
