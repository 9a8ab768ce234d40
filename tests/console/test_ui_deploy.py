"""Deploy view: per-node, per-step progress; refusals before any node; cancel."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from app.deploy import Deployment, NodeProgress
from app.designer import DesignerModel
from node_service.module import keys
from ui.deploy_view import DeployView

pytestmark = pytest.mark.console


@pytest.fixture
def view(qtbot, site, workers):
    v = DeployView(site, workers)
    qtbot.addWidget(v)
    return v


@pytest.fixture
def package(tmp_path: Path) -> Path:
    """A valid signed mirror module for the site's nodes lab-n1 and lab-n2."""
    key, _pub = keys.generate(tmp_path / "keys")
    model = DesignerModel.from_template("mirror")
    model.set_field(("node", 0, "name"), "lab-n1")
    model.set_field(("node", 1, "name"), "lab-n2")
    out = tmp_path / "web.safe"
    model.build(tmp_path / "web", key, out)
    return out


def test_synthetic_progress_is_drawn_per_node_and_step(qtbot, view, site, workers):
    d = Deployment(site, "/nonexistent.safe", ["lab-n1", "lab-n2"], workers=workers)
    view.show_deployment(d)
    assert view.cell_text("lab-n1", "connect") == "pending"
    p = NodeProgress.new("lab-n1")
    p = p.with_step("connect", state="done", progress=1.0, message="connected")
    p = p.with_step("upload", state="running", progress=0.42, message="upload...")
    d.changed.emit("lab-n1", p)
    qtbot.waitUntil(lambda: view.cell_text("lab-n1", "upload") == "running 42%", timeout=2000)
    assert view.cell_text("lab-n1", "connect") == "done"
    assert view.cell_tip("lab-n1", "connect") == "connected"
    failed = p.with_step("upload", state="failed", message="disk full on lab-n1")
    failed = replace(
        failed,
        steps=tuple(
            replace(s, state="skipped") if s.state == "pending" else s for s in failed.steps
        ),
    )
    d.changed.emit("lab-n1", failed)
    qtbot.waitUntil(lambda: view.cell_text("lab-n1", "upload") == "failed", timeout=2000)
    assert view.cell_text("lab-n1", "result") == "lab-n1: upload failed: disk full on lab-n1"
    assert view.cell_text("lab-n2", "connect") == "pending"  # the other node is untouched


def test_invalid_package_is_refused_before_any_node(qtbot, view, tmp_path: Path):
    bogus = tmp_path / "bogus.safe"
    bogus.write_bytes(b"this is not a zip")
    view.package.setText(str(bogus))
    assert view.deploy() is not None
    qtbot.waitUntil(lambda: view.status.text().startswith("⚠"), timeout=5000)
    assert "bogus.safe" in view.status.text()
    assert view.deploy_button.isEnabled() and not view.cancel_button.isEnabled()
    assert view.cell_text("lab-n1", "connect") == "pending"


def test_deploy_options_reach_the_deployment(qtbot, site, workers, package):
    made: list[Deployment] = []

    def factory(*args, **kwargs) -> Deployment:
        made.append(Deployment(*args, **kwargs))
        return made[-1]

    view = DeployView(site, workers, factory=factory)
    qtbot.addWidget(view)
    view.package.setText(str(package))
    view.start_after.setChecked(False)
    view.restart_running.setChecked(True)
    view.deploy()
    qtbot.waitUntil(view.deploy_button.isEnabled, timeout=15000)
    assert made[0].start is False and made[0].restart_running is True
    assert view.cell_text("lab-n1", "start") == "skipped"


def test_no_package_chosen_says_so(view):
    assert view.deploy() is None
    assert "choose a .safe" in view.status.text()


def test_unreachable_nodes_fail_at_connect_with_the_message(qtbot, view, package):
    view.package.setText(str(package))
    view.node_boxes["lab-n2"].setChecked(False)
    d = view.deploy()
    assert d is not None and view.chosen_nodes() == ["lab-n1"]
    assert not view.deploy_button.isEnabled() and view.cancel_button.isEnabled()
    qtbot.waitUntil(lambda: view.status.text().startswith("finished"), timeout=15000)
    assert view.cell_text("lab-n1", "connect") == "failed"
    assert "cannot reach 127.0.0.1" in view.cell_tip("lab-n1", "connect")
    assert view.cell_text("lab-n1", "upload") == "skipped"
    assert "0 deployed, 1 failed" in view.status.text()
    assert view.deploy_button.isEnabled()


class RecordingDeployment(Deployment):
    cancels = 0

    def cancel(self) -> None:
        RecordingDeployment.cancels += 1
        super().cancel()


def test_cancel_stops_the_deployment_between_steps(qtbot, site, workers, package):
    view = DeployView(site, workers, factory=RecordingDeployment)
    qtbot.addWidget(view)
    view.package.setText(str(package))
    d = view.deploy()
    view.cancel()
    assert RecordingDeployment.cancels == 1
    assert "cancelling" in view.status.text()
    qtbot.waitUntil(view.deploy_button.isEnabled, timeout=15000)
    assert d is not None
    for node in ("lab-n1", "lab-n2"):
        # Cancelled before the nodes were touched, or stopped after a failed connect:
        # either way nothing was uploaded or installed.
        assert all(s.state != "done" for s in d.progress(node).steps), d.progress(node)
