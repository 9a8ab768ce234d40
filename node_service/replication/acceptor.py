"""The node's replication port: one TCP listener, a socket per module's process.

Each mirror module has its own replication process (process.py), but a node
has one replication port (node.yaml ``replication_port``, 7811). rampartd
listens on it; the primary's process opens a TCP connection and first sends
a short plaintext preamble naming the module::

    RAMPART-REPL 1 <module>\\n

The acceptor reads it (at most ``MAX_PREAMBLE`` bytes within
``PREAMBLE_TIMEOUT_S``, one byte at a time so not a byte of the TLS
handshake that follows is consumed) and hands the raw socket to that
module's process over its control socket (SCM_RIGHTS). The process does the
mutual-TLS handshake and checks the peer's certificate itself; the acceptor
never sees a key. An unknown module, or one without a running process: the
connection is closed and the refusal logged.

Tasks (owned by ``Acceptor``): ``repl-acceptor:PORT`` (accepts) and
``repl-acceptor-conn:ADDR`` (one per connection being read, at most
``MAX_PENDING``). The runners of mirror modules share one Acceptor per
node (``Acceptor.shared``); it listens while at least one module is registered.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from node_service.errors import RetryableError

log = logging.getLogger("rampart.replication.acceptor")

MAGIC = b"RAMPART-REPL 1 "
MAX_PREAMBLE = 128
PREAMBLE_TIMEOUT_S = 5.0
PASS_TIMEOUT_S = 5.0
MAX_PENDING = 32
MAX_CONTROL_LINE = 1 << 20
MODULE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class PreambleError(RetryableError):
    """A connection did not start with a valid preamble."""


def encode_preamble(module: str) -> bytes:
    if not MODULE_NAME.fullmatch(module):
        raise PreambleError(f"module name {module!r} cannot be sent in a preamble")
    return MAGIC + module.encode() + b"\n"


def parse_preamble(line: bytes) -> str:
    """The module a preamble names (pure); PreambleError says what is wrong."""
    if not line.startswith(MAGIC) or not line.endswith(b"\n"):
        raise PreambleError(f"expected 'RAMPART-REPL 1 <module>', got {line[:40]!r}")
    name = line[len(MAGIC) : -1].decode("ascii", "replace")
    if not MODULE_NAME.fullmatch(name):
        raise PreambleError(f"invalid module name {name!r} in the preamble")
    return name


def control_path(api_socket: Path, module: str) -> Path:
    """The module's replication control socket, beside the API socket in /run."""
    return Path(api_socket).parent / "repl" / f"{module}.sock"


def preamble_connect(module: str) -> Callable[..., Any]:
    """A ``transport.connect`` that names ``module`` before the TLS handshake."""
    from node_service.replication.transport import HANDSHAKE_TIMEOUT_S, Channel, PeerGone

    preamble = encode_preamble(module)

    def connect(address: tuple[str, int], ctx: Any, peer: str, timeout: float) -> Channel:
        try:
            sock = socket.create_connection(address, timeout=min(timeout, HANDSHAKE_TIMEOUT_S))
        except OSError as exc:
            raise PeerGone(
                f"cannot reach {peer} at {address[0]}:{address[1]}: {exc.strerror or exc}"
            ) from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(preamble)
            return Channel.handshake(sock, ctx, server_hostname=peer, timeout=timeout)
        except OSError as exc:
            sock.close()
            raise PeerGone(f"{peer} closed the connection: {exc.strerror or exc}") from None
        except BaseException:
            sock.close()
            raise

    return connect


