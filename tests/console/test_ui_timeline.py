"""Failover timeline view: state bars per node, event markers, zoom/pan, exports."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import pytest
from PySide6.QtGui import QImage

from app.timeline import Timeline
from tests.console.conftest import distinct_colours
from ui.timeline_view import TimelineView

pytestmark = pytest.mark.console

T = time.time()


def state(ts: float, node: str, value: str, reason: str, module: str = "web") -> dict:
    return {
        "type": "state",
        "ts": ts,
        "node": node,
        "module": module,
        "state": {"module": module, "node": node, "state": value},
        "reason": reason,
    }


def event(ts: float, node: str, kind: str, message: str, severity: str = "warning") -> dict:
    entry = {
        "ts": ts,
        "node": node,
        "module": "web",
        "kind": kind,
        "severity": severity,
        "message": message,
    }
    return {"type": "event", "ts": ts, "node": node, "module": "web", "entry": entry}


@pytest.fixture
def timeline() -> Timeline:
    tl = Timeline()
    tl.add_line("lab-n1", state(T - 120, "lab-n1", "PRIM", "started as primary"))
    tl.add_line("lab-n2", state(T - 118, "lab-n2", "SECOND", "peer is primary"))
    tl.add_line(
        "lab-n1", event(T - 40, "lab-n1", "checker", "tcp 198.51.100.200:8080 failed 3 times")
    )
    tl.add_line("lab-n2", state(T - 30, "lab-n2", "ALONE", "peer lost: no heartbeat for 3s"))
    return tl


@pytest.fixture
def view(qtbot, timeline, workers):
    v = TimelineView(timeline, workers)
    v.now = lambda: T
    v.resize(900, 300)
    qtbot.addWidget(v)
    v.redraw()
    return v


def test_rows_bars_and_markers_follow_the_model(qtbot, view, timeline):
    assert view.module == "web"
    assert view.nodes == ("lab-n1", "lab-n2")
    assert len(view.bars.opts["x0"]) == 3  # PRIM on n1; SECOND then ALONE on n2
    assert len(view.points.data) == 1
    ticks = view.plot.getAxis("left")._tickLevels[0]
    assert [name for _pos, name in ticks] == ["lab-n1", "lab-n2"]
    timeline.add_line("lab-n1", state(T - 5, "lab-n1", "STOP", "crash detected"))
    qtbot.waitUntil(lambda: len(view.bars.opts["x0"]) == 4, timeout=3000)


def test_hover_describes_bars_with_their_reason_and_markers(view):
    assert "ALONE" in view.describe(T - 10, 1) and "peer lost" in view.describe(T - 10, 1)
    assert "SECOND" in view.describe(T - 60, 1.1)
    marker = view.describe(T - 40, 0)
    assert "checker" in marker and "failed 3 times" in marker
    assert view.describe(T - 60, 5) == ""


def test_zoom_and_pan_stop_following_and_fit_restores(view):
    low, high = view.x_range()
    assert high >= T and low <= T - 120
    view.zoom(0.25)
    zlow, zhigh = view.x_range()
    assert (zhigh - zlow) == pytest.approx((high - low) * 0.25, rel=0.05)
    assert view.follow is False
    view.redraw()  # new data does not yank the user's zoom away
    assert view.x_range() == pytest.approx((zlow, zhigh))
    view.plot.vb.translateBy(x=-30)
    assert view.x_range()[0] == pytest.approx(zlow - 30, abs=1)
    view.fit()
    assert view.follow and view.x_range() == pytest.approx((low, high), abs=1)


def test_module_choice_switches_rows(qtbot, view, timeline):
    timeline.add_line("lab-n3", state(T - 10, "lab-n3", "UP", "farm node up", module="shop"))
    qtbot.waitUntil(lambda: view.module_choice.count() == 2, timeout=3000)
    view.module_choice.setCurrentText("shop")
    assert view.nodes == ("lab-n3",)


def test_export_csv_and_png_are_written_in_workers(view, tmp_path: Path):
    csv_task = view.export_csv(str(tmp_path / "timeline.csv"))
    png_task = view.export_png(str(tmp_path / "timeline.png"))
    assert csv_task.result(10) == tmp_path / "timeline.csv"
    assert png_task.result(10) == tmp_path / "timeline.png"
    rows = list(csv.reader((tmp_path / "timeline.csv").open()))
    assert rows[0][0] == "record" and len(rows) == 5  # header, 3 bars, 1 event
    assert any("peer lost" in r[-1] for r in rows)
    image = QImage(str(tmp_path / "timeline.png"))
    assert not image.isNull() and distinct_colours(image) > 3


def test_export_to_an_unwritable_place_fails_with_a_clear_error(view, tmp_path: Path):
    task = view.export_png(str(tmp_path / "missing-dir" / "t.png"))
    task.wait(10)
    assert "cannot write" in str(task.error)
