"""The management API: HTTP/JSON on a unix socket (aiohttp).

Every request is tied to the peer's uid (SO_PEERCRED) and authorized by
``roles.authorize`` before the handler runs. Errors come back as
``{"error": one line, "type": class name, "exit_code": n}`` with 400
(bad input), 403 (role), 404 (no such path), 409 (refused now) or 500,
so the CLI can print the line and exit with the code.

Endpoints (all JSON; streams are JSON lines, ``application/x-ndjson``):

    GET    /v1/health                          anyone
    GET    /v1/state[?module=M]                read
    GET    /v1/modules                         read
    POST   /v1/modules                         install  (body: the .safe file)
    DELETE /v1/modules/{name}                  remove
    POST   /v1/modules/{name}/{command}        per command role
    GET    /v1/modules/{name}/repl/status      read
    POST   /v1/modules/{name}/repl/verify      read
    POST   /v1/modules/{name}/repl/sync        repl-sync (operator)
    GET    /v1/events[?module=M&limit=N&follow=1]   read
    GET    /v1/watch[?module=M]                read (stream, see watch.py)
    GET    /metrics                            read (Prometheus text)
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import logging
import os
import socket
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from node_service.api import roles
from node_service.errors import CommandRefused, FatalError, RampartError, UserError
from node_service.runner import COMMANDS

if TYPE_CHECKING:
    from node_service.daemon import Daemon

log = logging.getLogger("rampart.api")
MAX_UPLOAD = 260 * 1024 * 1024  # a .safe is at most 256 MiB uncompressed
SOCKET_GROUP = "rampart"
DAEMON_KEY = web.AppKey("daemon", object)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(status: int, exc: BaseException) -> web.Response:
    code = exc.exit_code if isinstance(exc, RampartError) else 1
    body = {"error": str(exc) or type(exc).__name__, "type": type(exc).__name__, "exit_code": code}
    return web.json_response(body, status=status)


def status_of(exc: RampartError) -> int:
    if isinstance(exc, CommandRefused):
        return 409
    if isinstance(exc, UserError):
        return 400
    return 500


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except FatalError as exc:
        daemon: Daemon = request.app[DAEMON_KEY]  # type: ignore[assignment]
        daemon.request_stop(str(exc), exc.exit_code)
        return error_response(500, exc)
    except RampartError as exc:
        return error_response(status_of(exc), exc)
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception as exc:
        log.exception("API handler failed")
        return error_response(500, exc)


def identity_of(request: web.Request) -> roles.Identity:
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is None:
        raise RampartError("cannot read the caller's credentials")
    return roles.peer_identity(sock)


def require(request: web.Request, action: str) -> roles.Identity:
    identity = identity_of(request)
    allowed, reason = roles.authorize(identity, action)
    if not allowed:
        raise web.HTTPForbidden(
            text=json.dumps({"error": reason, "type": "Forbidden", "exit_code": 3}),
            content_type="application/json",
        )
    return identity


class ApiServer:
    """Owns the aiohttp runner and the socket file."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.path = daemon.config.api_socket
        self.app = web.Application(middlewares=[errors_middleware], client_max_size=MAX_UPLOAD)
        self.app[DAEMON_KEY] = daemon
        self.app.add_routes(
            [
                web.get("/v1/health", self.health),
                web.get("/v1/state", self.state),
                web.get("/v1/modules", self.list_modules),
                web.post("/v1/modules", self.install),
                web.delete("/v1/modules/{name}", self.remove),
                web.post("/v1/modules/{name}/{command}", self.command),
                web.get("/v1/modules/{name}/repl/status", self.repl),
                web.post("/v1/modules/{name}/repl/{cmd}", self.repl),
                web.get("/v1/events", self.events),
                web.get("/v1/watch", self.watch),
                web.get("/metrics", self.metrics),
            ]
        )
        self._runner: web.AppRunner | None = None
        self._owns_socket = False

    async def start(self) -> None:
        self._prepare_path()
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        await web.UnixSite(self._runner, str(self.path)).start()
        self._owns_socket = True
        self._secure_socket()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._owns_socket:  # never remove the socket of another daemon
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self._owns_socket = False

    def _prepare_path(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        if not self.path.exists():
            return
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(self.path))
        except OSError:
            self.path.unlink()  # stale socket of a daemon that died
        else:
            raise FatalError(f"another rampartd is already serving {self.path}")
        finally:
            probe.close()

    def _secure_socket(self) -> None:
        # With the 'rampart' group: root:rampart 0660 (the product contract).
        # Without it, anyone may connect and every request is still checked
        # against the caller's groups, so outsiders get a clear refusal.
        try:
            gid = grp.getgrnam(SOCKET_GROUP).gr_gid
        except KeyError:
            os.chmod(self.path, 0o666)
            return
        os.chown(self.path, 0, gid)
        os.chmod(self.path, 0o660)

    # -- handlers ------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        d = self.daemon
        return web.json_response(
            {
                "status": "stopping" if d.stopping.is_set() else "ok",
                "node": d.config.node,
                "modules": {name: slot.state_name() for name, slot in d.slots.items()},
                "started_at": d.started_at,
            }
        )

    async def state(self, request: web.Request) -> web.Response:
        require(request, "read")
        module = request.query.get("module")
        if module:
            return web.json_response(self.daemon.state(module))
        return web.json_response({"node": self.daemon.config.node, "modules": self.daemon.states()})

    async def list_modules(self, request: web.Request) -> web.Response:
        require(request, "read")
        return web.json_response(
            {"node": self.daemon.config.node, "modules": self.daemon.installed()}
        )

    async def command(self, request: web.Request) -> web.Response:
        verb = request.match_info["command"]
        if verb not in COMMANDS:
            raise CommandRefused(f"unknown command {verb!r}; expected one of {', '.join(COMMANDS)}")
        identity = require(request, verb)
        result = await self.daemon.command(request.match_info["name"], verb, identity.user)
        return web.json_response(result)

    async def repl(self, request: web.Request) -> web.Response:
        cmd = request.match_info.get("cmd", "status")
        if cmd not in ("status", "verify", "sync"):
            raise CommandRefused(f"unknown repl command {cmd!r}; expected status, verify or sync")
        require(request, "repl-sync" if cmd == "sync" else "read")
        name = request.match_info["name"]
        slot = self.daemon.slot(name)
        replication_command = getattr(slot.runner, "replication_command", None)
        if replication_command is None:
            raise CommandRefused(f"module {name} is a {slot.kind} module: it has no replication")
        return web.json_response(await replication_command(cmd))

    async def install(self, request: web.Request) -> web.Response:
        identity = require(request, "install")
        fd, tmp = tempfile.mkstemp(prefix="rampart-upload-", suffix=".safe")
        try:
            with os.fdopen(fd, "wb") as out:
                # client_max_size does not cover streamed bodies: count here.
                size = 0
                async for chunk in request.content.iter_chunked(1 << 20):
                    size += len(chunk)
                    if size > MAX_UPLOAD:
                        raise UserError(
                            f"the uploaded module is larger than {MAX_UPLOAD >> 20} MiB; "
                            "a .safe file is at most 256 MiB"
                        )
                    out.write(chunk)
            result = await self.daemon.install(Path(tmp), identity.user)
        finally:
            os.unlink(tmp)
        return web.json_response(result)

    async def remove(self, request: web.Request) -> web.Response:
        identity = require(request, "remove")
        return web.json_response(
            await self.daemon.remove(request.match_info["name"], identity.user)
        )

    async def events(self, request: web.Request) -> web.StreamResponse:
        require(request, "read")
        # No check that the module is installed: a removed module's history
        # is still worth reading.
        module = request.query.get("module") or None
        limit = _int_query(request, "limit", 50)
        journal = self.daemon.journal
        if request.query.get("follow") not in ("1", "true", "yes"):
            return web.json_response({"events": journal.recent(module, limit)})
        # Subscribe and snapshot in one step so no entry falls between them.
        subscription = journal.subscribe(module)
        backlog = journal.recent(module, limit)
        response = await open_stream(request)
        try:
            for entry in backlog:
                await write_line(response, entry)
            while not self.daemon.stopping.is_set():
                entry = await subscription.get(timeout=1.0)
                if entry is not None:
                    await write_line(response, entry)
        except ConnectionResetError:
            pass
        finally:
            subscription.close()
        return response

    async def watch(self, request: web.Request) -> web.StreamResponse:
        from node_service.api.watch import stream_watch

        require(request, "read")
        module = request.query.get("module") or None
        if module:
            self.daemon.slot(module)
        task = asyncio.current_task()
        if task is not None:
            task.set_name(f"api-watch-{id(request):x}")
        response = await open_stream(request)
        try:
            await stream_watch(self.daemon, module, lambda line: write_line(response, line))
        except ConnectionResetError:
            pass
        return response

    async def metrics(self, request: web.Request) -> web.Response:
        from node_service.api.metrics import render

        require(request, "read")
        body, content_type = render(self.daemon)
        return web.Response(body=body, headers={"Content-Type": content_type})


def _int_query(request: web.Request, key: str, default: int) -> int:
    raw = request.query.get(key)
    if raw is None:
        return default
    try:
        return max(0, int(raw))
    except ValueError:
        raise UserError(f"{key} must be a whole number, got {raw!r}") from None


async def open_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    return response


async def write_line(response: web.StreamResponse, item: dict[str, Any]) -> None:
    await response.write(json.dumps(item, separators=(",", ":"), default=str).encode() + b"\n")
