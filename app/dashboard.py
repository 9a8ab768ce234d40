"""Dashboard: the module x node state matrix and its action buttons (pure).

Everything here is a function of the ``NodeStatus`` snapshots the site model
publishes, so the view re-renders from a fresh ``matrix()`` whenever a status
changes, and tests need no SSH.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

from app.nodes import NodeStatus, allowed

ACTIONS = ("start", "stop", "restart", "swap", "prim", "second")
UNREACHABLE, UNKNOWN = "unreachable", "unknown"
STATE_COLOURS = {
    "PRIM": "#2e7d32",
    "UP": "#2e7d32",
    "ALONE": "#f9a825",
    "SECOND": "#1565c0",
    "WAIT": "#6a1b9a",
    "STOP": "#757575",
    "starting": "#fb8c00",
    "stopping": "#fb8c00",
    "unsupported": "#c62828",
    UNREACHABLE: "#c62828",
    UNKNOWN: "#bdbdbd",
}
# What the operator is warned about before a disruptive action.
CONSEQUENCES = {
    "stop": "the application stops on this node; a mirror PRIM fails over to its SECOND",
    "restart": "the application is stopped and started again on this node",
    "stopstart": "the module is stopped then started again on this node",
    "swap": "the application moves to the other node (short interruption)",
    "prim": "this node becomes primary; the application moves here",
    "second": "this node becomes secondary; the application moves away",
    "primforce": "this node becomes primary even with stale data: newer data elsewhere is lost",
}


@dataclass(frozen=True)
class Cell:
    module: str
    node: str
    state: str
    since: float | None
    colour: str
    reachable: bool
    reason: str  # tooltip: why the cell shows this

    def text(self, now: float | None = None) -> str:
        if self.since is None:
            return self.state
        return f"{self.state} for {duration_text((now or time.time()) - self.since)}"


@dataclass(frozen=True)
class Matrix:
    modules: tuple[str, ...]
    nodes: tuple[str, ...]
    cells: dict[tuple[str, str], Cell]

    def cell(self, module: str, node: str) -> Cell | None:
        return self.cells.get((module, node))


def duration_text(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def colour(state: str) -> str:
    return STATE_COLOURS.get(state, STATE_COLOURS[UNKNOWN])


def _cell(status: NodeStatus, module: str) -> Cell | None:
    name = status.name
    if not status.reachable:
        why = status.error or "not checked yet"
        state = UNREACHABLE if status.reachable is False else UNKNOWN
        return Cell(module, name, state, None, colour(state), False, why)
    state = status.states.get(module)
    if state is not None:
        current = str(state.get("state", UNKNOWN))
        raw = state.get("since")
        since = float(raw) if isinstance(raw, int | float) and not isinstance(raw, bool) else None
        why = f"{module} on {name}: {current}"
        return Cell(module, name, current, since, colour(current), True, why)
    for info in status.modules:
        if info.name == module:
            why = info.error or f"{module} on {name}: {info.state}"
            return Cell(module, name, info.state, None, colour(info.state), True, why)
    return None  # not installed on this node: an empty cell


def matrix(statuses: Mapping[str, NodeStatus]) -> Matrix:
    nodes = tuple(statuses)
    modules = sorted(
        {m.name for s in statuses.values() for m in s.modules}
        | {name for s in statuses.values() for name in s.states}
    )
    cells = {}
    for module in modules:
        for status in statuses.values():
            found = _cell(status, module)
            if found is not None:
                cells[(module, status.name)] = found
    return Matrix(tuple(modules), nodes, cells)


def button(status: NodeStatus | None, module: str, verb: str) -> tuple[bool, str]:
    """(enabled, reason) of one action button for one module on one node."""
    ok, reason = allowed(status, verb)
    if not ok:
        return False, reason
    assert status is not None
    if module not in status.states and all(m.name != module for m in status.modules):
        return False, f"{module} is not installed on {status.name}"
    return True, reason


def confirmation(verb: str, module: str, node: str) -> str | None:
    """The question to ask before a disruptive action; None when none is needed."""
    consequence = CONSEQUENCES.get(verb)
    if consequence is None:
        return None
    return f"{verb} module {module} on {node}? {consequence[0].upper()}{consequence[1:]}."
