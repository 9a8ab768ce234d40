"""Figure: both numbers printed, the ratio against the baseline, and the limit's verdict."""

from __future__ import annotations

import math

from bench.figures import Figure, failed, median


def test_ratio_and_both_numbers_are_printed():
    figure = Figure("outage after crash", 3.1, "s", 3.0, "heartbeat timeout", 5.0)
    assert figure.ok is True
    assert math.isclose(figure.ratio or 0, 3.1 / 3.0)
    text = str(figure)
    assert text.startswith("outage after crash: 3.10 s vs heartbeat timeout 3 s (ratio 1.03)")
    assert "ok: 3.10 s <= limit 5 s" in text


def test_value_above_limit_fails_and_says_so():
    figure = Figure("swap", 2.5, "s", 1.96, "scripts by hand", 2.0)
    assert figure.ok is False
    assert "FAIL: 2.50 s > limit 2 s" in str(figure)


def test_value_equal_to_limit_passes():
    assert Figure("failovers", 0, "", None, "the load", 0).ok is True
    assert Figure("failovers", 1, "", None, "the load", 0).ok is False


def test_text_baseline_has_no_ratio():
    figure = Figure("failovers", 0, "", None, "the load: 1.9 CPU-s/s, 800 MB/s", 0)
    assert figure.ratio is None
    assert str(figure) == "failovers: 0 vs the load: 1.9 CPU-s/s, 800 MB/s — ok: 0 <= limit 0"


def test_zero_baseline_gives_no_ratio_instead_of_dividing():
    assert Figure("x", 1.0, "s", 0.0, "nothing", None).ratio is None


def test_information_only_figure_is_ok():
    figure = Figure("command to new primary", 2.4, "s", 2.0, "scripts", None)
    assert figure.ok is True
    assert "information only" in str(figure)


def test_unmeasured_value_is_a_failure_even_without_limit():
    figure = Figure("outage", math.inf, "s", 3.0, "heartbeat timeout", None)
    assert figure.ok is False
    assert figure.ratio is None
    assert "n/a" in str(figure) and "FAIL: not measured" in str(figure)


def test_failed_benchmark_figure_prints_its_reason():
    figure = failed("clean swap", "swap could not run: lab up failed")
    assert figure.ok is False
    assert str(figure).endswith("\n    swap could not run: lab up failed")


def test_median_counts_a_missing_run_as_worst():
    assert median([3.0, 3.2, 3.1]) == 3.1
    assert median([3.0, math.inf, math.inf]) == math.inf
    assert median([]) == math.inf
