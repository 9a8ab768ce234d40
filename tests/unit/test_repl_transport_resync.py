"""Reintegration, full sync and verify over the real transport, with real trees.

The primary's tree is changed the way the FUSE layer does it: the operation
is applied locally (here through an Applier on the primary's directory) and
submitted, both under one ordering lock that the resync also takes.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from node_service.replication import ops, verify
from node_service.replication.applier import Applier
from node_service.replication.dirty import DirtyRegion, DirtyTracker
from node_service.replication.resync import (
    Resync,
    SingleLock,
    block_ranges,
    expand,
    join_ranges,
    merge_want,
    pieces,
    repair_order,
    split_known,
    wanted,
)
from node_service.replication.sender import Link
from node_service.replication.transport import PeerGone
from tests.unit.repl_pair import DIR, Pair, make_site, open_op, write_op

REGION = 64 * 1024
MTIME = 1_700_000_000_000_000_000


class Primary:
    """Applies an operation to the primary's tree and replicates it, like fs.py."""

    def __init__(self, pair: Pair, root: Path):
        self.pair = pair
        self.root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        self.local = Applier(self.root_fd)
        self.ordering = SingleLock()
        self.lock = self.ordering.lock

    def do(self, op: ops.Op) -> None:
        with self.lock:
            self.local.apply(op)
            if hasattr(op, "stamps"):  # as fs.py does: times the primary ended up with
                op = replace(op, stamps=self._stamps(op))
            ticket = self.pair.replicator.submit(op)
        self.pair.replicator.wait(ticket)

    def _stamps(self, op: ops.Op) -> tuple[ops.Stamp, ...]:
        paths = [getattr(op, name) for name in ("path", "src", "dst") if hasattr(op, name)]
        out = {}
        for path in paths:
            for rel in (path.rpartition("/")[0], path):
                try:
                    st = os.stat(rel or ".", dir_fd=self.root_fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                out[rel] = ops.Stamp(rel, st.st_mtime_ns)
        return tuple(out.values())

    def resync(self, full: bool = False):
        passes = Resync(self.pair.sender, [self.root_fd], ordering=self.ordering, timeout=30)
        return passes.run(lambda: self.pair.connect(resync=True), full=full)

    def verify(self) -> list[str]:
        return Resync(self.pair.sender, [self.root_fd], timeout=30).verify()

    def close(self) -> None:
        self.local.close()
        os.close(self.root_fd)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    return make_site(tmp_path_factory.mktemp("site"))


@pytest.fixture
def trees(site, tmp_path) -> Iterator[tuple[Primary, Pair, Path, Path]]:
    src, dst = tmp_path / "primary", tmp_path / "secondary"
    src.mkdir()
    dst.mkdir()
    root = tmp_path / "pair"
    root.mkdir()
    for name in ("n1", "n2"):
        (root / name).symlink_to(site / name)
    dst_fd = os.open(dst, os.O_RDONLY | os.O_DIRECTORY)
    pair = Pair(root, appliers=lambda: [Applier(dst_fd)])
    primary = Primary(pair, src)
    try:
        yield primary, pair, src, dst
    finally:
        pair.close()
        primary.close()
        os.close(dst_fd)


def differences(src: Path, dst: Path) -> list[str]:
    a = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    b = os.open(dst, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return verify.report(verify.diff(verify.scan(a), verify.scan(b)), DIR)
    finally:
        os.close(a)
        os.close(b)


def block(n: int, size: int = REGION) -> bytes:
    return bytes([n % 251]) * size


def crash_secondary(pair: Pair, dst: Path, path: str, at: int, torn: bytes, regions) -> None:
    """Leave the secondary as a crash does: ``torn`` at ``at`` in its ``path``, the
    data regions ``regions`` of it in its own dirty log only; then restart it.

    Its tracker is stopped first, as a crash stops it: a live one forgets the
    file's acknowledged regions on its own schedule and would delete rows
    written behind its back (under load, after the primary forgot its own:
    the "1 block differs" flake of test_the_secondary_own_dirty_regions...).
    """
    pair.receiver.close()
    pair.tracker2.close()
    with open(dst / path, "r+b") as f:
        f.seek(at)
        f.write(torn)
    pair.log2.record([DirtyRegion(DIR, path, i) for i in regions])
    pair.tracker2 = DirtyTracker(pair.log2, name="n2-restarted", clear_delay=0.05)
    pair.receiver.tracker = pair.tracker2


def test_wanted_and_repair_order_are_pure_plans():
    regions = frozenset(
        {DirtyRegion(DIR, "a", 3), DirtyRegion(DIR, "a", 1), DirtyRegion(DIR, "d", ops.ENTRY)}
    )
    assert wanted(regions, DIR) == {"a": [1, 3], "d": None}
    diffs = (
        verify.Difference("x", "extra", ""),
        verify.Difference("x/y", "extra", ""),
        verify.Difference("z", "content", "", (2,)),
    )
    removals, creations = repair_order(diffs, {"x": None, "x/y": None})
    assert removals == ["x/y", "x"] and creations == []
    assert merge_want({"a": [1], "b": None}, {"a": [2], "b": [3], "c": [4]}) == {
        "a": [1, 2],
        "b": None,
        "c": [4],
    }


def test_reintegration_sends_only_the_dirty_blocks_and_ends_identical(trees):
    primary, pair, src, dst = trees
    pair.connect()
    primary.do(ops.Mkdir("docs", 0o755, 0, 0))
    primary.do(open_op(1, "docs/big"))
    for i in range(32):  # 2 MiB
        primary.do(write_op(1, i * REGION, block(i)))
    primary.do(open_op(2, "old"))
    primary.do(write_op(2, 0, b"to be removed"))
    assert differences(src, dst) == []
    # acknowledged regions are forgotten a clear_delay later; a lost peer is
    # noticed (heartbeat timeout) long after that
    assert pair.sender.drain(5)
    forgotten(pair, set())

    pair.sender.mark_absent("peer lost")
    modified = 0
    for i in (3, 17, 30):
        primary.do(write_op(1, i * REGION, block(100 + i)))
        modified += REGION
    primary.do(ops.Release(2))
    primary.do(ops.Unlink("old"))
    primary.do(ops.Mkdir("new", 0o700, 0, 0))
    primary.do(open_op(3, "new/file"))
    primary.do(write_op(3, 0, b"created while alone"))
    modified += len(b"created while alone")
    assert differences(src, dst) != []

    result = primary.resync()
    assert differences(src, dst) == []
    assert result.bytes_resent <= 1.2 * modified
    assert pair.sender.link == Link.CONNECTED
    # the application's handles survived: writing on after the resync works
    primary.do(write_op(1, 0, b"after"))
    assert pair.sender.drain(5)
    assert differences(src, dst) == []


def test_regions_dirty_only_on_the_secondary_are_repaired(trees):
    primary, pair, src, dst = trees
    pair.connect()
    primary.do(open_op(1, "f"))
    for i in range(4):
        primary.do(write_op(1, i * REGION, block(i)))
    assert pair.sender.drain(5)
    # as after a crash of the secondary: a block it had in flight is garbage,
    # and only its own dirty log knows
    crash_secondary(pair, dst, "f", 2 * REGION, b"torn write", [2])
    result = primary.resync()
    assert result.differences >= 1
    assert result.bytes_resent < 2 * REGION
    assert differences(src, dst) == []


def test_full_sync_compares_block_hashes_and_removes_extras(trees):
    primary, _pair, src, dst = trees
    data = b"".join(block(i) for i in range(16))
    (src / "same").write_bytes(data)
    (dst / "same").write_bytes(data)
    changed = bytearray(data)
    changed[5 * REGION : 5 * REGION + 3] = b"xyz"
    (src / "changed").write_bytes(bytes(changed))
    (dst / "changed").write_bytes(data)
    (dst / "extra-dir" / "deep").mkdir(parents=True)
    (dst / "extra-dir" / "deep" / "file").write_bytes(b"only here")
    (src / "link").symlink_to("same")
    (dst / "link").symlink_to("elsewhere")
    for tree in (src, dst):  # equal times, so only content and names differ
        for name in ("same", "changed"):
            os.utime(tree / name, ns=(MTIME, MTIME))
    result = primary.resync(full=True)
    assert differences(src, dst) == []
    assert result.full
    # the differing block is compared again by sub-block: one 4 KiB piece goes, not 64 KiB
    assert result.bytes_resent < 8 * 1024
    assert primary.verify() == []


def test_concurrent_writes_during_a_resync_end_up_correct(trees):
    primary, pair, src, dst = trees
    pair.connect()
    primary.do(open_op(1, "db"))
    for i in range(64):
        primary.do(write_op(1, i * REGION, block(i)))
    pair.sender.mark_absent("peer lost")
    for i in range(0, 64, 2):
        primary.do(write_op(1, i * REGION + 7, b"while alone"))
    stop = threading.Event()
    rng = random.Random(7)

    def application() -> None:
        n = 0
        while not stop.is_set() and n < 2000:
            i = rng.randrange(64)
            primary.do(write_op(1, i * REGION + rng.randrange(REGION - 16), b"app %08d" % n))
            n += 1

    writer = threading.Thread(target=application, name="test-app-writer")
    writer.start()
    try:
        primary.resync()
    finally:
        stop.set()
        writer.join(30)
    assert pair.sender.drain(10)
    assert pair.sender.link == Link.CONNECTED
    assert differences(src, dst) == []


def test_a_stale_secondary_is_cleared_by_a_resync(trees):
    primary, pair, src, dst = trees
    pair.log2.set_stale("operation 9 from n1 failed: No space left on device")
    (src / "f").write_bytes(b"primary")
    (dst / "f").write_bytes(b"secondary, stale")
    pair.connect()
    assert pair.sender.link == Link.STALE  # nothing but a resync for a stale peer
    primary.resync(full=True)
    assert pair.receiver.stale is None and pair.log2.stale is None
    assert (dst / "f").read_bytes() == b"primary"
    assert any("resync from n1 complete" in msg for _, _, msg in pair.events)


def test_verify_lists_every_differing_file(trees):
    primary, pair, src, dst = trees
    for tree in (src, dst):
        (tree / "sub").mkdir()
        (tree / "ok").write_bytes(b"same")
    (src / "sub" / "a").write_bytes(b"one")
    (dst / "sub" / "a").write_bytes(b"two")
    (src / "only-primary").write_bytes(b"p")
    (dst / "only-secondary").write_bytes(b"s")
    for tree in (src, dst):
        for path in ("ok", "sub/a", "sub", ""):
            os.utime(tree / path, ns=(MTIME, MTIME))
    pair.connect()
    lines = primary.verify()
    assert [line.split(":")[0] for line in lines] == [
        f"{DIR}/only-primary",
        f"{DIR}/only-secondary",
        f"{DIR}/sub/a",
    ]


def test_unknown_history_means_a_full_sync_then_dirty_regions_suffice(trees):
    primary, pair, src, dst = trees
    (src / "before").write_bytes(b"written before replication started")
    passes = Resync(pair.sender, [primary.root_fd], ordering=primary.ordering, timeout=30)
    first = passes.run(lambda: pair.connect(resync=True))  # fresh logs: no history
    assert first.full
    assert differences(src, dst) == []
    primary.do(open_op(1, "later"))
    pair.sender.mark_absent("peer lost")
    primary.do(write_op(1, 3 * REGION, b"while alone"))
    second = passes.run(lambda: pair.connect(resync=True))
    assert not second.full and second.regions >= 1
    assert passes.remaining_bytes == 0 and not passes.running
    assert differences(src, dst) == []


# ---- what a pass sends: plans (pure) and bytes on the wire ---------------------------


def test_long_runs_the_primary_recorded_go_without_comparing():
    ours = [*range(10, 30), 40, 41, 50]  # a 20-region stream, then two short runs
    direct, compare = split_known([3, 10, 11, 40, 50, 60], ours, run=16)
    assert direct == list(range(10, 30))  # the whole stream, even blocks not asked for
    assert compare == [3, 40, 50, 60]
    assert split_known([1, 2], [1, 2], run=16) == ([], [1, 2])
    # one write to a new region and its look-ahead make 16: not proof of a stream
    assert split_known([5], range(5, 21)) == ([], [5])


def test_byte_ranges_join_and_cut_into_pieces():
    assert block_ranges([3, 1, 2, 7]) == ((REGION, 3 * REGION), (7 * REGION, REGION))
    assert join_ranges([(0, 10), (30, 5)], [(8, 4), (35, 1)]) == ((0, 12), (30, 6))
    assert list(pieces([(0, 2500), (5000, 100)], chunk=1000)) == [
        (0, 1000),
        (1000, 1000),
        (2000, 500),
        (5000, 100),
    ]


def test_a_path_wanted_whole_becomes_every_block_of_every_file_under_it():
    files = {"d/a": 3 * REGION + 1, "d/sub/b": 0, "dx": REGION, "f": 2 * REGION}
    want = expand({"d": None, "f": [1], "gone": None}, files)
    assert want == {"d/a": [0, 1, 2, 3], "d/sub/b": [], "f": [1]}
    assert expand({"": None}, {"a": 1})["a"] == [0]  # the root: everything


def test_sub_block_digests_name_only_the_differing_4k_pieces(tmp_path):
    data = bytearray(block(1) * 3)
    (tmp_path / "a").write_bytes(data)
    data[REGION + 5000] ^= 0xFF  # second sub-block of block 1
    data[2 * REGION + REGION - 1] ^= 0xFF  # last sub-block of block 2
    (tmp_path / "b").write_bytes(data[: 2 * REGION + REGION - 100] + b"x" * 100)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        want = {"a": [verify.sub_block(i) for i in range(3)]}
        a = verify.scan(fd, want)["a"]
        b = verify.scan(fd, {"b": want["a"]})["b"]
        coarse = verify.scan(fd, {"a": [1]})["a"]
    finally:
        os.close(fd)
    assert len(dict(a.blocks)[1]) == 16 * verify.DIGEST_HEX
    assert len(dict(coarse.blocks)[1]) == verify.DIGEST_HEX
    assert verify.changed_ranges(b.blocks, dict(a.blocks), b.size) == (
        (REGION + 4096, 4096),
        (3 * REGION - 4096, 4096),
    )
    # a peer that gave one digest for the block (or none): the whole block goes
    assert verify.changed_ranges(b.blocks, dict(coarse.blocks), b.size) == (
        (0, 3 * REGION),  # blocks 0 and 2 missing from that answer, block 1 coarse
    )


def test_large_manifests_are_split_into_rows_that_fit_a_frame():
    blocks = tuple((i, "ab" * 256) for i in range(5000))  # ~2.6 MB of sub-block digests
    entry = verify.Entry("big", verify.FILE, 0o644, 0, 0, 5000 * REGION, 0, "", blocks)
    payloads = list(verify.chunks([entry]))
    assert len(payloads) > 1 and all(len(p) < 3 * 1024 * 1024 for p in payloads)
    rows = [e for p in payloads for e in verify.decode_entries(p)]
    assert verify.assemble(rows)["big"] == entry


class ScanLog:
    """Keeps the SCAN requests a pass makes (the frames go out unchanged)."""

    def __init__(self, sender):
        self.sender = sender
        self.request = sender.request
        self.scans: list[dict] = []
        sender.request = self.record

    def record(self, frame, timeout):
        if frame.type.name == "SCAN":
            self.scans.append(json.loads(frame.payload))
        return self.request(frame, timeout)

    def hashed_paths(self) -> set[str]:
        return {path for body in self.scans if body["hashes"] for path, _ in body["want"] or ()}


def forgotten(pair: Pair, keep: set[tuple[str, int]], *, secondary: bool = False) -> None:
    """Wait until the primary's tracker holds no region but ``keep`` (bounded).

    Acknowledged regions and the unused look-ahead are forgotten ``clear_delay``
    after their last use, as long after the writes as a real reconnect comes.
    ``secondary``: its tracker too. Under load it forgets later, and what it
    still holds is compared by the next pass (a stream "sent without hashing"
    was hashed once that way: digests, not bytes, never a lost write).
    """
    trackers = (pair.tracker1, pair.tracker2) if secondary else (pair.tracker1,)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        held = frozenset().union(*(t.recorded() for t in trackers))
        extra = {(r.path, r.index) for r in held} - keep
        if not extra:
            return
        for tracker in trackers:
            tracker.release(())  # wakes the commit thread
        threading.Event().wait(0.05)
    raise AssertionError(f"regions {sorted(extra)[:5]}... still recorded after 10 s")


def test_random_4k_writes_while_away_resend_about_what_changed(trees):
    primary, pair, src, dst = trees
    pair.connect()
    primary.do(open_op(1, "image"))
    for i in range(64):  # 4 MiB
        primary.do(write_op(1, i * REGION, block(i)))
    assert pair.sender.drain(5)
    pair.sender.mark_absent("peer lost")
    rng = random.Random(5)
    offsets = {rng.randrange(1024) * 4096 for _ in range(40)}
    for offset in sorted(offsets):
        primary.do(write_op(1, offset, bytes([offset % 253 + 1]) * 4096))
    forgotten(
        pair,
        {("image", o // REGION) for o in offsets} | {("image", ops.META), ("image", ops.ENTRY)},
    )
    modified = len(offsets) * 4096
    result = primary.resync()
    assert differences(src, dst) == []
    # 64 KiB regions would resend up to 16x; sub-blocks send what changed plus attributes
    assert result.bytes_resent <= 1.2 * modified, (result.bytes_resent, modified)


def test_a_stream_rewritten_while_away_is_sent_without_hashing(trees):
    primary, pair, src, dst = trees
    pair.connect()
    primary.do(open_op(1, "log"))
    for i in range(40):
        primary.do(write_op(1, i * REGION, block(i)))
    assert pair.sender.drain(5)
    forgotten(pair, set(), secondary=True)
    pair.sender.mark_absent("peer lost")
    for i in range(8, 40):  # a 2 MiB rewrite: 32 consecutive regions
        primary.do(write_op(1, i * REGION, block(200 + i)))
    primary.do(open_op(2, "created-while-away"))
    primary.do(write_op(2, 0, block(7) * 20))
    scans = ScanLog(pair.sender)
    result = primary.resync()
    assert differences(src, dst) == []
    assert scans.hashed_paths() == set(), scans.scans  # neither file was compared
    assert 52 * REGION <= result.bytes_resent <= 1.05 * 52 * REGION


def test_the_secondary_own_dirty_regions_are_still_compared(trees):
    primary, pair, src, dst = trees
    pair.connect()
    primary.do(open_op(1, "f"))
    for i in range(32):
        primary.do(write_op(1, i * REGION, block(i)))
    assert pair.sender.drain(5)
    forgotten(pair, set())
    # a torn write the secondary had in flight
    crash_secondary(pair, dst, "f", 20 * REGION + 8192, b"torn", range(16, 32))
    scans = ScanLog(pair.sender)
    result = primary.resync()
    assert differences(src, dst) == []
    assert "f" in scans.hashed_paths(), (result, scans.scans)
    assert result.bytes_resent < 2 * 4096  # one 4 KiB sub-block


def test_a_file_sent_whole_while_the_application_writes_and_resizes_it(trees):
    primary, pair, src, dst = trees
    pair.connect()
    primary.do(open_op(2, "streamed-while-away"))
    primary.do(write_op(2, 0, b"before"))
    assert pair.sender.drain(5)
    forgotten(pair, set())
    pair.sender.mark_absent("peer lost")
    primary.do(open_op(1, "created-while-away"))
    for i in range(48):  # 3 MiB: sent whole in two pieces (2 MiB, 1 MiB), each under the lock
        primary.do(write_op(1, i * REGION, block(i)))
    for i in range(40):  # a stream over an existing file: sent without comparing
        primary.do(write_op(2, i * REGION, block(i + 50)))
    stop = threading.Event()
    rng = random.Random(11)

    def application() -> None:
        n = 0
        while not stop.is_set() and n < 3000:
            handle, blocks = rng.choice(((1, 48), (2, 40)))
            if n % 50 == 49:  # shrink or grow, as truncate(2) does
                size = rng.randrange(blocks * REGION * 5 // 4)
                primary.do(ops.Truncate(handle, "", size, MTIME + n))
            else:
                at = rng.randrange(blocks * REGION * 5 // 4)
                primary.do(write_op(handle, at, b"app %08d" % n))
            n += 1

    writer = threading.Thread(target=application, name="test-app-resizer")
    writer.start()
    try:
        result = primary.resync()
    finally:
        stop.set()
        writer.join(30)
    assert not writer.is_alive()
    assert pair.sender.drain(10)
    assert pair.sender.link == Link.CONNECTED
    assert result.differences >= 2
    assert differences(src, dst) == []


# ---- renames while the data phase runs (the namespace lock is released) ----------------


def at_first_compare(pair: Pair, application) -> list[bool]:
    """Run ``application`` in its own thread when the data phase first compares.

    The pass holds no ordering lock then (the thread would block otherwise),
    exactly where a real application's rename falls between the two phases.
    """
    request = pair.sender.request
    ran: list[bool] = []

    def hooked(frame, timeout):
        if frame.type.name == "SCAN" and json.loads(frame.payload)["hashes"] and not ran:
            ran.append(True)
            app = threading.Thread(target=application, name="test-app-renamer")
            app.start()
            app.join(10)
            assert not app.is_alive(), "the application blocked: the pass held a lock"
        return request(frame, timeout)

    pair.sender.request = hooked
    return ran


def away_with_changes(primary: Primary, pair: Pair, dst: Path) -> None:
    """d/f torn on the secondary (compared: only its own log knows), d/new created
    while the peer was away (sent whole, nothing compared)."""
    pair.connect()
    primary.do(ops.Mkdir("d", 0o755, 0, 0))
    primary.do(open_op(1, "d/f"))
    for i in range(32):
        primary.do(write_op(1, i * REGION, block(i)))
    primary.do(ops.Release(1))
    assert pair.sender.drain(5)
    forgotten(pair, set())
    crash_secondary(pair, dst, "d/f", 20 * REGION + 8192, b"torn", range(16, 32))
    pair.sender.mark_absent("peer lost")
    primary.do(open_op(2, "d/new"))
    primary.do(write_op(2, 0, b"created while away" * 1000))
    primary.do(ops.Release(2))


RENAMES = {
    "file": [ops.Rename("d/f", "d/g")],
    "file, then a new one under the old name": [
        ops.Rename("d/f", "d/f.old"),
        open_op(3, "d/f"),
        write_op(3, 0, b"a new file"),
        ops.Release(3),
    ],
    "parent directory": [ops.Rename("d", "e")],
    "twice, and linked": [
        ops.Rename("d/f", "d/g"),
        ops.Link("d/g", "d/h"),
        ops.Unlink("d/g"),
        ops.Rename("d", "e"),
    ],
}


@pytest.mark.parametrize("case", RENAMES)
def test_files_renamed_between_the_phases_are_sent_to_their_new_names(trees, case):
    primary, pair, src, dst = trees
    away_with_changes(primary, pair, dst)
    ran = at_first_compare(pair, lambda: [primary.do(op) for op in RENAMES[case]])
    primary.resync()
    assert ran
    assert pair.sender.drain(5)
    assert differences(src, dst) == []
    assert primary.verify() == []


def test_a_rename_in_a_pass_cut_short_is_left_to_the_next_pass(trees):
    primary, pair, src, dst = trees
    away_with_changes(primary, pair, dst)

    def application() -> None:
        primary.do(ops.Rename("d", "e"))
        primary.do(open_op(4, "other"))  # acknowledged after the rename, forgotten with it
        primary.do(ops.Release(4))
        pair.sender.mark_absent("peer lost")

    ran = at_first_compare(pair, application)
    with pytest.raises(PeerGone):
        primary.resync()
    assert ran
    forgotten_region(pair, "other")
    # the rename's regions outlive their acknowledgement: the next pass sees e/
    assert DirtyRegion(DIR, "e", ops.ENTRY) in pair.tracker1.recorded()
    primary.resync()
    assert differences(src, dst) == []


def forgotten_region(pair: Pair, path: str) -> None:
    """Wait (bounded) until the primary forgot the ENTRY of ``path``.

    Acknowledged after the rename, so due after it: the rename's regions
    are gone by then unless something keeps them.
    """
    entry = DirtyRegion(DIR, path, ops.ENTRY)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if entry not in pair.tracker1.recorded():
            return
        pair.tracker1.release(())  # wakes the commit thread
        threading.Event().wait(0.05)
    raise AssertionError(f"{path} still recorded after 10 s")
