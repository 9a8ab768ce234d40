"""One benchmark result: a measured value, the baseline measured in the same run, a limit.

The machine running `make bench` is shared and noisy, so a figure always
carries the number it should be read against (the module's heartbeat
timeout, the application's own scripts, the load that was applied, the same
disk unreplicated). ``Figure`` limits are upper bounds ("at most"): outage
seconds, swap seconds, failovers, megabytes of memory. ``AtLeastFigure``
limits are floors on the ratio to the baseline ("at least 0.9 of the
filter-off rate", "replicated writes at least 0.5 of the same disk
unreplicated").
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Figure:
    """``value`` (in ``unit``) against ``baseline``; ``ok`` when value <= limit.

    ``baseline`` is None when the baseline is not a number of the same unit
    (a load described by its throughput): ``baseline_name`` then says what
    it was, and there is no ratio.
    """

    name: str
    value: float
    unit: str
    baseline: float | None
    baseline_name: str
    limit: float | None
    detail: str = ""

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or self.baseline <= 0 or not math.isfinite(self.value):
            return None
        return self.value / self.baseline

    @property
    def ok(self) -> bool:
        # NaN/inf mean "never measured" (no recovery seen): never a pass.
        if not math.isfinite(self.value):
            return False
        return self.limit is None or self.value <= self.limit

    @property
    def verdict(self) -> str:
        """One reason sentence: why the figure passes or fails."""
        if not math.isfinite(self.value):
            return "FAIL: not measured (the bounded wait ended first)"
        if self.limit is None:
            return "information only"
        sign = "<=" if self.ok else ">"
        state = "ok" if self.ok else "FAIL"
        return f"{state}: {_num(self.value, self.unit)} {sign} limit {_num(self.limit, self.unit)}"

    def __str__(self) -> str:
        line = f"{self.name}: {_num(self.value, self.unit)}"
        if self.baseline is not None:
            line += f" vs {self.baseline_name} {_num(self.baseline, self.unit)}"
            if self.ratio is not None:
                line += f" (ratio {self.ratio:.2f})"
        elif self.baseline_name:
            line += f" vs {self.baseline_name}"
        line += f" — {self.verdict}"
        if self.detail:
            line += f"\n    {self.detail}"
        return line


@dataclass(frozen=True)
class AtLeastFigure(Figure):
    """A figure whose limit is a floor on its ratio to the baseline (value/baseline >= limit).

    ``Figure`` limits are ceilings on the value; throughput figures need
    "at least R of the baseline measured in the same run".
    """

    @property
    def ok(self) -> bool:
        ratio = self.ratio
        return ratio is not None and self.limit is not None and ratio >= self.limit

    @property
    def verdict(self) -> str:
        ratio = self.ratio
        if ratio is None or self.limit is None:
            return "FAIL: not measured (the bounded wait ended first)"
        sign, state = (">=", "ok") if self.ok else ("<", "FAIL")
        return f"{state}: ratio {ratio:.2f} {sign} limit {self.limit:.2f}"


def _num(value: float, unit: str) -> str:
    if not math.isfinite(value):
        return "n/a"
    text = f"{value:.0f}" if float(value).is_integer() else f"{value:.2f}"
    return f"{text} {unit}" if unit else text


def median(values: Sequence[float]) -> float:
    """Median where a missing measurement (inf) counts as the worst value."""
    if not values:
        return math.inf
    return float(statistics.median(values))


def failed(name: str, why: str) -> Figure:
    """The figure of a benchmark that could not run: printed, and a failure."""
    return Figure(name, math.inf, "", None, "", None, detail=why)
