"""The per-tick rules of the mirror state machine (no operator command pending).

One function per state reads the Snapshot and returns a Decision. Every
rule that lets a node start serving while its peer is reachable goes
through ``elect()``, which both nodes compute from the same pair of
candidates: that is what keeps two nodes that hear each other from both
serving. Without the peer, a node serves only with usable data and the
witness (when configured) in sight.
"""

from __future__ import annotations

from node_service.mirror.generations import (
    Freshness,
    GenerationInfo,
    Origin,
    adopt,
    compare,
    elect,
    mark_stale,
    new_generation,
)
from node_service.mirror.snapshot import Decision, Liveness, Snapshot, decision
from node_service.mirror.states import (
    START_SERVING,
    STOP_SERVING,
    Action,
    Handover,
    Intent,
    State,
)


def tick(s: Snapshot) -> Decision:
    """Decide for a snapshot without a pending command."""
    return _RULES[s.me.state](s)


def _stay(s: Snapshot, reason: str, actions: tuple[Action, ...] = (), **kw) -> Decision:
    return decision(s, s.me.state, reason, actions, **kw)


# -- STOP and WAIT ----------------------------------------------------------


def _from_stop(s: Snapshot) -> Decision:
    if s.me.intent is Intent.RUN:
        return decision(
            s,
            State.WAIT,
            f"module {s.module} starting on {s.me.name}: waiting for peer {s.peer.name}",
            (Action.RUN_PRESTART,),
        )
    return _stay(s, f"module {s.module} is stopped on {s.me.name} by the operator")


def _from_wait(s: Snapshot) -> Decision:
    live = s.liveness
    if live is Liveness.LOST:
        return takeover_or_wait(s, Origin.STARTED, s.silence_phrase(), need_witness=True)
    if live is Liveness.PENDING:
        return _stay(
            s,
            f"waiting for peer {s.peer.name}: silent for {s.peer.silent_s:.1f} s "
            f"of {s.timeout_s:.1f} s",
        )
    peer = s.peer.state
    if peer.serving:
        return join(s, f"peer {s.peer.name} is {peer}: {s.me.name} joins as SECOND")
    if peer is State.STOP:
        cause = f"peer {s.peer.name} is stopped"
        return takeover_or_wait(s, Origin.STARTED, cause, need_witness=False)
    return _elect_pair(s)


# -- serving states ---------------------------------------------------------


def _from_prim(s: Snapshot) -> Decision:
    live = s.liveness
    if live is Liveness.LOST:
        if s.witness_ok:
            gens = new_generation(
                s.me.generations, s.me.name, Origin.KEPT, known_peer_generations(s)
            )
            return decision(
                s,
                State.ALONE,
                f"{s.silence_phrase()} and {s.witness_phrase()}: continuing alone in "
                f"generation {gens.current}",
                (Action.NEW_GENERATION,),
                generations=gens,
                handover=Handover.NONE,
            )
        return _give_up(s)
    if live is Liveness.PENDING:
        return _stay(s, f"serving as PRIM, waiting to hear from peer {s.peer.name}")
    peer = s.peer.state
    if peer.serving:
        return _two_primaries(s)
    if peer is State.STOP:
        gens = new_generation(s.me.generations, s.me.name, Origin.KEPT, s.peer.generations)
        return decision(
            s,
            State.ALONE,
            f"peer {s.peer.name} is stopped: continuing alone in generation {gens.current}",
            (Action.NEW_GENERATION,),
            generations=gens,
            handover=Handover.NONE,
        )
    if peer is State.WAIT:
        return _stay(s, f"serving as PRIM; peer {s.peer.name} is WAIT and joins as SECOND")
    return _prim_with_second(s)


def _prim_with_second(s: Snapshot) -> Decision:
    ok, why_not = successor(s)
    me, peer = s.me.name, s.peer.name
    if s.me.app_failed:
        if ok:
            return handover(
                s,
                f"application failed on {me} (a checker demands failover): handing PRIM "
                f"over to up-to-date SECOND {peer}",
            )
        text = f"application failed on {me} but {why_not}: staying PRIM"
        return _stay(s, text, warnings=(text,))
    if s.peer.handover is Handover.ASKING and ok:
        return handover(s, f"{peer} asked for PRIM (prim command): handing over")
    if s.failback and s.preferred == peer and ok:
        return handover(
            s, f"failback: preferred node {peer} is back and up to date: handing PRIM back"
        )
    status = "up to date" if s.peer.uptodate and not s.peer.generations.stale else "resyncing"
    return _stay(s, f"serving as PRIM with SECOND {peer} {status}")


