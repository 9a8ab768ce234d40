"""What a checker's results mean for its module: pure decisions, no I/O.

A checker's history is a small frozen ``Track``; each new result goes through
``decide(track, policy, ok, detail, now)``, which returns the next track, the
verdict, whether to restart the application and whether to emit an event,
with a sentence saying why. ``now`` is a monotonic clock reading supplied by
the caller, so tests replay any timeline without sleeping.

Verdicts:

- ``ok``: the last check passed;
- ``failed``: the check failed but the module stays (fewer consecutive
  failures than the policy tolerates, a restart was just ordered, or the
  checker only reports, like the split-brain witness);
- ``failover``: the application cannot run here: move it to the peer;
- ``stop-module``: stop the module on this node without moving it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

OK = "ok"
FAILED = "failed"
FAILOVER = "failover"
STOP_MODULE = "stop-module"
VERDICTS = (OK, FAILED, FAILOVER, STOP_MODULE)

# What to do once a checker has failed ``failures`` times in a row.
ACT_FAILOVER = "failover"
ACT_STOP_MODULE = "stop-module"
ACT_RESTART = "restart"  # restart locally, up to N times in a window, then fail over
ACT_REPORT = "report"  # only tell (the split-brain witness)
ACTIONS = (ACT_FAILOVER, ACT_STOP_MODULE, ACT_RESTART, ACT_REPORT)


@dataclass(frozen=True)
class Policy:
    """How patient a checker is and what it does when patience runs out."""

    failures: int = 3
    action: str = ACT_FAILOVER
    restarts: int = 3
    window_s: float = 300.0

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"checker action {self.action!r}: expected one of {ACTIONS}")
        if self.failures < 1 or self.restarts < 0 or self.window_s <= 0:
            raise ValueError(
                f"checker policy {self}: expected failures >= 1, restarts >= 0, window > 0"
            )


@dataclass(frozen=True)
class Track:
    """What one checker remembers between two checks."""

    ok: bool | None = None  # the last result; None before the first check
    failures: int = 0  # consecutive failed checks since the last success or restart
    restarts: tuple[float, ...] = ()  # monotonic times of the restarts still in the window
    verdict: str = OK


@dataclass(frozen=True)
class Decision:
    track: Track
    verdict: str
    restart: bool
    emit: bool
    reason: str


def restarts_in_window(
    restarts: tuple[float, ...], now: float, window_s: float
) -> tuple[float, ...]:
    """The restarts that happened less than ``window_s`` before ``now``."""
    return tuple(t for t in restarts if now - t < window_s)


def _passed(track: Track, policy: Policy, detail: str, now: float) -> Decision:
    recent = restarts_in_window(track.restarts, now, policy.window_s)
    if track.ok is False:
        reason = f"{detail} (recovered after {track.failures} failed check(s))"
        if track.failures == 0 and track.restarts:
            reason = f"{detail} (recovered after a restart)"
    else:
        reason = detail
    nxt = Track(ok=True, failures=0, restarts=recent, verdict=OK)
    return Decision(nxt, OK, restart=False, emit=track.ok is not True, reason=reason)


def _failed(track: Track, policy: Policy, detail: str, now: float) -> Decision:
    failures = track.failures + 1
    recent = restarts_in_window(track.restarts, now, policy.window_s)
    base = Track(ok=False, failures=failures, restarts=recent)
    if failures < policy.failures:
        then = "restart" if policy.action == ACT_RESTART else policy.action
        reason = f"{detail} (failure {failures} of {policy.failures} before {then})"
        return _fail(base, FAILED, reason)
    if policy.action == ACT_REPORT:
        return _fail(base, FAILED, f"{detail} ({failures} consecutive failures)")
    if policy.action == ACT_STOP_MODULE:
        return _fail(base, STOP_MODULE, f"{detail}: stopping the module on this node")
    if policy.action == ACT_FAILOVER:
        return _fail(base, FAILOVER, f"{detail}: failing over ({failures} consecutive failures)")
    if len(recent) < policy.restarts:
        nxt = replace(base, failures=0, restarts=(*recent, now))
        reason = (
            f"{detail}: restarting the application (restart {len(recent) + 1} of "
            f"{policy.restarts} within {policy.window_s:g} s)"
        )
        return _fail(nxt, FAILED, reason, restart=True)
    reason = (
        f"{detail}: already restarted {len(recent)} time(s) within "
        f"{policy.window_s:g} s: failing over"
    )
    return _fail(base, FAILOVER, reason)


def _fail(track: Track, verdict: str, reason: str, *, restart: bool = False) -> Decision:
    # Every failure is an event: the journal shows each step towards failover.
    return Decision(replace(track, verdict=verdict), verdict, restart, emit=True, reason=reason)


def decide(track: Track, policy: Policy, ok: bool, detail: str, now: float) -> Decision:
    """Fold one check result into the checker's track.

    ``detail`` is the check's own sentence ("tcp 198.51.100.200:80
    refused"); the decision adds what it means for the module.
    """
    if ok:
        return _passed(track, policy, detail, now)
    return _failed(track, policy, detail, now)
