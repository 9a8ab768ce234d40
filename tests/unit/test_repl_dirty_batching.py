"""Fewer dirty-log commits per file: regions ahead of a create, forgetting rate-limited."""

from __future__ import annotations

import itertools
import os
import time

from node_service.replication import ops
from node_service.replication.dirty import (
    META,
    READAHEAD,
    DirtyTracker,
    opening_ahead,
)
from tests.unit.test_repl_dirty import D, R, eventually


def opened(path: str = "f", *, created: bool = True, flags: int = os.O_WRONLY) -> ops.Open:
    return ops.Open(1, path, flags, 0o644, 0, 0, created)


def test_a_created_or_truncated_file_gets_its_first_data_regions_ahead():
    assert opening_ahead(D, opened()) == tuple(R("f", k) for k in range(READAHEAD + 1))
    truncated = opened(created=False, flags=os.O_WRONLY | os.O_TRUNC)
    assert opening_ahead(D, truncated)[0] == R("f", 0)
    assert opening_ahead(D, opened(created=False)) == ()
    assert opening_ahead(D, ops.Mkdir("d", 0o755, 0, 0)) == ()


def test_the_write_after_a_create_needs_no_commit_of_its_own(dirty_log):
    tracker = DirtyTracker(dirty_log, name="ahead", clear_delay=5.0, readahead=0)
    try:
        op = opened()
        tracker.wait_durable(tracker.add([R("f", META)], opening_ahead(D, op)), 5.0)
        commits = tracker.commits
        assert tracker.add([R("f", 0), R("f", META)]) == 0  # already durable: no wait
        assert R("f", 0) in dirty_log.regions()
        assert tracker.commits == commits
    finally:
        tracker.close()


def test_unused_regions_ahead_are_forgotten_used_ones_wait_for_release(dirty_log):
    tracker = DirtyTracker(dirty_log, name="ahead", clear_delay=0.05, readahead=0)
    try:
        tracker.mark([R("f", META)])
        tracker.wait_durable(tracker.add([], opening_ahead(D, opened())), 5.0)
        tracker.mark([R("f", 0)])  # a write in flight: referenced
        assert eventually(lambda: dirty_log.regions() == {R("f", META), R("f", 0)})
        tracker.release([R("f", META), R("f", 0)])
        assert eventually(lambda: dirty_log.count() == 0)
    finally:
        tracker.close()


def test_forgetting_happens_at_most_once_per_clear_delay(dirty_log):
    flushes: list[float] = []
    tracker = DirtyTracker(
        dirty_log,
        name="rate",
        clear_delay=0.3,
        readahead=0,
        before_clear=lambda: flushes.append(time.monotonic()),
    )
    try:
        began = time.monotonic()
        for k in range(40):  # a region acknowledged every 25 ms for a second
            tracker.mark([R("f", k)])
            tracker.release([R("f", k)])
            time.sleep(0.025)
        assert eventually(lambda: dirty_log.count() == 0, timeout=5.0)
        assert flushes, "regions were forgotten without a flush first"
        gaps = [b - a for a, b in itertools.pairwise(flushes)]
        assert all(g >= 0.3 for g in gaps), gaps
        assert len(flushes) <= (time.monotonic() - began) / 0.3 + 1
    finally:
        tracker.close()
