"""The replication transport over real mutual TLS on loopback: modes, pipelining, failures."""

from __future__ import annotations

import errno
import os
import shutil
import threading
import time

import pytest

from node_service.replication import ops
from node_service.replication.dirty import META, DirtyRegion
from node_service.replication.sender import Link, Ticket, replication_status, state_fields
from node_service.replication.transport import PeerGone
from tests.unit.repl_pair import (
    DIR,
    GatedApplier,
    open_op,
    real_appliers,
    write_op,
)

KIB64 = 64 * 1024


def in_thread(fn, *args) -> tuple[threading.Thread, threading.Event]:
    done = threading.Event()

    def run() -> None:
        fn(*args)
        done.set()

    thread = threading.Thread(target=run, name="test-waiter", daemon=True)
    thread.start()
    return thread, done


def eventually(check, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.01)
    return check()


def test_many_operations_in_flight_are_applied_and_acked_in_order(pair_factory):
    pair = pair_factory()
    pair.connect()
    r = pair.replicator
    tickets = [r.submit(open_op())]
    tickets += [r.submit(write_op(1, i * 100, b"%05d" % i)) for i in range(500)]
    # nothing waited for yet: every operation was queued without a round trip
    for t in tickets:
        r.wait(t)
    assert [t.seq for t in tickets] == list(range(1, 502))
    assert [op.data for op in pair.applier.applied[1:]] == [b"%05d" % i for i in range(500)]
    stats = pair.sender.stats()
    assert stats.ops == 501 and stats.lag_ops == 0 and stats.lag_bytes == 0
    assert stats.acks < 501 * 2  # cumulative acks were coalesced
    assert stats.link == "connected"


def test_sync_returns_only_after_the_secondary_applied(pair_factory):
    pair = pair_factory(mode="sync")
    pair.applier.gate = threading.Event()
    pair.connect()
    ticket = pair.replicator.submit(open_op())
    _, done = in_thread(pair.replicator.wait, ticket)
    assert pair.applier.entered.wait(5)
    assert pair.receiver.stats().received == 1
    assert not done.wait(0.2)  # received but not applied: still waiting
    pair.applier.gate.set()
    assert done.wait(5)
    assert len(pair.applier.applied) == 1


def test_semi_returns_once_received_while_the_apply_is_held(pair_factory):
    pair = pair_factory(mode="semi")
    pair.applier.gate = threading.Event()
    pair.connect()
    ticket = pair.replicator.submit(open_op())
    _, done = in_thread(pair.replicator.wait, ticket)
    assert done.wait(5)
    assert pair.applier.applied == []  # the secondary has not written it yet
    pair.applier.gate.set()
    assert pair.sender.drain(5)


def test_async_returns_at_once_but_lag_is_bounded_and_reported(pair_factory):
    pair = pair_factory(mode="async", max_lag_bytes=4 * KIB64, timeout=5.0)
    pair.applier.gate = threading.Event()
    pair.connect()
    r = pair.replicator
    r.wait(r.submit(open_op()))  # returns without the secondary
    for i in range(3):
        r.wait(r.submit(write_op(1, i * KIB64, b"x" * KIB64)))
    assert pair.sender.stats().lag_bytes >= 3 * KIB64
    _, done = in_thread(lambda: r.wait(r.submit(write_op(1, 9 * KIB64, b"y" * KIB64))))
    assert not done.wait(0.3)  # the bound holds the fourth write back
    pair.applier.gate.set()
    assert done.wait(5)
    assert pair.sender.drain(5)
    assert pair.sender.stats().lag_bytes == 0
    assert len(pair.applier.applied) == 5


def test_slow_peer_releases_waiters_within_the_timeout_and_keeps_regions(pair_factory):
    pair = pair_factory(mode="sync", timeout=0.5)
    pair.applier.gate = threading.Event()  # never opened: the secondary hangs
    pair.connect()
    r = pair.replicator
    r.wait(r.submit(open_op()))  # the Open is held: this wait times out
    started = time.monotonic()
    ticket = r.submit(write_op(1, 3 * KIB64, b"z" * 10))
    r.wait(ticket)
    assert time.monotonic() - started < 0.5 + 1.0
    assert pair.sender.link == Link.ABSENT
    assert "did not acknowledge" in pair.sender.reason
    later = r.submit(write_op(1, 7 * KIB64, b"w"))
    assert later == Ticket(0, later.epoch)
    r.wait(later)
    recorded = pair.log1.regions()
    assert {DirtyRegion(DIR, "f", 3), DirtyRegion(DIR, "f", 7)} <= recorded
    assert any(sev == "warning" and "absent" in msg for _, sev, msg in pair.events)
    pair.applier.gate.set()


