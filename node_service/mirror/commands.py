"""Operator commands on a mirror module: start, stop, restart, stopstart, prim,
second, swap, primforce.

A command that makes no sense in the current state returns a refusal whose
reason names the module, the node, the state and what to do instead; the
runner raises it as CommandRefused. Commands never bypass the election: a
SECOND that wants PRIM only publishes ASKING, and the primary hands over on
its own tick, so a command on one node can never make both nodes serve.
"""

from __future__ import annotations

from node_service.mirror.generations import Freshness, Origin, compare, new_generation
from node_service.mirror.rules import (
    handover,
    known_peer_generations,
    successor,
    usable_second,
)
from node_service.mirror.snapshot import Decision, Liveness, Snapshot, decision, refusal
from node_service.mirror.states import (
    START_SERVING,
    Action,
    Command,
    Handover,
    Intent,
    State,
    stop_actions,
)


def apply_command(s: Snapshot) -> Decision:
    """Decide for a snapshot whose ``command`` is set."""
    assert s.command is not None
    return _HANDLERS[s.command](s)


def _where(s: Snapshot) -> str:
    return f"module {s.module} is {s.me.state} on {s.me.name}"


def _start(s: Snapshot) -> Decision:
    if s.me.state is not State.STOP:
        return refusal(s, f"start refused: {_where(s)} already; use restart or stopstart")
    return decision(
        s,
        State.WAIT,
        f"start: module {s.module} starting on {s.me.name}, waiting for peer {s.peer.name}",
        (Action.RUN_PRESTART,),
        intent=Intent.RUN,
    )


def _stop(s: Snapshot) -> Decision:
    if s.me.state is State.STOP:
        return refusal(s, f"stop refused: {_where(s)} already")
    return decision(
        s,
        State.STOP,
        f"stop: operator stopped module {s.module} on {s.me.name}",
        stop_actions(s.me.state),
        intent=Intent.STOP,
        handover=Handover.NONE,
    )


def _restart(s: Snapshot) -> Decision:
    if not s.me.state.serving:
        return refusal(
            s,
            f"restart refused: {_where(s)}; the application runs only on the primary "
            f"(restart it there, or use stopstart here)",
        )
    return decision(
        s,
        s.me.state,
        f"restart: restarting the application of module {s.module} on {s.me.name} in place "
        f"({s.me.state} kept)",
        (Action.RUN_STOP_PRIM, Action.RUN_START_PRIM),
    )


def _stopstart(s: Snapshot) -> Decision:
    return decision(
        s,
        State.WAIT,
        f"stopstart: operator stopped and started module {s.module} on {s.me.name}",
        (*stop_actions(s.me.state), Action.RUN_PRESTART),
        intent=Intent.RUN,
        handover=Handover.NONE,
        via=State.STOP,
    )


def _give(s: Snapshot, verb: str) -> Decision:
    """second/swap on the primary: hand PRIM to an up-to-date SECOND."""
    me, state = s.me.name, s.me.state
    if state is State.ALONE:
        return refusal(
            s, f"{verb} refused: module {s.module} is ALONE, there is no SECOND to hand over to"
        )
    ok, why_not = successor(s)
    if not ok:
        return refusal(s, f"{verb} refused: {_where(s)} but {why_not}")
    return handover(s, f"{verb}: operator asked {me} to hand PRIM over to {s.peer.name}")


def _ask(s: Snapshot, verb: str) -> Decision:
    """prim/swap on the SECOND: publish ASKING; the primary hands over on its tick."""
    peer = s.peer
    if s.liveness is not Liveness.UP or not peer.state.running:
        return refusal(
            s,
            f"{verb} refused: {_where(s)} and peer {peer.name} is not running; "
            f"use primforce to serve this node's data",
        )
    if not usable_second(s):
        return refusal(
            s,
            f"{verb} refused: {_where(s)} but its data is not up to date with {peer.name} "
            f"({s.me.generations} vs {peer.generations}); wait for the resync to finish",
        )
    if s.me.handover is Handover.ASKING:
        return refusal(s, f"{verb} refused: {s.me.name} already asked {peer.name} for PRIM")
    return decision(
        s,
        s.me.state,
        f"{verb}: {s.me.name} asks {peer.name} ({peer.state}) to hand PRIM over",
        handover=Handover.ASKING,
    )


