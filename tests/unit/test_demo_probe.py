"""The client probe's pure part: what counts as the outage a client saw, and when to stop."""

from __future__ import annotations

import math

from node_service.demo import Sample, find_outage, parse_samples, recovered


def series(pattern: str, start: float = 100.0, step: float = 0.05) -> list[Sample]:
    """'1' = answered by n1, '2' = by n2, 'x' = failed; one attempt every 50 ms."""
    return [
        Sample(
            start + i * step,
            c != "x",
            None if c == "x" else f"n{c}",
            "timeout" if c == "x" else None,
        )
        for i, c in enumerate(pattern)
    ]


def test_outage_is_first_failure_to_first_success_again():
    samples = series("1111xxxxxx22")
    outage = find_outage(samples, since=100.1)
    assert outage.failures == 6
    assert math.isclose(outage.first_failure or 0, 100.2)
    assert math.isclose(outage.recovered or 0, 100.5)
    assert math.isclose(outage.seconds or 0, 0.3)
    assert (outage.before, outage.after) == ("n1", "n2")
    assert outage.reason == "6 failed connection(s), then n2 answered"


def test_samples_out_of_order_are_sorted_by_start_time():
    samples = series("11xx2")
    outage = find_outage(list(reversed(samples)))
    assert math.isclose(outage.seconds or 0, 0.1)


def test_failures_before_since_are_not_the_outage():
    samples = series("xx11111xx1")
    outage = find_outage(samples, since=100.1)
    assert math.isclose(outage.first_failure or 0, 100.35)
    assert outage.failures == 2
    assert outage.after == "n1"


def test_node_change_without_failure_is_a_zero_outage():
    outage = find_outage(series("111222"))
    assert outage.seconds == 0.0
    assert (outage.before, outage.after) == ("n1", "n2")
    assert "without any failure" in outage.reason


def test_no_recovery_has_no_duration():
    outage = find_outage(series("11xxxx"))
    assert outage.seconds is None
    assert outage.reason == "4 failed connection(s) and no answer since"


def test_quiet_run_has_no_outage():
    outage = find_outage(series("111111"))
    assert outage.seconds is None and outage.failures == 0
    assert outage.reason == "no failure and no change of node seen"


def test_recovered_needs_an_outage_then_settled_successes():
    assert not recovered(series("1" * 30), settle=10)
    assert not recovered(series("11xx" + "2" * 9), settle=10)
    assert recovered(series("11xx" + "2" * 10), settle=10)
    assert recovered(series("111" + "2" * 10), settle=10)


def test_recovered_ignores_failures_before_the_service_first_answered():
    assert not recovered(series("xxxx" + "1" * 20), settle=10)


def test_parse_samples_reads_the_probe_output_rows():
    rows = [[1.0, True, "n1"], [1.05, False, "ClientConnectorError"]]
    assert parse_samples(rows) == [
        Sample(1.0, True, "n1", None),
        Sample(1.05, False, None, "ClientConnectorError"),
    ]
