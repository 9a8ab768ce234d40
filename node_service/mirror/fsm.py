"""The mirror module's state machine: ``decide(snapshot) -> Decision``.

Pure code, no I/O. The runner (node_service/mirror/runner.py) builds a
Snapshot each tick, calls decide(), performs ``Decision.actions`` in order,
persists ``Decision.generations`` when an action asks for it, raises
CommandRefused for a refused command and journals every transition as
``OLD -> NEW (reason)``. The rules, the generation scheme and the
invariants the tests check are in docs/dev/mirror-state-machine.md.

This module is the one import point; the pieces live in states.py
(vocabulary, transition table), generations.py (data generations and the
election), snapshot.py (input/output types), rules.py (per-tick rules) and
commands.py (operator commands).
"""

from __future__ import annotations

from node_service.mirror.commands import apply_command
from node_service.mirror.generations import (
    HISTORY_DEPTH,
    INITIAL,
    Candidate,
    Election,
    Freshness,
    Generation,
    GenerationInfo,
    Origin,
    adopt,
    compare,
    elect,
    fork,
    mark_stale,
    new_generation,
)
from node_service.mirror.rules import tick
from node_service.mirror.snapshot import Decision, Liveness, Local, Peer, Snapshot
from node_service.mirror.states import (
    SERVING,
    TRANSITIONS,
    Action,
    Command,
    Handover,
    IllegalTransition,
    Intent,
    State,
    Substate,
    Transition,
    stop_actions,
    transition,
)

__all__ = [
    "HISTORY_DEPTH",
    "INITIAL",
    "SERVING",
    "TRANSITIONS",
    "Action",
    "Candidate",
    "Command",
    "Decision",
    "Election",
    "Freshness",
    "Generation",
    "GenerationInfo",
    "Handover",
    "IllegalTransition",
    "Intent",
    "Liveness",
    "Local",
    "Origin",
    "Peer",
    "Snapshot",
    "State",
    "Substate",
    "Transition",
    "adopt",
    "compare",
    "decide",
    "elect",
    "fork",
    "mark_stale",
    "new_generation",
    "stop_actions",
    "transition",
]


def decide(snapshot: Snapshot) -> Decision:
    """Decide what this node does now for one mirror module, and why.

    Never raises for user input: a command that is not valid now comes back
    as a Decision with ``refused=True`` and the reason. Raises
    IllegalTransition only if the rules themselves are wrong (a bug).
    """
    if snapshot.command is not None:
        return apply_command(snapshot)
    return tick(snapshot)
