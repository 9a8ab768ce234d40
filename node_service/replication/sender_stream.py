"""The primary's stream threads: frames out, acknowledgements in, few hand-offs.

Part of ``Sender`` (which inherits ``SenderStream``; split out for size): the
state lives in ``Sender.__init__`` and is guarded by its condition.

On two CPUs under the GIL a thread hand-off (notify, then the woken thread
waits for a CPU and the GIL) costs about as much as sealing and sending a
4 KiB frame, and the 4 KiB write + fsync round trip had six of them per
operation across both nodes. So the roles are tokens, not threads:

- **sending**: whoever pops frames off the queue holds ``_sending`` until they
  are on the wire, so frames leave in queue (sequence) order. An application
  thread that waits for its acknowledgement sends the queue itself when
  nobody holds the token; the ``repl-tx-send`` thread sleeps on ``_tx`` and
  is woken only for frames nobody is about to send that way (async, Release,
  an Fsync submitted before the local fsync, resync, requests), and PINGs.
- **reading**: whoever reads the channel holds ``_reader``. An application
  thread waiting for its acknowledgement reads it itself when nobody else
  reads; the ``repl-tx-acks`` thread steps aside (on ``_aside``, which the
  many notify_all of ``_cond`` do not wake) while such waiters exist, and
  otherwise reads, takes acknowledgements and judges the peer's silence.
  Threads waiting for other frames (drain, requests, room in the lag bound)
  wake it.

Both rules keep the frame order and the dirty-log rule as they were: a batch
is sent only after the commit covering its region records is durable.
"""

from __future__ import annotations

import collections
import threading
import time

from node_service.errors import RetryableError
from node_service.replication import frames
from node_service.replication.dirty import DirtyLogError, DirtyTracker
from node_service.replication.frames import Frame, FrameType
from node_service.replication.link import Link, Mode, Releases
from node_service.replication.transport import Channel

SEND_BATCH_BYTES = 4 * 1024 * 1024

QueueItem = tuple[FrameType, int, int, bytes]  # (frame type, seq, record epoch, payload)


