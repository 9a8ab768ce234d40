"""A node that takes over serves at once: no dial to the lost peer in the write path.

A real ``ReplicationProcess`` link thread, a real ``Sender``/``Resync`` and,
as the lost peer, a loopback listener that accepts TCP and never answers the
TLS handshake (what a power-cut host behind a live switch looks like to
``connect``). While the link thread is stuck dialing it, the namespace lock
the FUSE operations take must be free and writes must be only recorded.
When a real secondary appears (tests/unit/repl_pair.py), the same thread
connects, resyncs, and the link joins the write path. No FUSE, no root.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from node_service.mirror.actions import ActionsMixin
from node_service.mirror.fsm import Action, State
from node_service.replication.link import Link
from node_service.replication.process import ReplicationProcess
from node_service.replication.resync import Resync, SingleLock
from tests.unit.repl_pair import DIR, MODULE, Pair, make_site, open_op, real_appliers, write_op

HEARTBEAT_TIMEOUT_S = 1.5
PROMPT_S = 0.3  # what a write may cost while the peer is lost: far below the timeout
WAIT_S = 20.0


@dataclass(frozen=True)
class Peer:
    name: str
    addresses: tuple[str, ...]


@dataclass(frozen=True)
class FakeModule:
    """The few fields of a module ``ReplicationProcess`` reads."""

    name: str = MODULE
    replicated_dirs: tuple[str, ...] = (DIR,)
    replication_mode: str = "sync"
    heartbeat_timeout: float = HEARTBEAT_TIMEOUT_S

    def peer_of(self, node: str) -> Peer:
        return Peer("n2", ("127.0.0.1",))


class Blackhole:
    """Accepts connections and never says a word: each dial waits for its timeout."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.2)
        self.port = self.server.getsockname()[1]
        self.accepted = threading.Event()
        self.conns: list[socket.socket] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="test-blackhole", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.conns.append(conn)
            self.accepted.set()

    def close(self) -> None:
        self._stop.set()
        self.thread.join(WAIT_S)
        for conn in self.conns:
            conn.close()
        self.server.close()


@pytest.fixture
def takeover(tmp_path):
    """n1 serving alone: its process's link thread dialing a peer that never answers."""
    root = make_site(tmp_path)
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    dest.mkdir()
    src_fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    dest_fd, appliers = real_appliers(dest)
    blackhole = Blackhole()
    pair = Pair(root, appliers=appliers, timeout=HEARTBEAT_TIMEOUT_S)
    process = ReplicationProcess(
        module=FakeModule(),
        node="n1",
        module_dir=tmp_path / "n1-module",
        site_dir=root / "n1",
        port=blackhole.port,
        control_path=tmp_path / "web.sock",
    )
    # As become_primary(peer_lost=True) does, minus the FUSE mount: the
    # pair's sender stands for the process's own, one SingleLock for the mount's.
    ordering = SingleLock()
    process.tracker, process.sender = pair.tracker1, pair.sender
    process.resync = Resync(pair.sender, [src_fd], ordering=ordering)
    process.role = "primary"
    pair.sender.mark_absent("n2 is lost (n1 serves alone)")
    try:
        yield process, pair, ordering, blackhole, src
    finally:
        process.request_stop()
        for thread in process._threads:
            thread.join(WAIT_S)
        blackhole.close()
        pair.close()
        process.log.close()
        os.close(src_fd)
        os.close(dest_fd)


def timed(fn) -> float:
    started = time.monotonic()
    fn()
    return time.monotonic() - started


def take_namespace_lock(ordering: SingleLock) -> None:
    assert ordering.lock.acquire(timeout=WAIT_S), "namespace lock never came free"
    ordering.lock.release()


def test_the_sender_of_a_takeover_starts_absent_and_only_records(takeover):
    process, pair, _ordering, _blackhole, _src = takeover
    assert pair.sender.link == Link.ABSENT
    assert process.status()["status"] == "stale"
    ticket = pair.replicator.submit(open_op(7, "first"))
    assert timed(lambda: pair.replicator.wait(ticket)) < PROMPT_S
    assert ticket.seq == 0  # recorded for the resync, not sent
    assert any(r.path == "first" for r in pair.tracker1.recorded())


