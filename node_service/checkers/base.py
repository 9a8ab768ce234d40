"""What every checker shares: its result and its settings.

A check is one short probe of the application or its surroundings that
returns ``CheckResult(ok, reason)``; the reason is a sentence for the
journal ("tcp 198.51.100.200:80 refused"). Checks never raise for a failing
target: a refused connection is a result, not an error. The ``CheckerRunner``
adds scheduling, the timeout, failure counting and verdicts.
"""

from __future__ import annotations

from dataclasses import dataclass

from node_service.checkers.decide import Policy


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    reason: str


class Check:
    """Base of the checkers. Subclasses set ``kind`` and implement ``check``."""

    kind = ""

    def __init__(
        self,
        label: str,
        *,
        interval_s: float = 5.0,
        timeout_s: float = 2.0,
        policy: Policy | None = None,
    ):
        if interval_s <= 0 or timeout_s <= 0:
            raise ValueError(f"checker {label}: interval and timeout must be positive")
        self.label = label
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.policy = policy or Policy()

    async def check(self) -> CheckResult:
        raise NotImplementedError

    async def restart(self) -> str:
        """Restart the application locally (only checkers with a restart policy)."""
        return f"{self.label}: no local restart for this checker"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.label}>"
