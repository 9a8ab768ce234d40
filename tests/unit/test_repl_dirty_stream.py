"""Adaptive look-ahead: a file written in order costs a few dirty-log commits, not one per MiB."""

from __future__ import annotations

import os
import threading
import time

from node_service.replication import ops, readahead
from node_service.replication.dirty import (
    META,
    READAHEAD,
    DirtyTracker,
    opening_ahead,
)
from node_service.replication.readahead import MAX_AHEAD, Stream, extend
from tests.unit.test_repl_dirty import D, R, eventually, fresh_view

MIB_REGIONS = (1 << 20) // ops.REGION_SIZE  # 16


def simulate(total_regions: int, per_write: int) -> tuple[int, int]:
    """``per_write`` regions a write after a create: (extensions, widest look-ahead).

    ``per_write`` 0: 4 KiB writes, each region written 16 times.
    """
    stream = readahead.opened([("f", i) for i in range(READAHEAD + 1)], 0.0)["f"]
    assert stream == Stream(end=READAHEAD + 1, step=READAHEAD + 1, pos=0, touched=0.0)
    extensions = widest = 0
    writes = (
        [(i // 16, i // 16) for i in range(total_regions * 16)]
        if per_write == 0
        else [(n, n + per_write - 1) for n in range(0, total_regions, per_write)]
    )
    for t, (lo, hi) in enumerate(writes):
        assert hi < stream.end, f"write {t} found region {hi} not recorded ahead"
        stream, more, why = extend(stream, lo, hi, False, float(t), READAHEAD)
        assert stream is not None and stream.touched == float(t)  # the writer is seen at work
        if more:
            assert why == readahead.EXTENDED
            extensions += 1
        widest = max(widest, stream.end - 1 - hi)
    return extensions, widest


def test_a_stream_is_recorded_ahead_of_every_write_in_a_few_extensions():
    # 256 MiB: the old fixed read-ahead cost one commit per MiB (256); now a
    # handful, each made while the writer is in the previous extension's second half
    for per_write in (MIB_REGIONS, 1, 0):
        extensions, widest = simulate(256 * MIB_REGIONS, per_write)
        assert extensions <= 12, per_write
        assert widest <= MAX_AHEAD


def test_the_look_ahead_doubles_and_never_passes_its_bound():
    s = Stream(end=16, step=16, pos=8, touched=0.0)
    s, more, why = extend(s, 7, 7, False, 1.0, 15)
    assert (more, why) == (range(0), readahead.WITHIN)  # 9 left: more than half the step
    s, more, why = extend(s, 8, 8, False, 1.0, 15)
    assert more == range(16, 48) and why == readahead.EXTENDED and s.step == 32
    s, more, why = extend(s, 5, 5, False, 1.0, 15)
    assert s.pos == 9 and why == readahead.WITHIN  # a write a little behind: still the stream
    big = Stream(end=5000, step=1000, pos=4600, touched=0.0)
    big, more, _ = extend(big, 4600, 4600, False, 1.0, 15, max_ahead=1024)
    assert big.end - 1 - 4600 == 1024 and more == range(5000, 5625)


def test_a_write_that_outran_the_look_ahead_extends_it_from_its_end():
    s = Stream(end=16, step=16, pos=16, touched=0.0)
    s, more, why = extend(s, 16, 47, True, 1.0, 15)  # a 2 MiB write
    assert (more, why) == (range(48, 80), readahead.EXTENDED) and s.pos == 48


def test_a_new_region_outside_restarts_a_rewrite_outside_keeps_the_stream():
    s = Stream(end=100, step=64, pos=70, touched=0.0)
    kept, more, why = extend(s, 0, 0, False, 1.0, 15)  # a header rewritten
    assert (kept, more, why) == (s, range(0), readahead.OUTSIDE)
    fresh, more, why = extend(s, 500, 500, True, 1.0, 15)
    assert more == range(501, 516) and why == readahead.STARTED
    assert fresh == Stream(end=516, step=16, pos=501, touched=1.0)
    assert extend(None, 7, 7, False, 1.0, 15) == (None, range(0), readahead.OUTSIDE)


def test_random_writes_get_the_fixed_read_ahead_only():
    # writes that skip ahead, even inside the look-ahead, are no stream: a
    # long unused run would be sent whole by a resync (KNOWN_RUN)
    s, more, why = extend(None, 3, 3, True, 1.0, 15)
    assert (more, why) == (range(4, 19), readahead.STARTED)
    s, more, why = extend(s, 17, 17, False, 1.0, 15)
    assert (more, why) == (range(0), readahead.OUTSIDE)
    s, more, why = extend(s, 30, 30, True, 1.0, 15)
    assert (more, why) == (range(31, 46), readahead.STARTED)


def test_a_region_ahead_is_held_only_while_the_writer_is_at_work():
    s = Stream(end=100, step=64, pos=40, touched=10.0)
    assert s.holds(40, 10.5, 1.0) and s.holds(99, 10.5, 1.0)
    assert not s.holds(39, 10.5, 1.0)  # written: forgotten once acknowledged, as any region
    assert not s.holds(100, 10.5, 1.0)
    assert not s.holds(50, 11.0, 1.0)  # the writer stopped: unused look-ahead goes
    assert readahead.active({"f": s, "g": Stream(1, 1, 1, 9.0)}, 10.5, 1.0) == {"f": s}


def test_a_sequential_stream_costs_a_few_commits_and_every_write_is_durable(dirty_log):
    tracker = DirtyTracker(dirty_log, name="stream", clear_delay=5.0)
    try:
        tracker.mark([R("s", META)], 5.0)
        base = tracker.commits
        for n in range(64):  # 64 MiB of 1 MiB writes
            write = [R("s", n * MIB_REGIONS + k) for k in range(MIB_REGIONS)] + [R("s", META)]
            tracker.mark(write, 5.0)
            assert {(D, "s", r.index) for r in write} <= fresh_view(dirty_log)
            tracker.release(write)
        # was 64 (one per MiB); commits made ahead count too
        assert tracker.commits - base <= 10
    finally:
        tracker.close()


def test_a_slow_writer_finds_its_look_ahead_still_recorded(dirty_log):
    tracker = DirtyTracker(dirty_log, name="slow", clear_delay=0.2)
    try:
        tracker.wait_durable(tracker.add([R("f", META)], opening_ahead(D, created("f"))), 5.0)
        tracker.release([R("f", META)])
        waited = []
        for i in range(20):  # a writer slower than clear_delay per look-ahead
            epoch = tracker.add([R("f", i)])
            waited.append(epoch)
            tracker.wait_durable(epoch, 5.0)
            tracker.release([R("f", i)])
            time.sleep(0.04)  # pacing the writer, not synchronisation
        # every write found its region durable: no commit in series with it
        assert waited == [0] * 20
        # stopped: the unused look-ahead goes after clear_delay, used ones once released
        assert eventually(lambda: not {r for r in fresh_view(dirty_log) if r[2] >= 0})
    finally:
        tracker.close()


def test_no_look_ahead_at_all_when_readahead_is_zero(dirty_log):
    tracker = DirtyTracker(dirty_log, name="none", clear_delay=5.0, readahead=0)
    try:
        tracker.mark([R("f", 0)], 5.0)
        tracker.mark([R("f", 1)], 5.0)
        assert {r[2] for r in fresh_view(dirty_log)} == {0, 1}
    finally:
        tracker.close()


def test_release_wakes_the_commit_thread_only_for_an_earlier_deadline(dirty_log):
    tracker = DirtyTracker(dirty_log, name="wake", clear_delay=5.0, readahead=0)
    wakes = []
    lock = threading.Lock()
    notify_all = tracker._cond.notify_all

    def counted() -> None:
        with lock:
            wakes.append(1)
        notify_all()

    try:
        tracker.mark([R("a", 0), R("b", 0), R("c", 0)], 5.0)
        tracker._cond.notify_all = counted
        tracker.release([R("a", 0)])  # nothing due before: the thread sleeps for good
        assert len(wakes) == 1
        tracker.release([R("b", 0)])  # due later than a: its deadline stands
        tracker.release([R("c", 0)])
        assert len(wakes) == 1
    finally:
        tracker._cond.notify_all = notify_all
        tracker.close()


def created(path: str) -> ops.Open:
    return ops.Open(1, path, os.O_WRONLY, 0o644, 0, 0, True)
