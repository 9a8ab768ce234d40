"""No needless wake-ups of the replication threads on the sync hot path.

A sync primary's FUSE thread sends an Fsync itself before its local fsync
(``push``); a Release is not sent on its own but rides with the next frame;
the secondary wakes neither its apply nor its ack thread for what its
receiving thread applies and acknowledges itself, and sends no ACK_RECEIVED
that an ACK_WRITTEN in the same breath covers. Real mutual TLS on loopback
(tests/unit/repl_pair.py).
"""

from __future__ import annotations

import threading

from node_service.replication import ops
from node_service.replication.sender import Sender
from tests.unit.repl_pair import Pair, open_op, write_op

WRITES = 50


class CountingCondition(threading.Condition):
    """A condition that counts the notify_all calls made on it."""

    def __init__(self, lock) -> None:
        super().__init__(lock)
        self.notified = 0

    def notify_all(self) -> None:
        self.notified += 1
        super().notify_all()


def batches_sent_by(monkeypatch) -> list[tuple[str, list[str]]]:
    """(thread name, operation types) of every batch of frames the primary sends."""
    sent: list[tuple[str, list[str]]] = []
    original = Sender._send_batch

    def noting(self, channel, batch):
        kinds = [type(ops.decode(bytes(item[3])[2:])).__name__ for item in batch if item[1]]
        sent.append((threading.current_thread().name, kinds))
        return original(self, channel, batch)

    monkeypatch.setattr(Sender, "_send_batch", noting)
    return sent


def frames_taken(monkeypatch) -> list[str]:
    """The type of every frame the primary takes from the secondary."""
    taken: list[str] = []
    original = Sender._take_locked

    def noting(self, frame, now):
        taken.append(frame.type.name)
        return original(self, frame, now)

    monkeypatch.setattr(Sender, "_take_locked", noting)
    return taken


def test_a_sync_fsync_is_pushed_by_the_fuse_thread_and_applied_before_wait_returns(
    pair_factory, monkeypatch
):
    sent = batches_sent_by(monkeypatch)
    pair: Pair = pair_factory(mode="sync")
    pair.connect()
    r = pair.replicator
    r.wait(r.submit(open_op()))
    r.wait(r.submit(write_op(1, 0, b"f" * 4096)))
    ticket = r.submit(ops.Fsync(1, False))
    r.push(ticket)
    r.wait(ticket)
    assert isinstance(pair.applier.applied[-1], ops.Fsync)
    me = threading.current_thread().name
    assert (me, ["Fsync"]) in sent
    assert all(thread == me for thread, kinds in sent if kinds), sent


def test_an_async_fsync_still_goes_through_the_send_thread(pair_factory, monkeypatch):
    sent = batches_sent_by(monkeypatch)
    pair: Pair = pair_factory(mode="async")
    pair.connect()
    r = pair.replicator
    r.wait(r.submit(open_op()))
    ticket = r.submit(ops.Fsync(1, False))
    r.push(ticket)  # async: nothing to do here, nobody waits
    r.wait(ticket)
    assert pair.sender.drain(5)
    assert any(thread == "repl-tx-send-web" and "Fsync" in kinds for thread, kinds in sent)


def test_a_sync_release_rides_with_the_next_frame(pair_factory, monkeypatch):
    sent = batches_sent_by(monkeypatch)
    pair: Pair = pair_factory(mode="sync")
    pair.connect()
    r = pair.replicator
    r.wait(r.submit(open_op(1, "a")))
    r.submit(ops.Release(1))  # a close: nobody waits for it
    r.wait(r.submit(open_op(2, "b")))
    me = threading.current_thread().name
    assert (me, ["Release", "Open"]) in sent
    assert [type(op).__name__ for op in pair.applier.applied] == ["Open", "Release", "Open"]


def test_a_lone_sync_release_is_still_sent_within_a_ping_interval(pair_factory):
    pair: Pair = pair_factory(mode="sync")
    pair.connect()
    r = pair.replicator
    r.wait(r.submit(open_op()))
    ticket = r.submit(ops.Release(1))
    # the send thread wakes every third of the timeout (2 s here) at the latest
    assert pair.receiver.wait_written(ticket.seq, pair.timeout)
    assert isinstance(pair.applier.applied[-1], ops.Release)
    assert pair.sender.drain(5)
    assert pair.sender.stats().lag_ops == 0


def test_inline_sync_ops_wake_neither_the_apply_nor_the_ack_thread(pair_factory, monkeypatch):
    taken = frames_taken(monkeypatch)
    pair: Pair = pair_factory(mode="sync")
    receiver = pair.receiver
    lock = receiver._cond._lock  # type: ignore[attr-defined]
    receiver._apply_cv = apply_cv = CountingCondition(lock)
    receiver._ack_cv = ack_cv = CountingCondition(lock)
    pair.connect()
    r = pair.replicator
    r.wait(r.submit(open_op()))
    for i in range(WRITES):
        r.wait(r.submit(write_op(1, i * 4096, b"i" * 4096)))
    assert len(pair.applier.applied) == WRITES + 1
    # before: two wake-ups of each per operation; now only to answer a PING
    # (one every third of the 2 s timeout, however slow the machine)
    assert apply_cv.notified < WRITES // 4, apply_cv.notified
    assert ack_cv.notified < WRITES // 4, ack_cv.notified
    # ACK_WRITTEN n says "received n" too
    assert taken.count("ACK_WRITTEN") >= WRITES
    assert taken.count("ACK_RECEIVED") < WRITES // 4


def test_semi_still_gets_received_acks_from_the_ack_thread(pair_factory, monkeypatch):
    taken = frames_taken(monkeypatch)
    pair: Pair = pair_factory(mode="semi")
    pair.connect()
    r = pair.replicator
    r.wait(r.submit(open_op()))
    for i in range(10):
        r.wait(r.submit(write_op(1, i * 4096, b"s" * 4096)))
    assert pair.sender.drain(5)
    assert len(pair.applier.applied) == 11
    assert taken.count("ACK_RECEIVED") >= 1
    assert pair.sender.stats().link == "connected"