def _from_alone(s: Snapshot) -> Decision:
    live = s.liveness
    me = s.me.name
    if live is Liveness.LOST:
        # primforce overrode the witness once; giving up on the next tick
        # would undo the operator's explicit choice.
        forced = s.me.generations.current.origin is Origin.FORCED
        if not s.witness_ok and not forced:
            return _give_up(s)
        text = f"{s.silence_phrase()}; {s.witness_phrase()}: serving alone"
        if forced and not s.witness_ok:
            text += " (forced by primforce)"
        if s.me.app_failed:
            warn = f"application failed on {me} but there is no SECOND to take over: staying ALONE"
            return _stay(s, warn, warnings=(warn,))
        return _stay(s, text)
    if live is Liveness.PENDING:
        return _stay(s, f"serving alone, waiting to hear from peer {s.peer.name}")
    peer = s.peer.state
    if peer.serving:
        return _two_primaries(s)
    if peer is State.STOP:
        return _stay(s, f"peer {s.peer.name} is stopped: serving alone")
    return decision(
        s,
        State.PRIM,
        f"peer {s.peer.name} is back ({peer}): {me} becomes PRIM and {s.peer.name} "
        f"resyncs as SECOND",
        (Action.REPLICATION_SOURCE,),
    )


def _two_primaries(s: Snapshot) -> Decision:
    result = elect(s.me.candidate(), s.peer.candidate(), s.preferred, require_usable=False)
    me, peer = s.me.name, s.peer.name
    if result.winner == me:
        reason = (
            f"{result.reason}: {me} stays primary; {peer} preserves its diverging files "
            f"and resyncs as SECOND"
        )
        if s.me.state is State.ALONE:
            return decision(s, State.PRIM, reason, (Action.REPLICATION_SOURCE,))
        return _stay(s, reason)
    return join(
        s,
        f"{result.reason}: {peer} stays primary; {me} stops serving, preserves its "
        f"diverging files and resyncs as SECOND",
    )


# -- SECOND -----------------------------------------------------------------


def _from_second(s: Snapshot) -> Decision:
    live = s.liveness
    if live is Liveness.LOST:
        return takeover_or_wait(s, Origin.TAKEOVER, s.silence_phrase(), need_witness=True)
    if live is Liveness.PENDING:
        return _stay(s, f"SECOND, waiting to hear from peer {s.peer.name}")
    peer = s.peer.state
    if peer.serving:
        return _follow(s)
    if peer is State.STOP:
        cause = f"peer {s.peer.name} is stopped"
        return takeover_or_wait(s, Origin.TAKEOVER, cause, need_witness=False)
    return _elect_pair(s)


def _follow(s: Snapshot) -> Decision:
    """A SECOND with a serving peer: track whether this copy can take over."""
    me, peer = s.me, s.peer
    actions: list[Action] = []
    notes: list[str] = []
    gens, handing = me.generations, me.handover
    if handing is Handover.GIVING:
        handing = Handover.NONE
        actions.append(Action.REPLICATION_TARGET)
        notes.append(f"{peer.name} took over as {peer.state}: following it")
    elif handing is Handover.ASKING and not usable_second(s):
        handing = Handover.NONE
        notes.append(f"request for PRIM dropped: {me.name} is no longer up to date")
    freshness = compare(gens, peer.generations)
    if freshness in (Freshness.MINE_FRESHER, Freshness.DIVERGED) and not gens.stale:
        actions += [Action.PRESERVE_SPLIT_BRAIN, Action.MARK_STALE]
        gens = mark_stale(gens)
        notes.append(
            f"data on {me.name} ({me.generations}) diverged from {peer.name} "
            f"({peer.generations}): preserving its files and resyncing"
        )
    elif (freshness is Freshness.PEER_FRESHER or not me.uptodate) and not gens.stale:
        # A copy of an older generation, or one that fell behind, is
        # inconsistent from the first resynced block until the last.
        actions.append(Action.MARK_STALE)
        gens = mark_stale(gens)
        notes.append(f"resyncing from {peer.name}: {me.name} is stale until it completes")
    elif gens.stale and me.uptodate and peer.state is State.PRIM:
        actions.append(Action.ADOPT_GENERATION)
        gens = adopt(peer.generations)
        notes.append(f"resync from {peer.name} complete: {me.name} now at {gens}")
    if not notes:
        status = "up to date" if me.uptodate and not gens.stale else "resyncing"
        notes.append(f"SECOND of {peer.state} {peer.name}, {status}")
    return _stay(s, "; ".join(notes), tuple(actions), generations=gens, handover=handing)


# -- shared pieces ----------------------------------------------------------


def _elect_pair(s: Snapshot) -> Decision:
    """Both nodes running, neither serving: the elected one becomes PRIM."""
    result = elect(s.me.candidate(), s.peer.candidate(), s.preferred)
    me, peer = s.me.name, s.peer.name
    if result.winner == me and not s.peer_knows_me:
        return _stay(s, f"{result.reason}: waiting for {peer} to acknowledge {me} as {s.me.state}")
    if result.winner == me:
        return decision(
            s,
            State.PRIM,
            f"{result.reason}: {me} becomes PRIM, {peer} SECOND",
            START_SERVING,
            handover=Handover.NONE,
        )
    if result.winner == peer:
        reason = f"{result.reason}: {peer} becomes PRIM, {me} SECOND"
        if s.me.state is State.WAIT:
            return join(s, reason)
        return _stay(s, reason)
    return _stay(s, result.reason)


