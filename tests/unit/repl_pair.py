"""A primary/secondary replication pair over real mutual TLS on 127.0.0.1 (test helper).

Both sides run in this process, each with its own site files issued by one
site CA, its own dirty log and its own threads; only the appliers may be
fakes (``GatedApplier``) so a test can hold the secondary at will.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from node_service.cluster import pki
from node_service.replication import ops, verify
from node_service.replication.applier import Applier
from node_service.replication.dirty import DirtyLog, DirtyTracker
from node_service.replication.receiver import Receiver
from node_service.replication.sender import Sender
from node_service.replication.transport import Endpoint, ReplicationServer

MODULE = "web"
DIR = "/srv/web"
GATE_TIMEOUT_S = 20.0


def make_site(root: Path) -> Path:
    """Site ``root/site`` with nodes n1, n2, n3; a foreign site ``root/other`` with n1."""
    pki.create_site(root / "site")
    for node in ("n1", "n2", "n3"):
        pki.issue_node(root / "site", node, root / node)
    pki.create_site(root / "other")
    pki.issue_node(root / "other", "n1", root / "other-n1")
    return root


class GatedApplier:
    """Records what it applies; can be held on a gate or made to fail like a full disk."""

    def __init__(self, gate: threading.Event | None = None, fail_at: int | None = None):
        self.gate = gate
        self.fail_at = fail_at
        self.applied: list[ops.Op] = []
        self.entered = threading.Event()
        self.closed = False

    def apply(self, op: ops.Op) -> None:
        self.entered.set()
        if self.gate is not None and not self.gate.wait(GATE_TIMEOUT_S):
            raise ops.SecondaryApplyError(op, errno.ETIMEDOUT, "test gate never opened")
        if self.fail_at is not None and len(self.applied) + 1 >= self.fail_at:
            raise ops.SecondaryApplyError(
                op,
                errno.ENOSPC,
                f"secondary could not apply {ops.describe(op)}: {os.strerror(errno.ENOSPC)}",
            )
        self.applied.append(op)

    def close(self) -> None:
        self.closed = True


@dataclass
class Pair:
    root: Path
    mode: str = "sync"
    timeout: float = 2.0
    max_lag_bytes: int = 64 * 1024 * 1024
    appliers: object = None  # callable returning a list of appliers; default GatedApplier()
    events: list[tuple[str, str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.applier = GatedApplier()
        if self.appliers is None:
            self.appliers = lambda: [self.applier]
        self.log2 = DirtyLog(self.root / "n2-state" / "dirty.sqlite")
        self.tracker2 = DirtyTracker(self.log2, name="n2", clear_delay=0.05)
        self.receiver = Receiver(
            module=MODULE,
            node="n2",
            peer="n1",
            dirs=(DIR,),
            tracker=self.tracker2,
            dirty_log=self.log2,
            appliers=self.appliers,
            timeout=self.timeout,
            on_event=lambda sev, msg: self.events.append(("n2", sev, msg)),
        )
        self.server = ReplicationServer(
            ("127.0.0.1", 0), pki.tls_context(self.root / "n2", server=True), node="n2"
        ).start()
        self.server.serve(Endpoint(MODULE, "n1", self.receiver.accept))
        self.log1 = DirtyLog(self.root / "n1-state" / "dirty.sqlite")
        self.tracker1 = DirtyTracker(self.log1, name="n1", clear_delay=0.05)
        self.sender = Sender(
            module=MODULE,
            node="n1",
            peer="n2",
            dirs=(DIR,),
            tracker=self.tracker1,
            mode=self.mode,
            timeout=self.timeout,
            max_lag_bytes=self.max_lag_bytes,
            on_event=lambda sev, msg: self.events.append(("n1", sev, msg)),
        )
        self.replicator = self.sender.replicator(DIR)

    def connect(self, site_dir: str = "n1", **kw) -> None:
        ctx = pki.tls_context(self.root / site_dir, server=False)
        self.sender.connect(tuple(self.server.address), ctx, **kw)

    def close(self) -> None:
        self.sender.close()
        self.receiver.close()
        self.server.close()
        self.tracker1.close()
        self.tracker2.close()
        self.log1.close()
        self.log2.close()


def open_op(handle: int = 1, path: str = "f") -> ops.Open:
    return ops.Open(handle, path, os.O_WRONLY | os.O_CREAT, 0o644, 0, 0, True)


def write_op(handle: int, offset: int, data: bytes) -> ops.Write:
    return ops.Write(handle, offset, 1_700_000_000_000_000_000, data)


def real_appliers(dest: Path):
    """A factory of real Appliers on ``dest`` (a new handle table per connection)."""
    fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    return fd, lambda: [Applier(fd)]


@contextmanager
def pairs(site: Path, tmp_path: Path) -> Iterator[Callable[..., Pair]]:
    """A factory of pairs sharing one site's secrets; every pair made is closed at the end."""
    made: list[Pair] = []

    def make(**kw) -> Pair:
        root = tmp_path / f"pair{len(made)}"
        root.mkdir()
        for name in ("n1", "n2", "n3", "other-n1"):
            (root / name).symlink_to(site / name)
        pair = Pair(root, **kw)
        made.append(pair)
        return pair

    try:
        yield make
    finally:
        for pair in made:
            pair.close()


@contextmanager
def mirrored_over_fuse(tmp_path: Path, name: str) -> Iterator[tuple[Pair, Path, Path, object]]:
    """A connected pair with the real FUSE layer over ``primary`` and a read-only ``secondary``.

    Yields (pair, primary dir, secondary dir, the ReplicatedMount); needs root and FUSE.
    """
    from node_service.replication.mount import mount_replicated, protect_readonly

    root = make_site(tmp_path / "site")
    src, dst = tmp_path / "primary", tmp_path / "secondary"
    src.mkdir()
    dst.mkdir()
    with protect_readonly(str(dst)) as view:
        pair = Pair(root, appliers=lambda: [Applier(view.fd)], timeout=2.0)
        try:
            pair.connect()
            with mount_replicated(str(src), pair.replicator, name=name) as mount:
                yield pair, src, dst, mount
        finally:
            pair.close()


def identical(primary_fd: int, dst: Path) -> list[str]:
    """What differs between the primary's real tree (its descriptor) and ``dst`` ([] if nothing)."""
    fd = os.open(dst, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return verify.report(verify.diff(verify.scan(primary_fd), verify.scan(fd)), verify.DIR)
    finally:
        os.close(fd)
