"""The farm module's states on one node: ``decide(snapshot) -> Decision`` (pure).

A farm node is ``STOP`` (not started), ``WAIT`` (started, holding the VIP
behind the shared MAC but owning no bucket) or ``UP`` (owning its share of
buckets). Unlike a mirror there is no election: every node decides for
itself from its admin intent, its own checkers and the problems the runner
met, and the bucket map follows from which nodes say they are ``UP``.

Why a node in trouble goes to WAIT rather than STOP: it keeps the VIP and
its conntrack entries, so the flows it already accepted keep working while
its buckets go to the others (the filter's established rule), and it comes
back by itself when its checkers pass again.

The runner (runner.py) builds a ``Snapshot`` after every checker event,
heartbeat change or command, calls ``decide`` and acts on the decision.
Also here: the start-time refusals (``start_problem``) and the sentence the
journal gets when the bucket map changes (``membership_change``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from node_service.errors import RampartError
from node_service.farm.nft import FilterRule

STOP, WAIT, UP = "STOP", "WAIT", "UP"
STATES = (STOP, WAIT, UP)

# Every legal change; anything else is a bug in the runner, not a user error.
TRANSITIONS: dict[str, frozenset[str]] = {
    STOP: frozenset({WAIT}),
    WAIT: frozenset({UP, STOP}),
    UP: frozenset({WAIT, STOP}),
}

# What a checker's latest verdict means here (checkers.decide vocabulary,
# plus "pending" before its first result).
PENDING = "pending"
CHECK_OK = "ok"
CHECK_FAILED = "failed"  # failed, but fewer times in a row than it tolerates
GIVE_UP = frozenset({"failover", "stop-module"})

MIRROR_ONLY = ("prim", "second", "swap", "primforce")


class IllegalTransition(RampartError):
    """The runner asked for a change the farm table forbids (a bug)."""


def transition(old: str, new: str) -> str:
    """``new`` if the table allows ``old -> new`` (or no change); raises otherwise."""
    if old == new:
        return new
    if new not in TRANSITIONS.get(old, frozenset()):
        raise IllegalTransition(f"farm state {old} -> {new} is not a legal transition")
    return new


@dataclass(frozen=True)
class CheckerSeen:
    """One checker as the runner last saw it."""

    label: str
    verdict: str  # pending, ok, failed, failover, stop-module
    reason: str = ""


@dataclass(frozen=True)
class PeerSeen:
    """Another node of the farm, as its heartbeats show it."""

    name: str
    reachable: bool
    state: str | None = None  # from its heartbeat payload
    eligible: bool = False  # it says it takes buckets

    @property
    def serving(self) -> bool:
        return self.reachable and self.state == UP and self.eligible


@dataclass(frozen=True)
class Snapshot:
    node: str
    state: str  # the state in force before this decision
    started: bool  # admin intent
    weights: Mapping[str, int]
    checkers: tuple[CheckerSeen, ...] = ()
    peers: tuple[PeerSeen, ...] = ()
    problem: str | None = None  # why this node may not serve (start_both, nft...)


@dataclass(frozen=True)
class Decision:
    state: str
    reason: str
    alive: frozenset[str]  # the nodes the bucket map is computed over
    eligible: bool  # what this node tells its peers


def weights_problem(weights: Mapping[str, int]) -> str | None:
    """Why no node of the farm could ever own a bucket, or None."""
    if weights and all(w == 0 for w in weights.values()):
        return (
            f"every node of the farm ({', '.join(sorted(weights))}) has weight 0: no node may "
            "own buckets; give at least one node a weight of 1 or more in userconfig.xml"
        )
    return None


def _checkers_verdict(checkers: Iterable[CheckerSeen], state: str) -> tuple[bool, str]:
    """(may serve, why) from this node's own checkers."""
    checkers = tuple(checkers)
    for seen in checkers:
        if seen.verdict in GIVE_UP:
            return False, f"checker {seen.label} failed: {seen.reason}; giving up its buckets"
    for seen in checkers:
        if seen.verdict == PENDING:
            return False, f"waiting for the first result of checker {seen.label}"
    failing = [c for c in checkers if c.verdict == CHECK_FAILED]
    if failing and state != UP:
        # Not yet a failover, but not healthy either: do not take buckets now.
        return False, f"checker {failing[0].label} not passing yet: {failing[0].reason}"
    if not checkers:
        return True, "no checker configured; the application was started"
    if failing:
        return True, f"checker {failing[0].label} failing but still tolerated"
    labels = ", ".join(c.label for c in checkers)
    return True, f"checker{'s' if len(checkers) > 1 else ''} {labels} ok"