def pass_socket(path: Path, sock: socket.socket, origin: str, timeout: float) -> None:
    """Hand ``sock`` to the process listening on ``path`` (blocking, bounded)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as ctl:
        ctl.settimeout(timeout)
        ctl.connect(str(path))
        line = json.dumps({"cmd": "peer_socket", "id": 1, "origin": origin}).encode() + b"\n"
        socket.send_fds(ctl, [line], [sock.fileno()])
        reply = b""
        while not reply.endswith(b"\n") and len(reply) < MAX_CONTROL_LINE:
            chunk = ctl.recv(4096)
            if not chunk:
                break
            reply += chunk
    answer = json.loads(reply or b"{}")
    if not answer.get("ok"):
        raise PreambleError(f"process refused the socket: {answer.get('error', 'no answer')}")


class Acceptor:
    """The node's replication listener (asyncio; all its tasks are owned)."""

    _shared: dict[tuple[str, int], Acceptor] = {}

    def __init__(self, port: int, host: str = "") -> None:
        self.port = port
        self.host = host
        self.modules: dict[str, Path] = {}
        self.refusals: list[str] = []
        self._server: socket.socket | None = None
        self._task: asyncio.Task[Any] | None = None
        self._conns: set[asyncio.Task[Any]] = set()

    @classmethod
    def shared(cls, api_socket: Path, port: int) -> Acceptor:
        """One acceptor per node (a node is known by its API socket)."""
        key = (str(api_socket), port)
        if key not in cls._shared:
            cls._shared[key] = cls(port)
        return cls._shared[key]

    async def register(self, module: str, path: Path) -> None:
        self.modules[module] = path
        if self._task is None:
            self._listen()

    async def unregister(self, module: str) -> None:
        self.modules.pop(module, None)
        if not self.modules:
            await self.close()

    def _listen(self) -> None:
        sock = socket.create_server((self.host, self.port), reuse_port=False)
        sock.setblocking(False)
        self._server = sock
        self.port = sock.getsockname()[1]
        self._task = asyncio.get_running_loop().create_task(
            self._accept_loop(sock), name=f"repl-acceptor:{self.port}"
        )
        log.info("replication port %s open", self.port)

    async def close(self) -> None:
        tasks = [t for t in (self._task, *self._conns) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._task = None
        self._conns.clear()
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _accept_loop(self, server: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, addr = await loop.sock_accept(server)
            except OSError as exc:  # out of descriptors: say so, try again shortly
                log.warning("replication port %s: accept failed: %s", self.port, exc)
                await asyncio.sleep(0.5)
                continue
            origin = f"{addr[0]}:{addr[1]}"
            if len(self._conns) >= MAX_PENDING:
                conn.close()
                self._refuse(origin, f"more than {MAX_PENDING} connections being read")
                continue
            task = loop.create_task(self._route(conn, origin), name=f"repl-acceptor-conn:{origin}")
            self._conns.add(task)
            task.add_done_callback(self._conns.discard)

    async def _route(self, conn: socket.socket, origin: str) -> None:
        try:
            async with asyncio.timeout(PREAMBLE_TIMEOUT_S):
                module = parse_preamble(await self._read_line(conn))
            path = self.modules.get(module)
            if path is None:
                raise PreambleError(f"module {module} has no replication process on this node")
            await asyncio.to_thread(pass_socket, path, conn, origin, PASS_TIMEOUT_S)
        except TimeoutError:
            self._refuse(origin, f"no preamble within {PREAMBLE_TIMEOUT_S:g} s")
        except (PreambleError, OSError, ValueError) as exc:
            self._refuse(origin, str(exc))
        finally:
            conn.close()  # the process holds its own copy of the descriptor

    @staticmethod
    async def _read_line(conn: socket.socket) -> bytes:
        loop = asyncio.get_running_loop()
        line = b""
        while len(line) < MAX_PREAMBLE and not line.endswith(b"\n"):
            byte = await loop.sock_recv(conn, 1)
            if not byte:
                break
            line += byte
        return line

    def _refuse(self, origin: str, reason: str) -> None:
        msg = f"replication connection from {origin} refused: {reason}"
        log.warning("%s", msg)
        self.refusals = [*self.refusals[-99:], msg]