def test_a_dial_to_the_lost_peer_holds_no_lock_the_application_needs(takeover):
    process, pair, ordering, blackhole, _src = takeover
    process._spawn(process._link_loop, "repl-link-web")
    assert blackhole.accepted.wait(WAIT_S), "the link thread never dialed"
    # The link thread now waits up to the heartbeat timeout for a TLS answer.
    for handle in range(1, 6):
        took = timed(lambda: take_namespace_lock(ordering))
        assert took < PROMPT_S, f"namespace lock held {took:.2f}s while dialing"
        ticket = pair.replicator.submit(open_op(handle, f"f{handle}"))
        assert timed(lambda t=ticket: pair.replicator.wait(t)) < PROMPT_S
        time.sleep(0.05)  # spread the operations over the dial (not a synchronisation)
    assert pair.sender.link == Link.ABSENT


def test_once_the_peer_answers_the_link_thread_resyncs_and_the_link_joins_the_write_path(
    takeover,
):
    process, pair, ordering, blackhole, src = takeover
    (src / "written-alone").write_bytes(b"while the peer was lost\n")
    with ordering.lock:
        pair.replicator.submit(open_op(1, "written-alone"))
    process._spawn(process._link_loop, "repl-link-web")
    assert blackhole.accepted.wait(WAIT_S)
    process.port = pair.server.address[1]  # the peer is back
    process._wake.set()
    assert pair.sender.wait_link(Link.CONNECTED, WAIT_S), pair.sender.reason
    deadline = time.monotonic() + WAIT_S
    while process.last_resync is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.last_resync is not None, "no resync after the peer came back"
    dest = src.parent / "dest"
    assert (dest / "written-alone").read_bytes() == b"while the peer was lost\n"
    # Joined the write path: a new operation is sent and acknowledged.
    with ordering.lock:
        (src / "after").write_bytes(b"x")
        ticket = pair.replicator.submit(open_op(9, "after"))
    pair.replicator.wait(ticket)
    assert ticket.seq > 0
    ticket = pair.replicator.submit(write_op(9, 0, b"x"))
    pair.replicator.wait(ticket)
    assert (dest / "after").read_bytes() == b"x"


# -- the runner tells the process the peer is lost -------------------------------------


class RecordingReplication:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int, bool]] = []

    async def perform(self, action: str, generation: int = 0, *, peer_lost: bool = False):
        self.calls.append((action, generation, peer_lost))
        return "info", f"{action} done"


class Journal:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def record(self, kind: str, text: str, module: str, **_: object) -> None:
        self.lines.append((kind, text))

    error = warning = record


@pytest.mark.parametrize(("state", "lost"), [(State.ALONE, True), (State.PRIM, False)])
def test_a_source_serving_alone_is_started_with_the_peer_lost(state, lost):
    runner = ActionsMixin()
    runner.module = SimpleNamespace(name=MODULE)
    runner.journal = Journal()
    runner.effects = SimpleNamespace(replication=RecordingReplication())
    runner._app_failed = False
    generations = SimpleNamespace(current=SimpleNamespace(number=4))
    decision = SimpleNamespace(state=state, generations=generations)
    asyncio.run(runner._replicate(Action.REPLICATION_SOURCE, decision))
    assert runner.effects.replication.calls == [("replication_source", 4, lost)]
    assert runner.journal.lines == [("info", "replication_source done")]


def test_the_process_reads_peer_lost_from_become_primary(takeover, monkeypatch):
    process = takeover[0]
    seen = []
    monkeypatch.setattr(
        process,
        "become_primary",
        lambda generation, peer_lost: seen.append((generation, peer_lost)) or "ok",
    )
    assert process._command("become_primary", {"generation": 5, "peer_lost": True}) == {
        "reason": "ok"
    }
    assert process._command("become_primary", {"generation": 6}) == {"reason": "ok"}
    assert seen == [(5, True), (6, False)]