class SenderStream:
    """The sending and acknowledgement-reading half of ``Sender``."""

    # set by Sender.__init__, guarded by _cond
    peer: str
    timeout: float
    mode: Mode
    tracker: DirtyTracker
    _cond: threading.Condition
    _aside: threading.Condition
    _tx: threading.Condition
    _queue: collections.deque[QueueItem]
    _sending: bool
    _reader: str | None
    _waiters: int
    _channel: Channel | None
    _link: Link
    _last_rx: float
    _bytes_sent: int
    _received: int
    _written: int
    _acks: int
    _acked_bytes: int
    _lag_bytes: int
    _inflight: collections.OrderedDict[int, tuple[tuple, int]]
    _samples: collections.deque[tuple[float, int]]
    _replies: dict[int, list[bytes]]
    _answered: set[int]
    _releases: Releases

    def _go_locked(self, link: Link, reason: str) -> None:
        raise NotImplementedError  # Sender's: the link state machine

    def _live(self, channel: Channel) -> bool:
        return self._channel is channel and self._link == Link.CONNECTED

    def _lose(self, channel: Channel, reason: str) -> None:
        with self._cond:
            if self._live(channel):
                self._go_locked(Link.ABSENT, reason)

    def _acked(self) -> int:
        return self._written if self.mode == Mode.SYNC else self._received

    def _await_ack(self, seq: int) -> None:
        """Wait for ``seq``'s acknowledgement, reading it ourselves when nobody else reads."""
        deadline = time.monotonic() + self.timeout
        poll = self._poll()
        with self._cond:
            self._waiters += 1
        try:
            while True:
                with self._cond:
                    if self._acked() >= seq or self._link != Link.CONNECTED:
                        return
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self._go_locked(
                            Link.ABSENT,
                            f"{self.peer} did not acknowledge operation {seq} "
                            f"within {self.timeout:.1f}s",
                        )
                        return
                    channel = self._channel
                    if self._reader is not None or channel is None:
                        self._cond.wait(left)
                        continue
                    # Nobody reads: read our acknowledgement ourselves rather
                    # than wait for the acks thread to wake us (a hand-off).
                    self._reader = "waiter"
                self._read_once(channel, min(left, poll), silence=False)
        finally:
            with self._cond:
                self._waiters -= 1

    def _send_own(self, seq: int) -> None:
        """Send the queue from the waiting thread when nobody else is sending.

        The thread that waits for ``seq`` would otherwise wake the writer
        thread and sleep: on two CPUs under the GIL each such hand-off costs
        about as much as the TLS write itself. Order holds because frames
        leave only with the sending token, in queue order.
        """
        with self._cond:
            channel = self._channel
            if self._sending or channel is None or not self._live(channel):
                return
            if not self._queue or self._queue[0][1] > seq or self._queue[0][0] != FrameType.OP:
                return  # already on its way, or a request goes first: the writer's job
            batch = self._take_batch_locked()
        self._send_batch(channel, batch)

    def _take_batch_locked(self) -> list[QueueItem]:
        self._sending = True
        batch = []
        size = 0
        while self._queue and size < SEND_BATCH_BYTES:
            item = self._queue.popleft()
            batch.append(item)
            size += len(item[3])
        return batch

    def _send_batch(self, channel: Channel, batch: list[QueueItem]) -> bool:
        """Send frames taken with the token; give the token back. False: link lost."""
        size = sum(len(b[3]) for b in batch)
        try:
            # Recorded before the data leaves: the grouped commit covering
            # every frame of the batch is awaited first.
            self.tracker.wait_durable(max(b[2] for b in batch), max(self.timeout, 30.0))
            chunks = []
            for ftype, seq, _epoch, payload in batch:
                chunks.append(frames.encode_header(ftype, seq, len(payload)))
                chunks.append(payload)
            channel.send(*chunks)
        except (RetryableError, DirtyLogError) as exc:
            with self._cond:
                self._sending = False
            self._lose(channel, str(exc))
            return False
        with self._cond:
            self._sending = False
            self._bytes_sent += size
            if self._queue:
                self._tx.notify()  # queued while we sent: the send thread's now
        return True

    def _write_loop(self, channel: Channel) -> None:
        ping_every = max(self.timeout / 3, 0.05)
        while True:
            with self._cond:
                self._tx.wait_for(
                    lambda: (self._queue and not self._sending) or not self._live(channel),
                    ping_every,
                )
                if not self._live(channel):
                    return
                batch = self._take_batch_locked() if self._queue and not self._sending else []
            if batch:
                if not self._send_batch(channel, batch):
                    return
                continue
            try:
                channel.send_frame(Frame(FrameType.PING, 0))
            except RetryableError as exc:
                self._lose(channel, str(exc))
                return

    def _poll(self) -> float:
        return max(min(self.timeout / 4, 0.25), 0.01)

    def _read_loop(self, channel: Channel) -> None:
        poll = self._poll()
        while True:
            with self._cond:
                if not self._live(channel):
                    return
                if self._reader is not None or self._waiters:
                    # Application threads read their acknowledgements: stay
                    # aside until a poll passes or someone else needs frames.
                    self._aside.wait(poll)
                    self._check_silence_locked(time.monotonic())
                    if self._reader is not None or self._waiters:
                        continue
                self._reader = "acks"
            if not self._read_once(channel, poll):
                return

    def _wake_reader(self) -> None:
        """Someone waits for frames no application thread may read (drain, request, room)."""
        self._aside.notify_all()

    def _read_once(self, channel: Channel, poll: float, *, silence: bool = True) -> bool:
        """Read and take what arrives within ``poll`` (reader role held); False: link lost.

        ``silence``: also judge the peer's silence (the acks thread does; a
        waiter judges its own operation's deadline instead).
        """
        try:
            got: list[Frame] | RetryableError | None = channel.read_frames(poll)
        except RetryableError as exc:
            got = exc
        with self._cond:
            self._reader = None
            self._cond.notify_all()
            if not self._live(channel):
                return False
            if isinstance(got, RetryableError) or got is None:
                reason = str(got or f"{self.peer} closed the replication connection")
                self._go_locked(Link.ABSENT, reason)
                return False
            now = time.monotonic()
            if got:
                self._last_rx = now
            else:
                self._releases.flush(now)
            try:
                for frame in got:
                    self._take_locked(frame, now)
            except RetryableError as exc:
                self._go_locked(Link.ABSENT, f"bad frame from {self.peer}: {exc}")
                return False
            if silence:
                self._check_silence_locked(now)
            return self._live(channel)

    def _check_silence_locked(self, now: float) -> None:
        # While application threads wait they judge their own deadline (same
        # timeout) and say which operation went unanswered.
        if self._waiters:
            return
        if self._link == Link.CONNECTED and now - self._last_rx > self.timeout:
            self._go_locked(Link.ABSENT, f"no answer from {self.peer} for {self.timeout:.1f}s")

    def _take_locked(self, frame: Frame, now: float) -> None:
        if frame.type == FrameType.ACK_RECEIVED:
            self._received = max(self._received, frame.seq)
        elif frame.type == FrameType.ACK_WRITTEN:
            self._written = max(self._written, frame.seq)
            self._received = max(self._received, frame.seq)
            while self._inflight:
                seq = next(iter(self._inflight))
                if seq > frame.seq:
                    break
                regions, size = self._inflight.pop(seq)
                self._releases.add(regions, now)
                self._lag_bytes -= size
                self._acked_bytes += size
            self._samples.append((now, self._acked_bytes))
        elif frame.type in (FrameType.DIRTY, FrameType.MANIFEST):
            if frame.seq in self._replies:
                self._replies[frame.seq].append(frame.payload)
        elif frame.type == FrameType.REPLY_END:
            self._answered.add(frame.seq)
        elif frame.type == FrameType.ERROR:
            err = frames.parse_error(frame)
            self._go_locked(
                Link.STALE, f"{self.peer} failed at operation {frame.seq}: {err.message}"
            )
            return
        else:
            self._go_locked(Link.ABSENT, f"unexpected {frame.type.name} frame from {self.peer}")
            return
        self._acks += 1
        self._cond.notify_all()
