"""The pure checker decisions: failure counting, restart window, verdicts."""

from __future__ import annotations

import pytest

from node_service.checkers.decide import (
    ACT_FAILOVER,
    ACT_REPORT,
    ACT_RESTART,
    ACT_STOP_MODULE,
    FAILED,
    FAILOVER,
    OK,
    STOP_MODULE,
    Policy,
    Track,
    decide,
    restarts_in_window,
)


def run(policy: Policy, results: list[tuple[bool, float]], track: Track | None = None):
    """Fold a timeline of (ok, now) results; returns every decision."""
    track = track or Track()
    decisions = []
    for ok, now in results:
        d = decide(track, policy, ok, "tcp 198.51.100.200:80 " + ("ok" if ok else "refused"), now)
        decisions.append(d)
        track = d.track
    return decisions


def test_first_success_is_emitted_then_quiet():
    ds = run(Policy(), [(True, 0), (True, 1), (True, 2)])
    assert [d.verdict for d in ds] == [OK, OK, OK]
    assert [d.emit for d in ds] == [True, False, False]


def test_failover_only_after_consecutive_failures():
    ds = run(Policy(failures=3), [(False, 0), (False, 1), (False, 2)])
    assert [d.verdict for d in ds] == [FAILED, FAILED, FAILOVER]
    assert all(d.emit for d in ds)
    assert ds[0].reason == "tcp 198.51.100.200:80 refused (failure 1 of 3 before failover)"
    assert "failing over (3 consecutive failures)" in ds[2].reason
    assert ds[2].track.failures == 3


def test_success_resets_the_count():
    ds = run(Policy(failures=3), [(False, 0), (False, 1), (True, 2), (False, 3), (False, 4)])
    assert [d.verdict for d in ds] == [FAILED, FAILED, OK, FAILED, FAILED]
    assert ds[2].emit and "recovered after 2 failed check(s)" in ds[2].reason
    assert ds[4].track.failures == 2


def test_stop_module_and_report_actions():
    stop = run(Policy(failures=1, action=ACT_STOP_MODULE), [(False, 0)])[0]
    assert stop.verdict == STOP_MODULE
    assert "stopping the module" in stop.reason
    report = run(Policy(failures=1, action=ACT_REPORT), [(False, 0), (False, 1)])
    assert [d.verdict for d in report] == [FAILED, FAILED]
    assert report[1].reason.endswith("(2 consecutive failures)")


def test_restart_until_budget_then_failover():
    policy = Policy(failures=1, action=ACT_RESTART, restarts=2, window_s=60)
    ds = run(policy, [(False, 0), (False, 10), (False, 20)])
    assert [(d.verdict, d.restart) for d in ds] == [
        (FAILED, True),
        (FAILED, True),
        (FAILOVER, False),
    ]
    assert "restart 1 of 2 within 60 s" in ds[0].reason
    assert "already restarted 2 time(s) within 60 s: failing over" in ds[2].reason
    assert ds[1].track.restarts == (0, 10)


def test_restarts_leave_the_window():
    policy = Policy(failures=1, action=ACT_RESTART, restarts=2, window_s=60)
    ds = run(policy, [(False, 0), (False, 10), (True, 20), (False, 65)])
    # The restart at t=0 is older than 60 s at t=65: one restart is left.
    assert ds[-1].restart and ds[-1].verdict == FAILED
    assert ds[-1].track.restarts == (10, 65)
    assert "recovered after a restart" in ds[2].reason


def test_restart_waits_for_consecutive_failures():
    policy = Policy(failures=2, action=ACT_RESTART, restarts=1, window_s=60)
    ds = run(policy, [(False, 0), (False, 1), (False, 2), (False, 3)])
    assert [d.restart for d in ds] == [False, True, False, False]
    assert "before restart" in ds[0].reason
    # After the restart the count starts again, so failover needs two more failures.
    assert [d.verdict for d in ds] == [FAILED, FAILED, FAILED, FAILOVER]


def test_restarts_in_window_is_strict():
    assert restarts_in_window((0.0, 5.0, 9.0), now=10.0, window_s=5.0) == (9.0,)
    assert restarts_in_window((), now=10.0, window_s=5.0) == ()


@pytest.mark.parametrize(
    "kwargs",
    [{"action": "reboot"}, {"failures": 0}, {"restarts": -1}, {"window_s": 0}],
)
def test_bad_policy_is_refused(kwargs):
    with pytest.raises(ValueError, match="expected"):
        Policy(**kwargs)


def test_failover_policy_is_the_default():
    assert Policy().action == ACT_FAILOVER
