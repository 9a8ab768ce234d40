"""Heartbeat transport fixes: seqs across remove/add, cancellation never swallowed.

Real UDP sockets on loopback, fast timings. The cancellation tests fire the
wake-up and the cancellation in the same loop iteration, the race in which
Python 3.11's ``asyncio.wait_for`` returns instead of raising.
"""

from __future__ import annotations

import asyncio
import socket

from node_service.cluster.pki import heartbeat_key
from node_service.cluster.transport import HeartbeatService

SECRET = b"f" * 32
A, B = "127.0.0.1", "127.0.0.2"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((A, 0))
        return s.getsockname()[1]


def _service(name: str, address: str, port: int, journal: list) -> HeartbeatService:
    return HeartbeatService(
        name,
        [address],
        port,
        lambda m: heartbeat_key(SECRET, m),
        incarnation=7,
        journal=lambda sev, line: journal.append((sev, line)),
    )


async def _until(predicate, timeout: float) -> bool:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)
    return True


def _highest_seq(service: HeartbeatService, peer: str, address: str) -> int:
    view = service.view("web").peer(peer)
    assert view is not None
    link = view.link(address)
    return link.highest_seq if link is not None else 0


def test_readded_module_goes_on_with_its_seqs_and_the_peer_accepts_at_once():
    async def scenario():
        port = _free_port()
        ja: list = []
        jb: list = []
        a, b = _service("n1", A, port, ja), _service("n2", B, port, jb)
        a.add_module("web", {"n2": [B]}, interval=0.02, timeout=5.0,
                     payload_fn=lambda: {"state": "PRIM"})  # fmt: skip
        b.add_module("web", {"n1": [A]}, interval=0.02, timeout=5.0,
                     payload_fn=lambda: {"state": "SECOND"})  # fmt: skip
        await a.start()
        await b.start()
        try:
            # Enough rounds that a count restarted at 1 would be dropped for a
            # long while (60 rounds x 20 ms = 1.2 s, more than the bound below).
            await _until(lambda: _highest_seq(b, "n1", A) >= 60, 5.0)
            await a.remove_module("web")
            a.add_module("web", {"n2": [B]}, interval=0.02, timeout=5.0,
                         payload_fn=lambda: {"state": "STOP"})  # fmt: skip
            await _until(lambda: (b.peer_payload("web", "n1") or {}).get("state") == "STOP", 0.5)
            assert b.drops.get("replay", 0) == 0, b.recent_drops
            assert _highest_seq(b, "n1", A) > 60
        finally:
            await a.close()
            await b.close()

    asyncio.run(scenario())


def test_cancelled_wait_changed_always_ends_even_as_the_wake_up_fires():
    async def scenario():
        service = _service("n1", A, _free_port(), [])
        service.add_module("web", {"n2": [B]}, interval=0.05, timeout=0.5)
        changed = service._run("web").changed  # the event peers' news sets
        ended = 0
        for attempt in range(150):
            blocked = asyncio.Event()

            async def watch(blocked: asyncio.Event) -> None:
                # A runner's watch loop: wait for news, again and again.
                for _ in range(1000):
                    blocked.set()
                    await service.wait_changed("web", 5.0)

            task = asyncio.create_task(watch(blocked), name=f"rt-watch-{attempt}")
            await blocked.wait()
            for _ in range(attempt % 3):  # let the waiter get further in on some attempts
                await asyncio.sleep(0)
            changed.set()
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=1.0)
            assert task in done, f"attempt {attempt}: the cancelled watcher kept waiting"
            assert task.cancelled()
            ended += 1
        assert ended == 150

    asyncio.run(scenario())


def test_remove_module_right_after_send_now_ends_the_sender():
    async def scenario():
        service = _service("n1", A, _free_port(), [])
        await service.start()
        try:
            for attempt in range(60):
                service.add_module("web", {"n2": [B]}, interval=2.0, timeout=10.0)
                sender = service._run("web").task
                assert sender is not None
                for _ in range(attempt % 3 + 1):  # the sender is parked in its wait
                    await asyncio.sleep(0)
                service.send_now("web")
                # Its own task and asyncio.wait: a timeout cancelling the caller
                # could itself be swallowed and hide the hang.
                removal = asyncio.create_task(service.remove_module("web"), name="rt-remove")
                done, _ = await asyncio.wait({removal}, timeout=1.0)
                assert removal in done, f"attempt {attempt}: remove_module never returned"
                assert sender.done(), f"attempt {attempt}: the sender outlived remove_module"
            names = {t.get_name() for t in asyncio.all_tasks()}
            assert "heartbeat-send:web" not in names
        finally:
            await service.close()

    asyncio.run(scenario())
