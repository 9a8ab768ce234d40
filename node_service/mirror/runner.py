"""The mirror module on one node: the loop that makes it fail over.

Each step builds an immutable Snapshot (this node's persisted generations,
intent and handover, the peer as its heartbeats describe it, the witness,
the application's health from the checkers, a pending operator command),
calls the pure ``decide()`` and performs the decision's actions in order.
Then, in this order: the new generations/state are persisted, the state is
set (journaled ``OLD -> NEW (reason)``), and a heartbeat goes out at once so
the peer decides on the news without waiting an interval.

One lock serialises steps: the loop's ticks, operator commands and the
process checker's local restarts never interleave their side effects.

Tasks, all owned and cancelled in ``stop``/``close``: ``mirror:M`` (the
loop: wakes on heartbeat changes, checker events and every heartbeat
interval), ``mirror-heartbeats:M`` (turns ``wait_changed`` into wake-ups),
``mirror-garp:M:VIP`` (gratuitous ARP rounds after taking a VIP, so the
application starts without waiting for the last round), and the checker
runners' tasks (``mirror-checkers:M``, ``mirror-witness:M``). Policies and
invariants: docs/dev/mirror-runner.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from typing import Any

from node_service.errors import CommandRefused, RampartError
from node_service.mirror import persist, wire
from node_service.mirror.actions import ActionsMixin
from node_service.mirror.checks import MirrorChecks
from node_service.mirror.effects import MirrorEffects
from node_service.mirror.fsm import (
    Command,
    Decision,
    Handover,
    Intent,
    Local,
    Peer,
    Snapshot,
    State,
    decide,
)
from node_service.runner import ModuleRunner

STATE_CODES = {"STOP": 0, "WAIT": 1, "SECOND": 2, "PRIM": 3, "ALONE": 4}
# A stopping node keeps heartbeating this many intervals so the peer hears
# STOP (and may take over at once) even if one datagram is lost.
LINGER_INTERVALS = 3
HANDOVER_CAP_S = 120.0
AFTER_RESTART = "replication after the rampartd restart"

# service -> {module: runner}: whose heartbeat payload a registration sends.
_PUBLISHERS: weakref.WeakKeyDictionary[Any, dict[str, MirrorRunner]] = weakref.WeakKeyDictionary()


class MirrorRunner(ActionsMixin, ModuleRunner):
    kind = "mirror"

    def __init__(self, *args: Any, effects: MirrorEffects | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.effects = effects or MirrorEffects(self._replication())
        self.peer_name = self._peer_name()
        self.checks = MirrorChecks(self)
        self._saved = persist.Persisted()
        self._epoch = 0
        self._app_failed = False
        self._reason = f"module {self.module.name} is stopped"
        self._substate: str | None = None
        self._said: set[str] = set()  # warnings already journaled while they last
        self._problem: str | None = None
        self._hb = False
        self._quit = False  # tells the owned loops to end (see _end)
        self._started = time.monotonic()
        self._transitions = 0
        self._tasks: list[asyncio.Task[Any]] = []
        self._garp: dict[str, asyncio.Task[Any]] = {}
        # Bound to no loop until first used (Python >= 3.10): no side effect here.
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._news = asyncio.Event()

    def _replication(self) -> Any:
        """The module's replication process, or nothing to replicate."""
        if not self.module.replicated_dirs:
            return None
        from node_service.replication.control import ProcessReplication

        return ProcessReplication(
            module=self.module,
            module_dir=self.module_dir,
            node=self.node,
            journal=self.journal,
            on_change=self.wake_up,
            on_failure=self.replication_failed,
        )

    def replication_failed(self, reason: str) -> None:
        """The replication process died or its dirty log failed: do not serve on it."""
        if State(self.current_state).serving:
            self.app_failed(reason)
        else:
            self.wake_up()

    async def replication_command(self, cmd: str) -> dict[str, Any]:
        """``rampart repl status|verify|sync`` (the API calls this)."""
        return await self.effects.replication.command(cmd)

    def _peer_name(self) -> str:
        me = self.node.node
        if me in self.module.node_names and len(self.module.nodes) == 2:
            return self.module.peer_of(me).name
        return ""

    @property
    def state_path(self):
        return self.module_state_dir / persist.STATE_FILE

    @property
    def marker_path(self):
        return persist.runtime_path(self.node.api_socket, self.module.name)

    # -- lifecycle (driven by the daemon) --------------------------------------

    async def start(self) -> str:
        name, me = self.module.name, self.node.node
        if self.current_state != "STOP":
            raise CommandRefused(
                f"start refused: module {name} is {self.current_state} on {me} already; "
                f"use rampart stopstart -m {name}"
            )
        if not self.peer_name:
            raise CommandRefused(
                f"module {name}: node {me} is not one of its two nodes "
                f"({', '.join(self.module.node_names)})"
            )
        self._load()
        # A VIP left by a crash of this node must not answer while it waits.
        for vip in self.module.vips:
            with contextlib.suppress(RampartError):
                reason = await self.effects.remove_vip(vip)
                if "removed" in reason:
                    self.journal.warning(f"left over from before: {reason}", name)
        cleaned = await self.effects.replication.clear_dead_leftovers()
        if cleaned:
            self.journal.warning(f"left over from before at the replicated dirs: {cleaned}", name)
        await self._begin()
        decision = await self.step(Command.START)
        return decision.reason

    async def resume(self) -> str:
        restored = State(self.current_state) if self.current_state in STATE_CODES else None
        ran = persist.read_marker(self.marker_path)
        if restored in (None, State.STOP) or ran is None:
            why = (
                "it was stopped"
                if restored in (None, State.STOP)
                else "the node restarted since it ran (nothing of it runs now)"
            )
            self.restore_state("STOP", time.time())
            return f"starting module {self.module.name} afresh: {why}; " + await self.start()
        self._load()
        self.restore_state(
            ran.value, self._since if ran.value == self.current_state else time.time()
        )
        await self._begin()
        await self._resume_replication(ran)
        if ran.serving:
            self.checks.start_app_checkers()
            self._reason = f"resumed as {ran.value} (application left running)"
        else:
            self._reason = f"resumed as {ran.value}"
        self.wake_up()
        return self._reason

    async def _resume_replication(self, ran: State) -> None:
        """Adopt the replication process the last rampartd left running (or start one)."""
        action = (
            "replication_source"
            if ran.serving
            else "replication_target"
            if ran is State.SECOND
            else None
        )
        if action is None:
            return
        try:
            _, text = await self.effects.replication.perform(
                action, self._saved.generations.current.number, peer_lost=ran is State.ALONE
            )
            self.journal.record("info", f"{AFTER_RESTART}: {text}", self.module.name)
        except RampartError as exc:
            self.journal.error(f"{AFTER_RESTART}: {exc}", self.module.name)
            if ran.serving:
                self._app_failed = True

    async def stop(self, reason: str) -> str:
        if self.current_state == "STOP":
            return f"module {self.module.name} is already stopped on {self.node.node}"
        try:
            decision = await self.step(Command.STOP, why=reason)
        finally:
            await self._end()
        return decision.reason

    async def close(self) -> None:
        # Policy (docs/dev/mirror-runner.md): rampartd going down stops the
        # module here like `stop` and tells the peer at once, so a SECOND
        # takes over without waiting for the heartbeat timeout. The admin
        # intent stays "started": the next rampartd start starts it again.
        if self.current_state != "STOP":
            await self.stop("rampartd is shutting down")
        await self._unregister_heartbeats()

    async def command(self, name: str) -> str:
        try:
            cmd = Command(name)
        except ValueError:
            known = ", ".join(c.value for c in Command)
            raise CommandRefused(f"unknown command {name!r}; expected one of {known}") from None
        if cmd is Command.START:
            return await self.start()
        if cmd is Command.STOP:
            return await self.stop(f"{name} command")
        if cmd is Command.STOPSTART:
            await self.stop(f"{name} command")
            return await self.start()
        before = State(self.current_state)
        decision = await self.step(cmd)
        return await self._follow_through(cmd, before, decision)

    async def _follow_through(self, cmd: Command, before: State, decision: Decision) -> str:
        """prim/second/swap complete on the peer's tick: wait (bounded) for it."""
        cap = min(
            HANDOVER_CAP_S,
            2 * self.module.heartbeat_timeout + self.module.script_timeout("start_prim"),
        )
        if decision.handover is Handover.ASKING:
            ok = await self.wait_for(lambda: State(self.current_state).serving, cap)
            outcome = f"now {self.current_state}" if ok else f"not PRIM after {cap:g} s"
        elif before.serving and decision.handover is Handover.GIVING:
            ok = await self.wait_for(lambda: self.peer_state() in ("PRIM", "ALONE"), cap)
            peer = self.peer_name
            outcome = f"{peer} is now PRIM" if ok else f"{peer} not PRIM after {cap:g} s"
        else:
            return decision.reason
        return f"{decision.reason}; {outcome}"

    # -- the decision ------------------------------------------------------------

    def snapshot(self, command: Command | None = None) -> Snapshot:
        state = State(self.current_state)
        failover = self.module.failover
        return Snapshot(
            module=self.module.name,
            me=self._local(state),
            peer=self._peer(),
            witness=self.checks.witness(),
            failback=failover.failback,
            preferred=self.module.nodes[0].name,
            command=command,
            timeout_s=self.module.heartbeat_timeout,
        )

    def _local(self, state: State) -> Local:
        saved = self._saved
        uptodate = state.serving or self.effects.replication.uptodate()
        return Local(
            self.node.node,
            state,
            saved.generations,
            uptodate,
            self._app_failed,
            saved.intent,
            saved.handover,
            self._epoch,
        )

    def _peer(self) -> Peer:
        data, silent = self._peer_heard()
        peer, problem = wire.peer_from_payload(self.peer_name, data, silent)
        if problem:
            self._say_once(problem)
        return peer

    def _peer_heard(self) -> tuple[Any, float]:
        """The peer's last payload and how long it has been silent on every network."""
        if self.heartbeats is None or not self._hb:
            return None, time.monotonic() - self._started
        try:
            view = self.heartbeats.view(self.module.name)
        except KeyError:
            return None, time.monotonic() - self._started
        pv = view.peer(self.peer_name)
        heard = [lk.last_heard for lk in pv.links if lk.last_heard is not None]
        last = max(heard) if heard else view.started
        return pv.payload, max(0.0, self.heartbeats.clock() - last)

    async def step(self, command: Command | None = None, *, why: str | None = None) -> Decision:
        """One decision, performed. Raises CommandRefused for a refused command."""
        async with self._lock:
            snap = self.snapshot(command)
            decision = decide(snap)
            if decision.refused:
                self.journal.warning(decision.reason, self.module.name)
                raise CommandRefused(decision.reason)
            await self._perform(snap, decision, command, why)
            return decision

    async def _perform(
        self, snap: Snapshot, d: Decision, command: Command | None, why: str | None
    ) -> None:
        me = snap.me
        self._journal_warnings(d.warnings)
        published = (d.state, d.generations, d.handover)
        changed = published != (me.state, me.generations, me.handover)
        self._reason = d.reason
        if not d.actions and not changed and d.intent is me.intent:
            return
        self._substate = str(d.substate) if d.substate else None
        cause = command.value if command else "auto"
        try:
            for action in d.actions:
                await self._do(action, d, cause)
        finally:
            self._substate = None
        # Persist before announcing: the peer must never learn a generation
        # or state this node could forget in a crash.
        if changed:
            self._epoch = persist.next_epoch(self._epoch)
        self._save(d)
        if d.state.serving:
            persist.write_marker(self.marker_path, d.state)
        else:
            self._app_failed = False
            if d.state is State.STOP:
                persist.clear_marker(self.marker_path)
            else:
                persist.write_marker(self.marker_path, d.state)
        for step in d.transitions:
            self._transitions += 1
            self.set_state(step.new.value, why or step.reason)
        if not d.transitions and d.actions and command is None:
            self.journal.record("info", d.reason, self.module.name)
        if d.state.serving:
            self.checks.start_app_checkers()
        else:
            await self.checks.stop_app_checkers()
        self._send_now()
        self._notify()

    async def restart_app(self) -> str:
        """The process checker's local restart: stop_prim then start_prim, here."""
        async with self._lock:
            state = State(self.current_state)
            if not state.serving:
                return f"no restart: module {self.module.name} is {state} here"
            self.journal.record(
                "info", f"restarting the application locally ({state} kept)", self.module.name
            )
            await self._script("stop_prim", state, "restart")
            ok = await self._script("start_prim", state, "restart")
            return "application restarted locally" if ok else "local restart failed"

    def app_failed(self, reason: str) -> None:
        """A checker's verdict: the application cannot run here any more."""
        if State(self.current_state).serving and not self._app_failed:
            self._app_failed = True
            self.journal.error(
                f"application failed on {self.node.node}: {reason}", self.module.name
            )
        self.wake_up()

    # -- state kept between steps --------------------------------------------------

    def _load(self) -> None:
        self._saved = persist.load(self.state_path)
        self._epoch = persist.next_epoch(self._saved.epoch)
        self._app_failed = False
        self._said.clear()

    def _save(self, d: Decision) -> None:
        self._saved = persist.Persisted(d.generations, d.intent, d.handover, d.state, self._epoch)
        persist.save(self.state_path, self._saved)

    def _journal_warnings(self, warnings: tuple[str, ...]) -> None:
        for text in warnings:
            if text not in self._said:
                self.journal.warning(text, self.module.name)
        self._said = set(warnings)

    def _say_once(self, text: str) -> None:
        if text != self._problem:
            self._problem = text
            self.journal.warning(text, self.module.name)

    # -- heartbeats -------------------------------------------------------------------

    def heartbeat_payload(self) -> dict[str, Any]:
        me = self._local(State(self.current_state))
        data = None
        if self.heartbeats is not None and self._hb:
            with contextlib.suppress(KeyError):
                data = self.heartbeats.peer_payload(self.module.name, self.peer_name)
        return wire.payload(me, wire.epoch_of(data))

    def peer_state(self) -> str | None:
        if self.heartbeats is None or not self._hb:
            return None
        try:
            if not self.heartbeats.peer_reachable(self.module.name, self.peer_name):
                return None
            data = self.heartbeats.peer_payload(self.module.name, self.peer_name)
        except KeyError:
            return None
        return (data or {}).get("state")

    def _send_now(self) -> None:
        if self.heartbeats is not None and self._hb:
            with contextlib.suppress(KeyError):
                self.heartbeats.send_now(self.module.name)

    # -- owned tasks -----------------------------------------------------------------

    async def _begin(self) -> None:
        name = self.module.name
        self._started = time.monotonic()
        self._quit = False
        if self.heartbeats is None:
            self.journal.warning(
                "no heartbeats on this node (site secret missing?): the peer cannot be "
                "heard, so this node serves alone once the heartbeat timeout passes",
                name,
            )
        else:
            self._register_heartbeats()
        self.checks.start_witness()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._loop(), name=f"mirror:{name}"),
            loop.create_task(self._watch_heartbeats(), name=f"mirror-heartbeats:{name}"),
        ]

    def _register_heartbeats(self) -> None:
        """Heartbeat this module, or take over its registration from an earlier run.

        A registration outlives ``stop`` on purpose: the peer keeps hearing
        STOP (and may serve alone at once, without the witness), and the
        service numbers a re-added module's packets from 1 again under the
        same incarnation, which the peer would drop as replays for minutes.
        The payload function reads the module's current runner from
        ``_PUBLISHERS``, so a runner rebuilt after a reinstall publishes itself.
        """
        service, name = self.heartbeats, self.module.name
        _PUBLISHERS.setdefault(service, {})[name] = self
        try:
            service.view(name)
        except KeyError:
            peer = self.module.node(self.peer_name)
            service.add_module(
                name,
                {peer.name: list(peer.addresses)},
                interval=self.module.heartbeat_interval,
                timeout=self.module.heartbeat_timeout,
                payload_fn=lambda: _PUBLISHERS[service][name].heartbeat_payload(),
            )
        self._hb = True

    async def _end(self) -> None:
        """Stop the module's tasks; its heartbeats go on saying STOP (see above)."""
        self._quit = True
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._cancel_garp()
        await self.checks.stop_all()
        await self.effects.replication.close()

    async def _unregister_heartbeats(self) -> None:
        service = self.heartbeats
        if not self._hb or service is None:
            return
        # Let the STOP heartbeat reach the peer before going silent.
        await asyncio.sleep(self.module.heartbeat_interval * LINGER_INTERVALS)
        with contextlib.suppress(KeyError):
            await service.remove_module(self.module.name)
        publishers = _PUBLISHERS.get(service, {})
        if publishers.get(self.module.name) is self:
            del publishers[self.module.name]
        self._hb = False

    async def _loop(self) -> None:
        while not self._quit:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.module.heartbeat_interval):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug or a failing disk must not end the module silently
                self._say_once(f"mirror decision failed: {type(exc).__name__}: {exc}")

    async def _watch_heartbeats(self) -> None:
        if self.heartbeats is None or not self._hb:
            return
        # wait_for (inside wait_changed) can swallow a cancel that meets a
        # wake-up on Python 3.11, hence the flag as well.
        while not self._quit:
            try:
                if await self.heartbeats.wait_changed(self.module.name, 5.0):
                    self.wake_up()
            except KeyError:  # removed while stopping
                return

    def wake_up(self) -> None:
        self._wake.set()
        self._notify()

    def _notify(self) -> None:
        self._news.set()
        self._news = asyncio.Event()

    async def wait_for(self, predicate: Any, timeout: float) -> bool:
        """Wait (bounded) until ``predicate()`` holds, re-checked on every change."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            left = deadline - loop.time()
            if left <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                # Re-check at least every interval: peer payloads change without a step.
                async with asyncio.timeout(min(left, self.module.heartbeat_interval)):
                    await self._news.wait()
        return True

    # -- what the daemon reads ----------------------------------------------------------

    def peers_state(self) -> dict[str, dict[str, Any]]:
        peers = super().peers_state()
        for entry in peers.values():
            if not entry.get("reachable"):
                entry["state"] = None  # a lost peer's last word is history, not its state
        return peers

    def state(self) -> dict[str, Any]:
        data = super().state()
        gens = self._saved.generations
        data.update(
            reason=self._reason,
            substate=self._substate,
            generation=str(gens.current),
            stale=gens.stale,
            uptodate=self._local(State(self.current_state)).uptodate,
            handover=self._saved.handover.value,
            app_failed=self._app_failed,
            witness=self.checks.witness_state(),
            vips=[f"{v.address}/{v.prefix}" for v in self.module.vips],
        )
        replication = self.effects.replication.fields()
        if replication is not None:
            data["replication"] = replication
        return data

    def metrics(self) -> dict[str, Any]:
        rtt: dict[str, float] = {}
        reachable = 0
        if self.heartbeats is not None and self._hb:
            with contextlib.suppress(KeyError):
                status = self.heartbeats.status(self.module.name)["peers"].get(self.peer_name, {})
                rtt = {a: ms / 1000 for a, ms in (status.get("rtt_ms") or {}).items() if ms}
                reachable = int(bool(status.get("reachable")))
        return {
            "state_code": STATE_CODES.get(self.current_state, -1),
            "transitions": self._transitions,
            "peer_reachable": reachable,
            "generation": self._saved.generations.current.number,
            "heartbeat_rtt_seconds": rtt,
            **self.effects.replication.metrics(),
        }

    def intent(self) -> Intent:
        return self._saved.intent
