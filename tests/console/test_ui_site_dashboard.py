"""Site and dashboard views over a real SiteModel fed with synthetic node statuses."""

from __future__ import annotations

import time

import pytest

from app.nodes import ModuleInfo, NodeStatus
from node_service.api.roles import Identity
from ui.dashboard_view import DashboardView
from ui.site_view import SiteView

pytestmark = pytest.mark.console

ADMIN = Identity(0, "root", frozenset())
OPERATOR = Identity(1001, "oper", frozenset({"rampart-operator"}))
MONITOR = Identity(1002, "watcher", frozenset({"rampart-monitor"}))


def up(name: str, state: str, identity: Identity = ADMIN, since_ago: float = 65.0) -> NodeStatus:
    since = time.time() - since_ago
    return NodeStatus(
        name,
        True,
        "0.1.0",
        modules=(ModuleInfo("web", "3", "mirror", state),),
        states={
            "web": {"module": "web", "kind": "mirror", "node": name, "state": state, "since": since}
        },
        identity=identity,
        checked_at=time.time(),
    )


def down(name: str) -> NodeStatus:
    return NodeStatus(
        name, False, error=f"node {name}: cannot reach 127.0.0.1: refused", checked_at=time.time()
    )


def test_site_view_shows_reachability_version_and_modules(qtbot, site_model):
    view = SiteView(site_model)
    qtbot.addWidget(view)
    assert view.cell_text("lab-n1", "Reachable") == "checking…"
    site_model._publish(up("lab-n1", "PRIM"))
    site_model._publish(down("lab-n2"))
    qtbot.waitUntil(lambda: view.cell_text("lab-n2", "Reachable") == "unreachable", timeout=2000)
    assert view.cell_text("lab-n1", "Reachable") == "reachable"
    assert view.cell_text("lab-n1", "Rampart") == "0.1.0"
    assert view.cell_text("lab-n1", "Modules") == "web 3 (PRIM)"
    assert view.cell_text("lab-n1", "Role") == "admin"
    assert "cannot reach" in view.cell_text("lab-n2", "Status")


def test_site_view_marshals_worker_thread_updates(qtbot, site_model, workers):
    view = SiteView(site_model)
    qtbot.addWidget(view)
    # The model publishes from a worker, as its monitor threads do.
    task = workers.submit("publish", lambda _t: site_model._publish(down("lab-n1")))
    assert task.wait(5)
    qtbot.waitUntil(lambda: view.cell_text("lab-n1", "Reachable") == "unreachable", timeout=2000)


def test_dashboard_matrix_shows_states_colours_and_since(qtbot, site_model):
    view = DashboardView(site_model, confirm=lambda q: pytest.fail(f"unexpected question {q}"))
    qtbot.addWidget(view)
    assert view.table.rowCount() == 0 and view.empty.isVisibleTo(view)
    site_model._publish(up("lab-n1", "PRIM"))
    site_model._publish(up("lab-n2", "SECOND", since_ago=5))
    qtbot.waitUntil(lambda: view.table.rowCount() == 1, timeout=2000)
    assert view.table.verticalHeaderItem(0).text() == "web"
    prim = view.table.item(0, 0)
    assert prim.text().startswith("PRIM for 1m0")
    assert prim.background().color().name() == "#2e7d32"
    assert view.table.item(0, 1).text().startswith("SECOND for ")
    site_model._publish(down("lab-n2"))
    qtbot.waitUntil(lambda: view.table.item(0, 1).text() == "unreachable", timeout=2000)
    assert "cannot reach" in view.table.item(0, 1).toolTip()


def test_monitor_role_greys_out_every_action_with_the_reason(qtbot, site_model):
    view = DashboardView(site_model, confirm=lambda q: pytest.fail(f"unexpected question {q}"))
    qtbot.addWidget(view)
    site_model._publish(up("lab-n1", "PRIM", identity=MONITOR))
    qtbot.waitUntil(lambda: view.table.rowCount() == 1, timeout=2000)
    view.select("web", "lab-n1")
    for verb in ("start", "stop", "restart", "swap", "prim", "second"):
        enabled, reason = view.button_state(verb)
        assert not enabled, verb
        assert "watcher" in reason and "operator rights" in reason, reason
    assert "operator rights" in view.reason.text()
    assert view.act("stop") is None


def test_operator_gets_enabled_buttons_and_swap_asks_first(qtbot, site_model):
    questions: list[str] = []
    answers = iter([False, True])

    def confirm(question: str) -> bool:
        questions.append(question)
        return next(answers)

    view = DashboardView(site_model, confirm=confirm)
    qtbot.addWidget(view)
    site_model._publish(up("lab-n1", "PRIM", identity=OPERATOR))
    qtbot.waitUntil(lambda: view.table.rowCount() == 1, timeout=2000)
    view.select("web", "lab-n1")
    assert view.button_state("swap")[0] and view.button_state("stop")[0]

    assert view.act("swap") is None  # declined: nothing runs
    assert questions[0].startswith("swap module web on lab-n1?")
    assert "not done: cancelled" in view.result.text()

    task = view.act("stop")  # accepted: runs in the model's workers
    assert "stop module web on lab-n1?" in questions[1]
    assert task is not None and task.wait(15)
    # The node is not reachable (closed loopback port): the refusal is shown.
    qtbot.waitUntil(lambda: "refused" in view.result.text(), timeout=5000)
    assert "lab-n1" in view.result.text()


def test_start_needs_no_confirmation(qtbot, site_model):
    view = DashboardView(site_model, confirm=lambda q: pytest.fail(f"unexpected question {q}"))
    qtbot.addWidget(view)
    site_model._publish(up("lab-n1", "STOP"))
    qtbot.waitUntil(lambda: view.table.rowCount() == 1, timeout=2000)
    view.select("web", "lab-n1")
    task = view.act("start")
    assert task is not None and task.wait(15)
    qtbot.waitUntil(lambda: "start web on lab-n1:" in view.result.text(), timeout=5000)
