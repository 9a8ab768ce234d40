"""The contract between rampartd and the code that runs one module of one kind.

rampartd knows nothing about mirrors or farms: for each installed module it
builds a ModuleRunner of the module's kind and forwards commands to it. A
runner owns everything the module does on this node (its tasks, scripts,
virtual IP, replication process) and reports through the journal.

Runner implementations are found by kind in ``RUNNERS`` and imported lazily,
so a daemon built before the farm runner exists still runs mirror modules;
a kind without an implementation becomes an ``UnsupportedRunner`` (listed
with state "unsupported", journaled as an error) instead of a crash.
"""

from __future__ import annotations

import abc
import importlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from node_service.errors import CommandRefused

if TYPE_CHECKING:
    from node_service.config import NodeConfig
    from node_service.journal import Journal
    from node_service.module.model import Module

RUNNERS: dict[str, str] = {
    "mirror": "node_service.mirror.runner:MirrorRunner",
    "farm": "node_service.farm.runner:FarmRunner",
}

# Test-only hook: "kind=package.module:Class[,kind=...]" overrides RUNNERS so
# the daemon's own tests can run it with a small in-memory runner. It is read
# from the daemon's environment, which only root controls.
TEST_RUNNERS_ENV = "RAMPART_TEST_RUNNERS"

COMMANDS = ("start", "stop", "restart", "stopstart", "prim", "second", "swap", "primforce")

StateListener = Callable[["ModuleRunner", str, str, str], None]


class ModuleRunner(abc.ABC):
    """One module on this node. Subclasses implement the kind's behaviour.

    Lifecycle, as the daemon drives it:

    - constructed once per installed module (no side effects in __init__);
    - ``resume()`` when the daemon starts and the module was started before
      (the application may still be running: adopt it, do not restart it);
    - ``start()`` / ``stop(reason)`` / ``command(name)`` on user commands;
    - ``close()`` when the daemon shuts down (stop per the module's policy).

    State changes go through ``set_state`` so that every change is journaled
    as ``OLD -> NEW (reason)`` and the daemon can persist and publish it.
    """

    kind: ClassVar[str] = ""

    def __init__(
        self,
        module: Module,
        module_dir: Path,
        node: NodeConfig,
        journal: Journal,
        heartbeats: Any | None = None,
    ) -> None:
        self.module = module
        self.module_dir = module_dir
        self.node = node
        self.journal = journal
        self.heartbeats = heartbeats
        self._state = "STOP"
        self._since = time.time()
        self._listeners: list[StateListener] = []

    # -- what subclasses implement -------------------------------------------

    @abc.abstractmethod
    async def start(self) -> str:
        """Start the module on this node; return the reason/outcome sentence."""

    @abc.abstractmethod
    async def stop(self, reason: str) -> str:
        """Stop the module on this node (application, VIP, replication)."""

    @abc.abstractmethod
    async def command(self, name: str) -> str:
        """restart, prim, second, swap, primforce (and kind-specific ones).

        Return the reason sentence; raise CommandRefused when not valid now.
        """

    async def resume(self) -> str:
        """Adopt a module that was started before the daemon restarted.

        Called (after ``restore_state(last_state, since)``) only for modules
        whose admin intent is "started". ``current_state`` is the last state
        persisted: STOP means the application was stopped (a clean daemon
        shutdown whose policy stopped it), so start; anything else means the
        daemon died or left it running, so adopt it without restarting it.
        The default cannot adopt anything: it starts from STOP. The mirror
        and farm runners override this.
        """
        self._state = "STOP"
        return await self.start()

    async def close(self) -> None:
        """The daemon is shutting down: stop per the module's policy."""
        if self._state != "STOP":
            await self.stop("rampartd is shutting down")

    def metrics(self) -> dict[str, Any]:
        """Numbers sampled once per second for watch and /metrics.

        Flat ``name: number`` or one level ``name: {label: number}`` (for
        example ``heartbeat_rtt_seconds: {"198.51.100.12": 0.0004}``).
        """
        return {}

    def state(self) -> dict[str, Any]:
        """The ``rampart state --json`` object; subclasses extend the base fields."""
        return {
            "module": self.module.name,
            "kind": self.kind or self.module.kind,
            "version": getattr(self.module, "version", None),
            "node": self.node.node,
            "state": self._state,
            "since": round(self._since, 3),
            "peers": self.peers_state(),
            "replication": {
                "mode": self.module.replication_mode,
                "status": "off",
                "bytes_per_s": 0,
                "lag_bytes": 0,
                "resync_remaining_bytes": 0,
            },
        }

    def peers_state(self) -> dict[str, dict[str, Any]]:
        """``peers`` of the state JSON, from the shared heartbeat service when it runs."""
        me = self.node.node
        if me not in self.module.node_names:
            return {}
        peers: dict[str, dict[str, Any]] = {}
        for peer in self.module.peers_of(me):
            entry: dict[str, Any] = {
                "state": None,
                "reachable": False,
                "networks": dict.fromkeys(peer.addresses, False),
            }
            if self.heartbeats is not None:
                try:
                    entry["reachable"] = self.heartbeats.peer_reachable(self.module.name, peer.name)
                    entry["networks"] = self.heartbeats.networks(self.module.name, peer.name)
                    payload = self.heartbeats.peer_payload(self.module.name, peer.name) or {}
                    entry["state"] = payload.get("state")
                except KeyError:
                    pass  # this module is not heartbeating (stopped)
            peers[peer.name] = entry
        return peers

    # -- helpers for subclasses ----------------------------------------------

    @property
    def current_state(self) -> str:
        return self._state

    @property
    def module_state_dir(self) -> Path:
        """Persistent per-module state, kept across reinstalls (module_dir/state)."""
        return self.module_dir / "state"

    @property
    def files_dir(self) -> Path:
        """The installed module files (userconfig.xml, bin/)."""
        return self.module_dir / "module"

    def set_state(self, new: str, reason: str) -> None:
        """Change state: journal ``OLD -> NEW (reason)`` and tell the daemon."""
        old = self._state
        if old == new:
            return
        self._state = new
        self._since = time.time()
        self.journal.transition(self.module.name, old, new, reason)
        for listener in list(self._listeners):
            listener(self, old, new, reason)

    def restore_state(self, state: str, since: float) -> None:
        """Set the state remembered before a daemon restart, without a transition."""
        self._state, self._since = state, since

    def add_listener(self, listener: StateListener) -> None:
        self._listeners.append(listener)


