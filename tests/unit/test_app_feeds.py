"""Live feed parsing: watch lines -> 5-minute series, robust to garbage."""

from __future__ import annotations

import json

import pytest

from app.feeds import LiveFeed, Series, parse_line, resync_eta


def metrics(ts: float, **values: object) -> str:
    return json.dumps({"type": "metrics", "ts": ts, "node": "n1", "module": "web",
                       "state": "PRIM", "metrics": values})  # fmt: skip


def state(ts: float, name: str, **replication: object) -> str:
    return json.dumps({"type": "state", "ts": ts, "node": "n1", "module": "web",
                       "reason": "r", "state": {"module": "web", "state": name, "since": ts,
                                                "replication": replication}})  # fmt: skip


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "not json",
        '{"type": "metrics"',  # cut in the middle
        "[1, 2]",
        '{"ts": 1, "node": "n1"}',
        '{"type": "metrics", "ts": "soon", "node": "n1", "module": "web"}',
        '{"type": "metrics", "ts": NaN, "node": "n1", "module": "web"}',
        '{"type": "state", "ts": 1, "node": "n1"}',
        b"\xff\xfe",
    ],
)
def test_garbage_is_counted_not_raised(raw: str | bytes) -> None:
    feed = LiveFeed()
    assert parse_line(raw) is None
    assert feed.add_line("n1", raw) is False
    assert feed.garbage == 1


def test_unknown_types_and_keys_are_ignored() -> None:
    feed = LiveFeed()
    line = '{"type": "future", "ts": 1, "node": "n1", "extra": {"a": 1}}'
    assert feed.add_line("n1", line) is True
    assert feed.garbage == 0
    assert feed.modules() == ()


def test_metrics_and_states_feed_the_series() -> None:
    feed = LiveFeed()
    seen: list[str] = []
    feed.changed.connect(seen.append)
    feed.add_line("n1", state(100, "PRIM", bytes_per_s=0, lag_bytes=0, resync_remaining_bytes=0))
    feed.add_line("n1", metrics(101, replication_bytes_per_s=2e6, replication_lag_bytes=4096,
                                heartbeat_rtt_seconds={"198.51.100.12": 0.0004,
                                                       "203.0.113.12": 0.0009}))  # fmt: skip
    feed.add_line("n1", metrics(102, bytes_per_s=3e6, lag_bytes=0, weird="x",
                                heartbeat_rtt_seconds={"198.51.100.12": "bad"}))  # fmt: skip
    assert feed.series("n1", "web", "bytes_per_s") == ((100, 101, 102), (0, 2e6, 3e6))
    assert feed.series("n1", "web", "lag_bytes") == ((100, 101, 102), (0, 4096, 0))
    assert feed.rtt("n1") == {
        "198.51.100.12": ((101,), (0.0004,)),
        "203.0.113.12": ((101,), (0.0009,)),
    }
    assert feed.state("n1", "web") == "PRIM"
    assert seen == ["n1", "n1", "n1"]
    assert feed.series("n2", "web", "lag_bytes") == ((), ())
    with pytest.raises(KeyError, match="unknown series"):
        feed.series("n1", "web", "temperature")


def test_window_keeps_five_minutes_and_is_bounded() -> None:
    series = Series(window=300, limit=50)
    for t in range(0, 1000, 10):
        series.add(float(t), float(t))
    ts, _ = series.snapshot()
    assert ts[0] >= 990 - 300 and ts[-1] == 990
    assert len(series) <= 50
    series.add(10.0, 1.0)  # older than the newest: dropped
    assert series.last == (990.0, 990.0)


def test_resync_eta_from_the_recent_rate() -> None:
    feed = LiveFeed()
    for i, remaining in enumerate([1000e6, 900e6, 800e6, 700e6]):
        feed.add_line("n1", metrics(100 + 10 * i, resync_remaining_bytes=remaining))
    assert feed.resync_eta("n1", "web") == pytest.approx(70.0)  # 700 MB at 10 MB/s
    assert resync_eta([(0, 5.0), (10, 0.0)]) == 0.0
    assert resync_eta([(0, 5.0), (10, 6.0)]) is None  # growing: no ETA
    assert resync_eta([]) is None
