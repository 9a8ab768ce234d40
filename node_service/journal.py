"""The node's journal: every transition, command, checker result, script line.

One entry is a flat JSON object ``{ts, node, module, kind, severity, message,
...}``. Entries go three ways at once:

- a JSON-lines file with size-capped rotation (the standard library's
  RotatingFileHandler does the rotation; we only format the lines), so the
  history survives a daemon restart;
- a ring in memory, for ``rampart events`` without reading the disk;
- bounded subscriber queues, for ``events --follow`` and ``watch``.

A slow subscriber must never hold up the daemon: when its queue is full the
oldest entries are dropped and a single ``lost`` marker says how many, so a
console can tell a gap from a quiet node.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import logging.handlers
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger("rampart.journal")

KINDS = ("transition", "command", "checker", "script", "warning", "error", "info", "lost")
SEVERITIES = ("debug", "info", "warning", "error")
_LOG_LEVEL = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}

Entry = dict[str, Any]


def make_entry(
    node: str,
    kind: str,
    message: str,
    module: str | None = None,
    severity: str = "info",
    ts: float | None = None,
    **fields: Any,
) -> Entry:
    """Build one journal entry (pure; the clock is only read when ts is None)."""
    if kind not in KINDS:
        raise ValueError(f"journal kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if severity not in SEVERITIES:
        raise ValueError(f"journal severity must be one of {', '.join(SEVERITIES)}")
    entry: Entry = {
        "ts": round(time.time() if ts is None else ts, 6),
        "node": node,
        "module": module,
        "kind": kind,
        "severity": severity,
        "message": message,
    }
    entry.update(fields)
    return entry


def matches(entry: Entry, module: str | None) -> bool:
    """Whether an entry belongs in a per-module view (node-wide entries show everywhere)."""
    return module is None or entry.get("module") in (module, None)


def format_entry(entry: Entry) -> str:
    """One human line: ``16:02:11 web transition: SECOND -> PRIM (peer lost)``."""
    clock = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.get("ts", 0)))
    module = entry.get("module") or "-"
    severity = entry.get("severity", "info")
    mark = "" if severity in ("info", entry.get("kind")) else f" [{severity}]"
    return f"{clock} {module} {entry.get('kind')}{mark}: {entry.get('message')}"


class Subscription:
    """A bounded queue of entries for one reader; filled without ever blocking the writer."""

    def __init__(self, journal: Journal, maxsize: int, module: str | None) -> None:
        self._journal = journal
        self._queue: asyncio.Queue[Entry] = asyncio.Queue(maxsize=maxsize)
        self.module = module
        self.lost = 0

    def offer(self, entry: Entry) -> None:
        if not matches(entry, self.module):
            return
        if self._queue.full():
            # Drop the oldest to make room; the marker goes in front of the
            # next read so the reader learns about the gap where it happened.
            self._queue.get_nowait()
            self.lost += 1
        self._queue.put_nowait(entry)

    async def get(self, timeout: float | None = None) -> Entry | None:
        """The next entry, a ``lost`` marker first if entries were dropped; None on timeout."""
        if self.lost:
            count, self.lost = self.lost, 0
            return make_entry(
                self._journal.node,
                "lost",
                f"{count} journal entries lost: this reader was too slow",
                severity="warning",
                lost=count,
            )
        # asyncio.timeout, not wait_for (see checkers/runner.py run_once).
        try:
            async with asyncio.timeout(timeout):
                return await self._queue.get()
        except TimeoutError:
            return None

    def close(self) -> None:
        self._journal.unsubscribe(self)

    def __aiter__(self) -> AsyncIterator[Entry]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Entry]:
        while True:
            entry = await self.get()
            if entry is not None:
                yield entry


class Journal:
    """Writes entries to the rotating file, the ring and every subscriber."""

    def __init__(
        self,
        node: str,
        path: Path | None,
        ring_size: int = 2000,
        max_bytes: int = 10 * 1024 * 1024,
        backups: int = 5,
    ) -> None:
        self.node = node
        self.path = path
        self._ring: collections.deque[Entry] = collections.deque(maxlen=ring_size)
        self._subscribers: set[Subscription] = set()
        self._handler: logging.handlers.RotatingFileHandler | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._ring.extend(_tail(path, ring_size))
            self._handler = logging.handlers.RotatingFileHandler(
                path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
            )
            self._handler.setFormatter(logging.Formatter("%(message)s"))

    # -- writing -------------------------------------------------------------

    def record(
        self,
        kind: str,
        message: str,
        module: str | None = None,
        severity: str = "info",
        **fields: Any,
    ) -> Entry:
        entry = make_entry(self.node, kind, message, module, severity, **fields)
        self._ring.append(entry)
        if self._handler is not None:
            line = json.dumps(entry, separators=(",", ":"), default=str)
            self._handler.handle(logging.makeLogRecord({"msg": line, "args": None}))
        log.log(
            _LOG_LEVEL.get(severity, logging.ERROR),
            "%s%s: %s",
            f"{module} " if module else "",
            kind,
            message,
        )
        for subscriber in list(self._subscribers):
            subscriber.offer(entry)
        return entry

    def transition(self, module: str, old: str, new: str, reason: str, **fields: Any) -> Entry:
        """The one format every state change uses: ``OLD -> NEW (reason)``."""
        return self.record(
            "transition", f"{old} -> {new} ({reason})", module, old=old, new=new, reason=reason,
            **fields,
        )  # fmt: skip

    def error(self, message: str, module: str | None = None, **fields: Any) -> Entry:
        return self.record("error", message, module, severity="error", **fields)

    def warning(self, message: str, module: str | None = None, **fields: Any) -> Entry:
        return self.record("warning", message, module, severity="warning", **fields)

    # -- reading -------------------------------------------------------------

    def recent(self, module: str | None = None, limit: int = 100) -> list[Entry]:
        selected = [e for e in self._ring if matches(e, module)]
        return selected[-limit:] if limit > 0 else []

    def subscribe(self, module: str | None = None, maxsize: int = 1000) -> Subscription:
        subscription = Subscription(self, maxsize, module)
        self._subscribers.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscribers.discard(subscription)

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def close(self) -> None:
        if self._handler is not None:
            self._handler.close()
            self._handler = None


def _tail(path: Path, count: int) -> Iterable[Entry]:
    """The last entries of the current journal file (a damaged line is skipped, not fatal)."""
    if not path.exists():
        return []
    lines: collections.deque[str] = collections.deque(maxlen=count)
    with path.open(encoding="utf-8", errors="replace") as stream:
        lines.extend(stream)
    entries = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries
