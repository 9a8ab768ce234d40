"""The secondary's side of replication: operations in, acknowledgements out.

Three named threads per connection, so that no stage waits for another:

- ``repl-rx-recv-MODULE`` reads frames, notes each operation's regions in the
  secondary's dirty log (group commit), queues it and advances the
  received sequence;
- ``repl-rx-apply-MODULE`` applies operations strictly in order through the
  replicated dir's ``Applier`` (an Fsync op is fsynced there);
- ``repl-rx-ack-MODULE`` sends cumulative ACK_RECEIVED / ACK_WRITTEN frames;
  an operation is acknowledged as written only once it is applied AND its
  region record is durable, because from then on only this node remembers
  that the region may not be on disk yet.

For a sync primary the receiving thread applies and acknowledges a small
read itself when nothing is queued (``inline_apply``): its writer waits for
exactly that acknowledgement, and two thread hand-offs cost as much as the
work. Applying and acknowledging are tokens (``applying``, ``acking``), so
one thread at a time does each and the order stays the sequence order.

An operation that cannot be applied (ENOSPC, EIO, an unknown handle) makes
this node stale: the reason is persisted in the dirty log (a restart does not
forget it), an error event is raised, an ERROR frame tells the primary, and
nothing more is applied: the regions of the failed operation and of every
later one stay recorded for the resync. Never a silent gap.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from node_service.errors import RampartError, RetryableError
from node_service.replication import frames, ops, verify
from node_service.replication.dirty import (
    SECONDARY_ROLE,
    DirtyLog,
    DirtyLogError,
    DirtyTracker,
    dirty_regions,
    encode_regions,
    opening_ahead,
)
from node_service.replication.frames import Frame, FrameType
from node_service.replication.link import Releases
from node_service.replication.transport import Accepted, Channel

log = logging.getLogger("rampart.replication.receiver")

EventSink = Callable[[str, str], None]  # (severity, message)
DIRTY_PER_FRAME = 20000  # ~1 MiB of JSON
# A read of at most this many op bytes (one FUSE write of up to 1 MiB and a
# few small operations), with nothing queued, is applied and acknowledged by
# the receiving thread itself when the primary is in sync mode: its writer
# waits for exactly that acknowledgement, so a thread hand-off here is pure
# latency. More at once means several writers: the apply thread then lets
# reading and writing to disk overlap.
INLINE_APPLY_BYTES = 1024 * 1024 + 64 * 1024

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def syncfs(fd: int) -> None:
    """Flush the filesystem holding ``fd`` (one call for a whole replicated dir)."""
    if _libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"syncfs: {os.strerror(err)}")


def inline_apply(busy: bool, taken: Sequence[object], nbytes: int) -> bool:
    """Whether the receiving thread applies what it just read itself (pure).

    Only operations (no SCAN or RESYNC marker: those can take long and must
    keep their place in the apply thread's order), only when nothing is
    queued or being applied (order), and only small reads (big ones overlap
    better with the next read in the apply thread).
    """
    return (
        bool(taken)
        and not busy
        and nbytes <= INLINE_APPLY_BYTES
        and all(isinstance(op, ops.Op) for op in taken)
    )


class ApplierLike(Protocol):
    root_fd: int  # the replicated dir, scanned for resync and verify
    replay: bool  # set during a resync: effects already present count as done

    def apply(self, op: ops.Op) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class ReceiverStats:
    connected: bool
    received: int
    written: int
    stale: str | None


@dataclass
class _Conn:
    channel: Channel
    appliers: Sequence[ApplierLike]
    paths: list[ops.HandlePaths]
    queue: collections.deque  # (seq, index, op, regions, epoch)
    applied: collections.deque  # (seq, regions, epoch) applied, not yet acked written
    received: int = 0
    sent_received: int = 0
    written: int = 0
    sent_written: int = -1
    ping: bool = False
    error: Frame | None = None
    done: bool = False
    applying: bool = False  # someone holds the apply token (apply thread or recv inline)
    acking: bool = False  # someone holds the ack token: the only one writing the channel
    # Sync primary: apply small reads in the receiving thread. Semi and async
    # want "received" while the disk works, even a flush of seconds: they
    # keep the apply thread, and this thread keeps reading and answering.
    inline: bool = False
    failed: bool = False  # an operation failed on this connection: apply nothing more
    resyncing: bool = False  # between RESYNC_BEGIN and RESYNC_END
    reported: frozenset = frozenset()  # dirty regions sent to the primary for its resync
    outbox: list = field(default_factory=list)  # DIRTY/MANIFEST/REPLY_END frames to send


class Receiver:
    """One module's incoming replication stream (at most one connection at a time)."""

    def __init__(
        self,
        *,
        module: str,
        node: str,
        peer: str,
        dirs: tuple[str, ...],
        tracker: DirtyTracker,
        dirty_log: DirtyLog,
        appliers: Callable[[], Sequence[ApplierLike]],
        timeout: float = 3.0,
        on_event: EventSink | None = None,
    ):
        self.module = module
        self.node = node
        self.peer = peer
        self.dirs = dirs
        self.tracker = tracker
        tracker.set_role(SECONDARY_ROLE)
        self.dirty_log = dirty_log
        self._make_appliers = appliers
        self.timeout = timeout
        self._on_event = on_event or (lambda severity, message: None)
        lock = threading.RLock()
        # Callers of wait_written/wait_stale sleep on _cond; the apply and ack
        # threads each on a condition of their own (same lock), woken only
        # when they have something to do (_wake): on two CPUs under the GIL
        # every needless wake-up competes with the receiving thread, which
        # applies and acknowledges a sync primary's operation itself.
        self._cond = threading.Condition(lock)
        self._apply_cv = threading.Condition(lock)
        self._ack_cv = threading.Condition(lock)
        self._conn: _Conn | None = None
        self._threads: list[threading.Thread] = []
        self._accept_lock = threading.Lock()
        self._stale = dirty_log.stale
        self._releases = Releases(tracker.release)

    # ---- connections -------------------------------------------------------

    def accept(self, accepted: Accepted) -> None:
        """Take a connection the server checked for this module; replaces any older one."""
        # Handshakes run in their own threads: two quick reconnects must not
        # interleave the old connection's shutdown with the new one's start.
        with self._accept_lock:
            self._accept(accepted)

    def _accept(self, accepted: Accepted) -> None:
        self._drop_connection()
        self._stale = self.dirty_log.stale  # a resync may have cleared it meanwhile
        appliers = self._make_appliers()
        conn = _Conn(
            channel=accepted.channel,
            appliers=appliers,
            paths=[ops.HandlePaths() for _ in self.dirs],
            queue=collections.deque(),
            applied=collections.deque(),
            inline=accepted.hello.mode == "sync",
        )
        try:
            accepted.channel.send_frame(
                frames.welcome(
                    self.module,
                    self.node,
                    stale=self._stale is not None,
                    history=self.tracker.history_known,
                )
            )
        except RetryableError as exc:
            log.warning("module %s: lost %s during WELCOME: %s", self.module, self.peer, exc)
            self._close_appliers(conn)
            accepted.channel.close()
            return
        with self._cond:
            self._conn = conn
        for target, role in (
            (self._read_loop, "recv"),
            (self._apply_loop, "apply"),
            (self._ack_loop, "ack"),
        ):
            thread = threading.Thread(
                target=target, args=(conn,), name=f"repl-rx-{role}-{self.module}", daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def stats(self) -> ReceiverStats:
        with self._cond:
            conn = self._conn
            return ReceiverStats(
                connected=conn is not None and not conn.done,
                received=conn.received if conn else 0,
                written=max(conn.written, 0) if conn else 0,
                stale=self._stale,
            )

    @property
    def stale(self) -> str | None:
        return self._stale

    def wait_written(self, seq: int, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(
                lambda: self._conn is not None and self._conn.written >= seq, timeout
            )

    def wait_stale(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._stale is not None, timeout)

    def close(self) -> None:
        with self._accept_lock:
            self._drop_connection()

    def _drop_connection(self) -> None:
        with self._cond:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.done = True
                self._wake(conn)
        if conn is not None:
            conn.channel.close()
        threads, self._threads = self._threads, []
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(timeout=5)
        if conn is not None:
            self._close_appliers(conn)
        self._releases.flush()

    def _end(self, conn: _Conn, reason: str) -> None:
        self._releases.flush()
        with self._cond:
            if conn.done:
                return
            conn.done = True
            self._wake(conn)
        conn.channel.close()
        log.info("module %s: replication from %s ended: %s", self.module, self.peer, reason)

    def _wake(self, conn: _Conn) -> None:
        """After a change of ``conn``'s state (lock held): wake who can act on it now."""
        self._cond.notify_all()  # wait_written, wait_stale
        if conn.done or (conn.queue and not conn.applying):
            self._apply_cv.notify_all()
        if conn.done or (not conn.acking and self._ack_due(conn)):
            self._ack_cv.notify_all()

    @staticmethod
    def _close_appliers(conn: _Conn) -> None:
        for applier in conn.appliers:
            try:
                applier.close()
            except OSError as exc:
                log.warning("closing applier: %s", exc)

    # ---- threads -------------------------------------------------------------

    def _read_loop(self, conn: _Conn) -> None:
        poll = max(min(self.timeout / 4, 0.25), 0.01)
        last_rx = time.monotonic()
        while not conn.done:
            try:
                got = conn.channel.read_frames(poll)
            except RetryableError as exc:
                self._end(conn, str(exc))
                return
            if got is None:
                self._end(conn, f"{self.peer} closed the connection")
                return
            now = time.monotonic()
            if not got:
                self._releases.flush(now)
                # The primary pings every third of the timeout: silence means gone.
                if now - last_rx > 2 * self.timeout:
                    self._end(conn, f"nothing from {self.peer} for {2 * self.timeout:.1f}s")
                    return
                continue
            last_rx = now
            try:
                items = [self._take(conn, frame) for frame in got]
            except (RampartError, ValueError) as exc:
                self._end(conn, f"bad frame from {self.peer}: {exc}")
                return
            taken = [item for item in items if item is not None]
            with self._cond:
                inline = conn.inline and inline_apply(
                    conn.applying or bool(conn.queue),
                    [item[2] for item in taken],
                    sum(len(frame.payload) for frame in got),
                )
                conn.applying = conn.applying or inline
                # the ack token with the apply token, in the same hold: the ack
                # thread is not woken for the "received" this read makes due
                own_ack = inline and not conn.acking and not conn.done
                conn.acking = conn.acking or own_ack
                for frame, item in zip(got, items, strict=True):
                    if item is None:
                        conn.ping = conn.ping or frame.type == FrameType.PING
                    else:
                        if not inline:
                            conn.queue.append(item)
                        if frame.type == FrameType.OP:
                            conn.received = item[0]
                self._wake(conn)
            if inline:
                self._apply_inline(conn, taken, own_ack)

    def _take(self, conn: _Conn, frame: Frame) -> tuple | None:
        if frame.type == FrameType.PING:
            return None
        if frame.type == FrameType.DIRTY_REQUEST:
            self._answer_dirty(conn, frame.seq)
            return None
        if frame.type in (FrameType.SCAN, FrameType.RESYNC_BEGIN, FrameType.RESYNC_END):
            # in operation order: the applier thread handles them between ops
            return frame.seq, 0, frame, (), 0
        index, data = frames.split_op(frame, len(self.dirs))
        op = ops.decode(data)
        paths = conn.paths[index]
        regions = dirty_regions(self.dirs[index], ops.regions(op, paths))
        paths.follow(op)
        ahead = opening_ahead(self.dirs[index], op)
        return frame.seq, index, op, regions, self.tracker.add(regions, ahead)

    def _apply_inline(self, conn: _Conn, batch: list[tuple], own: bool) -> None:
        """Apply and acknowledge in the receiving thread (apply token held).

        ``own``: the ack token was free and taken with the apply token, for
        the whole of it, so the ack thread is not woken for what this thread
        sends itself.
        """
        try:
            self._apply_batch(conn, batch, notify=not own)
        except BaseException:
            with self._cond:
                conn.applying = False
                conn.acking = conn.acking and not own
                self._wake(conn)
            raise
        with self._cond:
            conn.applying = False
            if not own:
                self._wake(conn)
        if own:
            self._send_acks(conn)  # gives the ack token back

    def _apply_loop(self, conn: _Conn) -> None:
        while True:
            with self._cond:
                self._apply_cv.wait_for(lambda: not conn.applying and (conn.queue or conn.done))
                if conn.done:
                    self._abandon(conn)
                    return
                batch = list(conn.queue)
                conn.queue.clear()
                conn.applying = True
            try:
                self._apply_batch(conn, batch)
            finally:
                with self._cond:
                    conn.applying = False
                    self._wake(conn)

    def _apply_batch(self, conn: _Conn, batch: list[tuple], *, notify: bool = True) -> None:
        for seq, index, op, regions, epoch in batch:
            if isinstance(op, Frame):
                self._control(conn, op)
                continue
            skip = conn.done or conn.failed
            if skip or (self._stale is not None and not conn.resyncing):
                self.tracker.keep(regions)
                continue
            try:
                conn.appliers[index].apply(op)
            except ops.SecondaryApplyError as exc:
                self.tracker.keep(regions)
                self._go_stale(conn, seq, exc.errno or 0, str(exc))
                continue
            with self._cond:
                conn.applied.append((seq, regions, epoch))
                if notify:
                    self._wake(conn)

    def _abandon(self, conn: _Conn) -> None:
        # The connection is gone: whatever was received but not acknowledged
        # as written stays recorded until a resync settles it (lock held).
        for item in conn.queue:
            if not isinstance(item[2], Frame):
                self.tracker.keep(item[3])
        conn.queue.clear()
        for _seq, regions, _epoch in conn.applied:
            self.tracker.keep(regions)
        conn.applied.clear()

    def _answer_dirty(self, conn: _Conn, rid: int) -> None:
        regions = sorted(self.tracker.recorded())
        chunks = [
            Frame(FrameType.DIRTY, rid, encode_regions(regions[i : i + DIRTY_PER_FRAME]))
            for i in range(0, len(regions), DIRTY_PER_FRAME)
        ]
        with self._cond:
            conn.reported = frozenset(regions)
            conn.outbox.extend([*chunks, Frame(FrameType.REPLY_END, rid)])
            self._wake(conn)

    def _control(self, conn: _Conn, frame: Frame) -> None:
        out: list[Frame] = []
        if frame.type == FrameType.SCAN:
            try:
                index, want, hashes = frames.parse_scan(frame, len(self.dirs))
                entries = verify.scan(conn.appliers[index].root_fd, want, hashes=hashes).values()
                out = [Frame(FrameType.MANIFEST, frame.seq, c) for c in verify.chunks(entries)]
            except (RampartError, OSError) as exc:
                log.warning("module %s: cannot answer SCAN: %s", self.module, exc)
            out.append(Frame(FrameType.REPLY_END, frame.seq))
        elif frame.type == FrameType.RESYNC_BEGIN:
            conn.resyncing = True
            self._set_replay(conn, True)
        elif frame.type == FrameType.RESYNC_END:
            self._set_replay(conn, False)
            conn.resyncing = False
            if not conn.failed:
                self._resynced(conn)
            out.append(Frame(FrameType.REPLY_END, frame.seq))
        with self._cond:
            conn.outbox.extend(out)
            self._wake(conn)

    @staticmethod
    def _set_replay(conn: _Conn, on: bool) -> None:
        for applier in conn.appliers:
            if hasattr(applier, "replay"):
                applier.replay = on

    def _resynced(self, conn: _Conn) -> None:
        was = self._stale
        try:
            self.dirty_log.set_stale(None)
        except DirtyLogError as exc:
            log.error("%s", exc)
            return
        # Everything this node reported is now the primary's content; the
        # flush before forgetting (before_clear) makes that durable first.
        self.tracker.settle(conn.reported)
        # a pass over a node of unknown history is always a full sync
        self.tracker.history_known = True
        with self._cond:
            self._stale = None
            self._wake(conn)
        self._on_event(
            "info",
            f"module {self.module}: resync from {self.peer} complete"
            + (f"; no longer stale ({was})" if was else ""),
        )

    def _go_stale(self, conn: _Conn, seq: int, errno_: int, message: str) -> None:
        conn.failed = True
        reason = f"operation {seq} from {self.peer} failed: {message}"
        try:
            self.dirty_log.set_stale(reason)
        except DirtyLogError as exc:
            log.error("%s", exc)
        with self._cond:
            self._stale = reason
            conn.error = frames.error(seq, errno_, message)
            self._wake(conn)
        self._on_event(
            "error",
            f"module {self.module}: this node's replicated data is stale: {reason}; "
            "it stays stale until a resync from the primary",
        )
        log.error("module %s: stale: %s", self.module, reason)

    def _ack_loop(self, conn: _Conn) -> None:
        while True:
            with self._cond:
                self._ack_cv.wait_for(
                    lambda: conn.done or (not conn.acking and self._ack_due(conn))
                )
                if conn.done:
                    return
                conn.acking = True
            if not self._send_acks(conn):
                return

    def _send_acks(self, conn: _Conn) -> bool:
        """With the ack token: send what is due, give the token back; False: connection over."""
        try:
            return self._send_due(conn)
        finally:
            with self._cond:
                conn.acking = False
                self._wake(conn)

    def _send_due(self, conn: _Conn) -> bool:
        with self._cond:
            received = conn.received
            applied = list(conn.applied)
            ping, conn.ping = conn.ping, False
            error, conn.error = conn.error, None
            extra, conn.outbox = conn.outbox, []
        written = conn.written
        try:
            if applied:
                # Only this node remembers these regions once the primary
                # hears "written": the records must be on disk first.
                self.tracker.wait_durable(max(a[2] for a in applied), 30.0)
                written = applied[-1][0]
            out = []
            # ACK_WRITTEN n also says "received n": no ACK_RECEIVED it covers
            if received > conn.sent_received and received > written:
                out.append(frames.encode(Frame(FrameType.ACK_RECEIVED, received)))
            if written > conn.sent_written or ping:
                out.append(frames.encode(Frame(FrameType.ACK_WRITTEN, max(written, 0))))
            out.extend(frames.encode(f) for f in extra)
            if error is not None:
                out.append(frames.encode(error))
            if out:
                conn.channel.send(*out)
        except (RetryableError, DirtyLogError) as exc:
            self._end(conn, str(exc))
            return False
        now = time.monotonic()
        for _seq, regions, _epoch in applied:
            self._releases.add(regions, now)
        with self._cond:
            for _ in applied:
                if conn.applied:  # _abandon may have taken them meanwhile
                    conn.applied.popleft()
            conn.sent_received = max(conn.sent_received, received)
            conn.written = max(conn.written, written)
            conn.sent_written = max(conn.sent_written, written)
            self._wake(conn)
        if error is not None:
            self._end(conn, "stale: stopped applying")
            return False
        return True

    @staticmethod
    def _ack_due(conn: _Conn) -> bool:
        return bool(
            conn.received > conn.sent_received
            or conn.applied
            or conn.ping
            or conn.error
            or conn.outbox
        )
