"""Fewer thread hand-offs on the replication hot path, with order and modes kept.

A sync writer sends its own frame and reads its own acknowledgement; a sync
secondary applies and acknowledges in its receiving thread; semi and async
keep the apply thread. Whichever thread does the work, operations are applied
in sequence order and a sync ``wait`` returns only after its operation was
applied. Real mutual TLS on loopback (tests/unit/repl_pair.py).
"""

from __future__ import annotations

import threading
import time

import pytest

from node_service.replication import ops
from node_service.replication.link import Releases
from node_service.replication.receiver import INLINE_APPLY_BYTES, inline_apply
from node_service.replication.sender import Sender
from node_service.replication.transport import JOIN_BYTES, _slices
from tests.unit.repl_pair import GatedApplier, Pair, open_op, write_op

WRITERS = 6
OPS_PER_WRITER = 60


class ThreadNotingApplier(GatedApplier):
    """Notes which thread applied each operation."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: list[str] = []

    def apply(self, op: ops.Op) -> None:
        super().apply(op)
        self.threads.append(threading.current_thread().name)


def noting_pair(pair_factory, mode: str) -> tuple[Pair, ThreadNotingApplier]:
    pair = pair_factory(mode=mode)
    applier = ThreadNotingApplier()
    pair.applier = applier
    pair.connect()
    return pair, applier


def acks_taken_by(monkeypatch) -> list[str]:
    """The names of the threads that take each ACK_WRITTEN on the primary."""
    taken: list[str] = []
    original = Sender._take_locked

    def noting(self, frame, now):
        if frame.type.name == "ACK_WRITTEN":
            taken.append(threading.current_thread().name)
        return original(self, frame, now)

    monkeypatch.setattr(Sender, "_take_locked", noting)
    return taken


def test_a_lone_sync_writer_reads_its_own_acks_and_the_secondary_applies_inline(
    pair_factory, monkeypatch
):
    taken = acks_taken_by(monkeypatch)
    pair, applier = noting_pair(pair_factory, "sync")
    r = pair.replicator
    r.wait(r.submit(open_op()))
    for i in range(50):
        ticket = r.submit(write_op(1, i * 4096, b"w" * 4096))
        r.wait(ticket)
        assert len(applier.applied) == i + 2  # sync: applied before wait returned
    me = threading.current_thread().name
    # the acks thread may hold the reader role when the first writes arrive;
    # after that it stays aside while the writer waits
    assert taken.count(me) >= 0.8 * len(taken)
    assert set(applier.threads) == {"repl-rx-recv-web"}


@pytest.mark.parametrize("mode", ["semi", "async"])
def test_semi_and_async_secondaries_keep_their_apply_thread(pair_factory, mode):
    pair, applier = noting_pair(pair_factory, mode)
    r = pair.replicator
    r.wait(r.submit(open_op()))
    for i in range(20):
        r.wait(r.submit(write_op(1, i * 4096, b"s" * 4096)))
    assert pair.sender.drain(5)
    assert len(applier.applied) == 21
    assert set(applier.threads) == {"repl-rx-apply-web"}


def test_concurrent_sync_writers_keep_sequence_order_and_wait_for_their_apply(pair_factory):
    pair, applier = noting_pair(pair_factory, "sync")
    r = pair.replicator
    r.wait(r.submit(open_op(1, "a")))
    failures: list[str] = []
    submitted: list[tuple[int, bytes]] = []
    lock = threading.Lock()

    def writer(n: int) -> None:
        for i in range(OPS_PER_WRITER):
            data = b"%02d-%04d" % (n, i)
            with lock:  # submit order = sequence order (the FUSE layer's stripe lock)
                ticket = r.submit(write_op(1, (n * OPS_PER_WRITER + i) * 16, data))
                submitted.append((ticket.seq, data))
            r.wait(ticket)
            if data not in {op.data for op in applier.applied[1:]}:
                failures.append(f"operation {ticket.seq} returned before it was applied")

    threads = [
        threading.Thread(target=writer, args=(n,), name=f"test-writer-{n}") for n in range(WRITERS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads)
    assert failures == []
    in_seq_order = [data for _, data in sorted(submitted)]
    assert [op.data for op in applier.applied[1:]] == in_seq_order
    stats = pair.sender.stats()
    assert stats.ops == 1 + WRITERS * OPS_PER_WRITER and stats.lag_ops == 0
    assert stats.link == "connected"


def test_acknowledged_regions_are_forgotten_after_the_release_interval(pair_factory):
    pair = pair_factory(mode="sync")
    pair.connect()
    r = pair.replicator
    r.wait(r.submit(open_op()))
    for i in range(8):
        r.wait(r.submit(write_op(1, i * 65536, b"f" * 100)))
    assert pair.log1.regions()  # recorded while in flight
    deadline = time.monotonic() + 10
    while (pair.log1.regions() or pair.log2.regions()) and time.monotonic() < deadline:
        time.sleep(0.05)
    # released in bunches, then forgotten after clear_delay, on both nodes
    assert pair.log1.regions() == frozenset() and pair.log2.regions() == frozenset()


def test_releases_go_to_the_tracker_in_bunches_and_on_flush():
    released: list[list] = []
    releases = Releases(released.append, every=1.0)
    releases.add(["a"], now=100.0)  # first add after construction at monotonic() ~ now
    releases.flush(now=100.0)
    assert released == [["a"]]
    releases.add(["b"], now=100.5)
    releases.add(["c", "d"], now=100.9)
    assert released == [["a"]]  # held: less than `every` since the last flush
    releases.add(["e"], now=101.0)
    assert released == [["a"], ["b", "c", "d", "e"]]
    releases.flush()
    assert released == [["a"], ["b", "c", "d", "e"]]  # nothing held: no empty release


def test_the_receiving_thread_applies_only_small_runs_of_operations_with_nothing_queued():
    write = write_op(1, 0, b"x")
    assert inline_apply(False, [write, write], 8192)
    assert not inline_apply(True, [write], 100)  # the apply thread has work: order
    assert not inline_apply(False, [], 0)  # a PING: nothing to apply
    assert not inline_apply(False, [write], INLINE_APPLY_BYTES + 1)
    assert inline_apply(False, [write], 1024 * 1024 + 64)  # one FUSE write of 1 MiB
    marker = object()  # SCAN / RESYNC markers keep their place in the apply thread
    assert not inline_apply(False, [write, marker], 100)


def test_large_chunks_are_cut_into_slices_without_copies_and_small_ones_kept():
    big = bytes(range(256)) * 4096  # 1 MiB
    pieces = list(_slices((b"head", big), 256 * 1024))
    assert pieces[0] == b"head"
    assert [len(p) for p in pieces[1:]] == [256 * 1024] * 4
    assert all(isinstance(p, memoryview) and p.obj is big for p in pieces[1:])
    assert b"".join(pieces) == b"head" + big
    assert JOIN_BYTES <= 16 * 1024  # frames joined before sealing fit one TLS record
