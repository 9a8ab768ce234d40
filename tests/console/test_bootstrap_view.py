"""The "Add node" dialog (offscreen Qt) driving the real bootstrap service.

Nodes here are on a loopback port nobody listens on, so every bootstrap
fails at connect, at once, without leaving the machine; what is checked is
what the dialog shows and what it writes to the site file. The successful
run on a real bare host is test_bootstrap.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from app.bootstrap import STEPS
from app.deploy import FAILED, SKIPPED
from app.site import load
from node_service.cluster import pki
from node_service.module import keys
from tests.console.conftest import free_port
from tests.unit.test_bootstrap_plan import fake_deb

pytestmark = pytest.mark.console


def write_site(tmp_path: Path, secrets: bool = True) -> Path:
    if secrets:
        pki.create_site(tmp_path / "site")
    _, pub = keys.generate(tmp_path / "keys")
    doc = {
        "site": "uisite",
        "nodes": [{"name": "old1", "addresses": ["127.0.0.1"],
                   "ssh": {"host": "127.0.0.1", "port": free_port(), "user": "root",
                           "key": str(tmp_path / "nokey")}}],
        "known_hosts": str(tmp_path / "known_hosts"),
        "trust_pub": str(pub),
    }  # fmt: skip
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def dialog_for(qtbot, tmp_path, workers, node=None, secrets=True):
    from ui.bootstrap_view import BootstrapDialog

    site = load(write_site(tmp_path, secrets))
    changed = []
    dialog = BootstrapDialog(site, workers, node=node, ask=lambda *_: False,
                             on_site_changed=changed.append)  # fmt: skip
    qtbot.addWidget(dialog)
    dialog.package.setText(str(fake_deb(tmp_path / "rampart_0.1.0-1_amd64.deb")))
    return dialog, changed


def test_bootstrapping_a_site_node_shows_the_failing_step(qtbot, tmp_path, workers):
    dialog, changed = dialog_for(qtbot, tmp_path, workers, node="old1")
    assert not dialog.name.isEnabled() and dialog.address.text() == "127.0.0.1"
    dialog.start_button.click()
    qtbot.waitUntil(lambda: dialog.row_text("connect")[0] == FAILED, timeout=20000)
    assert "cannot reach 127.0.0.1" in dialog.row_text("connect")[1]
    for step in STEPS[1:]:
        assert dialog.row_text(step) == (SKIPPED, "not run: connect failed")
    qtbot.waitUntil(lambda: dialog.start_button.isEnabled(), timeout=5000)
    assert dialog.note.text().startswith("old1: connect over SSH failed")
    assert changed == []  # the site was not touched


def test_add_node_saves_the_node_then_bootstraps_it(qtbot, tmp_path, workers):
    dialog, changed = dialog_for(qtbot, tmp_path, workers)
    dialog.name.setText("new1")
    dialog.address.setText("127.0.0.1")
    dialog.port.setValue(free_port())
    dialog.start_button.click()
    qtbot.waitUntil(lambda: dialog.row_text("connect")[0] == FAILED, timeout=20000)
    saved = load(tmp_path / "site.yaml")
    assert saved.node_names == ("old1", "new1")
    assert [s.node_names for s in changed] == [("old1", "new1")]
    assert not dialog.name.isEnabled()  # now a node of the site: Start again retries it


def test_bad_input_and_a_site_without_ca_are_refused_in_the_dialog(qtbot, tmp_path, workers):
    dialog, changed = dialog_for(qtbot, tmp_path, workers, secrets=False)
    before = (tmp_path / "site.yaml").read_text()
    dialog.name.setText("old1")
    dialog.address.setText("127.0.0.1")
    dialog.start_button.click()
    assert dialog.note.text() == "⚠ site uisite already has a node named old1; choose another name"
    dialog.name.setText("new2")
    dialog.start_button.click()
    qtbot.waitUntil(lambda: dialog.start_button.isEnabled(), timeout=10000)
    assert "no site CA at" in dialog.note.text()
    assert dialog.note.text().endswith("nothing was sent to node new2")
    assert dialog.row_text("connect") == ("", "")  # nothing started
    assert (tmp_path / "site.yaml").read_text() == before and changed == []