def join(s: Snapshot, reason: str) -> Decision:
    """Become SECOND of the peer, keeping any data of ours the peer does not have."""
    me = s.me
    freshness = compare(me.generations, s.peer.generations)
    actions: list[Action] = list(STOP_SERVING) if me.state.serving else []
    gens = me.generations
    if me.state.serving or freshness in (Freshness.MINE_FRESHER, Freshness.DIVERGED):
        actions.append(Action.PRESERVE_SPLIT_BRAIN)
    if (me.state.serving or freshness is not Freshness.SAME) and not gens.stale:
        actions.append(Action.MARK_STALE)
        gens = mark_stale(gens)
    actions.append(Action.REPLICATION_TARGET)
    return decision(
        s, State.SECOND, reason, tuple(actions), generations=gens, handover=Handover.NONE
    )


def takeover_or_wait(s: Snapshot, origin: Origin, cause: str, *, need_witness: bool) -> Decision:
    """Peer lost or stopped: serve alone if this copy is usable (and the witness agrees)."""
    blockers = usability_problems(s)
    if need_witness and not s.witness_ok:
        blockers.append("witness unreachable")
    if blockers:
        hint = "" if blockers == ["witness unreachable"] else "; use primforce to serve it anyway"
        reason = f"{cause} but {', '.join(blockers)}: staying WAIT{hint}"
        if s.me.state is State.SECOND:
            return decision(
                s, State.WAIT, reason, (Action.REPLICATION_OFF,), handover=Handover.NONE
            )
        return _stay(s, reason)
    if s.liveness is Liveness.UP and not s.peer_knows_me:
        return _stay(s, f"{cause}: waiting for it to acknowledge {s.me.name} as {s.me.state}")
    gens = new_generation(s.me.generations, s.me.name, origin, known_peer_generations(s))
    check = s.witness_phrase() if need_witness else f"data on {s.me.name} up to date"
    verb = "taking over" if s.me.state is State.SECOND else "starting alone"
    return decision(
        s,
        State.ALONE,
        f"{cause} and {check}: {verb} in generation {gens.current}",
        (Action.NEW_GENERATION, *START_SERVING),
        generations=gens,
        handover=Handover.NONE,
    )


def usability_problems(s: Snapshot) -> list[str]:
    """Why this node's copy must not serve alone (empty: it may)."""
    me = s.me
    problems = []
    if me.generations.stale:
        problems.append(f"data on {me.name} is stale (a resync did not finish)")
    elif me.state is State.SECOND and not me.uptodate:
        problems.append(f"data on {me.name} was not up to date with {s.peer.name}")
    elif s.peer.heard and compare(me.generations, s.peer.generations) is Freshness.PEER_FRESHER:
        problems.append(f"peer {s.peer.name} has fresher data ({s.peer.generations})")
    return problems


def successor(s: Snapshot) -> tuple[bool, str]:
    """Can the peer take PRIM over from this node now? (ok, why not)."""
    peer = s.peer
    if s.liveness is not Liveness.UP or peer.state is not State.SECOND:
        return False, f"peer {peer.name} is not an up-to-date SECOND"
    if peer.generations.stale or not peer.uptodate:
        return False, f"SECOND {peer.name} is not up to date (resyncing)"
    if compare(s.me.generations, peer.generations) is not Freshness.SAME:
        return False, f"SECOND {peer.name} holds {peer.generations}, not {s.me.generations}"
    if peer.handover is Handover.GIVING:
        return False, f"{peer.name} is still finishing its own handover"
    return True, ""


def usable_second(s: Snapshot) -> bool:
    """This SECOND's copy matches its peer's, so it could take PRIM over now."""
    me = s.me
    return (
        me.uptodate
        and not me.generations.stale
        and compare(me.generations, s.peer.generations) is Freshness.SAME
    )


def handover(s: Snapshot, reason: str) -> Decision:
    """Leave PRIM for the up-to-date SECOND peer, which takes it on the next tick."""
    return decision(
        s,
        State.SECOND,
        reason,
        (*STOP_SERVING, Action.REPLICATION_OFF),
        handover=Handover.GIVING,
    )


def _give_up(s: Snapshot) -> Decision:
    return decision(
        s,
        State.WAIT,
        f"{s.silence_phrase()} and witness unreachable: giving up {s.me.state} so that "
        f"the side that reaches the witness can serve",
        (*STOP_SERVING, Action.REPLICATION_OFF),
        handover=Handover.NONE,
    )


def known_peer_generations(s: Snapshot) -> GenerationInfo | None:
    return s.peer.generations if s.peer.heard else None


_RULES = {
    State.STOP: _from_stop,
    State.WAIT: _from_wait,
    State.PRIM: _from_prim,
    State.ALONE: _from_alone,
    State.SECOND: _from_second,
}
