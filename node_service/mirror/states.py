"""Vocabulary of the mirror state machine: states, commands, actions, transitions.

A mirror module on a node is in exactly one of five states. The allowed
changes between them are written down once, in TRANSITIONS, and
``transition()`` is the only way to make a Transition record: asking for a
change that is not in the table is a bug in the decision code, never a user
mistake, so it raises instead of returning a refusal.

Everything here is plain data; nothing performs I/O.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from node_service.errors import FatalError


class State(enum.Enum):
    """Where a mirror module stands on one node."""

    STOP = "STOP"  # module stopped: no application, no replication, no VIP
    WAIT = "WAIT"  # started, not serving: waiting for the peer or for a safe moment
    ALONE = "ALONE"  # primary without a peer: serves, tracks changes for a later resync
    PRIM = "PRIM"  # primary with its peer present: serves and replicates to it
    SECOND = "SECOND"  # secondary: receives the primary's writes, ready to take over

    def __str__(self) -> str:
        return self.value

    @property
    def serving(self) -> bool:
        """True when the application runs here and the VIP is held."""
        return self in SERVING

    @property
    def running(self) -> bool:
        """True when the module takes part in the cluster (every state but STOP)."""
        return self is not State.STOP


SERVING = frozenset({State.PRIM, State.ALONE})

# Every allowed change. Self-loops are absent on purpose: staying in a state
# is not a transition and never reaches the journal as one.
TRANSITIONS: frozenset[tuple[State, State]] = frozenset(
    {
        (State.STOP, State.WAIT),  # start
        (State.WAIT, State.STOP),  # stop
        (State.WAIT, State.PRIM),  # elected with the peer present
        (State.WAIT, State.SECOND),  # the peer is (or is elected) primary
        (State.WAIT, State.ALONE),  # peer lost or stopped, data usable, witness OK
        (State.ALONE, State.STOP),
        (State.ALONE, State.PRIM),  # the peer came back and resyncs as SECOND
        (State.ALONE, State.SECOND),  # lost a split brain
        (State.ALONE, State.WAIT),  # lost the witness: give up serving
        (State.PRIM, State.STOP),
        (State.PRIM, State.ALONE),  # peer lost or stopped, witness OK
        (State.PRIM, State.SECOND),  # swap, failover on application failure, split brain lost
        (State.PRIM, State.WAIT),  # lost peer and witness: give up so the other side serves
        (State.SECOND, State.STOP),
        (State.SECOND, State.PRIM),  # handover (swap, failback) or election
        (State.SECOND, State.ALONE),  # primary lost, data up to date, witness OK
        (State.SECOND, State.WAIT),  # primary lost but this data cannot serve
    }
)


class IllegalTransition(FatalError):
    """The decision code asked for a change the transition table forbids (a bug)."""


@dataclass(frozen=True)
class Transition:
    """One state change as it goes to the journal: ``OLD -> NEW (reason)``."""

    old: State
    new: State
    reason: str

    def __str__(self) -> str:
        return f"{self.old} -> {self.new} ({self.reason})"


def transition(old: State, new: State, reason: str) -> Transition:
    """Record a change from ``old`` to ``new``; raise IllegalTransition if the table forbids it."""
    if (old, new) not in TRANSITIONS:
        raise IllegalTransition(
            f"mirror state machine bug: {old} -> {new} is not an allowed transition ({reason})"
        )
    if not reason.strip():
        raise IllegalTransition(f"mirror state machine bug: {old} -> {new} has no reason")
    return Transition(old, new, reason)


class Command(enum.Enum):
    """Operator commands (``rampart CMD -m MODULE``)."""

    START = "start"
    STOP = "stop"
    RESTART = "restart"
    STOPSTART = "stopstart"
    PRIM = "prim"
    SECOND = "second"
    SWAP = "swap"
    PRIMFORCE = "primforce"

    def __str__(self) -> str:
        return self.value


class Intent(enum.Enum):
    """What the operator last asked for; persisted so a reboot honours it."""

    RUN = "run"
    STOP = "stop"


class Handover(enum.Enum):
    """A handover in progress, published in heartbeats so both nodes see it.

    GIVING: this node left PRIM for its peer to take over (swap, failback,
    application failure). ASKING: this SECOND asked the primary for PRIM
    (``prim`` command). The election uses them as priorities when both nodes
    hold the same data: ASKING beats NONE beats GIVING.
    """

    NONE = "none"
    GIVING = "giving"
    ASKING = "asking"

    @property
    def priority(self) -> int:
        return {Handover.GIVING: 0, Handover.NONE: 1, Handover.ASKING: 2}[self]


class Substate(enum.Enum):
    """What the runner shows while the actions of a decision run."""

    STARTING = "starting"
    STOPPING = "stopping"

    def __str__(self) -> str:
        return self.value


class Action(enum.Enum):
    """One side effect the runner performs, in the order decide() lists them.

    Ordering matters and is decided here, not in the runner: the VIP is added
    before ``start_prim`` because applications often bind to it, replication
    becomes source before the application can write, and stopping runs in the
    reverse order.
    """

    RUN_PRESTART = "run_script:prestart"
    RUN_START_PRIM = "run_script:start_prim"
    RUN_STOP_PRIM = "run_script:stop_prim"
    RUN_POSTSTOP = "run_script:poststop"
    ADD_VIP = "add_vip"
    REMOVE_VIP = "remove_vip"
    REPLICATION_SOURCE = "replication_source"  # mount the replicated dirs, send to the peer
    REPLICATION_TARGET = "replication_target"  # receive (and resync) from the primary
    REPLICATION_OFF = "replication_off"
    NEW_GENERATION = "new_generation"  # persist Decision.generations (a new one began)
    ADOPT_GENERATION = "adopt_generation"  # persist: resync done, we share the primary's
    MARK_STALE = "mark_stale"  # persist: this copy is behind until a resync completes
    PRESERVE_SPLIT_BRAIN = "preserve_split_brain"  # keep diverging files in a dated folder

    def __str__(self) -> str:
        return self.value

    @property
    def script(self) -> str | None:
        """The module script this action runs (``bin/NAME``), or None."""
        kind, _, name = self.value.partition(":")
        return name if kind == "run_script" else None

    @property
    def persists_generations(self) -> bool:
        """True when the runner must write Decision.generations to disk first."""
        return self in _GENERATION_ACTIONS

    @property
    def substate(self) -> Substate | None:
        return _SUBSTATE.get(self)


_GENERATION_ACTIONS = frozenset({Action.NEW_GENERATION, Action.ADOPT_GENERATION, Action.MARK_STALE})

_SUBSTATE = {
    Action.RUN_PRESTART: Substate.STARTING,
    Action.ADD_VIP: Substate.STARTING,
    Action.RUN_START_PRIM: Substate.STARTING,
    Action.RUN_STOP_PRIM: Substate.STOPPING,
    Action.REMOVE_VIP: Substate.STOPPING,
    Action.RUN_POSTSTOP: Substate.STOPPING,
}

# Ordered action sequences shared by the tick rules and the commands.
START_SERVING = (Action.REPLICATION_SOURCE, Action.ADD_VIP, Action.RUN_START_PRIM)
STOP_SERVING = (Action.RUN_STOP_PRIM, Action.REMOVE_VIP)


def stop_actions(state: State) -> tuple[Action, ...]:
    """What ``stop`` must undo in ``state``, in order (the right scripts for the state)."""
    if state.serving:
        return (*STOP_SERVING, Action.REPLICATION_OFF, Action.RUN_POSTSTOP)
    if state is State.SECOND:
        return (Action.REPLICATION_OFF, Action.RUN_POSTSTOP)
    if state is State.WAIT:
        return (Action.RUN_POSTSTOP,)
    return ()
