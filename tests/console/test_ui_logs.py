"""Logs view: journal entries from watch lines, filtered by node, module, severity, text."""

from __future__ import annotations

import time

import pytest

from app.logs import LogModel
from ui.logs_view import LogsView

pytestmark = pytest.mark.console

T = time.time()


def event(i: int, node: str, module: str | None, severity: str, message: str) -> dict:
    entry = {
        "ts": T + i,
        "node": node,
        "module": module,
        "kind": "checker",
        "severity": severity,
        "message": message,
    }
    return {"type": "event", "ts": T + i, "node": node, "module": module, "entry": entry}


@pytest.fixture
def model() -> LogModel:
    logs = LogModel()
    logs.add_line("lab-n1", event(0, "lab-n1", "web", "info", "tcp check ok"))
    logs.add_line("lab-n1", event(1, "lab-n1", "web", "error", "tcp check failed 3 times"))
    logs.add_line("lab-n2", event(2, "lab-n2", "db", "warning", "resync slow"))
    logs.add_line("lab-n2", event(3, "lab-n2", None, "debug", "heartbeat tick"))
    return logs


@pytest.fixture
def view(qtbot, model):
    v = LogsView(model)
    qtbot.addWidget(v)
    return v


def messages(view: LogsView) -> list[str]:
    return [e.message for e in view.shown()]


def test_shows_entries_at_info_and_above_by_default(view):
    assert messages(view) == ["tcp check ok", "tcp check failed 3 times", "resync slow"]
    assert view.count.text() == "3 of 4 entries"
    assert view.table_model.data(view.table_model.index(1, 3)) == "error"


def test_filters_by_node_module_severity_and_text(view):
    view.node_filter.setCurrentText("lab-n2")
    assert messages(view) == ["resync slow"]
    view.node_filter.setCurrentText("(all)")
    view.module_filter.setCurrentText("web")
    assert messages(view) == ["tcp check ok", "tcp check failed 3 times"]
    view.severity_filter.setCurrentText("error")
    assert messages(view) == ["tcp check failed 3 times"]
    view.module_filter.setCurrentText("(all)")
    view.severity_filter.setCurrentText("debug")
    view.search.setText("FAILED")
    assert messages(view) == ["tcp check failed 3 times"]


def test_new_entries_appear_and_filters_learn_new_names(qtbot, view, model, workers):
    line = event(9, "lab-n3", "shop", "error", "split brain detected")
    task = workers.submit("feed", lambda _t: model.add_line("lab-n3", line))
    assert task.wait(5)
    qtbot.waitUntil(lambda: "split brain detected" in messages(view), timeout=3000)
    nodes = [view.node_filter.itemText(i) for i in range(view.node_filter.count())]
    assert nodes == ["(all)", "lab-n1", "lab-n2", "lab-n3"]
