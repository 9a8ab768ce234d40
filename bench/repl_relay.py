"""A delaying TCP relay: the stand-in for ``tc netem`` on a kernel without sch_netem.

The replication benchmark's relay process (``python -m bench.repl_setup
relay``) runs in the secondary's network namespace; a primary started with
``delayed=True`` connects to it instead of the secondary's port. Every chunk
read is held for half the round trip before it is written on, in each
direction, so an operation and its acknowledgement see the delayed link's
latency. Four named threads per connection (a reader and a writer each way);
what is held is bounded (64 MiB per direction).
"""

from __future__ import annotations

import collections
import os
import socket
import threading
import time
from collections.abc import Callable

from bench.repl_setup import REPLY_TIMEOUT_S, TIMEOUT_S

RELAY_MAX_CONNECTIONS = 1000
RELAY_CHUNK = 256 * 1024
RELAY_MAX_HELD = 64 * 1024 * 1024
CLOSE_JOIN_S = 2.0


class DelayRelay:
    """A TCP relay holding every chunk for half the round trip, each way.

    Stands in for netem where the kernel lacks it: the latency an operation
    and its acknowledgement see is the same; what a real link adds on top
    (TCP's window over a long path) does not matter for 4 KiB operations.
    """

    def __init__(self, listen: str, target: tuple[str, int]):
        self.target = target
        self.one_way_s = 0.0
        self.server = socket.create_server((listen, 0))
        self.threads: list[threading.Thread] = []
        self.sockets: list[socket.socket] = []
        self._closed = threading.Event()

    def start(self) -> DelayRelay:
        self._thread(self._accept_loop, "bench-relay-accept")
        return self

    def _thread(self, target, name: str, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        self.threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        for n in range(RELAY_MAX_CONNECTIONS):
            try:
                down, _ = self.server.accept()
                up = socket.create_connection(self.target, timeout=TIMEOUT_S)
            except OSError:
                return  # closed
            up.settimeout(None)
            self.sockets += [down, up]
            for sock in (down, up):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._pipe(down, up, f"bench-relay-{n}-up")
            self._pipe(up, down, f"bench-relay-{n}-down")

    def _pipe(self, src: socket.socket, dst: socket.socket, name: str) -> None:
        cond = threading.Condition()
        queue: collections.deque[tuple[float, bytes]] = collections.deque()
        held = [0]

        def read() -> None:
            while not self._closed.is_set():  # ends at EOF or a closed socket
                try:
                    data = src.recv(RELAY_CHUNK)
                except OSError:
                    data = b""
                with cond:
                    cond.wait_for(lambda: held[0] < RELAY_MAX_HELD, timeout=REPLY_TIMEOUT_S)
                    queue.append((time.monotonic() + self.one_way_s, data))
                    held[0] += len(data)
                    cond.notify_all()
                if not data:
                    return

        def write() -> None:
            while True:
                with cond:
                    cond.wait_for(lambda: queue or self._closed.is_set(), timeout=1.0)
                    if self._closed.is_set():
                        return
                    if not queue:
                        continue
                    due, data = queue[0]
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)  # the emulated propagation delay itself
                with cond:
                    queue.popleft()
                    held[0] -= len(data)
                    cond.notify_all()
                try:
                    if not data:
                        dst.shutdown(socket.SHUT_WR)
                        return
                    dst.sendall(data)
                except OSError:
                    return

        self._thread(read, name + "-rx")
        self._thread(write, name + "-tx")

    def close(self) -> None:
        """Stop relaying; every thread ends (its socket is closed under it)."""
        self._closed.set()
        for sock in (self.server, *self.sockets):
            # close() alone wakes neither accept() nor recv() in another thread
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # not connected (any more)
            sock.close()
        for thread in self.threads:
            thread.join(CLOSE_JOIN_S)


def serve_relay(listen: str, target: str, reply: Callable, serve: Callable) -> None:
    """The relay process: ``delay`` commands set the round trip until end of input."""
    host, _, port = target.rpartition(":")
    relay = DelayRelay(listen, (host, int(port))).start()

    def delay(cmd: dict) -> dict:
        relay.one_way_s = float(cmd["rtt_ms"]) / 2000
        return {"one_way_ms": relay.one_way_s * 1000}

    try:
        reply(pid=os.getpid(), port=relay.server.getsockname()[1])
        serve({"delay": delay})
    finally:
        relay.close()