def _prim(s: Snapshot) -> Decision:
    state = s.me.state
    if state.serving:
        return refusal(s, f"prim refused: {_where(s)}, already primary")
    if state is State.SECOND:
        return _ask(s, "prim")
    hint = "start it first" if state is State.STOP else "use primforce to override"
    return refusal(
        s, f"prim refused: {_where(s)}; it becomes primary on its own when safe ({hint})"
    )


def _second(s: Snapshot) -> Decision:
    state = s.me.state
    if state.serving:
        return _give(s, "second")
    if state is State.SECOND:
        return refusal(s, f"second refused: {_where(s)} already")
    return refusal(s, f"second refused: {_where(s)}; only a primary can hand over")


def _swap(s: Snapshot) -> Decision:
    state = s.me.state
    if state.serving:
        return _give(s, "swap")
    if state is State.SECOND and s.liveness is Liveness.UP and s.peer.state.serving:
        return _ask(s, "swap")
    return refusal(s, f"swap refused: {_where(s)}; a swap needs a PRIM and an up-to-date SECOND")


def _primforce(s: Snapshot) -> Decision:
    me, peer, state = s.me, s.peer, s.me.state
    if state.serving:
        return refusal(s, f"primforce refused: {_where(s)}, already primary")
    if state is State.STOP:
        return refusal(s, f"primforce refused: {_where(s)}; start it first")
    live = s.liveness
    if live is Liveness.UP and peer.state.serving:
        return refusal(
            s,
            f"primforce refused: peer {peer.name} is {peer.state} and reachable; forcing would "
            f"make two primaries (use swap, or stop module {s.module} on {peer.name} first)",
        )
    if live is Liveness.UP and peer.state.running:
        return refusal(
            s,
            f"primforce refused: peer {peer.name} is {peer.state} and reachable; the nodes "
            f"elect the primary themselves (stop module {s.module} on {peer.name} first "
            f"to force {me.name}'s data)",
        )
    overridden = _overridden(s)
    gens = new_generation(me.generations, me.name, Origin.FORCED, known_peer_generations(s))
    warning = (
        f"primforce on {me.name}: serving module {s.module} in generation {gens.current}"
        + (f" although {', '.join(overridden)}" if overridden else " without the usual checks")
        + f"; if {peer.name} served meanwhile, the nodes meet in split brain and the losing "
        f"side's files are preserved"
    )
    return decision(
        s,
        State.ALONE,
        f"primforce: operator forced {me.name} to serve as ALONE in generation {gens.current}",
        (Action.NEW_GENERATION, *START_SERVING),
        generations=gens,
        intent=Intent.RUN,
        handover=Handover.NONE,
        warnings=(warning,),
    )


def _overridden(s: Snapshot) -> list[str]:
    me, peer = s.me, s.peer
    found = []
    if me.generations.stale:
        found.append(f"its data is marked stale ({me.generations})")
    if peer.heard and compare(me.generations, peer.generations) is Freshness.PEER_FRESHER:
        found.append(f"peer {peer.name} had fresher data ({peer.generations})")
    if s.liveness is Liveness.PENDING:
        found.append(f"peer {peer.name} has not been heard yet")
    elif s.witness is False and not (s.liveness is Liveness.UP and peer.state is State.STOP):
        found.append("the witness is unreachable")
    return found


_HANDLERS = {
    Command.START: _start,
    Command.STOP: _stop,
    Command.RESTART: _restart,
    Command.STOPSTART: _stopstart,
    Command.PRIM: _prim,
    Command.SECOND: _second,
    Command.SWAP: _swap,
    Command.PRIMFORCE: _primforce,
}
