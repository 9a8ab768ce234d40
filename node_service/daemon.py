"""`rampartd`: the node daemon.

One asyncio process per node. It reads node.yaml, loads every installed
module and builds its runner, resumes the modules that were started before
it last stopped, serves the management API, and on SIGTERM/SIGINT stops
every module per its policy before exiting 0.

Before resuming anything, the daemon removes the virtual IPs a crashed run
left behind (Rampart marks its own), except those of modules it resumes as
PRIM or ALONE: a restarted daemon adopts a serving primary, but a VIP no
running module answers for must not stay up while the cluster decides.

Task ownership: the daemon owns the resume tasks (``resume-NAME``) and the
shutdown tasks (``close-NAME``); the API server owns request handlers;
runners own their own tasks and cancel them in ``stop``/``close``. Nothing
is fire-and-forget. The main loop survives every error of a module (it is
journaled against that module) except FatalError, which stops the daemon
cleanly with exit code 2.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node_service import __version__
from node_service.config import DEFAULT_PATH, NodeConfig
from node_service.errors import CommandRefused, FatalError, RampartError
from node_service.journal import Journal
from node_service.runner import COMMANDS, ModuleRunner, UnsupportedRunner, runner_class
from node_service.store import ModuleStore

log = logging.getLogger("rampart.daemon")
CLOSE_TIMEOUT_S = 170.0  # below the unit's TimeoutStopSec=180
IDLE_STATES = ("STOP", "unsupported", "error")
VIP_STATES = ("PRIM", "ALONE")  # a module resumed in these states still answers for its VIPs


@dataclass(frozen=True)
class ResumeSeen:
    """One installed module as the daemon finds it at start, for the VIP cleanup."""

    module: str
    resumes: bool  # intent "started" and a usable runner
    last_state: str
    vips: tuple[str, ...]


def vips_to_keep(modules: list[ResumeSeen]) -> tuple[frozenset[str], str]:
    """The Rampart VIPs a starting daemon leaves in place, and why.

    Only a module resumed as PRIM/ALONE keeps its VIPs: its runner adopts the
    running application. Any other leftover (a module stopped, removed,
    resumed as SECOND or not loadable) would answer for an address nobody
    serves, or that the peer now serves.
    """
    keep: dict[str, str] = {}
    for seen in modules:
        if seen.resumes and seen.last_state in VIP_STATES:
            for address in seen.vips:
                keep.setdefault(address, f"{seen.module} resumes as {seen.last_state}")
    if not keep:
        return frozenset(), "no module resumes holding a virtual IP"
    held = "; ".join(f"{address} ({why})" for address, why in sorted(keep.items()))
    return frozenset(keep), f"keeping {held}"


def sd_notify(message: str, environ: dict[str, str] | None = None) -> bool:
    """Tell systemd about readiness/stopping (Type=notify) without a dependency."""
    address = (environ if environ is not None else os.environ).get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", address.lstrip("\0"), exc)
        return False
    return True


@dataclass
class Slot:
    """One installed module as the daemon holds it."""

    name: str
    kind: str
    runner: ModuleRunner | None
    error: str | None = None
    reload_pending: bool = False
    transitions: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def running(self) -> bool:
        return self.runner is not None and self.runner.current_state not in IDLE_STATES

    def state_name(self) -> str:
        return self.runner.current_state if self.runner is not None else "error"


class Daemon:
    """The node: its modules, their runners, and the operations the API exposes."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.started_at = time.time()
        self.journal = Journal(config.node, config.journal_path)
        self.store = ModuleStore(config)
        self.slots: dict[str, Slot] = {}
        self.stopping = asyncio.Event()
        self.exit_code = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self.heartbeats: Any | None = None  # cluster.transport.HeartbeatService, shared
        # Serializes installs, so two uploads of one new module cannot interleave.
        self._install_lock = asyncio.Lock()

    # -- lifecycle -----------------------------------------------------------

    async def run(self) -> int:
        from node_service.api.http_endpoints import HttpEndpoints
        from node_service.api.server import ApiServer

        loop = asyncio.get_running_loop()
        loop.set_default_executor(
            concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="rampartd-io")
        )
        loop.set_exception_handler(self._loop_exception)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_stop, f"signal {signum.name}")
        server = ApiServer(self)
        endpoints = HttpEndpoints(self)  # metrics/health over TCP, when node.yaml asks
        try:
            self.load_modules()
            await self.remove_leftover_vips()
            await server.start()
            await endpoints.start()
            await self.refresh_heartbeats()
            self.journal.record(
                "info", f"rampartd {__version__} started on node {self.config.node} "
                f"with {len(self.slots)} module(s); API on {self.config.api_socket}",
            )  # fmt: skip
            self.resume_modules()
            sd_notify(f"READY=1\nSTATUS=serving {len(self.slots)} module(s)")
            await self.stopping.wait()
        except FatalError as exc:
            self.journal.error(f"rampartd cannot continue: {exc}")
            self.exit_code = exc.exit_code
        sd_notify("STOPPING=1")
        try:
            await self.shutdown()
        finally:
            await endpoints.close()
            await server.close()
            self.journal.record("info", f"rampartd stopped on node {self.config.node}")
            self.journal.close()
        return self.exit_code

    def request_stop(self, why: str, exit_code: int = 0) -> None:
        if not self.stopping.is_set():
            log.info("stopping: %s", why)
            self.exit_code = self.exit_code or exit_code
            self.stopping.set()

    def spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        """Start an owned, named task; it is cancelled at shutdown if still running."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def shutdown(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        closing = [
            self.spawn(self._close_slot(slot), f"close-{slot.name}")
            for slot in self.slots.values()
            if slot.runner is not None
        ]
        await asyncio.gather(*closing, return_exceptions=True)
        if self.heartbeats is not None:
            await self.heartbeats.close()
            self.heartbeats = None

    async def _close_slot(self, slot: Slot, when: str = "at shutdown") -> None:
        assert slot.runner is not None
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await slot.runner.close()
        except Exception as exc:
            self.journal.error(f"stopping {when} failed: {_describe(exc)}", slot.name)

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, FatalError):
            self.request_stop(str(exc), exc.exit_code)
        where = context.get("task") or context.get("future")
        name = where.get_name() if isinstance(where, asyncio.Task) else "the event loop"
        self.journal.error(f"unexpected error in {name}: {context.get('message')} {exc or ''}")

    # -- modules -------------------------------------------------------------

    def load_modules(self) -> None:
        for name in self.store.names():
            self.slots[name] = self._build_slot(name)

    def _build_slot(self, name: str) -> Slot:
        installed = self.store.get(name)
        kind = installed.kind if installed else "?"
        try:
            module = self.store.load(name)
        except RampartError as exc:
            self.journal.error(f"cannot load installed module: {exc}", name)
            return Slot(name, kind, None, error=str(exc))
        try:
            cls: type[ModuleRunner] = runner_class(module.kind)
            why = None
        except LookupError as exc:
            cls, why = UnsupportedRunner, str(exc)
        args = (module, self.store.module_dir(name), self.config, self.journal, self.heartbeats)
        try:
            runner = UnsupportedRunner(*args, why=why) if why else cls(*args)
        except Exception as exc:
            why = f"the {module.kind} runner failed to load: {_describe(exc)}"
            runner = UnsupportedRunner(*args, why=why)
        if why:
            self.journal.error(why, name)
        slot = Slot(name, module.kind, runner, error=why)
        runner.add_listener(self._on_transition(slot))
        return slot

    def _on_transition(self, slot: Slot):
        def listener(runner: ModuleRunner, old: str, new: str, reason: str) -> None:
            slot.transitions += 1
            self.store.write_record(slot.name, state=new, since=time.time())

        return listener

    def _resumes(self, slot: Slot, record: dict[str, Any]) -> bool:
        return record.get("intent") == "started" and slot.runner is not None and not slot.error

    async def remove_leftover_vips(self) -> None:
        """Remove the VIPs a crashed run left, except those of resumed PRIM/ALONE modules."""
        seen = []
        for slot in self.slots.values():
            record = self.store.read_record(slot.name)
            vips = slot.runner.module.vips if slot.runner is not None else ()
            seen.append(
                ResumeSeen(
                    slot.name,
                    self._resumes(slot, record),
                    str(record.get("state", "STOP")),
                    tuple(v.address for v in vips),
                )
            )
        keep, why = vips_to_keep(seen)
        try:
            from node_service.net import vip

            removed = await asyncio.to_thread(vip.remove_leftovers, keep)
        except Exception as exc:  # netlink refused, pyroute2 missing: say so, go on
            self.journal.error(f"cannot check for virtual IPs left by a crash: {_describe(exc)}")
            return
        for line in removed:
            self.journal.record("info", f"at start, leftover {line} ({why})")

    def resume_modules(self) -> None:
        for slot in self.slots.values():
            record = self.store.read_record(slot.name)
            if self._resumes(slot, record):
                slot.runner.restore_state(
                    str(record.get("state", "STOP")), float(record.get("since", time.time()))
                )
                self.spawn(self._resume(slot), f"resume-{slot.name}")

    async def _resume(self, slot: Slot) -> None:
        assert slot.runner is not None
        async with slot.lock:
            try:
                reason = await slot.runner.resume()
                self.journal.record("info", f"resumed after rampartd restart: {reason}", slot.name)
            except FatalError as exc:
                self.journal.error(f"resume failed, rampartd cannot continue: {exc}", slot.name)
                self.request_stop(str(exc), exc.exit_code)
            except Exception as exc:
                self.journal.error(f"resume failed: {_describe(exc)}", slot.name)

    # -- heartbeats: one service per node, shared by every module's runner ----

    def _local_addresses(self) -> tuple[str, ...]:
        found: list[str] = []
        for slot in self.slots.values():
            if slot.runner is not None and self.config.node in slot.runner.module.node_names:
                found.extend(slot.runner.module.node(self.config.node).addresses)
        return tuple(dict.fromkeys(found))

    async def refresh_heartbeats(self) -> None:
        """Listen for heartbeats on every address this node has in its modules.

        The service binds its sockets once, so a module bringing a new address
        means a new service; that is only done while no module is running
        (a running module would see its peers restart), otherwise a warning
        says to restart rampartd.
        """
        wanted = self._local_addresses()
        current = self.heartbeats.local_addresses if self.heartbeats is not None else ()
        missing = [a for a in wanted if a not in current]
        if not missing:
            return
        if any(slot.running for slot in self.slots.values()):
            self.journal.warning(
                f"heartbeats do not listen on {', '.join(missing)} yet: restart rampartd "
                "when no module is running (systemctl restart rampartd)"
            )
            return
        from node_service.cluster import pki, transport

        try:
            secret = pki.load_heartbeat_secret(self.config.site_dir)
        except RampartError as exc:
            self.journal.warning(f"modules run without heartbeats: {exc}")
            return
        if self.heartbeats is not None:
            await self.heartbeats.close()
            self.heartbeats = None
        try:
            service = transport.HeartbeatService(
                self.config.node,
                wanted,
                self.config.heartbeat_port,
                lambda module: pki.heartbeat_key(secret, module),
                incarnation=transport.next_incarnation(
                    self.config.state_dir / "heartbeat.incarnation"
                ),
                journal=self._heartbeat_journal,
            )
            await service.start()
        except (RampartError, OSError) as exc:
            self.journal.error(f"heartbeats cannot start on {', '.join(wanted)}: {exc}")
            return
        self.heartbeats = service
        for slot in self.slots.values():
            if slot.runner is not None:
                slot.runner.heartbeats = service

    def _heartbeat_journal(self, severity: str, line: str) -> None:
        module = None
        if line.startswith("module ") and ": " in line:
            module, line = line[len("module ") :].split(": ", 1)
        if severity in ("warning", "error"):
            self.journal.record(severity, line, module, severity=severity)
        elif severity == "info":
            self.journal.record("info", line, module)
        else:  # critical: a peer lost is what an operator must see first
            self.journal.record("error", line, module, severity="error")

    def slot(self, name: str) -> Slot:
        slot = self.slots.get(name)
        if slot is None:
            known = ", ".join(sorted(self.slots)) or "none"
            raise CommandRefused(
                f"module {name} is not installed on node {self.config.node} (installed: {known})"
            )
        return slot

    def state(self, name: str) -> dict[str, Any]:
        slot = self.slot(name)
        base = {"module": name, "kind": slot.kind, "node": self.config.node}
        if slot.runner is None:
            return {**base, "state": "error", "since": None, "error": slot.error}
        try:
            state = slot.runner.state()
        except Exception as exc:
            return {**base, "state": slot.state_name(), "error": _describe(exc)}
        record = self.store.read_record(name)
        state.setdefault("intent", record.get("intent", "stopped"))
        return state

    def states(self) -> list[dict[str, Any]]:
        return [self.state(name) for name in sorted(self.slots)]

    def metrics(self, name: str) -> dict[str, Any]:
        slot = self.slots.get(name)
        if slot is None or slot.runner is None:
            return {}
        try:
            return dict(slot.runner.metrics())
        except Exception as exc:
            log.debug("metrics of %s failed: %s", name, exc)
            return {}

    # -- operations (called by the API; the caller has checked the role) -----

    async def command(self, name: str, verb: str, user: str) -> dict[str, Any]:
        if verb not in COMMANDS:
            raise CommandRefused(f"unknown command {verb!r}; expected one of {', '.join(COMMANDS)}")
        slot = self.slot(name)
        self.journal.record("command", f"{verb} requested by {user}", name, command=verb)
        async with slot.lock:
            if verb == "start" and slot.reload_pending and not slot.running:
                slot = self._reload(slot)
            runner = slot.runner
            if runner is None:
                raise CommandRefused(f"module {name} cannot be used: {slot.error}")
            try:
                if verb == "stop":
                    reason = await runner.stop(f"stop command from {user}")
                    self.store.write_record(name, intent="stopped")
                elif verb == "start":
                    reason = await runner.start()
                    self.store.write_record(name, intent="started")
                elif verb == "stopstart":
                    # Stop first: a reinstall while running is only picked up
                    # once the old runner has stopped.
                    await runner.stop(f"stopstart command from {user}")
                    if slot.reload_pending:
                        slot = self._reload(slot)
                        if slot.runner is None:
                            raise CommandRefused(
                                f"module {name} stopped; its new files cannot be used: {slot.error}"
                            )
                        runner = slot.runner
                    reason = await runner.start()
                    self.store.write_record(name, intent="started")
                else:
                    reason = await runner.command(verb)
            except (RampartError, asyncio.CancelledError):
                raise
            except Exception as exc:
                self.journal.error(f"{verb} failed: {_describe(exc)}", name)
                raise RampartError(f"module {name}: {verb} failed: {_describe(exc)}") from exc
        self.journal.record("command", f"{verb} done: {reason}", name, command=verb)
        return {"module": name, "command": verb, "reason": reason, "state": self.state(name)}

    def _reload(self, slot: Slot) -> Slot:
        """A stopped module's slot rebuilt from its newly installed files.

        The new slot takes over the old one's lock (the caller holds it, and
        a command arriving meanwhile must wait for it) and transition count.
        """
        fresh = self._build_slot(slot.name)
        fresh.lock, fresh.transitions = slot.lock, slot.transitions
        self.slots[slot.name] = fresh
        version = getattr(fresh.runner.module, "version", "?") if fresh.runner else "?"
        self.journal.record("info", f"new files loaded (version {version})", slot.name)
        return fresh

    async def install(self, safe_path: Path, user: str) -> dict[str, Any]:
        from node_service.module import safe

        # Read the name first (unverified) only to take the right module's lock.
        name = await asyncio.to_thread(_peek_name, safe, safe_path)
        slot = self.slots.get(name) if name else None
        lock = slot.lock if slot is not None else asyncio.Lock()
        async with self._install_lock, lock:
            running = slot.running if slot is not None else False
            installed, reason = await asyncio.to_thread(self.store.install, safe_path, running)
            current = self.slots.get(installed.name)
            if current is not None and current.running:
                current.reload_pending = True
            else:
                self.slots[installed.name] = self._build_slot(installed.name)
            await self.refresh_heartbeats()
        self.journal.record("info", f"{reason} by {user}", installed.name)
        return {"module": installed.as_json(), "reason": reason}

    async def remove(self, name: str, user: str) -> dict[str, Any]:
        slot = self.slot(name)
        async with slot.lock:
            if slot.running:
                raise CommandRefused(
                    f"module {name} is {slot.state_name()} on node {self.config.node}: "
                    f"stop it first (rampart stop -m {name})"
                )
            if slot.runner is not None:
                # A stopped runner may still hold resources: a mirror keeps
                # telling its peer STOP until close() drops its heartbeats.
                await self._close_slot(slot, "before removal")
            reason = await asyncio.to_thread(self.store.remove, name)
            del self.slots[name]
        self.journal.record("info", f"{reason} by {user}", name)
        return {"module": name, "reason": reason}

    def installed(self) -> list[dict[str, Any]]:
        listed = []
        for item in self.store.list():
            slot = self.slots.get(item.name)
            listed.append(
                {**item.as_json(), "state": slot.state_name() if slot else "error"}
                | ({"error": slot.error} if slot and slot.error else {})
            )
        return listed


def _peek_name(safe: Any, path: Path) -> str | None:
    try:
        from node_service.module import userconfig

        return userconfig.parse(safe.read_userconfig(path)).name
    except Exception:
        return None


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def setup_logging(level: str) -> None:
    # Under systemd, journald stamps each line itself (JOURNAL_STREAM is set).
    fmt = "%(levelname)s %(name)s: %(message)s"
    if not os.environ.get("JOURNAL_STREAM"):
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr, format=fmt)


def build_parser() -> argparse.ArgumentParser:
    """rampartd's arguments (also read by clidoc for docs/cli-reference.md)."""
    parser = argparse.ArgumentParser(prog="rampartd", description="Rampart node daemon.")
    parser.add_argument("--config", type=Path, default=DEFAULT_PATH, help="node.yaml path")
    parser.add_argument("--version", action="version", version=f"rampartd {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    from node_service import config as config_mod

    args = build_parser().parse_args(argv)
    try:
        config = config_mod.load(args.config)
    except RampartError as exc:
        print(f"rampartd: {exc}", file=sys.stderr)
        return exc.exit_code
    setup_logging(config.log_level)
    try:
        return asyncio.run(Daemon(config).run())
    except RampartError as exc:
        print(f"rampartd: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        # Typically the journal or socket directory: not writable, wrong path.
        print(f"rampartd: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
