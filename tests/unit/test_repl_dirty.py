"""The persistent dirty log and its group-committing tracker."""

from __future__ import annotations

import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node_service.errors import RetryableError
from node_service.replication import ops
from node_service.replication.dirty import (
    ENTRY,
    META,
    DirtyLog,
    DirtyLogError,
    DirtyRegion,
    DirtyTracker,
    FileDirt,
    decode_regions,
    dirty_regions,
    encode_regions,
    plan,
)

D = "/srv/data"


def R(path: str, index: int) -> DirtyRegion:
    return DirtyRegion(D, path, index)


def eventually(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.01)
    return check()


@pytest.fixture
def dirty_log(tmp_path) -> Iterator[DirtyLog]:
    log = DirtyLog(tmp_path / "state" / "dirty.sqlite")
    try:
        yield log
    finally:
        log.close()


@pytest.fixture
def tracker(dirty_log) -> Iterator[DirtyTracker]:
    t = DirtyTracker(dirty_log, name="test", clear_delay=0.05, readahead=0)
    try:
        yield t
    finally:
        t.close()


def fresh_view(log: DirtyLog) -> set[tuple]:
    """What another process (or the node after a crash) would read from disk."""
    db = sqlite3.connect(log.path)
    try:
        return set(db.execute("SELECT dir, path, idx FROM region"))
    finally:
        db.close()


def test_the_log_is_in_wal_mode_with_full_sync(dirty_log):
    assert dirty_log.journal_mode() == "wal"
    assert (dirty_log.path.parent / "dirty.sqlite-wal").exists()


def test_regions_generation_and_stale_survive_a_reopen(tmp_path):
    path = tmp_path / "dirty.sqlite"
    log = DirtyLog(path)
    log.record([R("a", 0), R("a", 1), R("b", META)])
    log.clear([R("a", 1)])
    log.set_generation(42)
    log.set_stale("operation 7 failed: No space left on device")
    log.close()
    again = DirtyLog(path)
    try:
        assert again.regions() == {R("a", 0), R("b", META)}
        assert again.generation == 42
        assert again.stale == "operation 7 failed: No space left on device"
        again.set_stale(None)
        assert again.stale is None
    finally:
        again.close()


