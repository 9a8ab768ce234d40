"""The primary's side of replication: operations out, acknowledgements in.

The FUSE layer calls ``submit(op)`` under its ordering locks and ``wait``
outside them (the ``ops.Replicator`` protocol, one ``DirReplicator`` per
replicated directory). ``submit`` is cheap: it numbers the operation, notes
its dirty regions (the commit is grouped and done by the tracker's thread)
and queues the frame. Frames leave as soon as their region records are
durable, many in flight at once, sent by the waiting application thread
itself or by a writer thread; cumulative acknowledgements are read by a
waiting application thread or by a reader thread, which wakes every waiter
up to that sequence (who does what: sender_stream.py).

Modes: ``sync`` waits for ACK_WRITTEN (the secondary applied it; an Fsync
was fsynced there), ``semi`` for ACK_RECEIVED, ``async`` only for the region
record; the bytes not yet written on the secondary (the lag) are bounded in
every mode, so a slow peer makes ``submit`` wait rather than memory grow.

When the peer is slow or gone (no acknowledgement within the module's
heartbeat timeout, connection lost) the link goes ABSENT: every waiter is
released at once, the regions of everything unacknowledged stay recorded,
and later operations are only recorded. An ERROR frame makes the link STALE
the same way. The application never waits on a missing peer for longer
than the timeout, and never loses an acknowledged write: it is on the
primary's disk and its region is in the dirty log for the next resync.
"""

from __future__ import annotations

import collections
import logging
import os
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import replace

from node_service.errors import RetryableError
from node_service.replication import frames, ops
from node_service.replication.dirty import (
    PRIMARY_ROLE,
    DirtyTracker,
    dirty_regions,
    opening_ahead,
)
from node_service.replication.frames import Frame, FrameType
from node_service.replication.link import (
    Link,
    Mode,
    Releases,
    SenderStats,
    Ticket,
    parse_mode,
    rate,
    replication_status,
    state_fields,
)
from node_service.replication.sender_stream import QueueItem, SenderStream
from node_service.replication.transport import Channel, PeerGone, connect

log = logging.getLogger("rampart.replication.sender")

# the link vocabulary is defined in link.py; re-exported for callers of the sender
__all__ = [
    "DirReplicator",
    "Link",
    "Mode",
    "Sender",
    "SenderStats",
    "Ticket",
    "replication_status",
    "state_fields",
]

DEFAULT_MAX_LAG_BYTES = 64 * 1024 * 1024

EventSink = Callable[[str, str], None]  # (severity, message)


