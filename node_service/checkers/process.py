"""The process checker: is the application's process alive?

The process is found either through a pid file (the usual daemon
convention) or by a pattern matched against every process's command line
(``/proc/PID/cmdline``, arguments joined by spaces, as ``pgrep -f`` does)
among the processes of the node's own network namespace. A zombie counts as
dead. An application inside a container with its own network namespace is
checked by pid file or script instead. When the checker's policy says so the runner calls
``restart()``, which awaits the callback the module runner supplied (usually
running ``bin/start_prim`` again); the restart budget and the escalation to
failover are decided in ``decide.py``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Awaitable, Callable

from node_service.checkers.base import Check, CheckResult
from node_service.checkers.decide import ACT_RESTART, Policy
from node_service.errors import RampartError, UserError

RestartCallback = Callable[[], Awaitable[str]]


def process_alive(pid: int, proc: str = "/proc") -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        with open(f"{proc}/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # The state letter follows the command name, which is in parentheses and may
    # itself contain spaces or ")".
    state = stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3]
    return state not in (b"Z", b"X")


def read_pidfile(path: str) -> int | None:
    """The pid written in ``path``, or None if it is missing or not a pid."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            text = f.read(64).strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def _netns(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def matching_pids(pattern: re.Pattern[str], proc: str = "/proc") -> list[int]:
    """Live processes of this node whose command line matches ``pattern``.

    Only processes in our own network namespace count: lab hosts share one
    kernel (and one /proc), and a node must not mistake its neighbour's
    application for its own. Our own process is excluded.
    """
    own = os.getpid()
    own_netns = _netns(f"{proc}/thread-self/ns/net")
    found = []
    for entry in os.listdir(proc):
        if not entry.isdigit() or int(entry) == own:
            continue
        if _netns(f"{proc}/{entry}/ns/net") != own_netns:
            continue
        try:
            with open(f"{proc}/{entry}/cmdline", "rb") as f:
                raw = f.read()
        except OSError:  # exited meanwhile
            continue
        if not raw:  # kernel threads and zombies have no command line
            continue
        cmdline = raw.rstrip(b"\x00").replace(b"\x00", b" ").decode("utf-8", "replace")
        if pattern.search(cmdline) and process_alive(int(entry), proc):
            found.append(int(entry))
    return sorted(found)


class ProcessCheck(Check):
    """Alive-or-not of the application's process, with local restarts."""

    kind = "process"

    def __init__(
        self,
        *,
        pattern: str | None = None,
        pidfile: str | None = None,
        restart: RestartCallback | None = None,
        restarts: int = 3,
        window_s: float = 300.0,
        failures: int = 1,
        **settings,
    ):
        if (pattern is None) == (pidfile is None):
            raise UserError("process checker: expected exactly one of a pattern or a pid file")
        what = f"pid file {pidfile}" if pidfile else pattern
        if restart is not None:
            settings.setdefault(
                "policy",
                Policy(failures=failures, action=ACT_RESTART, restarts=restarts, window_s=window_s),
            )
        super().__init__(f"process {what}", **settings)
        self.pidfile = pidfile
        self.pattern = None
        if pattern is not None:
            try:
                self.pattern = re.compile(pattern)
            except re.error as exc:
                raise UserError(
                    f"process checker: pattern {pattern!r} is not a valid regular expression "
                    f"({exc})"
                ) from None
        self._restart = restart

    async def check(self) -> CheckResult:
        if self.pidfile is not None:
            pid = read_pidfile(self.pidfile)
            if pid is None:
                return CheckResult(False, f"{self.label}: missing or holds no pid")
            if not process_alive(pid):
                return CheckResult(False, f"{self.label}: process {pid} is not running")
            return CheckResult(True, f"{self.label}: process {pid} running")
        pids = matching_pids(self.pattern)
        if not pids:
            return CheckResult(False, f"{self.label}: no running process matches")
        shown = ", ".join(map(str, pids[:5])) + (" ..." if len(pids) > 5 else "")
        return CheckResult(True, f"{self.label}: running (pid {shown})")

    async def restart(self) -> str:
        if self._restart is None:
            return f"{self.label}: no restart action configured"
        try:
            return await self._restart()
        except RampartError as exc:
            return f"restart failed: {exc}"
