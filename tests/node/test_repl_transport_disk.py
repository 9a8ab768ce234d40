"""A real full disk on the secondary: a 1 MiB tmpfs under the real Applier.

The secondary must go stale with a clear event on both sides, keep every
region the failed and later operations touched, and never leave a silent
gap: what the secondary lacks is exactly what the dirty logs name.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from node_service.replication import ops
from node_service.replication.dirty import DirtyRegion
from node_service.replication.sender import Link
from tests.unit.repl_pair import DIR, Pair, make_site, open_op, real_appliers, write_op

pytestmark = pytest.mark.node

MIB = 1024 * 1024


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    mnt = tmp_path / "secondary"
    mnt.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "rt-repl-full", str(mnt)],
        check=True,
        timeout=30,
    )
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, timeout=30)


@pytest.fixture
def pair(tmp_path, small_disk) -> Iterator[Pair]:
    root = make_site(tmp_path / "site")
    fd, appliers = real_appliers(small_disk)
    made = Pair(root, appliers=appliers)
    try:
        yield made
    finally:
        made.close()
        os.close(fd)


def test_disk_full_on_the_secondary_marks_it_stale_and_keeps_the_gap(pair, small_disk):
    pair.connect()
    r = pair.replicator
    r.wait(r.submit(open_op(1, "big")))
    chunk = b"\xab" * (128 * 1024)
    tickets = [r.submit(write_op(1, i * len(chunk), chunk)) for i in range(16)]  # 2 MiB
    for t in tickets:
        r.wait(t)
    assert pair.sender.wait_link(Link.STALE, 10)
    assert "No space left on device" in pair.sender.reason
    assert pair.receiver.wait_stale(5)
    assert "No space left on device" in pair.log2.stale
    # every region the secondary may lack is named by one side or the other
    written = (small_disk / "big").stat().st_size
    lacking = {
        DirtyRegion(DIR, "big", i) for i in range(written // (64 * 1024), 2 * MIB // (64 * 1024))
    }
    assert lacking <= pair.log1.regions() | pair.log2.regions()
    messages = [(node, sev) for node, sev, msg in pair.events if "No space left" in msg]
    assert ("n1", "error") in messages and ("n2", "error") in messages
    # the application kept going: later operations are recorded, not sent
    later = r.submit(ops.Chmod(0, "big", 0o600))
    assert later.seq == 0