def test_peer_gone_mid_stream_releases_every_waiter(pair_factory):
    pair = pair_factory(mode="sync", timeout=5.0)
    pair.applier.gate = threading.Event()
    pair.connect()
    r = pair.replicator
    first = r.submit(open_op())
    tickets = [r.submit(write_op(1, i * KIB64, b"d" * 100)) for i in range(20)]
    waiters = [in_thread(r.wait, t)[1] for t in [first, *tickets]]
    assert pair.applier.entered.wait(5)
    started = time.monotonic()
    # the secondary vanishes with everything in flight (its applier still stuck)
    closer, _ = in_thread(pair.receiver.close)
    assert all(done.wait(3) for done in waiters)
    assert time.monotonic() - started < 3
    assert pair.sender.wait_link(Link.ABSENT, 1)
    assert {DirtyRegion(DIR, "f", i) for i in range(20)} <= pair.log1.regions()
    pair.applier.gate.set()
    closer.join(10)


def test_enospc_on_the_secondary_makes_both_sides_stale_with_events(pair_factory):
    pair = pair_factory(mode="sync")
    pair.applier.fail_at = 3
    pair.connect()
    r = pair.replicator
    r.wait(r.submit(open_op()))
    r.wait(r.submit(write_op(1, 0, b"ok")))
    failing = r.submit(write_op(1, 5 * KIB64, b"too much"))
    r.wait(failing)
    assert pair.sender.wait_link(Link.STALE, 5)
    assert "No space left on device" in pair.sender.reason
    assert pair.receiver.wait_stale(5)
    assert "No space left on device" in pair.log2.stale  # persisted on the secondary
    assert DirtyRegion(DIR, "f", 5) in pair.log1.regions()
    assert DirtyRegion(DIR, "f", 5) in pair.log2.regions()
    severities = {(node, sev) for node, sev, msg in pair.events if "No space left" in msg}
    assert severities == {("n1", "error"), ("n2", "error")}
    # a stale secondary gets nothing more but a resync, even after a reconnect
    pair.sender.close()
    pair2 = pair_factory()
    pair2.log2.set_stale(pair.log2.stale)  # as after a restart of the secondary
    pair2.connect()
    assert pair2.sender.link == Link.STALE


