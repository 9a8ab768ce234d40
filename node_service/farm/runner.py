"""The farm module on one node: states, bucket map, packet filter, shared MAC.

Start: the node goes WAIT, loads a filter that owns no bucket (so the VIP
accepts nothing new yet), puts the VIP on the shared-MAC interface, runs
``bin/start_both``, starts its checkers and heartbeats. Every checker event,
heartbeat change (a peer lost, a peer's payload saying UP or WAIT) and a
periodic tick re-runs the pure ``states.decide``; the alive set it returns
feeds ``buckets.plan``, and this node's share is loaded with one atomic nft
transaction. A failing checker makes the node WAIT: it owns nothing and its
heartbeats say so, and the peers take its buckets. TCP connections it
accepted in buckets it stops owning stay let through ("held flows", read
from its sockets: ``flows.py``) until they end; buckets it gains are
guarded against the other nodes' held flows until every peer says it
holds none (``guard.py``). UDP buckets it stops owning stay let through
until conntrack shows its flows in them ended (``held.py``). The decision
loop reads sockets and conntrack for that, only while something is held.

Task ownership: ``farm:M`` (the decision loop), ``farm-heartbeats:M`` (wakes
the loop on membership changes), ``farm-counters:M`` (reads the nft counters
once a second, off the event loop) and the checker runner's tasks; all are
cancelled and awaited in ``stop``, and each loop also ends on the
``_leaving`` flag ``stop`` sets first. Waits use ``asyncio.timeout``: Python
3.11's ``asyncio.wait_for`` can swallow a cancellation arriving with the
wake-up, and a loop around it would outlive ``stop``. Side effects go through
``FarmEffects`` so unit tests replace them with a fake
(tests/unit/test_farm_states_runner.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any, ClassVar

from node_service.errors import CommandRefused, RampartError
from node_service.farm import buckets, flows, guard, macvlan, nft
from node_service.farm.effects import FarmEffects
from node_service.farm.loading import FilterLoading
from node_service.farm.states import (
    GIVE_UP,
    PENDING,
    STOP,
    UP,
    WAIT,
    CheckerSeen,
    FarmUse,
    PeerSeen,
    Snapshot,
    decide,
    farm_use,
    filter_rules,
    membership_change,
    port_clash,
    refuse_command,
    weights_problem,
)
from node_service.runner import ModuleRunner

TICK_S = 1.0  # re-decide at least this often (peer silence, retries)
COUNTERS_EVERY_S = 1.0


class FarmRunner(FilterLoading, ModuleRunner):
    kind = "farm"

    # Farm modules started in this daemon, for the VIP/port clash check.
    active: ClassVar[dict[str, FarmUse]] = {}

    def __init__(self, *args: Any, effects: FarmEffects | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.effects = effects or FarmEffects()
        self.rules = filter_rules(self.module.farm.rules if self.module.farm else ())
        self.weights = {n.name: n.weight for n in self.module.nodes}
        self.seed = buckets.module_seed(self.module.name)
        self._vips = tuple(v.address for v in self.module.vips)
        self._device: str | None = None  # the LAN interface: ingress drop and shared MAC
        self._udp = any(rule.protocol == "udp" for rule in self.rules)
        tcp = {port for rule in self.rules if rule.protocol == "tcp" for port in rule.ports}
        self._tcp_ports = tuple(sorted(tcp))
        self._reset()
        self._shared: macvlan.SharedMac | None = None
        self._checkers: Any | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._hb_module = False
        self.counters: dict[str, int] = dict.fromkeys(nft.KINDS, 0)

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> str:
        name, me = self.module.name, self.node.node
        if self.current_state != STOP:
            raise CommandRefused(
                f"module {name} is already {self.current_state} on node {me}: "
                f"use rampart stopstart -m {name} to start it again"
            )
        if me not in self.module.node_names:
            raise CommandRefused(f"module {name}: node {me} is not one of its nodes")
        use = farm_use(name, self._vips, self.rules)
        clash = port_clash(use, FarmRunner.active.values())
        if clash:
            self.journal.error(clash, name)
            raise CommandRefused(clash)
        FarmRunner.active[name] = use
        try:
            return await self._start()
        except BaseException as exc:
            # Half started: undo what was done (VIP, filter, tasks) before saying so.
            if self.current_state != STOP:
                with contextlib.suppress(Exception):
                    await self.stop(f"start failed: {type(exc).__name__}: {exc}")
            FarmRunner.active.pop(name, None)
            raise

    async def _start(self) -> str:
        name = self.module.name
        self._reset()
        self.set_state(WAIT, "start command: taking the VIP, starting the application")
        steps = [await self._take_vip()]
        if self._problem is None:
            steps.append(await self._run_script("start_both", "start"))
        if problem := weights_problem(self.weights):
            self._fail(problem)
        await self._start_heartbeats()
        self._start_checkers()
        loop = asyncio.get_running_loop()
        for coro, task_name in (
            (self._decision_loop(), f"farm:{name}"),
            (self._heartbeat_watch(), f"farm-heartbeats:{name}"),
            (self._counter_loop(), f"farm-counters:{name}"),
        ):
            self._tasks.append(loop.create_task(coro, name=task_name))
        await self.evaluate()
        return "; ".join(steps)

    async def resume(self) -> str:
        # After a daemon restart or a node crash nothing of the old run can be
        # trusted (checkers, map, payload): start again; start_both is idempotent
        # and the filter/VIP setup replaces whatever is left.
        self.restore_state(STOP, time.time())
        return await self.start()

    async def stop(self, reason: str) -> str:
        name = self.module.name
        if self.current_state == STOP:
            return f"module {name} is already stopped on node {self.node.node}"
        self._leaving = True
        steps: list[str] = []
        # Own nothing first, and say so, so peers take the buckets at once.
        await self._load(frozenset(), "stopping")
        self._send_now()
        await self._cancel_tasks()
        if self._checkers is not None:
            await self._checkers.stop()
            self._checkers = None
        steps.append(await self._run_script("stop_both", "stop"))
        if self._shared is not None:
            try:
                steps.append(await self.effects.mac_teardown(self._shared))
            except RampartError as exc:
                self.journal.error(f"removing the shared MAC failed: {exc}", name)
        try:
            await self.effects.remove(name)
            steps.append("packet filter removed")
        except RampartError as exc:
            self.journal.error(f"removing the packet filter failed: {exc}", name)
        if self.heartbeats is not None and self._hb_module:
            await self.heartbeats.remove_module(name)
        self._hb_module = False
        FarmRunner.active.pop(name, None)
        self._owners, self._alive, self._applied, self._held_applied = None, None, None, None
        self._flows_applied, self._guard_applied, self._adopted = None, None, None
        self.set_state(STOP, reason)
        return "; ".join(s for s in steps if s)

    async def command(self, name: str) -> str:
        if name == "restart":
            if self.current_state == STOP:
                raise CommandRefused(
                    f"module {self.module.name} is stopped: use rampart start -m {self.module.name}"
                )
            return await self._restart_app()
        raise CommandRefused(refuse_command(self.module.name, name, self.current_state))

    # -- what the daemon reads ---------------------------------------------------

    @property
    def owned(self) -> frozenset[int]:
        if self._owners is None or self.current_state != UP:
            return frozenset()
        return buckets.owned_by(self._owners, self.node.node)

    def state(self) -> dict[str, Any]:
        data = super().state()
        data["buckets"] = len(self._applied or ())
        # Let through beyond the owned buckets: TCP flows and UDP buckets of this node.
        data["held"] = self._held_count()
        data["held_flows"] = len(self._flows_applied or ())
        data["guarded"] = len(self._guard_applied or ())
        data["bucket_map"] = buckets.shares(self._owners) if self._owners else {}
        data["alive"] = sorted(self._alive or ())
        data["vips"] = [f"{v.address}/{v.prefix}" for v in self.module.vips]
        data["filter"] = dict(self.counters)
        if self._problem:
            data["problem"] = self._problem
        return data

    def metrics(self) -> dict[str, Any]:
        return {
            "owned_buckets": len(self._applied or ()),
            "held_buckets": self._held_buckets(),
            "held_flows": len(self._flows_applied or ()),
            "guarded_buckets": len(self._guard_applied or ()),
            "alive_nodes": len(self._alive or ()),
            "connections_accepted": self.counters.get(nft.OWNED, 0),
            "established_packets": self.counters.get(nft.ESTABLISHED, 0),
            "dropped_packets": self.counters.get(nft.DROPPED, 0),
        }

    # -- the decision --------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        return Snapshot(
            node=self.node.node,
            state=self.current_state,
            started=not self._leaving,
            weights=self.weights,
            checkers=self._checkers_seen(),
            peers=self.peers_seen(),
            problem=self._problem or self._peers_unsettled(),
        )

    async def evaluate(self) -> None:
        """Decide, change state, recompute the map if the alive set moved, load it."""
        if self._leaving or self.current_state == STOP:
            return
        snap = self.snapshot()
        decision = decide(snap)
        if decision.state != self.current_state:
            self.set_state(decision.state, decision.reason)
            self._send_now()
        if decision.alive != self._alive or self._owners is None:
            self._replan(decision.alive, snap.peers)
        if await self._load(self.owned, decision.reason):
            # Said in the payload only now: the filter (and the flows held
            # through any loss) of this membership is loaded.
            self._adopted = guard.alive_digest(self._alive)

    def _replan(self, alive: frozenset[str], peers: tuple[PeerSeen, ...]) -> None:
        change = membership_change(self._alive, alive, peers)
        try:
            result = buckets.plan(self._owners, self.weights, alive, self.seed)
        except RampartError as exc:
            self._fail(f"bucket map not computed: {exc}")
            return
        self.journal.record("info", f"bucket map: {change}; {result.reason}", self.module.name)
        self._owners, self._alive = result.owners, alive

    # -- inputs to the decision --------------------------------------------------

    def _checkers_seen(self) -> tuple[CheckerSeen, ...]:
        if self._checkers is None:
            return ()
        seen = []
        for check in self._checkers.checks:
            event = self._checkers.latest(check.label)
            if event is None:
                seen.append(CheckerSeen(check.label, PENDING))
            else:
                seen.append(CheckerSeen(check.label, event.verdict, event.reason))
        return tuple(seen)

    def peers_seen(self) -> tuple[PeerSeen, ...]:
        if self.node.node not in self.module.node_names:
            return ()
        return tuple(
            PeerSeen(name, reachable, payload.get("state"), bool(payload.get("eligible")))
            for name, reachable, payload in self._peer_payloads()
        )

    def _peers_unsettled(self) -> str | None:
        """Why this node must not take buckets yet: some peer neither heard nor lost.

        Without this a node that just started would see no peer, own every
        bucket for a heartbeat interval and answer other nodes' new clients.
        """
        if self.heartbeats is None or not self._hb_module or self.current_state == UP:
            return None
        try:
            view = self.heartbeats.view(self.module.name)
        except KeyError:
            return None
        waiting = sorted(p.name for p in view.peers if p.status == "unknown")
        if not waiting:
            return None
        return f"waiting to hear from {', '.join(waiting)} before taking buckets"

    def _payload(self) -> dict[str, Any]:
        if self._leaving:
            return {"state": STOP, "eligible": False}
        up = self.current_state == UP
        return {
            "state": self.current_state,
            "eligible": up,
            "buckets": len(self._applied or ()),
            # What the peers' guards wait for (guard.py).
            "held": self._held_count(),
            "alive": self._adopted,
        }

    # -- side-effect steps -----------------------------------------------------------

    @property
    def _pickup_memo(self) -> Path:
        return self.module_state_dir / "conntrack_tcp_loose"

    def _reset(self) -> None:
        """The state of one run (set up again at every start)."""
        self._owners: buckets.BucketMap | None = None
        self._alive: frozenset[str] | None = None
        self._applied: frozenset[int] | None = None  # the owned set loaded in nft
        self._hold = self._hold_start()  # UDP buckets let through at ingress
        self._held_applied: frozenset[int] | None = None
        self._flows = flows.nothing()  # TCP flows let through outside the owned buckets
        self._flows_applied: frozenset[flows.Flow] | None = None
        self._guard = guard.unguarded()  # owned buckets guarded against peers' held flows
        self._guard_applied: frozenset[int] | None = None
        self._adopted: str | None = None  # the membership whose filter (and held flows) is loaded
        self._problem: str | None = None
        self._said: str | None = None  # last error journaled (said once, not every tick)
        self._leaving = False
        self._wake = asyncio.Event()

    def _fail(self, problem: str) -> None:
        self._problem = problem
        self._say(problem)

    def _say(self, message: str) -> None:
        if message != self._said:
            self._said = message
            self.journal.error(message, self.module.name)

    async def _take_vip(self) -> str:
        """Filter first (owning nothing), then the VIP behind the shared MAC."""
        vips = self.module.vips
        self._shared, self._device = None, None
        try:  # the LAN interface first: the filter's ingress drop is on it too
            me = self.module.node(self.node.node)
            parent = vips[0].interface if vips and vips[0].interface else None
            parent = parent or await self.effects.lan_interface(me.lan_address)
            self._shared = macvlan.plan(
                self.module.name, parent, [(v.address, v.prefix) for v in vips]
            )
            self._device = parent
        except RampartError as exc:
            self._fail(f"shared MAC not set up: {exc}")
        if not await self._load(frozenset(), "start"):
            self._problem = self._said
            return "packet filter not loaded"
        try:
            # Only an earlier version's left-over: this one never changes it.
            if said := await self.effects.restore_left_over(self._pickup_memo):
                self.journal.record("info", said, self.module.name)
        except RampartError as exc:
            self.journal.warning(f"conntrack setting not put back: {exc}", self.module.name)
        if self._shared is None:
            return "VIP not taken"
        try:
            reason = await self.effects.mac_setup(self._shared)
        except RampartError as exc:
            self._fail(f"shared MAC not set up: {exc}")
            return "VIP not taken"
        for vip in vips:
            try:
                await self.effects.announce(vip.address, self._shared.link)
            except RampartError as exc:  # the LAN learns the VIP at the next ARP anyway
                self.journal.warning(f"gratuitous ARP for {vip.address}: {exc}", self.module.name)
        return reason

    async def _run_script(self, script: str, action: str) -> str:
        from node_service.scripts import script_env

        name, me = self.module.name, self.node.node
        env = script_env(name, str(self.files_dir), me, self.current_state, action)

        def on_line(line: str) -> None:
            self.journal.record("script", f"{script}: {line}", name)

        try:
            result = await self.effects.script(
                str(self.files_dir), script, env, self.module.script_timeout(script), on_line
            )
        except RampartError as exc:
            self._fail(f"bin/{script} could not run: {exc}")
            return f"bin/{script} could not run"
        if not result.ok and action == "start":
            self._fail(
                f"{result.reason}: this node stays WAIT; fix it and run rampart stopstart -m {name}"
            )
        elif not result.ok:
            self.journal.error(result.reason, name)
        return result.reason

    async def _restart_app(self) -> str:
        stopped = await self._run_script("stop_both", "restart")
        self._problem = None
        started = await self._run_script("start_both", "restart")
        self._wake.set()
        return f"{stopped}; {started}"

    async def _start_heartbeats(self) -> None:
        name = self.module.name
        if self.heartbeats is None:
            self.journal.warning(
                "no heartbeats on this node (site secret missing?): this node cannot see its "
                "peers and serves as if alone",
                name,
            )
            return
        peers = {p.name: list(p.addresses) for p in self.module.peers_of(self.node.node)}
        with contextlib.suppress(KeyError):
            # Left over from a run that did not stop cleanly (view raises if absent).
            self.heartbeats.view(name)
            await self.heartbeats.remove_module(name)
        self.heartbeats.add_module(
            name,
            peers,
            interval=self.module.heartbeat_interval,
            timeout=self.module.heartbeat_timeout,
            payload_fn=self._payload,
        )
        self._hb_module = True

    def _start_checkers(self) -> None:
        from node_service.checkers.runner import CheckerRunner, from_model
        from node_service.scripts import script_env

        name, me = self.module.name, self.node.node
        env = script_env(name, str(self.files_dir), me, WAIT, "check")
        checks = [
            from_model(c, module_dir=str(self.files_dir), env=env, restart=self._restart_app)
            for c in self.module.checkers
        ]
        self._checkers = CheckerRunner(checks, self._on_checker, name=f"farm-checkers:{name}")
        self._checkers.start()

    def _on_checker(self, event: Any) -> None:
        severity = "info" if event.ok else ("error" if event.verdict in GIVE_UP else "warning")
        self.journal.record(
            "checker", f"{event.checker}: {event.reason}", self.module.name, severity=severity,
            checker=event.checker, verdict=event.verdict,
        )  # fmt: skip
        self._wake.set()

    def _send_now(self) -> None:
        if self.heartbeats is not None and self._hb_module:
            with contextlib.suppress(KeyError):
                self.heartbeats.send_now(self.module.name)

    # -- owned tasks -------------------------------------------------------------------

    async def _decision_loop(self) -> None:
        while not self._leaving:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TICK_S):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.evaluate()
                await self._refresh_held()
                await self._refresh_flows()
                await self._refresh_guard()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug here must not end the farm silently
                self._say(f"farm decision failed: {type(exc).__name__}: {exc}")

    async def _heartbeat_watch(self) -> None:
        if self.heartbeats is None or not self._hb_module:
            return
        while not self._leaving:
            try:
                if await self.heartbeats.wait_changed(self.module.name, TICK_S * 5):
                    self._wake.set()
            except KeyError:  # removed under us (stopping)
                return

    async def _counter_loop(self) -> None:
        while not self._leaving:
            if self._applied is not None:
                try:
                    self.counters = await self.effects.counters(self.module.name)
                except RampartError as exc:
                    self._say(f"packet filter counters unreadable: {exc}")
            await asyncio.sleep(COUNTERS_EVERY_S)

    async def _cancel_tasks(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
