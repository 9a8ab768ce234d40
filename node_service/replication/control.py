"""The mirror runner's side of a module's replication process (asyncio).

``ProcessReplication`` is what ``MirrorEffects.replication`` is for a module
with replicated directories: the runner's replication actions become
commands to the module's replication process (process.py), started on the
first action and stopped by ``replication_off``. It keeps the last status
the process pushed (once a second and on every change), so ``uptodate()``,
``fields()`` and ``metrics()`` answer at once, and journals the process's
events. An unexpected exit is never left as a hung mount: the leftovers are
detached, the runner is told (a serving node fails over), and a SECOND's
process is started again (bounded).

Tasks, owned here and cancelled by ``close``: ``repl-control:M`` (reads
replies, events and status lines) and ``repl-process:M`` (waits for the
process to exit). Protocol: one JSON object per line both ways; requests
carry an ``id``; replies ``{"type": "reply", "id", "ok", "result"|"error"}``;
pushed lines ``{"type": "event", "severity", "message", ...}`` and
``{"type": "status", "status": {...}}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from node_service.errors import CommandRefused, RampartError
from node_service.replication.acceptor import MAX_CONTROL_LINE, Acceptor, control_path

log = logging.getLogger("rampart.replication.control")

READY_TIMEOUT_S = 20.0
COMMAND_TIMEOUT_S = 60.0
VERIFY_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 20.0
RESTARTS = 3  # a SECOND's process is started again at most this often...
RESTART_WINDOW_S = 60.0  # ...in this window

OFF_FIELDS = {"status": "off", "bytes_per_s": 0, "lag_bytes": 0, "resync_remaining_bytes": 0}


class ReplicationProcessError(RampartError):
    """The replication process refused a command, did not answer, or is not running."""


class ProcessReplication:
    """One module's replication process, seen from its runner."""

    def __init__(
        self,
        *,
        module: Any,
        module_dir: Path,
        node: Any,
        journal: Any,
        on_change: Callable[[], None] = lambda: None,
        on_failure: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self.module = module
        self.name = module.name
        self.module_dir = Path(module_dir)
        self.node = node
        self.journal = journal
        self.on_change = on_change
        self.on_failure = on_failure
        self.control = control_path(node.api_socket, module.name)
        self.role = "off"
        self.last: dict[str, Any] = {}
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._replies: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ids = 0
        self._tasks: list[asyncio.Task[Any]] = []
        self._stopping = False
        self._restarts: list[float] = []
        self._generation = 0

    # ---- what the runner reads ---------------------------------------------------

    def uptodate(self) -> bool:
        return bool(self.last.get("uptodate")) and self.role == "secondary"

    def fields(self) -> dict[str, Any]:
        """The ``replication`` object of ``rampart state --json``."""
        out = {"mode": self.module.replication_mode, **OFF_FIELDS, "role": self.role}
        if self.last and self.role != "off":
            keep = ("status", "reason", "bytes_per_s", "lag_bytes", "resync_remaining_bytes")
            out.update({k: self.last[k] for k in keep if k in self.last})
            out["uptodate"] = bool(self.last.get("uptodate"))
            out["last_resync"] = self.last.get("last_resync")
        return out

    def metrics(self) -> dict[str, Any]:
        f = self.fields()
        return {
            "replication_bytes_per_s": f["bytes_per_s"],
            "replication_lag_bytes": f["lag_bytes"],
            "replication_resync_remaining_bytes": f["resync_remaining_bytes"],
            "replication_uptodate": int(f.get("status") == "uptodate"),
        }

    # ---- the runner's actions ------------------------------------------------------

    async def perform(
        self, action: str, generation: int = 0, *, peer_lost: bool = False
    ) -> tuple[str, str]:
        """Do one replication action; (severity, sentence) for the journal.

        ``peer_lost`` (a source that serves ALONE): the process starts its
        link ABSENT and dials in the background, never in the write path.
        """
        if action == "replication_off":
            return "info", await self.stop("replication off")
        await self._ensure_running()
        if action == "replication_source":
            self._generation = generation
            result = await self.request(
                "become_primary", generation=generation, peer_lost=peer_lost
            )
            self.role = "primary"
        elif action == "replication_target":
            result = await self.request("become_secondary")
            self.role = "secondary"
        elif action == "preserve_split_brain":
            result = await self.request("preserve_split_brain")
            return "warning", result["reason"]
        else:
            raise ReplicationProcessError(f"unknown replication action {action!r}")
        self.on_change()
        return "info", result["reason"]

    async def command(self, cmd: str) -> dict[str, Any]:
        """``rampart repl status|verify|sync`` on this node."""
        if cmd == "status":
            if self._writer is None:
                return {"module": self.name, "node": self.node.node, **self.fields()}
            status = await self.request("status")
            self.last = status
            return {"module": self.name, "node": self.node.node, **self.fields(), **status}
        if self._writer is None:
            raise CommandRefused(
                f"module {self.name}: replication is off on {self.node.node}; "
                "run this on the node where the module is PRIM"
            )
        if cmd == "verify":
            result = await self.request("verify", timeout=VERIFY_TIMEOUT_S)
            return {"module": self.name, "node": self.node.node, **result}
        if cmd == "sync":
            return {"module": self.name, **await self.request("sync")}
        raise CommandRefused(f"unknown repl command {cmd!r}; expected status, verify or sync")

    # ---- the process -----------------------------------------------------------------

    def running(self) -> bool:
        return self._writer is not None

    async def _ensure_running(self) -> None:
        if self._writer is not None:
            return
        self._stopping = False
        self.control.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not await self._adopt():
            await self._spawn()
        loop = asyncio.get_running_loop()
        assert self._reader is not None
        self._tasks = [
            loop.create_task(self._read_loop(self._reader), name=f"repl-control:{self.name}")
        ]
        self.last = await self.request("subscribe")
        self.role = self.last.get("role", "off")
        acceptor = Acceptor.shared(self.node.api_socket, self.node.replication_port)
        try:
            await acceptor.register(self.name, self.control)
        except OSError as exc:
            self.journal.error(
                f"replication port {self.node.replication_port} cannot be opened: {exc}; "
                "this node cannot receive replication",
                self.name,
            )

    async def _adopt(self) -> bool:
        """Take over a process left running by an earlier rampartd (its mounts stay)."""
        try:
            self._reader, self._writer = await asyncio.open_unix_connection(
                str(self.control), limit=MAX_CONTROL_LINE
            )
        except OSError:
            return False
        self.journal.record("info", f"replication process of {self.name} adopted", self.name)
        return True

    async def _spawn(self) -> None:
        # Its own session: a signal meant for rampartd's process group must not
        # unmount the application's data under it.
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "node_service.replication.process",
            "--module-dir",
            str(self.module_dir),
            "--node",
            self.node.node,
            "--site-dir",
            str(self.node.site_dir),
            "--port",
            str(self.node.replication_port),
            "--control",
            str(self.control),
            "--log-level",
            self.node.log_level,
            stdout=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
        assert self._proc.stdout is not None
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                ready = await self._proc.stdout.readline()
        except TimeoutError:
            ready = b""
        if ready.strip() != b"ready":
            await self._kill()
            raise ReplicationProcessError(
                f"module {self.name}: the replication process did not start "
                f"(exit {self._proc.returncode}); see rampartd's log"
            )
        self._reader, self._writer = await asyncio.open_unix_connection(
            str(self.control), limit=MAX_CONTROL_LINE
        )

    async def request(self, cmd: str, timeout: float = COMMAND_TIMEOUT_S, **args: Any) -> Any:
        if self._writer is None:
            raise ReplicationProcessError(
                f"module {self.name}: the replication process is not running"
            )
        self._ids += 1
        rid = self._ids
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._replies[rid] = future
        try:
            self._writer.write(json.dumps({"cmd": cmd, "id": rid, **args}).encode() + b"\n")
            await self._writer.drain()
            async with asyncio.timeout(timeout):
                reply = await future
        except TimeoutError:
            raise ReplicationProcessError(
                f"module {self.name}: replication process did not answer {cmd} in {timeout:g} s"
            ) from None
        except OSError as exc:
            raise ReplicationProcessError(
                f"module {self.name}: replication process unreachable: {exc}"
            ) from None
        finally:
            self._replies.pop(rid, None)
        if not reply.get("ok"):
            raise ReplicationProcessError(f"module {self.name}: {reply.get('error')}")
        return reply.get("result")

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                line = await reader.readline()
            except (OSError, ValueError):
                line = b""
            if not line:
                break
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            kind = msg.get("type")
            if kind == "reply":
                future = self._replies.get(msg.get("id"))
                if future is not None and not future.done():
                    future.set_result(msg)
            elif kind == "status":
                self._take_status(msg.get("status") or {})
            elif kind == "event":
                self._take_event(msg)
        for future in self._replies.values():
            if not future.done():
                future.set_result({"ok": False, "error": "replication process went away"})
        self._writer = None
        if not self._stopping:
            await self._lost()

    def _take_status(self, status: dict[str, Any]) -> None:
        before = (self.last.get("uptodate"), self.last.get("status"))
        self.last = status
        if (status.get("uptodate"), status.get("status")) != before:
            self.on_change()

    def _take_event(self, msg: dict[str, Any]) -> None:
        severity, text = msg.get("severity", "info"), str(msg.get("message", ""))
        if severity == "error":
            self.journal.error(text, self.name)
        elif severity == "warning":
            self.journal.warning(text, self.name)
        else:
            self.journal.record("info", text, self.name)
        if msg.get("fatal"):
            self.on_failure(text)

    async def _lost(self) -> None:
        """The control connection ended without a stop: the process died."""
        code = await self._reap()
        role, self.role = self.role, "off"
        self.last = {}
        reason = f"replication process of {self.name} exited unexpectedly (code {code})"
        _, cleaned = await asyncio.to_thread(_clear_leftovers, self.module.replicated_dirs)
        self.journal.error(f"{reason}; {cleaned}", self.name)
        self.on_failure(reason)
        self.on_change()
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if now - t < RESTART_WINDOW_S]
        if role == "secondary" and len(self._restarts) < RESTARTS:
            self._restarts.append(now)
            await self._restart_secondary()

    async def _reap(self) -> int | str:
        proc, self._proc = self._proc, None
        if proc is None:
            return "?"
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STOP_TIMEOUT_S):
                return await proc.wait()
        proc.kill()
        return await proc.wait()

    async def _restart_secondary(self) -> None:
        try:
            severity, text = await self.perform("replication_target")
            self.journal.record(severity, f"replication process restarted: {text}", self.name)
        except RampartError as exc:
            self.journal.error(f"replication process could not be restarted: {exc}", self.name)

    async def clear_dead_leftovers(self) -> str | None:
        """Detach the mounts of a replication process that died with the last rampartd.

        Under systemd a killed rampartd takes its whole cgroup along (the
        unit's KillMode), the replication process included, and the runtime
        marker goes with /run/rampart: the module then starts afresh and its
        dirs may still carry a dead FUSE mount. A live process (one that
        answers on its control socket) is never touched. Returns what was
        done, or None when there was nothing to do.
        """
        if self._writer is not None or await self._control_answers():
            return None
        detached, text = await asyncio.to_thread(_clear_leftovers, self.module.replicated_dirs)
        return text if detached else None

    async def _control_answers(self) -> bool:
        try:
            _, writer = await asyncio.open_unix_connection(str(self.control))
        except OSError:
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

    async def stop(self, why: str) -> str:
        """Stop the process (it unmounts and unprotects); kill it if it does not end."""
        if self._writer is None:
            self.role = "off"
            cleaned = await self.clear_dead_leftovers()
            tail = f"; {cleaned}" if cleaned else ""
            return f"replication of {self.name} is off{tail}"
        self._stopping = True
        how = "stopped"
        try:
            await self.request("stop", timeout=STOP_TIMEOUT_S)
            # The process closes the control connection when it has cleaned up.
            async with asyncio.timeout(STOP_TIMEOUT_S):
                await asyncio.gather(*self._tasks, return_exceptions=True)
        except (RampartError, TimeoutError):
            how = "killed after not stopping"
        code = await self._reap() if self._proc is not None else None
        if how != "stopped" and code is None:
            how = "not answering (adopted process)"
        await self._end_tasks()
        _, cleaned = await asyncio.to_thread(_clear_leftovers, self.module.replicated_dirs)
        acceptor = Acceptor.shared(self.node.api_socket, self.node.replication_port)
        await acceptor.unregister(self.name)
        self.role = "off"
        self.last = {}
        self.on_change()
        return f"replication of {self.name} {how} ({why}); {cleaned}"

    async def close(self) -> None:
        await self.stop("module closed")

    async def _kill(self) -> None:
        proc = self._proc
        if proc is not None and proc.returncode is None:
            proc.kill()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STOP_TIMEOUT_S):
                    await proc.wait()

    async def _end_tasks(self) -> None:
        tasks, self._tasks = self._tasks, []
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        for task in tasks:
            if task is not asyncio.current_task():
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _clear_leftovers(dirs: tuple[str, ...]) -> tuple[int, str]:
    """How many mounts were detached, and what to journal."""
    from node_service.replication.roles import clear_leftovers

    try:
        detached = clear_leftovers(dirs)
    except RampartError as exc:
        return 1, f"leftover mounts could not all be removed: {exc}"
    return detached, "no mount left behind"
