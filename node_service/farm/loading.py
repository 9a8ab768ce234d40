"""Loading a farm node's packet filter, and keeping what it lets through up to date.

Part of ``FarmRunner`` (a base class of it, so the runner stays readable):
every nft transaction of a running farm module goes through ``_load``
(a new owned set, with the flows held and the buckets guarded that go with
it), ``_refresh_flows`` (held TCP flows that ended, ``flows.py``),
``_refresh_guard`` (the guard lifted once no peer holds flows,
``guard.py``) and ``_refresh_held`` (UDP buckets whose conntrack flows
ended, ``held.py``). The decisions are in those pure modules; this is the
side-effect layer around them, run by the runner's decision loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from node_service.errors import RampartError
from node_service.farm import flows, guard, held, nft

if TYPE_CHECKING:
    from node_service.farm.effects import FarmEffects
    from node_service.journal import Journal


class FilterLoading:
    """The filter-loading half of ``FarmRunner`` (its state is set up there)."""

    effects: FarmEffects
    journal: Journal
    module: Any
    node: Any
    heartbeats: Any
    rules: tuple[nft.FilterRule, ...]
    _vips: tuple[str, ...]
    seed: int
    _udp: bool
    _tcp_ports: tuple[int, ...]
    _device: str | None
    _applied: frozenset[int] | None
    _hold: held.Hold
    _held_applied: frozenset[int] | None
    _flows: flows.Flows
    _flows_applied: frozenset[flows.Flow] | None
    _guard: guard.Guard
    _guard_applied: frozenset[int] | None
    _adopted: str | None
    _leaving: bool
    _hb_module: bool
    _said: str | None
    _say: Callable[[str], None]  # the runner's: journal an error once

    def _hold_start(self) -> held.Hold:
        if self._udp:
            return held.starting(time.monotonic())
        return held.Hold(frozenset(), None, "no UDP rule: no bucket held by conntrack")

    def _held_buckets(self) -> int:
        """UDP buckets let through at ingress beyond the owned ones."""
        return len(self._held_applied or ()) if self._device and self._udp else 0

    def _held_count(self) -> int:
        return self._held_buckets() + len(self._flows_applied or ())

    def _filter(self, owned: frozenset[int], hold: held.Hold, kept: flows.Flows,
                guarded: guard.Guard) -> nft.FarmFilter:  # fmt: skip
        return nft.FarmFilter(
            self.module.name, self._vips, self.rules,
            self.seed, owned, self._device, hold.held, kept.held, guarded.guarded & owned,
        )  # fmt: skip

    async def _load(self, owned: frozenset[int], why: str, hold: held.Hold | None = None) -> bool:
        """Load this node's share; False (previous rules intact, journaled) on failure.

        Buckets it stops owning: their TCP flows on this node are read from
        its sockets and let through in the same transaction (``flows.py``),
        their UDP buckets are held until conntrack shows the flows ended
        (``held.py``). Buckets it gains are guarded (``guard.py``).
        """
        now = time.monotonic()
        before = self._applied
        if hold is None:
            hold = (held.after_load(before or frozenset(), owned, self._hold, now)
                    if self._udp else self._hold)  # fmt: skip
        kept = self._flows
        if self._tcp_ports and (before is None or before - owned):
            kept = flows.losing(kept, await self._read_flows(), now)
        guarded = guard.after_load(self._guard, before, owned)
        if (
            owned == before
            and hold.held == self._held_applied
            and kept.held == self._flows_applied
            and guarded.guarded == self._guard_applied
        ):
            self._hold, self._flows, self._guard = hold, kept, guarded
            return True
        # UDP held buckets alone changed: the ip table (and its counters) stays.
        ingress_only = (owned, kept.held, guarded.guarded) == (
            before, self._flows_applied, self._guard_applied
        )  # fmt: skip
        ruleset = nft.build(self._filter(owned, hold, kept, guarded), ingress_only=ingress_only)
        # On failure nft's transaction failed as a whole: the previous rules are
        # in force; the next tick tries again.
        wanted = f"packet filter not updated ({len(owned)} buckets wanted, {why})"
        if not await self._try_apply(ruleset, wanted):
            return False
        self._applied, self._hold, self._held_applied = owned, hold, hold.held
        self._flows, self._flows_applied = kept, kept.held
        if guarded.guarded != self._guard_applied:
            self.journal.record("info", f"guard: {guarded.reason}", self.module.name)
        self._guard, self._guard_applied = guarded, guarded.guarded
        if self._said and self._said.startswith("packet filter not updated"):
            self._said = None
            self.journal.record(
                "info", f"packet filter loaded again: {len(owned)} buckets", self.module.name
            )
        if kept.adding:
            # Connections whose SYN came in between the reading and the load.
            await self._refresh_flows(force=True)
        return True

    async def _read_flows(self) -> frozenset[flows.Flow]:
        try:
            return await self.effects.flows(self._vips, self._tcp_ports)
        except RampartError as exc:
            # Nothing else knows these connections: they may be cut if their
            # bucket moved. Said once; the next reading may work again.
            self._say(f"held flows not read, connections in moved buckets may be cut: {exc}")
            return frozenset()

    async def _refresh_flows(self, force: bool = False) -> None:
        """Let go of held TCP flows that ended (and, right after a loss, add late ones)."""
        check_at = self._flows.check_at
        if self._applied is None or check_at is None or (not force and time.monotonic() < check_at):
            return
        found = await self._read_flows()
        if self._leaving or self._applied is None:
            return
        kept = flows.after_reading(self._flows, found, time.monotonic())
        if kept.held == self._flows_applied:
            self._flows = kept
            return
        farm = self._filter(self._applied, self._hold, kept, self._guard)
        if not await self._try_apply(nft.held_update(farm), "held flows not updated"):
            return
        self._flows, self._flows_applied = kept, kept.held
        self.journal.record("info", f"held flows: {kept.reason}", self.module.name)

    async def _refresh_guard(self) -> None:
        """Lift the guard once no peer may hold flows in the buckets this node gained."""
        if self._applied is None or not self._guard.guarded:
            return
        lifted = guard.after_peers(self._guard, self._peer_holds(), self._adopted)
        if lifted.guarded == self._guard.guarded:
            self._guard = lifted
            return
        farm = self._filter(self._applied, self._hold, self._flows, lifted)
        if not await self._try_apply(nft.build(farm), "packet filter not updated (guard)"):
            return
        self._guard, self._guard_applied = lifted, lifted.guarded
        self.journal.record("info", f"guard: {lifted.reason}", self.module.name)

    async def _try_apply(self, ruleset: nft.Ruleset, failed: str) -> bool:
        """Load ``ruleset``; on failure (previous rules intact) say why once and return False."""
        try:
            await self.effects.apply(ruleset)
        except RampartError as exc:
            self._say(f"{failed}: {exc}")
            return False
        return True

    def _peer_payloads(self) -> list[tuple[str, bool, dict[str, Any]]]:
        """Each peer: reachable, and its last heartbeat payload ({} if none)."""
        seen = []
        for peer in self.module.peers_of(self.node.node):
            reachable, payload = False, None
            if self.heartbeats is not None and self._hb_module:
                try:
                    reachable = self.heartbeats.peer_reachable(self.module.name, peer.name)
                    payload = self.heartbeats.peer_payload(self.module.name, peer.name)
                except KeyError:
                    pass
            seen.append((peer.name, reachable, payload or {}))
        return seen

    def _peer_holds(self) -> tuple[guard.PeerHolds, ...]:
        holds = []
        for name, reachable, payload in self._peer_payloads():
            count = payload.get("held")
            holds.append(
                guard.PeerHolds(
                    name, reachable, payload.get("state"), payload.get("alive"),
                    count if isinstance(count, int) and not isinstance(count, bool) else None,
                )
            )  # fmt: skip
        return tuple(holds)

    async def _refresh_held(self) -> None:
        """Let go of held buckets whose flows ended here (read from conntrack)."""
        check_at = self._hold.check_at
        if not self._udp or self._device is None or self._applied is None or check_at is None:
            return
        if self._said and self._said.startswith("packet filter not updated"):
            return  # nft is failing: the decision loop retries, with the held buckets
        if time.monotonic() < check_at:
            return
        try:
            found = await self.effects.held(self._vips, self.rules)
        except RampartError as exc:  # costs CPU (more let through), never a flow
            self._say(f"held flows not read: {exc}")
            return
        if self._leaving:
            return
        hold = held.after_reading(self._applied, found, self._hold, time.monotonic())
        if hold.held != self._held_applied and await self._load(self._applied, "held", hold):
            self.journal.record("info", f"ingress drop on {self._device}: {hold.reason}",
                                self.module.name)  # fmt: skip
        else:
            self._hold = hold
