"""Failover timeline (intervals, markers, CSV) and the logs model (filters, search)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from app.logs import LogFilter, LogModel
from app.timeline import Interval, Timeline


def state_line(node: str, ts: float, name: str, reason: str, since: float | None = None) -> dict:
    return {"type": "state", "ts": ts, "node": node, "module": "web", "reason": reason,
            "state": {"module": "web", "state": name, "since": since or ts}}  # fmt: skip


def event_line(node: str, ts: float, kind: str, message: str, severity: str = "info",
               module: str | None = "web", **extra: object) -> dict:  # fmt: skip
    entry = {"ts": ts, "node": node, "module": module, "kind": kind, "severity": severity,
             "message": message, **extra}  # fmt: skip
    return {"type": "event", "ts": ts, "node": node, "module": module, "entry": entry}


def failover(tl: Timeline) -> None:
    tl.add_line("n1", state_line("n1", 105, "PRIM", "current state", since=100))
    tl.add_line("n2", state_line("n2", 105, "SECOND", "current state", since=101))
    tl.add_line("n1", event_line("n1", 150, "checker", "tcp 198.51.100.200:80 failed 3 times",
                                 "warning"))  # fmt: skip
    tl.add_line("n1", state_line("n1", 160, "STOP", "checker tcp failed"))
    tl.add_line("n2", event_line("n2", 163, "transition", "SECOND -> ALONE", old="SECOND",
                                 new="ALONE", reason="peer n1 lost"))  # fmt: skip
    tl.add_line("n2", state_line("n2", 163, "ALONE", "peer n1 lost"))  # same change twice


def test_states_become_intervals_per_node() -> None:
    tl = Timeline()
    failover(tl)
    rows = tl.rows("web")
    assert rows["n1"] == (
        Interval("PRIM", 100, 160, "current state"),
        Interval("STOP", 160, None, "checker tcp failed"),
    )
    assert rows["n2"] == (
        Interval("SECOND", 101, 163, "current state"),
        Interval("ALONE", 163, None, "peer n1 lost"),
    )
    assert rows["n1"][1].duration(now=170) == 10
    assert tl.modules() == ("web",)
    assert tl.span() == (100, 163)


def test_events_become_markers_with_their_reason() -> None:
    tl = Timeline()
    failover(tl)
    markers = tl.markers("web")
    assert [(m.ts, m.node, m.kind) for m in markers] == [(150, "n1", "checker"),
                                                        (163, "n2", "transition")]  # fmt: skip
    assert markers[1].message == "SECOND -> ALONE (peer n1 lost)"
    assert markers[0].severity == "warning"


def test_csv_export_lists_bars_and_markers(tmp_path: Path) -> None:
    tl = Timeline()
    failover(tl)
    path = tl.export_csv(tmp_path / "web.csv", "web")
    rows = list(csv.DictReader(path.open()))
    assert [(r["record"], r["node"], r["state"] or r["kind"]) for r in rows] == [
        ("state", "n1", "PRIM"), ("state", "n1", "STOP"),
        ("state", "n2", "SECOND"), ("state", "n2", "ALONE"),
        ("event", "n1", "checker"), ("event", "n2", "transition"),
    ]  # fmt: skip
    assert rows[0]["start"] == "100.000" and rows[0]["end"] == "160.000"
    assert rows[1]["end"] == ""
    assert rows[4]["text"] == "tcp 198.51.100.200:80 failed 3 times"
    assert [p.name for p in tmp_path.iterdir()] == ["web.csv"]


def test_timeline_ignores_garbage_and_old_states() -> None:
    tl = Timeline()
    tl.add_line("n1", "garbage")
    tl.add_line("n1", state_line("n1", 200, "PRIM", "a"))
    assert tl.add_state("n1", "web", "STOP", 150, "older than the bar") is False
    assert tl.rows("web")["n1"] == (Interval("PRIM", 200, None, "a"),)


def sample_logs() -> LogModel:
    logs = LogModel(limit=100)
    logs.add_line("n1", event_line("n1", 3, "checker", "tcp check failed", "warning"))
    logs.add_line("n2", event_line("n2", 1, "info", "started", module=None))
    logs.add_line("n1", json.dumps(event_line("n1", 2, "error", "start_prim exit 1", "error",
                                              module="db")))  # fmt: skip
    logs.add_line("n1", state_line("n1", 4, "PRIM", "not an event"))
    logs.add("n2", {"ts": 5, "kind": "transition", "severity": "bogus", "message": "WAIT -> UP"})
    return logs


def test_logs_filter_by_node_module_severity_and_text() -> None:
    logs = sample_logs()
    assert [e.message for e in logs.filtered(LogFilter())] == [
        "started", "start_prim exit 1", "tcp check failed", "WAIT -> UP",
    ]  # fmt: skip
    assert [e.ts for e in logs.filtered(LogFilter(nodes=frozenset({"n2"})))] == [1, 5]
    assert [e.ts for e in logs.filtered(LogFilter(modules=frozenset({"db"})))] == [2]
    assert [e.ts for e in logs.filtered(LogFilter(min_severity="warning"))] == [2, 3]
    assert [e.ts for e in logs.filtered(LogFilter(text="TCP CHECK"))] == [3]
    assert [e.ts for e in logs.filtered(LogFilter(text="n2 - info"))] == [1]
    assert logs.nodes() == ("n1", "n2") and logs.modules() == ("db", "web")
    assert logs.filtered(LogFilter())[-1].severity == "info"  # unknown severity shown as info


def test_logs_keep_the_newest_entries_and_notify() -> None:
    logs = LogModel(limit=3)
    added = []
    logs.added.connect(added.append)
    for i in range(5):
        logs.add("n1", {"ts": i, "kind": "info", "severity": "info", "message": f"m{i}"})
    assert logs.add("n1", {"kind": "info", "message": "no timestamp"}) is None
    assert [e.message for e in logs.entries()] == ["m2", "m3", "m4"]
    assert len(added) == 5


def test_log_model_keeps_one_of_each_entry_even_after_eviction():
    from app.logs import LogModel

    logs = LogModel(limit=3)
    raw = [{"ts": 1700000000 + i, "module": "web", "message": f"entry {i}"} for i in range(4)]
    for entry in raw[:3]:
        assert logs.add("n1", entry) is not None
    assert logs.add("n1", raw[0]) is None  # a history fetched again after a reconnect
    assert len(logs.entries()) == 3
    assert logs.add("n1", raw[3]) is not None  # evicts entry 0 ...
    assert logs.add("n1", raw[0]) is not None  # ... which may then come back
    assert [e.message for e in logs.entries()] == ["entry 2", "entry 3", "entry 0"]