class Sender(SenderStream):
    """One module's replication stream to its secondary."""

    def __init__(
        self,
        *,
        module: str,
        node: str,
        peer: str,
        dirs: tuple[str, ...],
        tracker: DirtyTracker,
        mode: Mode | str = Mode.SYNC,
        timeout: float = 3.0,
        max_lag_bytes: int = DEFAULT_MAX_LAG_BYTES,
        on_event: EventSink | None = None,
    ):
        self.module = module
        self.node = node
        self.peer = peer
        self.dirs = dirs
        self.tracker = tracker
        tracker.set_role(PRIMARY_ROLE)
        self.mode = parse_mode(mode) if isinstance(mode, str) else mode
        self.timeout = timeout
        self.max_lag_bytes = max_lag_bytes
        self._on_event = on_event or (lambda severity, message: None)
        lock = threading.RLock()
        self._cond = threading.Condition(lock)
        # The acks thread sleeps here while application threads read their own
        # acknowledgements; a separate condition, so the many notify_all of
        # _cond (every submit, every ack) do not wake it.
        self._aside = threading.Condition(lock)
        # The send thread sleeps here: woken only for frames no waiting
        # application thread will send itself (async, Release, resync, requests).
        self._tx = threading.Condition(lock)
        self._reader: str | None = None  # who reads the channel now: "acks" or "waiter"
        self._waiters = 0  # application threads in wait() for an acknowledgement
        self._paths = [ops.HandlePaths() for _ in dirs]
        # A resync pass follows its planned files through the application's
        # renames: called (index, op) for each Rename/Link/Unlink in op order.
        self.watch: Callable[[int, ops.Op], None] | None = None
        self._opens: dict[tuple[int, int], ops.Open] = {}
        self._orphans: set[tuple[int, int]] = set()
        self._pending: dict[tuple[int, int], ops.Open] = {}
        self._missed: collections.defaultdict[int, set] = collections.defaultdict(set)
        self._link = Link.IDLE
        self._reason = "not connected yet"
        self.peer_history_known = False
        self._channel: Channel | None = None
        self._seq = 0
        self._received = 0
        self._written = 0
        # (frame type, seq, record epoch, payload) in the order they must leave
        self._queue: collections.deque[QueueItem] = collections.deque()
        # Whoever pops frames off the queue holds this token until they are
        # sent: the writer thread, or a waiting application thread that sends
        # its own frame (the common case of one writer: no thread hand-off).
        self._sending = False
        self._requests = 0
        self._replies: dict[int, list[bytes]] = {}
        self._answered: set[int] = set()
        self._inflight: collections.OrderedDict[int, tuple[tuple, int]] = collections.OrderedDict()
        self._lag_bytes = 0
        self._last_rx = time.monotonic()
        self._ops = self._bytes_sent = self._acks = self._resent = self._acked_bytes = 0
        self._samples: collections.deque[tuple[float, int]] = collections.deque(maxlen=256)
        self._threads: list[threading.Thread] = []
        self._releases = Releases(tracker.release)

    # ---- connection --------------------------------------------------------

    def connect(
        self,
        address: tuple[str, int],
        ctx: ssl.SSLContext,
        generation: int = 0,
        *,
        resync: bool = False,
    ) -> None:
        """Open the stream; on failure the link is ABSENT and PeerGone says why.

        A secondary that says it is stale gets nothing but a resync
        (``resync=True``): the link goes STALE and operations are only recorded.
        """
        self.attach(self.dial(address, ctx, generation), resync=resync)

    def dial(
        self, address: tuple[str, int], ctx: ssl.SSLContext, generation: int = 0
    ) -> tuple[Channel, frames.Welcome]:
        """TCP, TLS, HELLO and WELCOME, holding no lock of ours or of the FUSE layer.

        A dead peer costs up to the timeout here, so callers dial before they
        take the namespace lock and ``attach`` the result under it.
        """
        try:
            channel = connect(address, ctx, self.peer, self.timeout)
            try:
                channel.send_frame(frames.hello(self.module, self.node, generation, str(self.mode)))
                reply = channel.read_frame(self.timeout)
                if reply.type == FrameType.ERROR:
                    raise PeerGone(f"{self.peer} refused: {frames.parse_error(reply).message}")
                welcome = frames.parse_welcome(reply)
                if (welcome.module, welcome.node) != (self.module, self.peer):
                    raise PeerGone(f"{self.peer} answered as {welcome.node}/{welcome.module}")
            except BaseException:
                channel.close()
                raise
        except RetryableError as exc:
            self._go(Link.ABSENT, f"cannot connect to {self.peer}: {exc}")
            raise PeerGone(str(exc)) from None
        return channel, welcome

    def attach(self, dialed: tuple[Channel, frames.Welcome], *, resync: bool = False) -> None:
        """Make a dialed connection the stream: quick, never waits on the network."""
        channel, welcome = dialed
        if welcome.stale and not resync:
            channel.close()
            self._go(Link.STALE, f"{self.peer} is stale and needs a resync")
            return
        with self._cond:
            if self._link == Link.CLOSED:
                channel.close()
                raise PeerGone(f"replication of {self.module} is stopped")
            if self._link == Link.CONNECTED:
                # what the old connection had in flight stays dirty, never "acked"
                self._go_locked(Link.ABSENT, "connection replaced")
            self._threads = [t for t in self._threads if t.is_alive()]
            self.peer_history_known = welcome.history
            self._channel = channel
            self._link = Link.CONNECTED
            self._reason = f"connected to {self.peer}" + (" (peer stale)" if welcome.stale else "")
            self._last_rx = time.monotonic()
            self._received = self._written = self._seq
            if resync:
                # First, so a stale secondary applies everything that follows.
                self._queue.append((FrameType.RESYNC_BEGIN, self._seq, 0, b""))
            # Under the same lock hold as CONNECTED: no application operation
            # can slip in front of the re-opens it depends on.
            self._reopen_handles(defer=resync)
            self._tx.notify()
        for target, role in ((self._write_loop, "send"), (self._read_loop, "acks")):
            thread = threading.Thread(
                target=target, args=(channel,), name=f"repl-tx-{role}-{self.module}", daemon=True
            )
            self._threads.append(thread)
            thread.start()
        self._on_event("info", f"replication of {self.module} to {self.peer} connected")

    def _reopen_handles(self, *, defer: bool) -> None:
        # The secondary's handle table starts empty on every connection: files
        # the application still holds open are opened again there first. A
        # handle whose file was unlinked has no name to open: its operations
        # are dropped until it is released (they dirty no region either).
        # Before a resync the file may not exist there yet: the re-opens wait
        # for reopen_pending(), and operations on those handles are recorded
        # as missed regions for the resync to send.
        self._orphans.clear()
        self._pending.clear()
        self._missed.clear()
        for (index, handle), op in list(self._opens.items()):
            path = self._paths[index](handle)
            if path is None:
                self._orphans.add((index, handle))
            elif defer:
                self._pending[(index, handle)] = op
            else:
                self._reopen(index, op, path)

    def _reopen(self, index: int, op: ops.Open, path: str) -> None:
        flags = op.flags & ~(os.O_TRUNC | os.O_CREAT | os.O_EXCL)
        self.submit(index, replace(op, path=path, flags=flags, created=False, stamps=()))

    def reopen_pending(self) -> dict[int, set]:
        """Re-open the deferred handles now; return the regions they missed, per dir.

        Called by the resync once every file exists on the secondary, while it
        holds the namespace ordering lock.
        """
        with self._cond:
            pending, self._pending = self._pending, {}
            for (index, handle), op in pending.items():
                path = self._paths[index](handle)
                if path is None:
                    self._orphans.add((index, handle))
                else:
                    self._reopen(index, op, path)
            missed, self._missed = self._missed, collections.defaultdict(set)
            self._tx.notify()
            return dict(missed)

    # ---- the Replicator side -----------------------------------------------

    def replicator(self, dir: str) -> DirReplicator:
        return DirReplicator(self, self.dirs.index(dir))

    def submit(
        self, index: int, op: ops.Op, *, resync: bool = False, payload: bytearray | None = None
    ) -> Ticket:
        # payload: op's frame payload built by the caller (resync_pieces: a
        # resync piece read straight into it, no copy here)
        if payload is None:
            # the frame's payload in one join: a large write's data copied once
            payload = ops.encode(op, frames.dir_prefix(index))  # type: ignore[assignment]
        size = len(payload) - 2
        with self._cond:
            if self._link == Link.CONNECTED and self._lag_bytes + size > self.max_lag_bytes:
                self._wait_for_room(size)
            paths = self._paths[index]
            regions = dirty_regions(self.dirs[index], ops.regions(op, paths))
            paths.follow(op)
            if self.watch is not None and not resync and isinstance(op, NAMES):
                self.watch(index, op)
            self._follow_opens(index, op)
            epoch = self.tracker.add(regions, opening_ahead(self.dirs[index], op))
            key = (index, getattr(op, "handle", 0))
            orphan, pending = key in self._orphans, key in self._pending
            if isinstance(op, ops.Release):
                self._orphans.discard(key)
                self._pending.pop(key, None)
            if pending:
                self._missed[index].update(regions)
            if self._link != Link.CONNECTED or orphan or pending:
                self.tracker.keep(regions)
                return Ticket(0, epoch)
            self._seq += 1
            seq = self._seq
            self._inflight[seq] = (regions, size)
            self._queue.append((FrameType.OP, seq, epoch, payload))  # type: ignore[arg-type]
            self._lag_bytes += size
            self._ops += 1
            if resync:
                self._resent += size
            if self.mode == Mode.ASYNC or resync:
                # nobody waits for it at once: the send thread sends it. In
                # sync and semi mode no record wakes it: an Fsync is pushed by
                # the FUSE thread before its local fsync (push) and waited for
                # after it; a Release (nobody waits for a close) leaves with the
                # next frame anyone sends, a small file's close with the next
                # file's create, or at the send thread's next periodic wake.
                self._tx.notify()
            return Ticket(seq, epoch)

    def push(self, ticket: Ticket) -> None:
        """Send ``ticket``'s frame now from this thread if nobody is sending; no waiting.

        The FUSE layer pushes an Fsync before its local fsync, so both sides'
        fsyncs overlap without a hand-off to the send thread.
        """
        if ticket.seq and self.mode != Mode.ASYNC:
            self._send_own(ticket.seq)  # after the region records, as always (_send_batch)

    def wait(self, ticket: Ticket) -> None:
        # The application is never told "done" before the region record is durable.
        self.tracker.wait_durable(ticket.epoch, max(self.timeout, 30.0))
        if ticket.seq == 0 or self.mode == Mode.ASYNC:
            return
        self._send_own(ticket.seq)
        self._await_ack(ticket.seq)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until everything sent is written on the peer (or the link is down)."""
        with self._cond:
            self._tx.notify()
            self._wake_reader()
            return self._cond.wait_for(
                lambda: self._written >= self._seq or self._link != Link.CONNECTED,
                timeout if timeout is not None else self.timeout,
            )

    # ---- requests for resync and verify ---------------------------------------

    def request(self, frame: Frame, timeout: float) -> list[bytes]:
        """Send a DIRTY_REQUEST, SCAN or RESYNC_END in operation order; return the reply chunks.

        The frame's seq is replaced by a request id. Raises PeerGone when the
        link drops or no complete answer arrives within ``timeout``.
        """
        with self._cond:
            if self._link != Link.CONNECTED:
                raise PeerGone(f"{self.peer} is {self._link}: {self._reason}")
            self._requests += 1
            rid = self._requests
            self._replies[rid] = []
            self._queue.append((frame.type, rid, 0, frame.payload))
            self._tx.notify()
            self._wake_reader()
            try:
                self._cond.wait_for(
                    lambda: rid in self._answered or self._link != Link.CONNECTED, timeout
                )
                if rid not in self._answered:
                    if self._link != Link.CONNECTED:
                        raise PeerGone(f"{frame.type.name} to {self.peer} lost: {self._reason}")
                    raise PeerGone(f"{frame.type.name} to {self.peer} unanswered in {timeout:.0f}s")
                return self._replies[rid]
            finally:
                self._replies.pop(rid, None)
                self._answered.discard(rid)

    def settle_if_connected(self, regions) -> bool:
        """Forget resynced regions, unless the link dropped (then they stay pinned)."""
        with self._cond:
            if self._link != Link.CONNECTED:
                return False
            self.tracker.settle(regions)
            return True

    def _wait_for_room(self, size: int) -> None:
        deadline = time.monotonic() + self.timeout
        while self._link == Link.CONNECTED and self._lag_bytes + size > self.max_lag_bytes:
            left = deadline - time.monotonic()
            # A single operation larger than the bound goes alone.
            if self._lag_bytes == 0:
                return
            self._wake_reader()
            self._tx.notify()  # a queued Release waits for no one else (submit)
            if left <= 0:
                self._go_locked(
                    Link.ABSENT,
                    f"{self.peer} too slow: {self._lag_bytes} bytes not written "
                    f"after {self.timeout:.1f}s",
                )
                return
            self._cond.wait(left)

    def _follow_opens(self, index: int, op: ops.Op) -> None:
        if isinstance(op, ops.Open):
            self._opens[(index, op.handle)] = op
        elif isinstance(op, ops.Release):
            self._opens.pop((index, op.handle), None)

    # ---- state ---------------------------------------------------------------

    @property
    def link(self) -> Link:
        return self._link

    @property
    def reason(self) -> str:
        return self._reason

    def wait_link(self, link: Link, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._link == link, timeout)

    def stats(self) -> SenderStats:
        with self._cond:
            return SenderStats(
                link=str(self._link),
                reason=self._reason,
                ops=self._ops,
                bytes_sent=self._bytes_sent,
                acks=self._acks,
                bytes_per_s=rate(self._samples, time.monotonic()),
                lag_ops=len(self._inflight),
                lag_bytes=self._lag_bytes,
                resent_bytes=self._resent,
            )

    def mark_absent(self, reason: str) -> None:
        """The peer is known lost (heartbeats): stop sending, keep recording."""
        self._go(Link.ABSENT, reason)

    def close(self) -> None:
        self._go(Link.CLOSED, "replication stopped")
        for thread in self._threads:
            thread.join(timeout=5)

    def _go(self, link: Link, reason: str) -> None:
        with self._cond:
            self._go_locked(link, reason)

    def _go_locked(self, link: Link, reason: str) -> None:
        if self._link == Link.CLOSED or self._link == link:
            return
        if self._link == Link.STALE and link == Link.ABSENT:
            return  # stale says more: only a resync helps, not just a reconnect
        was = self._link
        self._link, self._reason = link, reason
        self._releases.flush()  # acknowledged before the change: theirs to forget
        kept = 0
        for regions, _size in self._inflight.values():
            self.tracker.keep(regions)
            kept += 1
        self._inflight.clear()
        self._queue.clear()
        self._lag_bytes = 0
        self._cond.notify_all()
        self._aside.notify_all()
        self._tx.notify_all()
        if self._channel is not None:
            self._channel.close()
        if link == Link.CLOSED:
            return
        severity = "error" if link == Link.STALE else "warning"
        self._on_event(
            severity,
            f"replication of {self.module} to {self.peer} {link}: {reason}; "
            f"{kept} operations in flight kept as dirty regions for resync",
        )
        log.warning("%s -> %s (%s)", was, link, reason)


NAMES = (ops.Rename, ops.Link, ops.Unlink)  # what changes the names of an existing file


class DirReplicator:
    """The ``ops.Replicator`` of one replicated directory of the module."""

    def __init__(self, sender: Sender, index: int):
        self.sender = sender
        self.index = index

    def submit(self, op: ops.Op) -> Ticket:
        return self.sender.submit(self.index, op)

    def wait(self, ticket: object) -> None:
        assert isinstance(ticket, Ticket)
        self.sender.wait(ticket)

    def push(self, ticket: object) -> None:
        assert isinstance(ticket, Ticket)
        self.sender.push(ticket)