class UnsupportedRunner(ModuleRunner):
    """Stands in for a kind whose runner is not available on this node."""

    def __init__(self, *args: Any, why: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.why = why
        self._state = "unsupported"

    async def start(self) -> str:
        raise CommandRefused(f"module {self.module.name}: cannot start: {self.why}")

    async def stop(self, reason: str) -> str:
        return f"module {self.module.name} is not running ({self.why})"

    async def command(self, name: str) -> str:
        raise CommandRefused(f"module {self.module.name}: cannot {name}: {self.why}")

    async def resume(self) -> str:
        return await self.start()

    async def close(self) -> None:
        return None

    def state(self) -> dict[str, Any]:
        return {**super().state(), "error": self.why}


def runner_table(environ: dict[str, str] | None = None) -> dict[str, str]:
    """RUNNERS, with the test-only overrides from the environment applied."""
    table = dict(RUNNERS)
    spec = (environ if environ is not None else os.environ).get(TEST_RUNNERS_ENV, "")
    for item in filter(None, (part.strip() for part in spec.split(","))):
        kind, _, target = item.partition("=")
        if kind and ":" in target:
            table[kind] = target
    return table


def runner_class(kind: str, environ: dict[str, str] | None = None) -> type[ModuleRunner]:
    """Import the runner for a kind; raise LookupError with a one-line reason."""
    target = runner_table(environ).get(kind)
    if target is None:
        raise LookupError(f"no runner for modules of kind {kind!r} on this node")
    module_name, _, class_name = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise LookupError(
            f"the {kind} runner ({target}) is not available in this build: {exc}"
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, ModuleRunner)):
        raise LookupError(f"{target} is not a ModuleRunner")
    return cls
