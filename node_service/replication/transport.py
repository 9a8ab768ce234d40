"""The replication connection: mutual TLS with the site CA, driven by two threads.

One TLS connection per mirror module carries the primary's operations and the
secondary's acknowledgements at the same time. OpenSSL does not allow two
threads inside one SSL object, so a ``Channel`` keeps the TLS state in a
memory BIO pair behind a short lock (encrypt/decrypt only) and does socket
I/O outside it: exactly one thread reads, exactly one thread writes, and
neither waits for the other while the network is slow.

``connect`` is the primary's side; ``ReplicationServer`` is the secondary's
listener on the node's replication port. The server checks, before it hands a
connection to a module, that the certificate's node name (CN, issued by the
site CA) is the module's other node and that the HELLO names that node and a
module this node serves; anything else is refused with a one-line reason in
the log, never a traceback.
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass

from node_service.errors import RetryableError
from node_service.replication import frames
from node_service.replication.frames import Frame, FrameReader

log = logging.getLogger("rampart.replication.transport")

RECV_BYTES = 256 * 1024
JOIN_BYTES = 16 * 1024  # a TLS record's payload: smaller frames are sealed together
SEND_SLICE = 256 * 1024  # sealed and sent in turn, so both ends' crypto overlaps
HANDSHAKE_TIMEOUT_S = 10.0
MAX_HANDSHAKES = 16  # connections being checked at once; more are refused


class PeerGone(RetryableError):
    """The replication connection is closed, broken or refused."""


class Channel:
    """A TLS connection with one reader thread and one writer thread."""

    def __init__(self, sock: socket.socket, tls: ssl.SSLObject, incoming, outgoing, timeout: float):
        self._sock = sock
        self._tls = tls
        self._in = incoming
        self._out = outgoing
        self._tls_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._reader = FrameReader()
        self._closed = False
        self.timeout = timeout
        sock.settimeout(timeout)  # bounds a blocked sendall: a stuck peer is a gone peer

    # ---- setup ---------------------------------------------------------------

    @classmethod
    def handshake(
        cls,
        sock: socket.socket,
        ctx: ssl.SSLContext,
        *,
        server_hostname: str | None,
        timeout: float,
    ) -> Channel:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = ctx.wrap_bio(
            incoming, outgoing, server_side=server_hostname is None, server_hostname=server_hostname
        )
        sock.settimeout(min(timeout, HANDSHAKE_TIMEOUT_S))
        try:
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    if outgoing.pending:
                        sock.sendall(outgoing.read())
                    data = sock.recv(RECV_BYTES)
                    if not data:
                        raise PeerGone(
                            "peer closed the connection during the TLS handshake"
                        ) from None
                    incoming.write(data)
            if outgoing.pending:
                sock.sendall(outgoing.read())
        except ssl.SSLError as exc:
            _flush_quietly(sock, outgoing)
            raise PeerGone(f"TLS handshake refused: {exc.reason or exc}") from None
        except OSError as exc:
            raise PeerGone(f"TLS handshake failed: {exc}") from None
        return cls(sock, tls, incoming, outgoing, timeout)

    def peer_node(self) -> str | None:
        """The node name the site CA certified for the peer (certificate CN)."""
        cert = self._tls.getpeercert() or {}
        for rdn in cert.get("subject", ()):
            for key, value in rdn:
                if key == "commonName":
                    return value
        return None

    # ---- the writer thread -------------------------------------------------

    def send(self, *chunks: bytes | memoryview) -> None:
        if len(chunks) > 1 and sum(len(c) for c in chunks) <= JOIN_BYTES:
            # one TLS record instead of one per chunk: half the sealing and
            # opening for a 4 KiB operation (header + payload)
            chunks = (b"".join(chunks),)
        try:
            with self._send_lock:
                for piece in _slices(chunks, SEND_SLICE):
                    with self._tls_lock:
                        self._tls.write(piece)
                        data = self._out.read()
                    # a slice on the wire while the next is sealed: the peer
                    # opens the first while we seal the second
                    self._sock.sendall(data)
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise PeerGone(f"replication connection lost while sending: {_why(exc)}") from None

    def send_frame(self, frame: Frame) -> None:
        self.send(frames.encode(frame))

    # ---- the reader thread -------------------------------------------------

    def read_frames(self, poll: float) -> list[Frame] | None:
        """Frames that arrived within ``poll`` seconds ([] if none); None at end of stream."""
        got: list[Frame] = []
        while True:
            with self._tls_lock:
                try:
                    # Nothing buffered on either side of the TLS object: read
                    # would only raise SSLWantReadError (twice per wait for an
                    # acknowledgement: on entry and after the last record).
                    if self._in.pending or self._tls.pending():
                        data = self._tls.read(RECV_BYTES)
                    else:
                        data = None
                except ssl.SSLWantReadError:
                    data = None
                except ssl.SSLZeroReturnError:
                    return got or None
                except ssl.SSLError as exc:
                    raise PeerGone(f"replication connection broken: {_why(exc)}") from None
                pending = self._out.pending
            if pending:
                self._flush_from_reader()
            if data:
                got.extend(self._reader.feed(data))
                continue
            if data is not None and not data:
                return got or None
            if got:
                return got
            try:
                ready, _, _ = select.select([self._sock], [], [], poll)
                if not ready:
                    return got
                raw = self._sock.recv(RECV_BYTES)
            except (OSError, ValueError) as exc:
                if self._closed:
                    return None
                raise PeerGone(f"replication connection lost: {_why(exc)}") from None
            if not raw:
                return None
            with self._tls_lock:
                self._in.write(raw)

    def read_frame(self, timeout: float) -> Frame:
        """Exactly one frame (handshake phase: nothing else is in flight)."""
        got = self.read_frames(timeout)
        if got is None:
            raise PeerGone("peer closed the replication connection")
        if not got:
            raise PeerGone(f"no answer from peer within {timeout:.1f}s")
        if len(got) > 1 or self._reader.buffered:
            raise frames.ProtocolError("peer sent frames before the handshake completed")
        return got[0]

    def _flush_from_reader(self) -> None:
        # TLS may answer something we read (a key update); if the writer is
        # busy it flushes the same BIO on its next send, in order.
        if self._send_lock.acquire(blocking=False):
            try:
                with self._tls_lock:
                    data = self._out.read()
                if data:
                    self._sock.sendall(data)
            except OSError:
                pass
            finally:
                self._send_lock.release()

    # ---- both ----------------------------------------------------------------

    def close(self) -> None:
        """Break the connection: both threads see an error or end of stream at once."""
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()


def connect(address: tuple[str, int], ctx: ssl.SSLContext, peer: str, timeout: float) -> Channel:
    """Open the primary's connection to ``peer`` (its certificate must name ``peer``)."""
    try:
        sock = socket.create_connection(address, timeout=min(timeout, HANDSHAKE_TIMEOUT_S))
    except OSError as exc:
        raise PeerGone(f"cannot reach {peer} at {address[0]}:{address[1]}: {_why(exc)}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        return Channel.handshake(sock, ctx, server_hostname=peer, timeout=timeout)
    except BaseException:
        sock.close()
        raise


# ---- the secondary's listener ------------------------------------------------


@dataclass(frozen=True)
class Accepted:
    """A connection whose certificate and HELLO were checked for one module."""

    channel: Channel
    hello: frames.Hello


@dataclass(frozen=True)
class Endpoint:
    """A module this node receives for: who may send, and who takes the connection."""

    module: str
    peer: str
    on_connection: Callable[[Accepted], None]


def check_hello(hello: frames.Hello, cert_node: str | None, endpoints: dict[str, Endpoint]) -> str:
    """Why a HELLO must be refused, or "" to accept it (pure)."""
    endpoint = endpoints.get(hello.module)
    if endpoint is None:
        return f"module {hello.module!r} is not replicated to this node"
    if cert_node != endpoint.peer:
        return (
            f"module {hello.module}: certificate names node {cert_node!r}, "
            f"only {endpoint.peer!r} may replicate to this node"
        )
    if hello.node != cert_node:
        return f"module {hello.module}: HELLO claims node {hello.node!r}, certificate {cert_node!r}"
    return ""


class ReplicationServer:
    """TLS listener of this node's replication port, one connection per module."""

    def __init__(
        self, address: tuple[str, int], ctx: ssl.SSLContext, *, node: str, timeout: float = 10.0
    ):
        self.node = node
        self.timeout = timeout
        self._ctx = ctx
        self._endpoints: dict[str, Endpoint] = {}
        self._lock = threading.Lock()
        self._sock = socket.create_server(address, reuse_port=False)
        self._sock.settimeout(0.2)
        self.address = self._sock.getsockname()[:2]
        self.refusals: list[str] = []
        self._handshakes = threading.BoundedSemaphore(MAX_HANDSHAKES)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="repl-listen", daemon=True)

    def serve(self, endpoint: Endpoint) -> None:
        with self._lock:
            self._endpoints[endpoint.module] = endpoint

    def start(self) -> ReplicationServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)
        self._sock.close()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, addr = self._sock.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stopping.is_set():
                    return
                # out of descriptors or memory: say so, and try again shortly
                log.warning("replication listener %s: accept failed: %s", self.address, exc)
                self._stopping.wait(0.5)
                continue
            if not self._handshakes.acquire(blocking=False):
                conn.close()
                self._refuse(addr, f"more than {MAX_HANDSHAKES} handshakes at once")
                continue
            threading.Thread(
                target=self._handshake,
                args=(conn, addr),
                name=f"repl-handshake-{addr[0]}:{addr[1]}",
                daemon=True,
            ).start()

    def _handshake(self, conn: socket.socket, addr: tuple[str, int]) -> None:
        try:
            self._check_peer(conn, addr)
        finally:
            self._handshakes.release()

    def _check_peer(self, conn: socket.socket, addr: tuple[str, int]) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            channel = Channel.handshake(conn, self._ctx, server_hostname=None, timeout=self.timeout)
            hello = frames.parse_hello(channel.read_frame(self.timeout))
            with self._lock:
                reason = check_hello(hello, channel.peer_node(), self._endpoints)
                endpoint = self._endpoints.get(hello.module)
            if reason or endpoint is None:
                channel.send_frame(frames.error(0, 1, reason))
                channel.close()
                self._refuse(addr, reason)
                return
        except RetryableError as exc:
            conn.close()
            self._refuse(addr, str(exc))
            return
        endpoint.on_connection(Accepted(channel, hello))

    def _refuse(self, addr: tuple[str, int], reason: str) -> None:
        msg = f"replication connection from {addr[0]}:{addr[1]} refused: {reason}"
        log.warning("%s", msg)
        self.refusals = [*self.refusals[-99:], msg]  # the last 100, for status and tests


def _slices(chunks: tuple[bytes | memoryview, ...], size: int):
    """The chunks cut into pieces of at most ``size`` bytes, without copying."""
    for chunk in chunks:
        if len(chunk) <= size:
            yield chunk
            continue
        view = memoryview(chunk)
        for at in range(0, len(view), size):
            yield view[at : at + size]


def _flush_quietly(sock: socket.socket, outgoing: ssl.MemoryBIO) -> None:
    # Send our TLS alert so the peer learns why, then give up.
    try:
        if outgoing.pending:
            sock.sendall(outgoing.read())
    except OSError:
        pass


def _why(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
