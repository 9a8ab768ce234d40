"""Runs a module's checkers: one named asyncio task per checker.

Each task checks at the checker's interval, bounds each check by its
timeout, folds the result into the checker's ``Track`` with the pure
``decide`` and, when the decision says so, awaits the checker's restart and
emits a ``CheckerEvent``. Events are emitted when a checker changes between
ok and failed and on every failure, so the journal shows each step towards a
failover but not a line per healthy check.

The runner owns its tasks: ``stop()`` (or leaving ``async with``) cancels and
awaits them all. A checker that raises unexpectedly is reported as a failed
check; the task carries on.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

from node_service.checkers.base import Check, CheckResult
from node_service.checkers.decide import ACT_FAILOVER, ACT_RESTART, Policy, Track, decide
from node_service.checkers.probes import InterfaceCheck, PingCheck, ScriptCheck, TcpCheck
from node_service.checkers.process import ProcessCheck, RestartCallback

log = logging.getLogger(__name__)

# A check gets this long beyond its own timeout before the runner cancels it:
# the checks time themselves out with a better reason; this is the backstop.
DEADLINE_MARGIN_S = 1.0


@dataclass(frozen=True)
class CheckerEvent:
    checker: str  # the label, e.g. "tcp 198.51.100.200:80"
    kind: str
    ok: bool
    verdict: str  # ok | failed | failover | stop-module
    reason: str
    failures: int  # consecutive failures counted so far
    restarted: bool  # a local restart was done for this event
    at: float  # wall clock, for the journal and the console timeline


OnEvent = Callable[[CheckerEvent], Awaitable[None] | None]


class CheckerRunner:
    def __init__(self, checks: Sequence[Check], on_event: OnEvent, *, name: str = "checkers"):
        labels = [c.label for c in checks]
        if len(set(labels)) != len(labels):
            raise ValueError(f"{name}: two checkers share a label in {labels}")
        self.name = name
        self.checks = tuple(checks)
        self._on_event = on_event
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._latest: dict[str, CheckerEvent] = {}
        self._tracks: dict[str, Track] = {c.label: Track() for c in checks}

    # --- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        for check in self.checks:
            if check.label not in self._tasks:
                self._tasks[check.label] = asyncio.get_running_loop().create_task(
                    self._loop(check), name=f"{self.name}: {check.label}"
                )

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def __aenter__(self) -> CheckerRunner:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # --- what the module runner reads ---------------------------------------------

    def latest(self, label: str) -> CheckerEvent | None:
        """The last event of a checker (the witness result, for instance)."""
        return self._latest.get(label)

    def track(self, label: str) -> Track:
        return self._tracks[label]

    # --- one checker ---------------------------------------------------------------

    async def run_once(self, check: Check) -> CheckResult:
        """One bounded check; never raises except on cancellation."""
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
        # cancellation that arrives with the result, and the checker loop
        # around this call would then outlive CheckerRunner.stop().
        try:
            async with asyncio.timeout(check.timeout_s + DEADLINE_MARGIN_S):
                return await check.check()
        except TimeoutError:
            return CheckResult(False, f"{check.label} no answer within {check.timeout_s:g} s")
        except Exception as exc:  # a checker bug must not stop the other checks
            log.exception("checker %s raised", check.label)
            return CheckResult(False, f"{check.label}: checker error {exc!r}")

    async def step(self, check: Check) -> CheckerEvent | None:
        """Check once, decide, restart if told to, and emit; returns the event."""
        result = await self.run_once(check)
        track = self._tracks[check.label]
        decision = decide(track, check.policy, result.ok, result.reason, time.monotonic())
        self._tracks[check.label] = decision.track
        reason = decision.reason
        if decision.restart:
            reason = f"{reason}; {await check.restart()}"
        event = CheckerEvent(
            checker=check.label,
            kind=check.kind,
            ok=result.ok,
            verdict=decision.verdict,
            reason=reason,
            failures=decision.track.failures,
            restarted=decision.restart,
            at=time.time(),
        )
        self._latest[check.label] = event
        if not decision.emit:
            return None
        outcome = self._on_event(event)
        if inspect.isawaitable(outcome):
            await outcome
        return event

    async def _loop(self, check: Check) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                await self.step(check)
            except asyncio.CancelledError:
                raise
            except Exception:  # the event consumer failed: keep checking
                log.exception("checker %s: event handling failed", check.label)
            await asyncio.sleep(max(0.0, started + check.interval_s - loop.time()))


def from_model(
    checker: object,
    *,
    module_dir: str,
    env: Mapping[str, str],
    restart: RestartCallback | None = None,
) -> Check:
    """The runtime checker for a ``module.model`` checker dataclass."""
    from node_service.module import model

    settings = {"interval_s": checker.interval, "timeout_s": checker.timeout}
    failover = Policy(failures=checker.failures, action=ACT_FAILOVER)
    if isinstance(checker, model.TcpChecker):
        return TcpCheck(checker.address, checker.port, policy=failover, **settings)
    if isinstance(checker, model.PingChecker):
        return PingCheck(checker.target, policy=failover, **settings)
    if isinstance(checker, model.InterfaceChecker):
        return InterfaceCheck(checker.interface, policy=failover, **settings)
    if isinstance(checker, model.ScriptChecker):
        return ScriptCheck(module_dir, checker.script, env=env, policy=failover, **settings)
    if isinstance(checker, model.ProcessChecker):
        action = ACT_RESTART if restart is not None else ACT_FAILOVER
        policy = Policy(
            failures=checker.failures,
            action=action,
            restarts=checker.restarts,
            window_s=checker.window,
        )
        return ProcessCheck(pattern=checker.pattern, restart=restart, policy=policy, **settings)
    raise ValueError(f"no runtime checker for {checker!r}")
