"""Failover timeline: per module, one row per node of state bars, plus event markers.

Built from watch lines (``state`` lines give the bars, ``event`` lines the
markers: checker results, commands, warnings, each with its message) or
from journal entries read with ``rampart events --json``. A transition
journal entry also closes and opens a bar, so a timeline rebuilt from the
journal alone looks the same as one fed live.

CSV export is here (atomic write); PNG export is the view's job.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.feeds import parse_line
from app.signals import Signal
from node_service.errors import UserError

MAX_INTERVALS = 5000  # per node and module
MAX_MARKERS = 20000
CSV_COLUMNS = ("record", "module", "node", "start", "end", "state", "kind", "severity", "text")


@dataclass(frozen=True)
class Interval:
    state: str
    start: float
    end: float | None  # None: still in this state
    reason: str

    def duration(self, now: float) -> float:
        return (self.end if self.end is not None else now) - self.start


@dataclass(frozen=True)
class Marker:
    ts: float
    node: str
    module: str | None
    kind: str
    severity: str
    message: str


class Timeline:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rows: dict[str, dict[str, deque[Interval]]] = {}
        self._markers: deque[Marker] = deque(maxlen=MAX_MARKERS)
        self.changed = Signal("timeline_changed")  # (module or None)

    # -- feeding
    def add_state(self, node: str, module: str, state: str, ts: float, reason: str) -> bool:
        """Open a bar for ``state`` at ``ts``; False when nothing changed."""
        with self._lock:
            row = self._rows.setdefault(module, {}).setdefault(node, deque(maxlen=MAX_INTERVALS))
            if row:
                last = row[-1]
                if last.state == state or ts < last.start:
                    return False  # same state again, or older than what we show
                row[-1] = Interval(last.state, last.start, ts, last.reason)
            row.append(Interval(state, ts, None, reason))
        self.changed.emit(module)
        return True

    def add_event(self, node: str, entry: dict[str, Any]) -> None:
        ts = entry.get("ts")
        if not isinstance(ts, int | float) or isinstance(ts, bool):
            return
        module = entry.get("module") if isinstance(entry.get("module"), str) else None
        node = str(entry.get("node") or node)
        kind = str(entry.get("kind", "info"))
        message = str(entry.get("message", ""))
        if kind == "transition" and module and isinstance(entry.get("new"), str):
            reason = str(entry.get("reason") or message)
            self.add_state(node, module, entry["new"], float(ts), reason)
            message = f"{entry.get('old', '?')} -> {entry['new']} ({reason})"
        with self._lock:
            self._markers.append(
                Marker(float(ts), node, module, kind, str(entry.get("severity", "info")), message)
            )
        self.changed.emit(module)

    def add_line(self, node: str, raw: Any) -> None:
        line = parse_line(raw)
        if line is None:
            return
        node = str(line.get("node") or node)
        if line["type"] == "state" and isinstance(line.get("state"), dict):
            state = line["state"]
            if not isinstance(state.get("state"), str):
                return
            ts = float(line["ts"])
            since = state.get("since")
            # The first line of a feed says "current state": its bar began at `since`.
            if isinstance(since, int | float) and not isinstance(since, bool) and since <= ts:
                ts = float(since)
            self.add_state(node, line["module"], state["state"], ts, str(line.get("reason", "")))
        elif line["type"] == "event" and isinstance(line.get("entry"), dict):
            self.add_event(node, line["entry"])

    # -- reading
    def modules(self) -> tuple[str, ...]:
        with self._lock:
            return tuple(sorted(self._rows))

    def rows(self, module: str) -> dict[str, tuple[Interval, ...]]:
        with self._lock:
            return {node: tuple(row) for node, row in sorted(self._rows.get(module, {}).items())}

    def markers(self, module: str | None = None) -> tuple[Marker, ...]:
        with self._lock:
            return tuple(m for m in self._markers if module is None or m.module == module)

    def span(self) -> tuple[float, float] | None:
        with self._lock:
            times = [i.start for rows in self._rows.values() for r in rows.values() for i in r]
            times += [m.ts for m in self._markers]
        return (min(times), max(times)) if times else None

    # -- export
    def csv_text(self, module: str | None = None) -> str:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for name in self.modules():
            if module is not None and name != module:
                continue
            for node, row in self.rows(name).items():
                for i in row:
                    end = "" if i.end is None else f"{i.end:.3f}"
                    writer.writerow(("state", name, node, f"{i.start:.3f}", end, i.state,
                                     "", "", i.reason))  # fmt: skip
        for m in self.markers(module):
            writer.writerow(("event", m.module or "", m.node, f"{m.ts:.3f}", "", "",
                             m.kind, m.severity, m.message))  # fmt: skip
        return out.getvalue()

    def export_csv(self, path: str | os.PathLike[str], module: str | None = None) -> Path:
        target = Path(path)
        text = self.csv_text(module)
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        except OSError as exc:
            raise UserError(f"cannot write {target}: {exc.strerror}") from None
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
                fh.write(text)
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target
