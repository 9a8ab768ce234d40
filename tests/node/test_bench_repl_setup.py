"""The replication benchmark's setup comes up for real and leaves nothing behind.

Two network namespaces joined by a veth pair, site secrets, a secondary
process under its read-only view, a primary process with the FUSE layer
mounted, mutual TLS between them, a delayed link (netem, or the relay on a
kernel without it), then teardown: no namespace, mount, process or scratch
directory left, even when the body raised.
"""

from __future__ import annotations

import errno
import secrets
import subprocess
from pathlib import Path

import pytest

from bench.repl_setup import Pair, replicated_pair
from bench.replication import block

pytestmark = pytest.mark.node


def namespaces() -> str:
    return subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, timeout=30
    ).stdout


def mounted(path: Path, pid: str = "self") -> bool:
    with open(f"/proc/{pid}/mountinfo") as table:
        return any(line.split()[4] == str(path) for line in table)


def gone(pair: Pair, pids: list[int]) -> None:
    assert pair.primary_ns not in namespaces() and pair.secondary_ns not in namespaces()
    assert not mounted(pair.secondary_dir)
    assert not pair.root.exists()
    for pid in pids:  # stopped and reaped, not merely asked to stop
        assert not Path(f"/proc/{pid}").exists()


def test_the_pair_replicates_over_tls_between_namespaces_and_tears_down(tmp_path):
    tag = "rt-rb" + secrets.token_hex(2)
    with replicated_pair(tag, scratch=str(tmp_path)) as pair:
        assert pair.primary_ns == f"{tag}p" and pair.primary_ns in namespaces()
        primary = pair.start_primary("sync")
        assert primary.ready["link"] == "connected"
        # the FUSE layer is mounted in the primary's own mount namespace, not the machine's
        assert mounted(pair.primary_dir, str(primary.pid)) and not mounted(pair.primary_dir)
        assert mounted(pair.secondary_dir)

        written = pair.work("sequential", path=pair.primary_dir / "db", total=1000)
        assert written.amount == 1000
        # sync mode: on the secondary when the call returned
        assert (pair.secondary_dir / "db").read_bytes() == block(0, 1000)
        with pytest.raises(OSError) as refused:
            (pair.secondary_dir / "local").write_bytes(b"no")
        assert refused.value.errno == errno.EROFS
        assert 10_000 < primary.memory_kib("VmRSS") <= primary.memory_kib("VmHWM")

        pair.start_primary("semi", delayed=True)
        how = pair.set_rtt(20)
        assert "netem" in how or "relay" in how
        # one data op and one fsync, each a round trip of >= 20 ms
        far = pair.work("fsync_4k", path=pair.primary_dir / "far", seconds=30.0, max_ops=1)
        assert far.amount == 1 and far.seconds >= 0.035
        assert (pair.secondary_dir / "far").stat().st_size == 4096
        pair.set_rtt(0)
        near = pair.work("fsync_4k", path=pair.primary_dir / "near", seconds=30.0, max_ops=1)
        assert near.seconds < 0.035
        pids = [c.pid for c in (pair.primary, pair.worker, pair.secondary, pair.relay) if c]
    gone(pair, pids)


def test_teardown_happens_even_when_the_benchmark_fails(tmp_path):
    tag = "rt-rb" + secrets.token_hex(2)
    with (
        pytest.raises(RuntimeError, match="benchmark broke"),
        replicated_pair(tag, scratch=str(tmp_path)) as pair,
    ):
        pair.start_primary("async")
        pids = [pair.primary.pid, pair.secondary.pid]
        raise RuntimeError("benchmark broke")
    gone(pair, pids)


def loop_devices_of(image: str) -> str:
    return subprocess.run(
        ["losetup", "--associated", image], capture_output=True, text=True, timeout=30
    ).stdout


def test_the_secondary_on_its_own_device_replicates_and_leaves_nothing_behind(tmp_path):
    tag = "rt-rb" + secrets.token_hex(2)
    image = f"/dev/shm/{tag}.img"
    with replicated_pair(tag, scratch=str(tmp_path), own_device=512 * 1024 * 1024) as pair:
        # the secondary's tree and dirty log are on an ext4 of their own
        assert mounted(pair.secondary_dir.parent)
        assert pair.secondary_dir.stat().st_dev != pair.primary_dir.stat().st_dev
        assert pair.secondary_state.stat().st_dev == pair.secondary_dir.stat().st_dev
        assert (pair.secondary_state / "dirty.sqlite").exists()
        assert "/dev/loop" in loop_devices_of(image)
        primary = pair.start_primary("sync")
        written = pair.work("fsync_4k", path=pair.primary_dir / "log", seconds=30.0, max_ops=20)
        assert written.amount == 20
        assert (pair.secondary_dir / "log").stat().st_size == 20 * 4096
        with pytest.raises(OSError) as refused:
            (pair.secondary_dir / "local").write_bytes(b"no")
        assert refused.value.errno == errno.EROFS
        home = pair.secondary_dir.parent
        pids = [primary.pid, pair.worker.pid, pair.secondary.pid]
    gone(pair, pids)
    assert not mounted(home)
    assert not Path(image).exists() and loop_devices_of(image) == ""
