"""The secondary's applier on its own: safety, errors, replay after a crash."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator

import pytest

from node_service.replication.applier import Applier, DirCache, LoopbackReplicator
from node_service.replication.ops import (
    Chmod,
    Link,
    Mkdir,
    Open,
    Release,
    Rename,
    ReplicationUnavailable,
    Rmdir,
    SecondaryApplyError,
    Stamp,
    Symlink,
    Truncate,
    UnknownHandleError,
    Unlink,
    Write,
    regions,
)
from tests.unit.test_repl_fs_direct import snapshot_tree


@pytest.fixture
def tree(tmp_path) -> Iterator[tuple[str, Applier]]:
    root = tmp_path / "secondary"
    root.mkdir()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    applier = Applier(fd)
    try:
        yield str(root), applier
    finally:
        applier.close()
        os.close(fd)


CREATE = os.O_WRONLY | os.O_CREAT


def history() -> list:
    """A short history touching every kind of namespace operation."""
    return [
        Mkdir("d", 0o750, 0, 0, (Stamp("", 10), Stamp("d", 11))),
        Open(1, "d/f", CREATE, 0o640, 7, 8, True, (Stamp("d", 12), Stamp("d/f", 12))),
        Write(1, 0, 13, b"payload"),
        Truncate(1, "", 4, 14),
        Release(1),
        Symlink("d/l", "f", 0, 0, (Stamp("d", 15), Stamp("d/l", 15))),
        Link("d/f", "hard", (Stamp("", 16),)),
        Rename("hard", "d/g", (Stamp("", 17), Stamp("d", 17))),
        Mkdir("tmp", 0o700, 0, 0, (Stamp("", 18), Stamp("tmp", 18))),
        Rmdir("tmp", (Stamp("", 19),)),
        Unlink("d/l", (Stamp("d", 20),)),
        Chmod(0, "d/f", 0o600),
    ]


def test_replaying_a_history_raises_nothing_and_differs_only_in_dirty_regions(tree):
    """Replay after a crash: per-op idempotence, and regions() covers what is not.

    Replaying Link(d/f, hard) after the later Rename(hard, d/g) brings 'hard'
    back: a namespace sequence is not idempotent. Every such difference must
    lie in a region the history dirtied, which resync compares with the primary.
    """
    root, applier = tree
    for op in history():
        applier.apply(op)
    first = snapshot_tree(root)
    assert first["d/f"][0] == stat.S_IFREG | 0o600
    assert first["d/f"][1:3] == (7, 8)
    assert first["d/g"][5] == 2, "the hard link survived its rename"
    replayer = Applier(applier.root_fd, replay=True)
    try:
        for op in history():
            replayer.apply(op)
    finally:
        replayer.close()
    again = snapshot_tree(root)
    differing = {p for p in set(first) | set(again) if first.get(p) != again.get(p)}
    assert differing == {"hard", "d/f", "d/g"}  # the link count and the revived name
    handles = {1: "d/f"}
    dirty = {r.path for op in history() for r in regions(op, handles.get)}
    assert differing <= dirty


def test_strict_mode_reports_a_namespace_divergence(tree):
    _root, applier = tree
    applier.apply(Mkdir("d", 0o755, 0, 0))
    with pytest.raises(SecondaryApplyError) as info:
        applier.apply(Mkdir("d", 0o755, 0, 0))
    assert info.value.errno == errno.EEXIST
    assert "secondary could not apply Mkdir(path='d'" in str(info.value)
    with pytest.raises(SecondaryApplyError) as info:
        applier.apply(Unlink("missing"))
    assert info.value.errno == errno.ENOENT


def test_a_write_to_an_unknown_handle_asks_for_a_resync(tree):
    _root, applier = tree
    with pytest.raises(UnknownHandleError, match=r"no open handle 42.*resync needed"):
        applier.apply(Write(42, 0, 0, b"x"))


def test_symlinks_in_the_tree_never_lead_the_applier_outside(tree, tmp_path):
    root, applier = tree
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, os.path.join(root, "escape"))
    os.symlink(outside / "file", os.path.join(root, "leaf"))
    attempts = [
        Mkdir("escape/x", 0o755, 0, 0),
        Open(1, "escape/f", CREATE, 0o644, 0, 0, True),
        Open(2, "leaf", CREATE, 0o644, 0, 0, True),
        Truncate(0, "leaf", 0, 0),
        Rename("escape/a", "b"),
    ]
    for op in attempts:
        with pytest.raises(SecondaryApplyError) as info:
            applier.apply(op)
        assert info.value.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT)
    assert list(outside.iterdir()) == []
    assert applier.open_handles == 0


def test_kept_directory_descriptors_follow_renames_and_removals(tree):
    root, applier = tree
    for op in [
        Mkdir("a", 0o755, 0, 0),
        Mkdir("a/b", 0o755, 0, 0),
        Open(1, "a/b/f", CREATE, 0o644, 0, 0, True),  # a and a/b are kept now
        Release(1),
        Rename("a", "moved"),
        Mkdir("a", 0o755, 0, 0),  # a new directory under the old name
        Mkdir("a/b", 0o755, 0, 0),
        Open(2, "a/b/g", CREATE, 0o644, 0, 0, True),
        Release(2),
        Open(3, "moved/b/h", CREATE, 0o644, 0, 0, True),
        Release(3),
        Unlink("a/b/g", ()),
        Rmdir("a/b", ()),
        Mkdir("a/b", 0o700, 0, 0),  # and once more after a removal
        Open(4, "a/b/i", CREATE, 0o644, 0, 0, True),
        Release(4),
    ]:
        applier.apply(op)
    found = sorted(
        os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs
    )
    assert found == ["a/b/i", "moved/b/f", "moved/b/h"]
    assert stat.S_IMODE(os.stat(os.path.join(root, "a/b")).st_mode) == 0o700


def test_the_directory_cache_keeps_a_bounded_number_of_descriptors(tmp_path):
    for n in range(4):
        (tmp_path / f"d{n}" / "sub").mkdir(parents=True)
    root = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    before = len(os.listdir("/proc/self/fd"))
    cache = DirCache(root, size=2)
    try:
        # every descriptor handed out stays open until trim (one op may hold two)
        held = [cache.get(f"d{n}/sub") for n in range(4)]
        assert len(set(held)) == 4
        for n, fd in enumerate(held):
            assert os.path.samestat(os.fstat(fd), os.stat(tmp_path / f"d{n}" / "sub"))
        cache.trim()
        assert len(os.listdir("/proc/self/fd")) - before <= 2
        assert os.path.samestat(os.fstat(cache.get("d3/sub")), os.stat(tmp_path / "d3/sub"))
        cache.forget("d3")
        assert len(os.listdir("/proc/self/fd")) - before <= 1
    finally:
        cache.close()
        assert len(os.listdir("/proc/self/fd")) == before
        os.close(root)


def test_chmod_of_a_symlink_leaves_its_target_alone(tree, tmp_path):
    root, applier = tree
    target = tmp_path / "target"
    target.write_bytes(b"")
    os.chmod(target, 0o644)
    os.symlink(target, os.path.join(root, "l"))
    applier.apply(Chmod(0, "l", 0o777))
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o644


def test_loopback_becomes_stale_after_an_apply_error_and_says_why(tmp_path):
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with LoopbackReplicator(fd) as loop:
            ticket = loop.submit(Unlink("missing"))
            with pytest.raises(ReplicationUnavailable, match=r"stale.*Unlink"):
                loop.wait(ticket)
            assert loop.error is not None and loop.error.errno == errno.ENOENT
            with pytest.raises(ReplicationUnavailable):
                loop.submit(Mkdir("d", 0o755, 0, 0))
        assert not (tmp_path / "d").exists()
    finally:
        os.close(fd)


def test_inline_loopback_applies_before_submit_returns(tmp_path):
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with LoopbackReplicator(fd, threaded=False) as loop:
            loop.wait(loop.submit(Mkdir("now", 0o755, 0, 0)))
            assert (tmp_path / "now").is_dir()
    finally:
        os.close(fd)
