"""The replication process of one mirror module on one node.

``python -m node_service.replication.process --module-dir D --node N ...``

rampartd's mirror runner starts one per mirror module, so heavy file I/O
never delays heartbeats, and drives it over a unix socket (JSON lines,
control.py): ``become_primary`` (mount the FUSE layer over every replicated
dir, connect to the peer, resync), ``become_secondary`` (read-only view,
receive), ``off``, ``status``, ``verify``, ``sync``, ``stop``. It pushes
back events (resync progress, stale, errors) and a status line every second.

The peer's TCP connection reaches this process through rampartd's acceptor
(acceptor.py), which reads the plaintext preamble naming the module and
passes the raw socket over the control socket (SCM_RIGHTS); the mutual-TLS
handshake and the HELLO check happen here. Our own outgoing connections
send the same preamble first.

Threads, all named and owned by ``ReplicationProcess``: ``repl-control-M``
(accepts control connections), ``repl-control-conn-M-N`` (one per control
connection), ``repl-link-M`` (primary: connects and resyncs whenever the
link is down), ``repl-status-M`` (pushes the status), ``repl-handshake-M``
(TLS of a socket the acceptor passed); plus the sender's, receiver's and
dirty tracker's own threads and one FUSE thread per mount.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from node_service.errors import RampartError
from node_service.replication import frames
from node_service.replication import sender as sender_module
from node_service.replication.acceptor import MAX_CONTROL_LINE, preamble_connect
from node_service.replication.dirty import DirtyLog, DirtyTracker
from node_service.replication.link import Link, state_fields
from node_service.replication.roles import (
    clear_leftovers,
    ensure_dirs,
    secondary_status,
    tracked_receiver,
)
from node_service.replication.splitbrain import SplitBrainCopy
from node_service.replication.transport import Accepted, Channel, Endpoint, PeerGone, check_hello

log = logging.getLogger("rampart.replication.process")

STATUS_PERIOD_S = 1.0
RETRY_S = 1.0  # between two connection attempts to an absent peer


class ReplicationProcess:
    """Everything this module's replication does on this node, in one role at a time."""

    def __init__(
        self,
        *,
        module: Any,
        node: str,
        module_dir: Path,
        site_dir: Path,
        port: int,
        control_path: Path,
    ):
        self.module = module
        self.name = module.name
        self.node = node
        self.peer = module.peer_of(node)
        self.dirs = module.replicated_dirs
        self.mode = module.replication_mode or "sync"
        self.timeout = module.heartbeat_timeout
        self.site_dir = site_dir
        self.port = port
        self.control_path = control_path
        self.state_dir = module_dir / "state"
        self.log = DirtyLog(self.state_dir / "dirty.sqlite")
        self.role = "off"
        self.generation = 0
        self.tracker: DirtyTracker | None = None
        self.sender: Any = None
        self.resync: Any = None
        self.mounts: list[Any] = []
        self.receiver: Any = None
        self.views: list[Any] = []
        self.synced = False  # secondary: a resync with the current primary completed
        self.fatal: str | None = None
        self.last_resync: dict[str, Any] | None = None
        self._force_full = False
        self._role_lock = threading.Lock()
        self._stop = threading.Event()
        self._stop_after_reply = False
        self._wake = threading.Event()  # the link thread: something changed
        self._changed = threading.Event()  # the status thread: push now
        self._subscribers: list[tuple[socket.socket, threading.Lock]] = []
        self._sub_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._conn_count = 0
        self._conns: set[socket.socket] = set()
        self._server: socket.socket | None = None

    # ---- events and status ---------------------------------------------------

    def event(self, severity: str, message: str, **extra: Any) -> None:
        getattr(log, "error" if severity == "error" else "info")("%s", message)
        self._push({"type": "event", "severity": severity, "message": message, **extra})
        self._changed.set()

    def _push(self, line: dict[str, Any]) -> None:
        data = json.dumps(line, separators=(",", ":")).encode() + b"\n"
        with self._sub_lock:
            subscribers = list(self._subscribers)
        for sock, lock in subscribers:
            try:
                with lock:
                    sock.sendall(data)
            except OSError:
                with self._sub_lock, contextlib.suppress(ValueError):
                    self._subscribers.remove((sock, lock))

    def status(self) -> dict[str, Any]:
        base: dict[str, Any] = {
            "role": self.role,
            "mode": self.mode,
            "fatal": self.fatal,
            "last_resync": self.last_resync,
        }
        if self.role == "primary" and self.sender is not None:
            stats = self.sender.stats()
            resyncing = bool(self.resync and self.resync.running)
            remaining = self.resync.remaining_bytes if self.resync else 0
            fields = state_fields(self.mode, stats, resyncing, remaining)
            fields.update(
                uptodate=stats.link == Link.CONNECTED and not resyncing,
                bytes_sent=stats.bytes_sent,
                resent_bytes=stats.resent_bytes,
                lag_ops=stats.lag_ops,
            )
            if self.fatal:
                fields.update(status="stale", reason=self.fatal)
            return {**base, **fields}
        if self.role == "secondary" and self.receiver is not None:
            stats = self.receiver.stats()
            return {**base, **secondary_status(self.mode, stats, self.synced)}
        return {
            **base,
            "status": "off",
            "reason": "replication is off on this node",
            "uptodate": False,
            "bytes_per_s": 0,
            "lag_bytes": 0,
            "resync_remaining_bytes": 0,
        }

    # ---- roles ---------------------------------------------------------------

    def become_primary(self, generation: int = 0, peer_lost: bool = False) -> str:
        """Mount and replicate; ``peer_lost``: taking over (ALONE), the peer is known gone.

        A node taking over starts with the link ABSENT: writes are only
        recorded, and the link thread dials in the background (see _link_loop).
        """
        from node_service.replication.mount import mount_replicated
        from node_service.replication.resync import Resync

        with self._role_lock:
            self.generation = generation
            if self.role == "primary":
                return f"already the replication source of {self.name}"
            self._teardown()
            clear_leftovers(self.dirs)
            self._ensure_dirs()
            self.tracker = DirtyTracker(self.log, name=self.name)
            self.sender = sender_module.Sender(
                module=self.name,
                node=self.node,
                peer=self.peer.name,
                dirs=self.dirs,
                tracker=self.tracker,
                mode=self.mode,
                timeout=self.timeout,
                on_event=self.event,
            )
            if peer_lost:
                self.sender.mark_absent(
                    f"{self.peer.name} is lost ({self.node} serves alone); "
                    "changes are recorded for the resync when it returns"
                )
            try:
                for d in self.dirs:
                    mount = mount_replicated(d, self.sender.replicator(d), name=self.name)
                    mount.operations.on_fatal = self._on_fatal
                    self.mounts.append(mount)
            except RampartError:
                self._teardown()
                raise
            self.resync = Resync(
                self.sender,
                [m.root_fd for m in self.mounts],
                ordering=[m.operations for m in self.mounts],
            )
            self.role = "primary"
            self._spawn(self._link_loop, f"repl-link-{self.name}")
        self._changed.set()
        return f"replicating {', '.join(self.dirs)} of {self.name} to {self.peer.name}"

    def become_secondary(self, preserve: bool = False) -> str:
        from node_service.replication.applier import Applier
        from node_service.replication.mount import protect_readonly
        from node_service.replication.receiver import Receiver, syncfs

        with self._role_lock:
            saved = self.preserve_split_brain() if preserve else ""
            if self.role == "secondary":
                return saved or f"already the replication target of {self.name}"
            self._teardown()
            clear_leftovers(self.dirs)
            self._ensure_dirs()
            try:
                self.views = [protect_readonly(d) for d in self.dirs]
            except RampartError:
                self._teardown()
                raise
            views = self.views
            self.tracker = DirtyTracker(
                self.log, name=self.name, before_clear=lambda: [syncfs(v.fd) for v in views]
            )
            self.synced = False
            self.receiver = tracked_receiver(Receiver)(
                on_resynced=self._resynced,
                module=self.name,
                node=self.node,
                peer=self.peer.name,
                dirs=self.dirs,
                tracker=self.tracker,
                dirty_log=self.log,
                appliers=lambda: [Applier(v.fd, replay=False) for v in views],
                timeout=self.timeout,
                on_event=self.event,
            )
            self.role = "secondary"
        self._changed.set()
        where = ", ".join(self.dirs)
        text = f"receiving {where} of {self.name} from {self.peer.name} (read-only here)"
        return f"{saved}; {text}" if saved else text

    def _ensure_dirs(self) -> None:
        try:
            created = ensure_dirs(self.dirs)
        except OSError as exc:
            raise RampartError(
                f"module {self.name}: cannot create replicated directory: {exc}"
            ) from None
        for d in created:
            self.event("info", f"module {self.name}: created missing replicated directory {d}")

    def _resynced(self) -> None:
        self.synced = True
        self._changed.set()

    def off(self, why: str = "replication off") -> str:
        with self._role_lock:
            was = self.role
            self._teardown()
        self._changed.set()
        return f"replication of {self.name} off (was {was}): {why}"

    def _teardown(self) -> None:
        """Back to 'off': unmount, unprotect, close; never leaves a mount behind."""
        self.role = "off"
        self._wake.set()
        if self.sender is not None:
            self.sender.close()
        for mount in self.mounts:
            try:
                mount.unmount()
            except RampartError as exc:
                self.event("error", f"module {self.name}: {exc}")
        if self.receiver is not None:
            self.receiver.close()
        for view in self.views:
            try:
                view.unprotect()
            except RampartError as exc:
                self.event("error", f"module {self.name}: {exc}")
        if self.tracker is not None:
            self.tracker.close()
        self.sender = self.resync = self.receiver = self.tracker = None
        self.mounts, self.views = [], []
        self.synced = False

    def _on_fatal(self, reason: str) -> None:
        self.fatal = reason
        self.event(
            "error",
            f"module {self.name}: the dirty log cannot be written ({reason}); writes to "
            f"{', '.join(self.dirs)} now fail with EIO: stop or fail over this module",
            fatal=True,
        )

    # ---- primary: connect and resync -------------------------------------------

    def _dial(self, sender: Any) -> Any:
        """Connect to the peer holding no lock the FUSE operations need (bounded by the timeout)."""
        from node_service.cluster import pki

        ctx = pki.tls_context(self.site_dir, server=False)
        address = (self.peer.addresses[0], self.port)
        return sender.dial(address, ctx, self.generation)

    def _resync(self, sender: Any, resync: Any, full: bool | None) -> Any:
        """Dial first, then resync: the namespace lock is only held once the peer answered.

        A dead peer (a takeover, every retry while ALONE) then costs this
        thread the connect timeout, and the application nothing.
        """
        dialed = self._dial(sender)
        attached = False

        def attach() -> None:
            nonlocal attached
            attached = True
            sender.attach(dialed, resync=True)

        try:
            return resync.run(attach, full=full)
        finally:
            if not attached:
                dialed[0].close()

    def _link_loop(self) -> None:
        while not self._stop.is_set():  # and while this node is the primary
            if self.role != "primary" or self.sender is None:
                return
            sender, resync = self.sender, self.resync
            full = True if self._force_full else None
            if sender.link != Link.CONNECTED or full:
                self._force_full = False
                try:
                    result = self._resync(sender, resync, full)
                except (PeerGone, RampartError) as exc:
                    self._changed.set()
                    log.info("module %s: peer not reached: %s", self.name, exc)
                    self._wake.wait(RETRY_S)
                    self._wake.clear()
                    continue
                self.last_resync = {
                    "full": result.full,
                    "regions": result.regions,
                    "differences": result.differences,
                    "bytes_resent": result.bytes_resent,
                    "seconds": round(result.seconds, 3),
                    "at": time.time(),
                }
                self.event("info", f"module {self.name}: {result.reason}", resync=self.last_resync)
            self._wake.wait(RETRY_S)
            self._wake.clear()

    def verify(self) -> list[str]:
        if self.role != "primary" or self.resync is None:
            raise RampartError(
                f"module {self.name}: verify runs on the primary; this node is {self.role}"
            )
        if self.sender.link != Link.CONNECTED:
            raise RampartError(
                f"module {self.name}: cannot verify, {self.peer.name} is not connected "
                f"({self.sender.reason})"
            )
        return self.resync.verify()

    def force_full_sync(self) -> str:
        if self.role != "primary":
            raise RampartError(
                f"module {self.name}: a full sync starts on the primary; this node is {self.role}"
            )
        self._force_full = True
        self._wake.set()
        return f"full sync of {self.name} to {self.peer.name} requested"

    # ---- secondary: sockets passed by the acceptor -----------------------------

    def take_socket(self, fd: int, origin: str) -> None:
        sock = socket.socket(fileno=fd)
        if self.role != "secondary" or self.receiver is None:
            sock.close()
            log.warning("module %s: connection from %s closed: not SECOND here", self.name, origin)
            return
        self._spawn(lambda: self._handshake(sock, origin), f"repl-handshake-{self.name}")

    def _handshake(self, sock: socket.socket, origin: str) -> None:
        from node_service.cluster import pki

        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            ctx = pki.tls_context(self.site_dir, server=True)
            channel = Channel.handshake(sock, ctx, server_hostname=None, timeout=self.timeout)
            hello = frames.parse_hello(channel.read_frame(self.timeout))
            endpoints = {self.name: Endpoint(self.name, self.peer.name, lambda a: None)}
            reason = check_hello(hello, channel.peer_node(), endpoints)
        except RampartError as exc:
            sock.close()
            log.warning("module %s: connection from %s refused: %s", self.name, origin, exc)
            return
        receiver = self.receiver
        if reason or receiver is None:
            reason = reason or "not SECOND here any more"
            with contextlib.suppress(RampartError):
                channel.send_frame(frames.error(0, 1, reason))
            channel.close()
            log.warning("module %s: connection from %s refused: %s", self.name, origin, reason)
            return
        self.synced = False  # a new primary connection: up to date once its resync ends
        self._changed.set()
        receiver.accept(Accepted(channel, hello))

    # ---- split brain -------------------------------------------------------------

    def preserve_split_brain(self) -> str:
        regions = self.tracker.recorded() if self.tracker else self.log.regions()
        copy = SplitBrainCopy.plan(self.state_dir, self.dirs, regions)
        if not copy.paths:
            return f"split brain on {self.node}: no diverging files to preserve"
        copied = copy.run()
        text = (
            f"split brain on {self.node}: {copied} diverging file(s) of {self.name} "
            f"preserved in {copy.folder} before the resync overwrites them"
        )
        self.event("warning", text, folder=str(copy.folder))
        return text

    # ---- the control socket ------------------------------------------------------

    def serve(self) -> int:
        self.control_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileNotFoundError):
            self.control_path.unlink()
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(self.control_path))
        os.chmod(self.control_path, 0o600)
        server.listen(16)
        server.settimeout(0.5)
        self._server = server
        self._spawn(self._accept_loop, f"repl-control-{self.name}")
        self._spawn(self._status_loop, f"repl-status-{self.name}")
        print("ready", flush=True)  # the runner waits for this line
        self._stop.wait()
        self.shutdown()
        return 0

    def request_stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def shutdown(self) -> None:
        with self._role_lock:
            self._teardown()
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):  # wakes their threads: the runner sees EOF
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(FileNotFoundError):
            self.control_path.unlink()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=5)
        self.log.close()

    def _spawn(self, target: Any, name: str) -> None:
        self._threads = [t for t in self._threads if t.is_alive()]
        thread = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._conn_count += 1
            self._spawn(
                lambda c=conn: self._serve_conn(c),
                f"repl-control-conn-{self.name}-{self._conn_count}",
            )

    def _serve_conn(self, conn: socket.socket) -> None:
        lock = threading.Lock()
        buffer = b""
        self._conns.add(conn)
        try:
            while not self._stop.is_set():
                data, fds, _, _ = socket.recv_fds(conn, 65536, 4)
                if not data and not fds:
                    return
                buffer += data
                if len(buffer) > MAX_CONTROL_LINE:
                    return
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    reply = self._handle(line, fds, conn, lock)
                    fds = []
                    if reply is not None:
                        with lock:
                            conn.sendall(json.dumps(reply).encode() + b"\n")
                    if self._stop_after_reply:
                        self.request_stop()
                for fd in fds:  # descriptors without a command line: not ours to keep
                    os.close(fd)
        except OSError:
            return
        finally:
            with self._sub_lock, contextlib.suppress(ValueError):
                self._subscribers.remove((conn, lock))
            self._conns.discard(conn)
            conn.close()

    def _handle(
        self, line: bytes, fds: list[int], conn: socket.socket, lock: threading.Lock
    ) -> dict[str, Any] | None:
        try:
            request = json.loads(line)
            cmd, rid = request["cmd"], request.get("id")
        except (ValueError, KeyError, TypeError):
            for fd in fds:
                os.close(fd)
            return {"type": "reply", "ok": False, "error": "expected one JSON object with 'cmd'"}
        if cmd == "peer_socket":
            if len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                return {"type": "reply", "id": rid, "ok": False, "error": "expected one socket"}
            self.take_socket(fds[0], str(request.get("origin", "?")))
            return {"type": "reply", "id": rid, "ok": True, "result": {}}
        for fd in fds:
            os.close(fd)
        try:
            result = self._command(cmd, request)
        except RampartError as exc:
            return {"type": "reply", "id": rid, "ok": False, "error": str(exc)}
        except Exception as exc:  # a bug must reach the runner's journal, not kill the process
            log.exception("command %s failed", cmd)
            return {
                "type": "reply",
                "id": rid,
                "ok": False,
                "error": f"{type(exc).__name__}: {exc}",
            }
        if cmd == "subscribe":
            with self._sub_lock:
                self._subscribers.append((conn, lock))
        return {"type": "reply", "id": rid, "ok": True, "result": result}

    def _command(self, cmd: str, request: dict[str, Any]) -> Any:
        if cmd == "become_primary":
            generation, lost = int(request.get("generation", 0)), bool(request.get("peer_lost"))
            return {"reason": self.become_primary(generation, peer_lost=lost)}
        if cmd == "become_secondary":
            return {"reason": self.become_secondary(bool(request.get("preserve", False)))}
        if cmd == "preserve_split_brain":
            return {"reason": self.preserve_split_brain()}
        if cmd == "off":
            return {"reason": self.off(str(request.get("why", "replication off")))}
        if cmd == "status" or cmd == "subscribe":
            return self.status()
        if cmd == "verify":
            return {"differences": self.verify()}
        if cmd == "sync":
            return {"reason": self.force_full_sync()}
        if cmd == "stop":
            # Stopped once the reply is out: shutdown closes every control connection.
            self._stop_after_reply = True
            return {"reason": f"replication process of {self.name} stopping"}
        raise RampartError(f"unknown replication command {cmd!r}")

    def _status_loop(self) -> None:
        while not self._stop.is_set():
            self._changed.wait(STATUS_PERIOD_S)
            self._changed.clear()
            try:
                self._push({"type": "status", "status": self.status()})
            except Exception as exc:  # status must never end the loop
                log.warning("status failed: %s", exc)


# ---- entry point -------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m node_service.replication.process")
    p.add_argument("--module-dir", required=True, type=Path, help="/var/lib/rampart/modules/M")
    p.add_argument("--node", required=True, help="this node's name")
    p.add_argument("--site-dir", required=True, type=Path, help="/etc/rampart/site")
    p.add_argument("--port", required=True, type=int, help="the peer's replication port")
    p.add_argument("--control", required=True, type=Path, help="control socket path")
    p.add_argument("--log-level", default="info")
    return p


def main(argv: list[str] | None = None) -> int:
    from node_service.module import userconfig

    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="rampart-repl[%(process)d] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        module = userconfig.load_dir(args.module_dir / "module")
        process = ReplicationProcess(
            module=module,
            node=args.node,
            module_dir=args.module_dir,
            site_dir=args.site_dir,
            port=args.port,
            control_path=args.control,
        )
    except RampartError as exc:
        print(f"rampart-repl: {exc}", file=sys.stderr)
        return exc.exit_code
    # Our handlers first: libfuse installs its own only where the default is left.
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda *_: process.request_stop())
    sender_module.connect = preamble_connect(module.name)
    return process.serve()


if __name__ == "__main__":
    sys.exit(main())
