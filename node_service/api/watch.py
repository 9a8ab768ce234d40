"""`rampart watch --json`: the console's live feed, as JSON lines.

Line schema (every line has ``type``, ``ts`` and ``node``):

- ``{"type": "hello", "modules": [NAME...]}`` first, once;
- ``{"type": "state", "module", "state": {the state --json object}, "reason"}``
  once per module at the start (reason "current state") and after every
  transition of that module (reason: the transition's reason);
- ``{"type": "metrics", "module", "state": "PRIM", "metrics": {...}}`` one
  sample per module per second (``ModuleRunner.metrics()``);
- ``{"type": "event", "module", "entry": {journal entry}}`` for every
  journal entry, transitions included (timeline markers, logs).

A reader that falls behind loses the oldest events (an ``event`` whose
entry has kind ``lost`` marks the gap); metric samples are made fresh each
second, so they are never stale. See docs/dev/daemon.md.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from node_service.daemon import Daemon

Line = dict[str, Any]
SAMPLE_PERIOD_S = 1.0


def state_line(node: str, module: str, state: dict[str, Any], reason: str) -> Line:
    return {"type": "state", "ts": time.time(), "node": node, "module": module,
            "state": state, "reason": reason}  # fmt: skip


def event_line(node: str, entry: dict[str, Any]) -> Line:
    return {"type": "event", "ts": entry.get("ts", time.time()), "node": node,
            "module": entry.get("module"), "entry": entry}  # fmt: skip


def metrics_line(node: str, module: str, state: str, metrics: dict[str, Any]) -> Line:
    return {"type": "metrics", "ts": time.time(), "node": node, "module": module,
            "state": state, "metrics": metrics}  # fmt: skip


def lines_for_entry(daemon: Daemon, entry: dict[str, Any]) -> list[Line]:
    """The watch lines one journal entry produces (a transition adds a state line)."""
    node = daemon.config.node
    lines = [event_line(node, entry)]
    module = entry.get("module")
    if entry.get("kind") == "transition" and module in daemon.slots:
        lines.append(state_line(node, module, daemon.state(module), str(entry.get("reason"))))
    return lines


async def stream_watch(
    daemon: Daemon, module: str | None, send: Callable[[Line], Awaitable[None]]
) -> None:
    """Send watch lines until the daemon stops or the reader goes away."""
    node = daemon.config.node
    subscription = daemon.journal.subscribe(module)
    try:
        names = [module] if module else sorted(daemon.slots)
        await send({"type": "hello", "ts": time.time(), "node": node, "modules": names})
        for name in names:
            if name in daemon.slots:
                await send(state_line(node, name, daemon.state(name), "current state"))
        next_sample = time.monotonic()
        while not daemon.stopping.is_set():
            now = time.monotonic()
            if now >= next_sample:
                for name in [module] if module else sorted(daemon.slots):
                    slot = daemon.slots.get(name)
                    if slot is not None:
                        await send(
                            metrics_line(node, name, slot.state_name(), daemon.metrics(name))
                        )
                # Skip missed ticks instead of bursting to catch up.
                while next_sample <= now:
                    next_sample += SAMPLE_PERIOD_S
            entry = await subscription.get(timeout=max(0.0, next_sample - time.monotonic()))
            if entry is not None:
                for line in lines_for_entry(daemon, entry):
                    await send(line)
    finally:
        subscription.close()
