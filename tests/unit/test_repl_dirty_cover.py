"""Covers: a recorded ENTRY stands in for the regions below it (one commit per new directory)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from node_service.replication import dirty, ops
from node_service.replication.dirty import (
    ENTRY,
    META,
    DirtyLog,
    DirtyRegion,
    DirtyTracker,
    dirty_regions,
    opening_ahead,
)
from tests.unit.test_repl_dirty import D, R, eventually


def created(handle: int, path: str) -> ops.Open:
    parent = path.rpartition("/")[0]
    stamps = (ops.Stamp(parent, 1), ops.Stamp(path, 1))
    return ops.Open(handle, path, os.O_WRONLY | os.O_CREAT, 0o644, 0, 0, True, stamps)


def regions_of(op: ops.Op, paths: ops.HandlePaths) -> tuple[DirtyRegion, ...]:
    out = dirty_regions(D, ops.regions(op, paths))
    paths.follow(op)
    return out


def on_disk_or_covered(log: DirtyLog, r: DirtyRegion) -> bool:
    """``r`` has a row, or an ENTRY row of a directory above it does."""
    rows = log.regions()
    if r in rows:
        return True
    path = r.path.rpartition("/")[0]
    while path:
        if DirtyRegion(D, path, ENTRY) in rows:
            return True
        path = path.rpartition("/")[0]
    return False


def test_files_created_in_a_new_directory_cost_no_commit_of_their_own(dirty_log):
    tracker = DirtyTracker(dirty_log, name="cover", clear_delay=0.05)
    paths = ops.HandlePaths()
    try:
        mkdir = ops.Mkdir("d", 0o755, 0, 0, (ops.Stamp("", 1), ops.Stamp("d", 1)))
        tracker.mark(regions_of(mkdir, paths))
        commits = tracker.commits
        in_flight = []
        for n in range(50):
            op = created(n + 1, f"d/f{n}")
            regions = regions_of(op, paths)
            assert tracker.add(regions, opening_ahead(D, op)) == 0, "no commit to wait for"
            write = ops.Write(n + 1, 0, 2, b"x" * 4096)
            data = regions_of(write, paths)
            assert tracker.add(data) == 0
            in_flight += [*regions, *data]
        assert tracker.commits == commits
        rows = dirty_log.regions()
        assert R("d", ENTRY) in rows and not any(r.path.startswith("d/") for r in rows)
        assert all(on_disk_or_covered(dirty_log, r) for r in in_flight)
        # the peer acknowledged everything: the covered regions go, then their cover
        tracker.release(in_flight)
        tracker.release(regions_of(mkdir, paths))
        assert eventually(lambda: dirty_log.count() == 0)
        assert tracker.recorded() == frozenset()
    finally:
        tracker.close()


def test_a_cover_stays_on_disk_while_a_region_it_covers_is_in_flight(dirty_log):
    tracker = DirtyTracker(dirty_log, name="cover", clear_delay=0.02)
    try:
        tracker.mark([R("d", ENTRY)])
        assert tracker.add([R("d/f", ENTRY)]) == 0
        tracker.release([R("d", ENTRY)])  # the mkdir was acknowledged long ago
        # several forgetting rounds go by; the file's create is still unacknowledged
        assert not eventually(lambda: R("d", ENTRY) not in dirty_log.regions(), timeout=0.3)
        assert tracker.recorded() == {R("d", ENTRY), R("d/f", ENTRY)}
        tracker.release([R("d/f", ENTRY)])
        assert eventually(lambda: dirty_log.count() == 0)
    finally:
        tracker.close()


def test_a_covered_region_the_peer_lacks_keeps_its_cover_until_settled(dirty_log):
    tracker = DirtyTracker(dirty_log, name="cover", clear_delay=0.02)
    try:
        tracker.mark([R("d", ENTRY)])
        tracker.add([R("d/f", 0)])
        tracker.keep([R("d/f", 0)])  # the peer went away
        tracker.release([R("d", ENTRY)])
        assert not eventually(lambda: dirty_log.count() == 0, timeout=0.3)
        assert dirty_log.regions() == {R("d", ENTRY)}
        tracker.settle([R("d/f", 0), R("d", ENTRY)])  # a resync brought the subtree over
        assert eventually(lambda: dirty_log.count() == 0)
    finally:
        tracker.close()


def test_a_spent_cover_hands_over_to_the_nearer_directory(dirty_log, monkeypatch):
    monkeypatch.setattr(dirty, "COVER_BUDGET", 4)
    tracker = DirtyTracker(dirty_log, name="budget", clear_delay=5.0, readahead=0)
    try:
        tracker.mark([R("top", ENTRY)])
        tracker.mark([R("top/d", ENTRY)])  # covered by top (1 of 4)
        for n in range(3):  # covered by top (2..4 of 4)
            assert tracker.add([R(f"top/d/f{n}", ENTRY)]) == 0
        assert dirty_log.regions() == {R("top", ENTRY)}
        # top's budget is spent: the nearest directory, top/d, gets a row of its
        # own and covers from now on
        tracker.wait_durable(tracker.add([R("top/d/f2", META)]), 5.0)
        assert dirty_log.regions() == {R("top", ENTRY), R("top/d", ENTRY)}
        commits = tracker.commits
        assert tracker.add([R("top/d/f4", ENTRY), R("top/d/f4", META)]) == 0
        assert tracker.commits == commits
        # a spent cover with no nearer ENTRY: plain rows again
        tracker.wait_durable(tracker.add([R("top/other", META)]), 5.0)
        assert R("top/other", META) in dirty_log.regions()
    finally:
        tracker.close()


def test_a_spent_cover_hands_over_even_after_the_directory_was_forgotten(dirty_log, monkeypatch):
    monkeypatch.setattr(dirty, "COVER_BUDGET", 3)
    tracker = DirtyTracker(dirty_log, name="budget", clear_delay=0.02, readahead=0)
    try:
        tracker.mark([R("top", ENTRY)])  # stays referenced: top is a live cover
        tracker.mark([R("top/d", ENTRY)])  # the mkdir, covered (1 of 3)
        tracker.release([R("top/d", ENTRY)])
        assert eventually(lambda: R("top/d", ENTRY) not in tracker.recorded())
        for n in range(2):  # (2..3 of 3)
            assert tracker.add([R(f"top/d/f{n}", ENTRY)]) == 0
        # spent: the files' directory gets a row again, not each file
        tracker.wait_durable(tracker.add([R("top/d/f2", ENTRY)]), 5.0)
        monkeypatch.setattr(dirty, "COVER_BUDGET", 4096)  # top/d's own, fresh budget
        commits = tracker.commits
        for n in range(3, 20):
            assert tracker.add([R(f"top/d/f{n}", ENTRY), R(f"top/d/f{n}", 0)]) == 0
        assert tracker.commits == commits
        assert dirty_log.regions() == {R("top", ENTRY), R("top/d", ENTRY)}
    finally:
        tracker.close()


def test_files_at_the_top_are_never_covered(dirty_log):
    tracker = DirtyTracker(dirty_log, name="top", clear_delay=5.0, readahead=0)
    try:
        tracker.mark([R("f", ENTRY)])
        tracker.mark([R("g", ENTRY)])
        assert {R("f", ENTRY), R("g", ENTRY)} <= dirty_log.regions()
        # nor is a file's data by its own ENTRY: exact rows, as before covers
        tracker.mark([R("f", 3), R("f", META)])
        assert {R("f", 3), R("f", META)} <= dirty_log.regions()
    finally:
        tracker.close()


TREE = ["d", "d/e", "d/e/f", "d/g", "h"]
ACTIONS = st.lists(
    st.tuples(
        st.sampled_from(["add", "release", "keep", "settle"]),
        st.sampled_from(TREE),
        st.sampled_from([ENTRY, META, 0]),
    ),
    max_size=30,
)


@settings(max_examples=40, deadline=None)
@given(ACTIONS)
def test_a_region_the_peer_may_lack_is_on_disk_or_covered(actions):
    """Model check: in flight or pinned => its row or a cover's row is on disk."""
    with tempfile.TemporaryDirectory() as tmp:
        log = DirtyLog(Path(tmp) / "dirty.sqlite")
        tracker = DirtyTracker(log, name="model", clear_delay=0.0, readahead=2)
        in_flight: dict[DirtyRegion, int] = {}
        pinned: set[DirtyRegion] = set()
        try:
            for action, path, index in actions:
                region = R(path, index)
                if action == "add":
                    tracker.mark([region], timeout=5)
                    in_flight[region] = in_flight.get(region, 0) + 1
                elif action in ("release", "keep") and in_flight.get(region):
                    (tracker.release if action == "release" else tracker.keep)([region])
                    in_flight[region] -= 1
                    if action == "keep":
                        pinned.add(region)
                elif action == "settle":
                    tracker.settle([region])
                    pinned.discard(region)
                must = {r for r, n in in_flight.items() if n} | pinned
                missing = [r for r in must if not on_disk_or_covered(log, r)]
                assert not missing, (action, path, index, missing)
        finally:
            tracker.close()
            log.close()