def test_a_log_that_cannot_be_opened_says_where(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    with pytest.raises(DirtyLogError, match="cannot open the dirty log"):
        DirtyLog(blocker / "dirty.sqlite")


def test_plan_groups_per_path_and_data_implies_meta():
    regions = [R("a", 3), R("a", 1), R("b", ENTRY), R("c", META), R("a", ENTRY)]
    assert plan(regions) == (
        FileDirt(D, "a", entry=True, meta=True, indexes=(1, 3)),
        FileDirt(D, "b", entry=True, meta=False, indexes=()),
        FileDirt(D, "c", entry=False, meta=True, indexes=()),
    )


def test_union_of_both_sides_travels_as_json():
    mine = {R("a", 0), R("a", 1)}
    theirs = {R("a", 1), R("b", META)}
    assert decode_regions(encode_regions(mine | theirs)) == {R("a", 0), R("a", 1), R("b", META)}
    for bad in (b"{}", b"[[1, 2, 3]]", b'[["d", "p", -3]]', b'[["d", "p", true]]', b"\xff"):
        with pytest.raises(RetryableError, match="malformed"):
            decode_regions(bad)


def test_op_regions_are_keyed_by_their_replicated_dir():
    regions = ops.regions(ops.Unlink("x/y"), lambda handle: None)
    assert dirty_regions(D, regions) == (R("x/y", ENTRY),)


def test_marked_regions_are_on_disk_when_mark_returns(tracker, dirty_log):
    tracker.mark([R("a", 0), R("a", 5)], timeout=5)
    assert fresh_view(dirty_log) == {(D, "a", 0), (D, "a", 5)}


def test_a_hot_region_costs_one_commit(tracker):
    tracker.mark([R("hot", 0)], timeout=5)
    before = tracker.commits
    for _ in range(50):
        assert tracker.add([R("hot", 0)]) == 0  # already durable: nothing to wait for
    assert tracker.commits == before


def test_concurrent_marks_are_grouped_into_few_commits(tracker, dirty_log):
    barrier = threading.Barrier(32)

    def writer(n: int) -> None:
        barrier.wait(timeout=5)
        for i in range(10):
            tracker.mark([R(f"f{n}", i)], timeout=10)

    threads = [threading.Thread(target=writer, args=(n,), name=f"w{n}") for n in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(fresh_view(dirty_log)) == 320
    assert tracker.commits < 320


def test_released_regions_are_forgotten_and_kept_ones_stay(tracker, dirty_log):
    tracker.mark([R("acked", 0), R("absent", 0)], timeout=5)
    tracker.keep([R("absent", 0)])
    tracker.release([R("acked", 0)])
    # the kept region was due no later than the released one
    assert eventually(lambda: (D, "acked", 0) not in fresh_view(dirty_log))
    assert fresh_view(dirty_log) == {(D, "absent", 0)}
    tracker.settle([R("absent", 0)])
    assert eventually(lambda: fresh_view(dirty_log) == set())


def test_a_region_still_in_flight_is_not_forgotten(tracker, dirty_log):
    tracker.mark([R("a", 0)], timeout=5)
    tracker.mark([R("a", 0)], timeout=5)  # a second operation on the same region
    tracker.mark([R("b", 0)], timeout=5)
    tracker.release([R("a", 0)])  # only the first is acknowledged
    tracker.release([R("b", 0)])
    assert eventually(lambda: (D, "b", 0) not in fresh_view(dirty_log))
    assert (D, "a", 0) in fresh_view(dirty_log)


def test_regions_found_at_start_stay_until_settled(tmp_path):
    path = tmp_path / "dirty.sqlite"
    log = DirtyLog(path)
    log.record([R("crash", 2)])
    tracker = DirtyTracker(log, name="restart", clear_delay=0.01)
    try:
        assert tracker.recorded() == {R("crash", 2)}
        tracker.mark([R("new", 0)])
        tracker.release([R("new", 0)])
        tracker.release([R("crash", 2)])  # a stray release must not forget history
        assert eventually(lambda: (D, "new", 0) not in fresh_view(log))
        assert fresh_view(log) == {(D, "crash", 2)}
    finally:
        tracker.close()
        log.close()


def test_the_flush_hook_runs_before_regions_are_forgotten(dirty_log):
    calls: list[set] = []
    tracker = DirtyTracker(
        dirty_log,
        name="hook",
        clear_delay=0.01,
        readahead=0,
        before_clear=lambda: calls.append(set(fresh_view(dirty_log))),
    )
    try:
        tracker.mark([R("a", 0)])
        tracker.release([R("a", 0)])
        assert eventually(lambda: fresh_view(dirty_log) == set())
        assert calls and calls[0] == {(D, "a", 0)}  # flushed while still recorded
    finally:
        tracker.close()


def test_a_failing_log_fails_every_waiter(dirty_log):
    class Broken(DirtyLog):
        def __init__(self) -> None:
            self.path = dirty_log.path

        def regions(self):
            return frozenset()

        def get(self, key, default=None):
            return default

        def set(self, key, value):
            pass

        def apply(self, record=(), clear=()):
            raise DirtyLogError(f"{self.path}: cannot write the dirty log: disk I/O error")

    tracker = DirtyTracker(Broken(), name="broken")
    try:
        with pytest.raises(DirtyLogError, match="disk I/O error"):
            tracker.mark([R("a", 0)], timeout=5)
        with pytest.raises(DirtyLogError, match="disk I/O error"):
            tracker.add([R("b", 0)])
    finally:
        tracker.close()


def test_history_is_known_only_after_a_clean_close(tmp_path):
    path = tmp_path / "dirty.sqlite"
    first = DirtyTracker(DirtyLog(path), name="first")
    assert not first.history_known  # first start: unknown history, full sync
    first.close()
    first.log.close()
    second = DirtyTracker(DirtyLog(path), name="second")
    assert second.history_known
    # no close: as after a crash of the node
    crashed_log = second.log
    third = DirtyTracker(DirtyLog(path), name="third")
    try:
        assert not third.history_known
    finally:
        third.close()
        third.log.close()
        second.close()
        crashed_log.close()


def test_a_new_region_records_the_next_ones_in_the_same_commit(dirty_log):
    tracker = DirtyTracker(dirty_log, name="stream", clear_delay=0.05, readahead=3)
    try:
        tracker.mark([R("stream", 0)])
        assert fresh_view(dirty_log) == {(D, "stream", i) for i in range(4)}
        commits = tracker.commits
        # already durable: no commit to wait for (and the writer is still in the
        # first half of its look-ahead: nothing extended, test_repl_dirty_stream.py)
        assert tracker.add([R("stream", 1)]) == 0
        assert tracker.add([R("stream", 1)]) == 0
        assert tracker.commits == commits
        tracker.release([R("stream", 0), R("stream", 1)])
        # unused read-ahead is forgotten like an acknowledged region once the
        # writer stopped; used ones stay in flight
        assert eventually(lambda: fresh_view(dirty_log) == {(D, "stream", 1)})
        tracker.mark([R("meta-only", META)])  # markers never read ahead
        assert (D, "meta-only", 0) not in fresh_view(dirty_log)
    finally:
        tracker.close()


ACTIONS = st.lists(
    st.tuples(st.sampled_from(["add", "release", "keep", "settle"]), st.integers(0, 2)),
    max_size=25,
)


@settings(max_examples=40, deadline=None)
@given(ACTIONS)
def test_a_region_the_peer_may_lack_is_always_on_disk(actions):
    """Model check: in flight or pinned => recorded, whatever the order of events."""
    with tempfile.TemporaryDirectory() as tmp:
        log = DirtyLog(Path(tmp) / "dirty.sqlite")
        tracker = DirtyTracker(log, name="model", clear_delay=0.0, readahead=0)
        in_flight = {i: 0 for i in range(3)}
        pinned: set[int] = set()
        try:
            for action, i in actions:
                region = R("m", i)
                if action == "add":
                    tracker.mark([region], timeout=5)
                    in_flight[i] += 1
                elif action == "release" and in_flight[i]:
                    tracker.release([region])
                    in_flight[i] -= 1
                elif action == "keep" and in_flight[i]:
                    tracker.keep([region])
                    in_flight[i] -= 1
                    pinned.add(i)
                elif action == "settle":
                    tracker.settle([region])
                    pinned.discard(i)
                must = {(D, "m", n) for n, c in in_flight.items() if c} | {
                    (D, "m", n) for n in pinned
                }
                assert must <= fresh_view(log), (action, i)
        finally:
            tracker.close()
            log.close()


def test_a_crashed_secondary_keeps_its_history_a_crashed_primary_does_not(tmp_path):
    for role, known in (("secondary", True), ("primary", False)):
        path = tmp_path / f"{role}.sqlite"
        log = DirtyLog(path)
        tracker = DirtyTracker(log, name=role)
        tracker.set_role(role)
        tracker.mark([R("in-flight", 0)])
        # crash: no close; the next run opens the same log
        again = DirtyTracker(DirtyLog(path), name=f"{role}-again")
        try:
            assert again.history_known is known
            assert R("in-flight", 0) in again.recorded()
        finally:
            again.close()
            again.log.close()
            tracker.close()
            log.close()