def test_written_data_reaches_the_secondary_tree(pair_factory, tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    fd, appliers = real_appliers(dest)
    try:
        pair = pair_factory(appliers=appliers)
        pair.connect()
        r = pair.replicator
        for op in (open_op(), write_op(1, 0, b"hello "), write_op(1, 6, b"world")):
            r.wait(r.submit(op))
        r.wait(r.submit(ops.Fsync(1, False)))
        r.wait(r.submit(ops.Release(1)))
        assert (dest / "f").read_bytes() == b"hello world"
        # records are forgotten on both sides once acked and flushed
        assert eventually(lambda: not pair.log1.regions() and not pair.log2.regions())
    finally:
        os.close(fd)


def test_open_files_are_reopened_on_a_new_connection(pair_factory, tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    fd, appliers = real_appliers(dest)
    try:
        pair = pair_factory(appliers=appliers)
        pair.connect()
        r = pair.replicator
        r.wait(r.submit(open_op()))
        r.wait(r.submit(write_op(1, 0, b"before")))
        pair.sender.mark_absent("heartbeats lost")
        pair.connect()  # a new connection: the secondary's handle table is empty
        r.wait(r.submit(write_op(1, 6, b"+after")))
        assert pair.sender.link == Link.CONNECTED
        assert (dest / "f").read_bytes() == b"before+after"
    finally:
        os.close(fd)


def test_a_node_that_is_not_the_peer_is_refused(pair_factory):
    pair = pair_factory()
    with pytest.raises(PeerGone, match="certificate names node 'n3'"):
        pair.connect("n3")
    assert pair.sender.link == Link.ABSENT
    assert eventually(lambda: any("n3" in line for line in pair.server.refusals))


def test_a_secondary_from_another_site_is_refused_by_the_primary(pair_factory):
    pair = pair_factory()
    with pytest.raises(PeerGone, match="TLS handshake refused: CERTIFICATE_VERIFY_FAILED"):
        pair.connect("other-n1")  # trusts only the other site's CA
    assert pair.sender.link == Link.ABSENT


def test_a_primary_from_another_site_is_refused_by_the_secondary(pair_factory):
    pair = pair_factory()
    # trusts our site's CA, but its own certificate was issued by another site
    mixed = pair.root / "mixed"
    mixed.mkdir()
    shutil.copy(pair.root / "n1" / "ca.pem", mixed / "ca.pem")
    for name in ("node.pem", "node.key"):
        shutil.copy(pair.root / "other-n1" / name, mixed / name)
    with pytest.raises(PeerGone):
        pair.connect("mixed")
    assert pair.sender.link == Link.ABSENT
    assert eventually(lambda: any("TLS" in line for line in pair.server.refusals))
    assert pair.applier.applied == []


def test_unreachable_peer_leaves_the_sender_absent_and_recording(pair_factory):
    pair = pair_factory()
    pair.server.close()
    with pytest.raises(PeerGone, match="cannot reach n2"):
        pair.connect()
    r = pair.replicator
    ticket = r.submit(write_op(1, 0, b"x"))
    r.wait(ticket)
    assert ticket.seq == 0
    # the write's handle is unknown here, so only the Open's entry shows up
    r.wait(r.submit(open_op(2, "g")))
    assert any(reg.path == "g" for reg in pair.log1.regions())


def test_meta_regions_of_namespace_ops_are_tracked_while_absent(pair_factory):
    pair = pair_factory()
    pair.sender.mark_absent("peer lost")
    r = pair.replicator
    r.wait(r.submit(ops.Chmod(0, "dir/file", 0o600)))
    assert DirtyRegion(DIR, "dir/file", META) in pair.log1.regions()


def test_applier_errors_other_than_space_also_go_stale(pair_factory):
    class Failing(GatedApplier):
        def apply(self, op):
            raise ops.SecondaryApplyError(op, errno.EIO, "secondary could not apply: I/O error")

    pair = pair_factory(appliers=lambda: [Failing()])
    pair.connect()
    pair.replicator.wait(pair.replicator.submit(open_op()))
    assert pair.sender.wait_link(Link.STALE, 5)
    assert "I/O error" in pair.receiver.stale


def test_a_handle_whose_file_was_unlinked_is_not_sent_after_a_reconnect(pair_factory, tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    fd, appliers = real_appliers(dest)
    try:
        pair = pair_factory(appliers=appliers)
        pair.connect()
        r = pair.replicator
        r.wait(r.submit(open_op(1, "gone")))
        r.wait(r.submit(ops.Unlink("gone")))
        pair.sender.mark_absent("heartbeats lost")
        pair.connect()
        orphan = r.submit(write_op(1, 0, b"into the void"))
        assert orphan.seq == 0
        r.wait(orphan)
        r.wait(r.submit(ops.Release(1)))
        r.wait(r.submit(open_op(2, "kept")))
        assert pair.sender.link == Link.CONNECTED
        assert pair.receiver.stale is None
        assert sorted(p.name for p in dest.iterdir()) == ["kept"]
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    ("link", "resyncing", "status"),
    [
        (Link.CONNECTED, False, "uptodate"),
        (Link.CONNECTED, True, "resyncing"),
        (Link.ABSENT, False, "stale"),
        (Link.STALE, True, "stale"),
        (Link.IDLE, False, "off"),
        (Link.CLOSED, False, "off"),
    ],
)
def test_replication_status_for_rampart_state(link, resyncing, status):
    got, reason = replication_status(link, resyncing, "because")
    assert got == status and "because" in reason


def test_check_hello_names_what_is_wrong():
    from node_service.replication.frames import Hello
    from node_service.replication.transport import Endpoint, check_hello

    served = {"web": Endpoint("web", "n1", lambda accepted: None)}
    assert check_hello(Hello("web", "n1"), "n1", served) == ""
    assert "not replicated to this node" in check_hello(Hello("db", "n1"), "n1", served)
    assert "only 'n1' may replicate" in check_hello(Hello("web", "n3"), "n3", served)
    assert "HELLO claims node 'n9'" in check_hello(Hello("web", "n9"), "n1", served)


def test_async_with_a_stuck_peer_goes_absent_instead_of_blocking_forever(pair_factory):
    pair = pair_factory(mode="async", max_lag_bytes=2 * KIB64, timeout=0.5)
    pair.applier.gate = threading.Event()  # the secondary never gets its write done
    pair.connect()
    r = pair.replicator
    r.wait(r.submit(open_op()))
    started = time.monotonic()
    for i in range(4):  # the third one finds the lag bound full
        r.wait(r.submit(write_op(1, i * KIB64, b"a" * KIB64)))
    assert time.monotonic() - started < 0.5 + 1.5
    assert pair.sender.link == Link.ABSENT
    assert "too slow" in pair.sender.reason
    assert {DirtyRegion(DIR, "f", i) for i in range(4)} <= pair.log1.regions()
    pair.applier.gate.set()


def test_state_fields_feed_rampart_state(pair_factory):
    pair = pair_factory(mode="semi")
    pair.connect()
    r = pair.replicator
    r.wait(r.submit(open_op()))
    fields = state_fields(pair.sender.mode, pair.sender.stats(), resyncing=True, remaining=42)
    assert fields == {
        "mode": "semi",
        "status": "resyncing",
        "reason": fields["reason"],
        "bytes_per_s": fields["bytes_per_s"],
        "lag_bytes": fields["lag_bytes"],
        "resync_remaining_bytes": 42,
    }
    assert "connected to n2" in fields["reason"]
    pair.sender.mark_absent("peer lost")
    after = state_fields("semi", pair.sender.stats())
    assert after["status"] == "stale" and "peer lost" in after["reason"]


def test_mode_and_rate_are_plain_functions():
    import collections as c

    from node_service.errors import ModuleError
    from node_service.replication.link import Mode, parse_mode, rate

    assert parse_mode(None) == Mode.SYNC and parse_mode("async") == Mode.ASYNC
    with pytest.raises(ModuleError, match="replication mode 'fast'; expected sync, semi or async"):
        parse_mode("fast")
    samples = c.deque([(10.0, 0), (10.5, 500_000), (11.0, 1_000_000)])
    assert rate(samples, now=11.0) == 1_000_000
    assert rate(samples, now=20.0) == 0.0  # nothing recent: idle, not the old rate
