"""Live data from `rampart watch --json`: time series for the graphs.

Each node's watch feed (docs/dev/daemon.md) sends a ``state`` line per
transition and a ``metrics`` line per module per second. ``LiveFeed`` keeps,
per node and module, bounded ring buffers covering the last five minutes:
replication throughput, lag, resync remaining (with an ETA), and heartbeat
round-trip time per network address. A line that is not a watch line (a
partial write, a stray message, a newer daemon's unknown type) is counted and
skipped: a feed never stops on bad input.

Metric names: the mirror runner's numbers are read under a few names
(``replication_bytes_per_s`` or ``bytes_per_s``...), and the ``replication``
object of state lines feeds the same series, so the graphs work whichever
the daemon sends.
"""

from __future__ import annotations

import json
import math
import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from app.signals import Signal

WINDOW_S = 300.0
MAX_SAMPLES = 2000  # > 5 minutes at several samples a second; bounds memory whatever arrives
ETA_SPAN_S = 30.0
SERIES = ("bytes_per_s", "lag_bytes", "resync_remaining_bytes")
# Metric names that feed each series, first found wins.
METRIC_NAMES = {
    "bytes_per_s": ("replication_bytes_per_s", "bytes_per_s"),
    "lag_bytes": ("replication_lag_bytes", "lag_bytes"),
    "resync_remaining_bytes": (
        "replication_resync_remaining_bytes",
        "resync_remaining_bytes",
    ),
}
RTT_METRIC = "heartbeat_rtt_seconds"

Line = dict[str, Any]
Points = tuple[tuple[float, ...], tuple[float, ...]]


def parse_line(raw: str | bytes | Line) -> Line | None:
    """A watch line as a dict, or None when it is not one (never raises)."""
    if isinstance(raw, dict):
        line = raw
    else:
        try:
            line = json.loads(raw)
        except (ValueError, TypeError, UnicodeDecodeError):
            return None
    if not isinstance(line, dict) or not isinstance(line.get("type"), str):
        return None
    ts = line.get("ts")
    if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts):
        return None
    # Events may be node-wide (module null); state and metrics always name one.
    if line["type"] in ("state", "metrics") and not isinstance(line.get("module"), str):
        return None
    return line


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


class Series:
    """Samples (ts, value) of one quantity over a sliding window."""

    def __init__(self, window: float = WINDOW_S, limit: int = MAX_SAMPLES) -> None:
        self.window = window
        self._samples: deque[tuple[float, float]] = deque(maxlen=limit)

    def add(self, ts: float, value: float) -> None:
        if self._samples and ts < self._samples[-1][0]:
            return  # out of order (clock step, replayed line): keep the series monotonic
        self._samples.append((ts, value))
        while self._samples and self._samples[0][0] < ts - self.window:
            self._samples.popleft()

    def snapshot(self) -> Points:
        if not self._samples:
            return (), ()
        ts, values = zip(*self._samples, strict=True)
        return tuple(ts), tuple(values)

    def points(self) -> list[tuple[float, float]]:
        return list(self._samples)

    @property
    def last(self) -> tuple[float, float] | None:
        return self._samples[-1] if self._samples else None

    def __len__(self) -> int:
        return len(self._samples)


def resync_eta(samples: Iterable[tuple[float, float]], span: float = ETA_SPAN_S) -> float | None:
    """Seconds until resync ends at the recent rate; None when it is not progressing."""
    points = list(samples)
    if not points:
        return None
    t_new, r_new = points[-1]
    if r_new <= 0:
        return 0.0
    recent = [p for p in points if p[0] >= t_new - span]
    t_old, r_old = recent[0]
    if t_new <= t_old or r_old <= r_new:
        return None
    rate = (r_old - r_new) / (t_new - t_old)
    return r_new / rate


@dataclass(frozen=True)
class Sample:
    node: str
    module: str
    state: str | None
    ts: float


class LiveFeed:
    """The graphs' data for every node of a site."""

    def __init__(self, window: float = WINDOW_S) -> None:
        self.window = window
        self._lock = threading.Lock()
        self._series: dict[tuple[str, str, str], Series] = {}
        self._rtt: dict[tuple[str, str], Series] = {}
        self._states: dict[tuple[str, str], str] = {}
        self.garbage = 0
        self.changed = Signal("feed_changed")  # (node)

    def _get(self, store: dict, key: tuple) -> Series:
        series = store.get(key)
        if series is None:
            series = store[key] = Series(self.window)
        return series

    def add_line(self, node: str, raw: str | bytes | Line) -> bool:
        """Take one watch line from ``node``; False (and counted) when it is garbage."""
        line = parse_line(raw)
        if line is None:
            with self._lock:
                self.garbage += 1
            return False
        ts = float(line["ts"])
        kind = line["type"]
        with self._lock:
            if kind == "metrics":
                self._metrics(node, line["module"], ts, line.get("metrics"))
                if isinstance(line.get("state"), str):
                    self._states[(node, line["module"])] = line["state"]
            elif kind == "state" and isinstance(line.get("state"), dict):
                state = line["state"]
                if isinstance(state.get("state"), str):
                    self._states[(node, line["module"])] = state["state"]
                self._replication(node, line["module"], ts, state.get("replication"))
            else:
                return True  # hello, event and unknown types: valid lines, nothing to graph
        self.changed.emit(node)
        return True

    def _metrics(self, node: str, module: str, ts: float, metrics: Any) -> None:
        if not isinstance(metrics, dict):
            return
        for series, names in METRIC_NAMES.items():
            for name in names:
                value = _number(metrics.get(name))
                if value is not None:
                    self._get(self._series, (node, module, series)).add(ts, value)
                    break
        rtt = metrics.get(RTT_METRIC)
        if isinstance(rtt, dict):
            for address, seconds in rtt.items():
                value = _number(seconds)
                if value is not None:
                    self._get(self._rtt, (node, str(address))).add(ts, value)

    def _replication(self, node: str, module: str, ts: float, replication: Any) -> None:
        if not isinstance(replication, dict):
            return
        for series in SERIES:
            value = _number(replication.get(series))
            if value is not None:
                self._get(self._series, (node, module, series)).add(ts, value)

    # -- reading (any thread)
    def series(self, node: str, module: str, name: str) -> Points:
        if name not in SERIES:
            raise KeyError(f"unknown series {name!r}; expected one of {', '.join(SERIES)}")
        with self._lock:
            found = self._series.get((node, module, name))
            return found.snapshot() if found else ((), ())

    def rtt(self, node: str) -> dict[str, Points]:
        with self._lock:
            return {addr: s.snapshot() for (n, addr), s in self._rtt.items() if n == node}

    def resync_eta(self, node: str, module: str) -> float | None:
        with self._lock:
            found = self._series.get((node, module, "resync_remaining_bytes"))
            points = found.points() if found else []
        return resync_eta(points)

    def state(self, node: str, module: str) -> str | None:
        with self._lock:
            return self._states.get((node, module))

    def modules(self) -> tuple[tuple[str, str], ...]:
        with self._lock:
            keys = {(n, m) for n, m, _ in self._series} | set(self._states)
        return tuple(sorted(keys))
