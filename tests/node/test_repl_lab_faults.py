"""Replication under faults on a real lab: disk full, secondary crash, split brain.

One lab and one module (``data``, replicating /srv/data) for the file; the
tests run in order and each leaves one PRIM and one up-to-date SECOND:

- disk full on the secondary (a 2 MiB tmpfs at /srv/data inside its host):
  the secondary goes stale with a clear event, and recovers by a resync;
- crash of the secondary while 64 KiB blocks are rewritten with fsync: after
  its boot the primary resends at most 1.2 x the bytes modified meanwhile
  (the resync's own counter);
- reintegration while the application keeps writing: final trees identical;
- split brain (the primary cut off, no witness, both serve and write, heal):
  the loser's diverging files land in a dated folder and an event says where;
- the primary's replication process killed: no hung mount, the SECOND takes
  over, and the old primary rejoins as an up-to-date SECOND.
"""

from __future__ import annotations

import os
import sys
import time

import pytest

from tests.node.repl_lab import DIR, MODULE, ReplSite, started_site

pytestmark = pytest.mark.node

BLOCK = 65536
BLOCKS = 160  # rewritten by the load; the secondary is crashed after the first ones
PACE_S = 0.01  # between two blocks, so the load outlasts the crash

PACED_BLOCKS = """
import os, sys, time
path, log, count, pace = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
with open(log, "a", buffering=1) as acked:
    for block in range(count):
        os.pwrite(fd, os.urandom(65536), block * 65536)
        os.fsync(fd)
        acked.write(f"{block}\\n")
        time.sleep(pace)
"""


@pytest.fixture(scope="module")
def site(fresh_lab, tmp_path_factory) -> ReplSite:
    workdir = tmp_path_factory.mktemp("repl-faults")
    os.chmod(workdir, 0o755)
    (workdir / "paced.py").write_text(PACED_BLOCKS)
    return started_site(fresh_lab, workdir)


def test_a_full_disk_on_the_secondary_marks_it_stale_with_a_clear_event(site):
    prim, sec = site.primary()
    site.r(sec, "stop", "-m", MODULE)
    site.sh(sec, f"mount -t tmpfs -o size=2m rampart-test-full {DIR}")
    try:
        site.r(sec, "start", "-m", MODULE)
        site.wait_uptodate(sec)
        site.sh(prim, f"head -c 4194304 /dev/urandom > {DIR}/too-big", check=False)
        entry = site.wait_journal(sec, r"stale: operation \d+ from .* No space left on device")
        assert entry["severity"] == "error"
        assert site.wait_status(sec, "stale")["uptodate"] is False
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not site.state(sec)["stale"]:
            time.sleep(0.2)
        assert site.state(sec)["stale"] is True
        assert site.state(prim)["replication"]["status"] == "stale"
    finally:
        site.sh(prim, f"rm -f {DIR}/too-big", check=False)
        site.r(sec, "stop", "-m", MODULE, check=False)
        site.sh(sec, f"umount {DIR}", check=False)
    site.r(sec, "start", "-m", MODULE)
    site.wait_uptodate(sec, timeout=60)
    assert site.verify(prim).returncode == 0


def test_a_crashed_secondary_gets_back_only_what_changed_meanwhile(site):
    prim, sec = site.primary()
    acked = site.workdir / "blocks-acked"
    load = site.background(prim, sys.executable, str(site.workdir / "paced.py"),
                           f"{DIR}/blocks", str(acked), str(BLOCKS), str(PACE_S))  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and _count(acked) < 10:
            time.sleep(0.02)
        site.lab_verb("crash", sec)
        before = _count(acked)
        load.wait(timeout=120)
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
    assert _count(acked) == BLOCKS
    modified = (BLOCKS - before) * BLOCK
    site.lab_verb("boot", sec)
    site.wait_uptodate(sec, timeout=60)
    last = site.repl_status(prim)["last_resync"]
    assert not last["full"], last  # a crashed secondary's history is known: no full sync
    metadata = 4096
    assert last["bytes_resent"] <= 1.2 * modified + metadata, (last, modified)
    assert last["bytes_resent"] >= modified * 0.9, (last, modified)
    assert site.verify(prim).returncode == 0


def test_reintegration_while_the_application_writes_ends_with_identical_trees(site):
    prim, sec = site.primary()
    acked = site.workdir / "continuous-acked"
    writer = site.background(prim, sys.executable, str(site.writer), f"{DIR}/continuous",
                             str(acked), "10")  # fmt: skip
    try:
        site.lab_verb("crash", sec)
        site.wait(prim, "ALONE")
        site.lab_verb("boot", sec)
        site.wait_uptodate(sec, timeout=60)
        assert writer.poll() is None, "the writer must still run while the secondary rejoins"
        writer.wait(timeout=60)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert _count(acked) > 100
    deadline = time.monotonic() + 30
    result = site.verify(prim)
    while time.monotonic() < deadline and result.returncode != 0:
        time.sleep(0.5)
        result = site.verify(prim)
    assert result.returncode == 0, result.stdout


def test_split_brain_keeps_the_losers_diverging_files(site):
    prim, sec = site.primary()
    site.lab_verb("cut", prim)
    try:
        site.wait(sec, "ALONE")
        site.wait(prim, "ALONE")
        site.sh(prim, f"echo winner > {DIR}/kept-side")
        site.sh(sec, f"echo loser > {DIR}/lost-side; echo changed > {DIR}/f2")
    finally:
        site.lab_verb("heal", prim)
    # The primary kept serving (KEPT ranks above TAKEOVER): it wins.
    site.wait(prim, "PRIM", timeout=60)
    site.wait_uptodate(sec, timeout=60)
    entry = site.wait_journal(sec, r"diverging file\(s\) of data preserved in")
    folder = entry["message"].split(" preserved in ")[1].split(" before")[0]
    assert "/state/split-brain/" in folder
    assert site.sh(sec, f"cat {folder}{DIR}/lost-side").stdout == "loser\n"
    assert site.sh(sec, f"cat {folder}{DIR}/f2").stdout == "changed\n"
    assert site.sh(sec, f"ls {DIR}").stdout.split().count("lost-side") == 0
    assert site.sh(sec, f"cat {DIR}/kept-side").stdout == "winner\n"
    assert site.verify(prim).returncode == 0


def test_a_killed_replication_process_fails_over_without_a_hung_mount(site):
    prim, sec = site.primary()
    site.sh(prim, f"echo before > {DIR}/before-kill")
    # [n]: the pattern must not match the pgrep command line itself
    pattern = f"[n]ode_service.replication.process .*--node {prim} "
    pids = site.sh(prim, f"pgrep -f '{pattern}'").stdout.split()
    assert len(pids) == 1, pids
    site.sh(prim, f"kill -KILL {pids[0]}")
    entry = site.wait_journal(prim, r"replication process of data exited unexpectedly")
    assert "no mount left behind" in entry["message"]
    site.wait(sec, "PRIM", timeout=60)
    # the mount point answers at once (a hung FUSE mount would block here)
    listing = site.sh(prim, f"timeout 5 ls {DIR}", check=False)
    assert listing.returncode == 0, listing.stderr
    site.wait_uptodate(prim, timeout=60)
    assert site.sh(prim, f"cat {DIR}/before-kill").stdout == "before\n"
    assert site.verify(sec).returncode == 0


def _count(path) -> int:
    try:
        return path.read_text().count("\n")
    except FileNotFoundError:
        return 0
