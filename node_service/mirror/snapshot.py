"""What decide() reads (Snapshot) and what it returns (Decision).

The runner builds a Snapshot each tick from its persisted state, the last
heartbeat of the peer, the checkers and a pending operator command. It then
performs ``Decision.actions`` in order (showing ``Action.substate`` while
each runs), persists ``Decision.generations`` when an action says so, keeps
``intent`` and ``handover`` for the next snapshot and its heartbeats, and
journals each of ``Decision.transitions`` (``str()`` is ``OLD -> NEW
(reason)``). A refused command becomes CommandRefused(reason) at the caller.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from node_service.errors import CommandRefused
from node_service.mirror.generations import Candidate, GenerationInfo
from node_service.mirror.states import (
    Action,
    Command,
    Handover,
    Intent,
    State,
    Substate,
    Transition,
    transition,
)


@dataclass(frozen=True)
class Local:
    """This node's side of the module."""

    name: str
    state: State
    generations: GenerationInfo = field(default_factory=GenerationInfo)
    # Replication's word: this copy matched the primary at the last contact
    # (True on the node that is or was the source). Only read on a SECOND.
    uptodate: bool = True
    app_failed: bool = False  # a checker demands failover of the application
    intent: Intent = Intent.RUN
    handover: Handover = Handover.NONE
    # Identifies what this node currently publishes (state, generations,
    # handover). The runner changes it whenever one of them changes and never
    # reuses a value, even across restarts (e.g. a clock reading).
    epoch: int = 0

    def candidate(self) -> Candidate:
        return Candidate(self.name, self.generations, self.handover)


@dataclass(frozen=True)
class Peer:
    """The other node of the module as last heard through heartbeats."""

    name: str
    heard: bool = False  # at least one heartbeat since this node started
    silent_s: float = 0.0  # since the last heartbeat on any network (or since start)
    state: State = State.WAIT  # meaningful only when heard
    generations: GenerationInfo = field(default_factory=GenerationInfo)
    uptodate: bool = False
    handover: Handover = Handover.NONE
    # The epoch of ours the peer last heard (echoed in its heartbeats); None
    # until it has heard us. See Snapshot.peer_knows_me.
    echo: int | None = None

    def candidate(self) -> Candidate:
        return Candidate(self.name, self.generations, self.handover)


class Liveness(enum.Enum):
    UP = "up"  # heard within the timeout
    PENDING = "pending"  # not heard since start, timeout not yet over
    LOST = "lost"  # silent on all networks for at least the timeout


@dataclass(frozen=True)
class Snapshot:
    """Everything one decision may depend on; built fresh by the runner each tick."""

    module: str
    me: Local
    peer: Peer
    witness: bool | None = None  # None: no witness configured; else reachable or not
    failback: bool = False
    preferred: str | None = None  # the first node of the module
    command: Command | None = None
    timeout_s: float = 3.0  # heartbeat timeout: silence this long means lost

    @property
    def liveness(self) -> Liveness:
        if self.peer.silent_s >= self.timeout_s:
            return Liveness.LOST
        return Liveness.UP if self.peer.heard else Liveness.PENDING

    @property
    def peer_knows_me(self) -> bool:
        """The peer's last heartbeat was sent after it heard what we publish now.

        A node starts serving next to a reachable peer only then: the peer's
        own decisions were made on our current state, so both sides decided
        on the same pair of states even though heartbeats cross in flight.
        """
        return self.peer.echo == self.me.epoch

    @property
    def witness_ok(self) -> bool:
        return self.witness is not False

    def witness_phrase(self) -> str:
        if self.witness is None:
            return "no witness configured"
        return "witness reachable" if self.witness else "witness unreachable"

    def silence_phrase(self) -> str:
        return f"peer {self.peer.name} silent for {self.peer.silent_s:.1f} s on all networks"


@dataclass(frozen=True)
class Decision:
    """What to do now, and why. ``state`` is the state after the actions."""

    state: State
    actions: tuple[Action, ...]
    reason: str
    generations: GenerationInfo
    intent: Intent
    handover: Handover
    transitions: tuple[Transition, ...] = ()
    warnings: tuple[str, ...] = ()
    refused: bool = False  # the command was refused; nothing else changed

    @property
    def substate(self) -> Substate | None:
        """The sub-state to show while the actions run ("starting"/"stopping")."""
        for action in self.actions:
            if action.substate is not None:
                return action.substate
        return None

    def changes_publication(self, me: Local) -> bool:
        """True when the runner must give ``me`` a new epoch (see Local.epoch)."""
        return (self.state, self.generations, self.handover) != (
            me.state,
            me.generations,
            me.handover,
        )

    def raise_if_refused(self) -> None:
        if self.refused:
            raise CommandRefused(self.reason)


def decision(
    snap: Snapshot,
    state: State,
    reason: str,
    actions: tuple[Action, ...] = (),
    *,
    generations: GenerationInfo | None = None,
    intent: Intent | None = None,
    handover: Handover | None = None,
    warnings: tuple[str, ...] = (),
    via: State | None = None,
) -> Decision:
    """Build a Decision, checking the transition (through ``via`` if given) on the way."""
    old = snap.me.state
    steps: list[Transition] = []
    if via is not None and via is not old:
        steps.append(transition(old, via, reason))
        old = via
    if state is not old:
        steps.append(transition(old, state, reason))
    return Decision(
        state=state,
        actions=tuple(actions),
        reason=reason,
        generations=snap.me.generations if generations is None else generations,
        intent=snap.me.intent if intent is None else intent,
        handover=snap.me.handover if handover is None else handover,
        transitions=tuple(steps),
        warnings=tuple(warnings),
    )


def refusal(snap: Snapshot, reason: str) -> Decision:
    """A command that is not valid now: nothing changes, the reason says why."""
    me = snap.me
    return Decision(
        state=me.state,
        actions=(),
        reason=reason,
        generations=me.generations,
        intent=me.intent,
        handover=me.handover,
        refused=True,
    )
