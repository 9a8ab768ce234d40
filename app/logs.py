"""Logs window model: journal entries of every node, filtered and searchable.

Entries come from watch ``event`` lines (live) or ``rampart events --json``
(history). The model keeps the newest ``limit`` entries; filtering is a pure
function of an immutable ``LogFilter`` so the view can re-filter at will.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

from app.feeds import parse_line
from app.signals import Signal
from node_service.journal import SEVERITIES

DEFAULT_LIMIT = 20000
RANK = {name: i for i, name in enumerate(SEVERITIES)}


@dataclass(frozen=True)
class LogEntry:
    ts: float
    node: str
    module: str | None
    kind: str
    severity: str
    message: str

    @property
    def text(self) -> str:
        return f"{self.node} {self.module or '-'} {self.kind} {self.severity} {self.message}"


@dataclass(frozen=True)
class LogFilter:
    """Empty sets mean "all"; ``text`` is a case-insensitive substring."""

    nodes: frozenset[str] = frozenset()
    modules: frozenset[str] = frozenset()
    min_severity: str = "debug"
    text: str = ""

    def matches(self, entry: LogEntry) -> bool:
        if self.nodes and entry.node not in self.nodes:
            return False
        if self.modules and (entry.module or "") not in self.modules:
            return False
        if RANK.get(entry.severity, RANK["info"]) < RANK.get(self.min_severity, 0):
            return False
        return not self.text or self.text.casefold() in entry.text.casefold()


def entry_from(node: str, raw: dict[str, Any]) -> LogEntry | None:
    """A journal entry dict as a LogEntry, or None when it lacks a timestamp."""
    ts = raw.get("ts")
    if isinstance(ts, bool) or not isinstance(ts, int | float):
        return None
    severity = raw.get("severity")
    module = raw.get("module")
    return LogEntry(
        float(ts),
        str(raw.get("node") or node),
        module if isinstance(module, str) else None,
        str(raw.get("kind", "info")),
        severity if severity in RANK else "info",
        str(raw.get("message", "")),
    )


class LogModel:
    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self._lock = threading.Lock()
        self._entries: deque[LogEntry] = deque(maxlen=limit)
        # One of each entry: a node's history is fetched again at each reconnect.
        self._seen: set[LogEntry] = set()
        self.added = Signal("log_added")  # (LogEntry)

    def add(self, node: str, raw: dict[str, Any]) -> LogEntry | None:
        entry = entry_from(node, raw)
        if entry is None:
            return None
        with self._lock:
            if entry in self._seen:
                return None
            if len(self._entries) == self._entries.maxlen:
                self._seen.discard(self._entries[0])
            self._entries.append(entry)
            self._seen.add(entry)
        self.added.emit(entry)
        return entry

    def add_line(self, node: str, raw: Any) -> LogEntry | None:
        line = parse_line(raw)
        if line is None or line["type"] != "event" or not isinstance(line.get("entry"), dict):
            return None
        return self.add(str(line.get("node") or node), line["entry"])

    def entries(self) -> tuple[LogEntry, ...]:
        with self._lock:
            return tuple(self._entries)

    def filtered(self, wanted: LogFilter) -> tuple[LogEntry, ...]:
        return tuple(e for e in sorted(self.entries(), key=lambda e: e.ts) if wanted.matches(e))

    def nodes(self) -> tuple[str, ...]:
        return tuple(sorted({e.node for e in self.entries()}))

    def modules(self) -> tuple[str, ...]:
        return tuple(sorted({e.module for e in self.entries() if e.module}))