def decide(snap: Snapshot) -> Decision:
    """This node's farm state, the alive set for the bucket map, and why."""
    serving_peers = frozenset(p.name for p in snap.peers if p.serving)
    if not snap.started:
        new, reason, mine = STOP, "module stopped on this node", False
    elif snap.problem:
        new, reason, mine = WAIT, snap.problem, False
    elif problem := weights_problem(snap.weights):
        new, reason, mine = WAIT, problem, False
    else:
        mine, reason = _checkers_verdict(snap.checkers, snap.state)
        new = UP if mine else WAIT
        if mine and snap.weights.get(snap.node, 0) == 0:
            reason += "; weight 0: UP without buckets (standby)"
    if snap.state == STOP and new == UP:
        # A start always passes through WAIT: the journal shows both steps.
        new, mine = WAIT, False
        reason = f"starting: {reason}"
    transition(snap.state, new)
    alive = serving_peers | ({snap.node} if new == UP else frozenset())
    return Decision(new, reason, alive, eligible=new == UP)


def membership_change(
    old: Collection[str] | None, new: Collection[str], peers: Iterable[PeerSeen]
) -> str:
    """Who joined or left the alive set, in words: ``lab-n3 lost, lab-n1 back``."""
    before, after = frozenset(old or ()), frozenset(new)
    seen = {p.name: p for p in peers}
    parts = []
    for name in sorted(before - after):
        peer = seen.get(name)
        if peer is not None and not peer.reachable:
            parts.append(f"{name} lost")
        elif peer is not None:
            parts.append(f"{name} left ({peer.state or 'no state'})")
        else:
            parts.append(f"{name} (this node) left")
    parts += [f"{name} joined" for name in sorted(after - before)]
    if old is None:
        return "first map over " + (", ".join(sorted(after)) or "no node")
    return ", ".join(parts) or "membership unchanged"


# -- start-time checks: refusals that name what is wrong -------------------


def filter_rules(rules: Iterable[object]) -> tuple[FilterRule, ...]:
    """The packet filter's rules for the model's ``FarmRule``s."""
    return tuple(
        FilterRule(str(r.protocol), tuple(int(p) for p in r.ports), str(r.criterion)) for r in rules
    )


@dataclass(frozen=True)
class FarmUse:
    """What one started farm module holds on this node: VIPs and ports."""

    module: str
    vips: tuple[str, ...]
    ports: frozenset[tuple[str, int]]  # (protocol, port)


def farm_use(module: str, vips: Iterable[str], rules: Iterable[FilterRule]) -> FarmUse:
    ports = frozenset((r.protocol, p) for r in rules for p in r.ports)
    return FarmUse(module, tuple(str(ipaddress.ip_address(v)) for v in vips), ports)


def port_clash(mine: FarmUse, others: Iterable[FarmUse]) -> str | None:
    """Why ``mine`` may not start beside ``others`` (same VIP and port), or None.

    Two farm tables filtering the same VIP and port would each drop what the
    other accepts: no client would get through. Refused, naming the other.
    """
    for other in sorted(others, key=lambda o: o.module):
        if other.module == mine.module:
            continue
        shared = sorted(set(mine.vips) & set(other.vips))
        ports = sorted(mine.ports & other.ports)
        if shared and ports:
            listed = ", ".join(f"{proto} {port}" for proto, port in ports)
            return (
                f"farm module {mine.module} cannot start: farm module {other.module} already "
                f"filters {listed} on VIP {shared[0]} on this node; give one of them another "
                "VIP or other ports"
            )
    return None


def refuse_command(module: str, name: str, state: str) -> str:
    """The refusal sentence for a command a farm does not have."""
    if name in MIRROR_ONLY:
        return (
            f"module {module} is a farm: {name} is a mirror command (a farm has no primary; "
            "use start, stop, restart or stopstart)"
        )
    return f"module {module} is a farm: unknown command {name!r} (state {state})"
