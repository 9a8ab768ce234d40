"""Module designer view: forms, inline messages, XML both ways, scripts, build & sign."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.designer import DesignerModel
from node_service.module import keys, safe
from node_service.module.model import MIRROR, Module, Node, Replication
from ui.designer_view import DesignerView

pytestmark = pytest.mark.console


def module() -> Module:
    nodes = (
        Node("n1", ("198.51.100.11", "203.0.113.11")),
        Node("n2", ("198.51.100.12", "203.0.113.12")),
    )
    return Module(name="web", kind=MIRROR, nodes=nodes, replication=Replication(("/srv/data",)))


@pytest.fixture
def view(qtbot, workers):
    v = DesignerView(DesignerModel(module()), workers)
    qtbot.addWidget(v)
    qtbot.waitUntil(lambda: v.template_choice.count() > 0, timeout=5000)  # listed in a worker
    return v


def type_into(qtbot, view: DesignerView, field: tuple, text: str) -> None:
    editor = view.form.editor(field)
    editor.selectAll()
    qtbot.keyClicks(editor, text)


def test_form_edit_updates_preview_and_raw_xml(qtbot, view):
    assert 'name="web"' in view.preview.toPlainText()
    type_into(qtbot, view, ("module", "name"), "shop")
    qtbot.waitUntil(lambda: 'name="shop"' in view.preview.toPlainText(), timeout=2000)
    assert 'name="shop"' in view.raw.toPlainText()
    assert view.model.module.name == "shop"


def test_invalid_field_shows_the_nodes_message_next_to_that_field(qtbot, view):
    field = ("node", 1, "address", 0)
    type_into(qtbot, view, field, "not-an-ip")
    key = ("node", 1, "address", 0)
    qtbot.waitUntil(lambda: view.form.problem_text(key) != "", timeout=2000)
    message = view.form.problem_text(key)
    assert "not-an-ip" in message
    assert view.form.problem_labels[key].isVisibleTo(view.form)
    # Only that field complains; its neighbours stay quiet.
    assert view.form.problem_text(("node", 0, "address", 0)) == ""
    assert view.form.problem_text(("node", 0)) == ""
    assert "<address>not-an-ip</address>" in view.preview.toPlainText()
    # The label sits in the same row as the field it is about.
    editor, label = view.form.editor(field), view.form.problem_labels[key]
    assert editor.parentWidget() is label.parentWidget()
    assert "not valid yet" in view.status.text()


def test_conversion_error_of_a_number_field_is_shown_on_its_item(qtbot, view):
    view.model.add("vip")
    qtbot.waitUntil(lambda: ("vip", 0, "prefix") in view.form.editors, timeout=2000)
    type_into(qtbot, view, ("vip", 0, "prefix"), "abc")
    qtbot.waitUntil(
        lambda: "not a whole number" in view.form.problem_text(("vip", 0)), timeout=2000
    )


def test_raw_xml_edit_updates_the_forms(qtbot, view):
    text = view.raw.toPlainText().replace('name="web"', 'name="billing"')
    text = text.replace("/srv/data", "/srv/ledger")
    view.raw.setPlainText(text)
    qtbot.waitUntil(lambda: view.model.module.name == "billing", timeout=3000)  # after the pause
    qtbot.waitUntil(lambda: view.form.editor(("module", "name")).text() == "billing", timeout=2000)
    assert view.form.editor(("dir", 0)).text() == "/srv/ledger"
    assert view.xml_errors.text() == ""


def test_bad_raw_xml_shows_the_parsers_error_and_keeps_the_forms(qtbot, view):
    view.raw.setPlainText('<module name="web" kind="mirror">\n  <nodes>\n</module>\n')
    assert view.apply_raw_xml() is False
    qtbot.waitUntil(lambda: view.xml_errors.text() != "", timeout=2000)
    assert "userconfig.xml:" in view.xml_errors.text()
    assert view.tabs.tabText(1).endswith("⚠")
    assert view.form.editor(("module", "name")).text() == "web"  # last model that parsed
    # Fixing the XML clears the error.
    view.raw.setPlainText(DesignerModel(module()).xml)
    assert view.apply_raw_xml() is True
    qtbot.waitUntil(lambda: view.xml_errors.text() == "", timeout=2000)


def test_adding_and_removing_items_rebuilds_the_form(qtbot, view):
    view.model.add("dir")
    qtbot.waitUntil(lambda: ("dir", 1) in view.form.editors, timeout=2000)
    qtbot.waitUntil(lambda: view.form.problem_text(("dir", 1)) != "", timeout=2000)
    view.model.remove(("node", 0))
    qtbot.waitUntil(lambda: ("node", 1, "name") not in view.form.editors, timeout=2000)
    assert view.form.editor(("node", 0, "name")).text() == "n2"
    assert view.form.problem_text(("nodes",)) != ""  # a mirror needs two nodes


def test_script_editor_highlights_shell_and_saves_into_the_model(qtbot, view):
    names = [view.script_list.item(i).text() for i in range(view.script_list.count())]
    assert names == ["prestart", "start_prim", "stop_prim", "poststop"]
    view.script_list.setCurrentRow(1)
    view.script_editor.setPlainText("#!/bin/sh\n# start the app\nexec echo started\n")
    assert view.model.scripts["start_prim"].endswith("exec echo started\n")
    block = view.script_editor.document().findBlockByNumber(1)
    formats = block.layout().formats()
    assert formats, "the comment line has no highlighting"
    xml_block = view.preview.document().findBlockByNumber(1)
    assert xml_block.layout().formats(), "the XML preview has no highlighting"


def test_template_opens_in_a_worker_and_replaces_the_model(qtbot, view):
    view.open_template("farm")
    qtbot.waitUntil(lambda: view.model.module.kind == "farm", timeout=5000)
    qtbot.waitUntil(lambda: ("rule", 0, "ports") in view.form.editors, timeout=2000)
    assert 'kind="farm"' in view.preview.toPlainText()


def test_build_and_sign_writes_a_verified_safe(qtbot, view, tmp_path: Path):
    key, pub = keys.generate(tmp_path / "keys")
    view.open_template("mirror")
    qtbot.waitUntil(lambda: view.model.module.name == "mirror", timeout=5000)
    assert view.model.valid, view.model.first_problem()
    view.module_dir.setText(str(tmp_path / "mod"))
    view.key_path.setText(str(key))
    view.out_path.setText(str(tmp_path / "mirror.safe"))
    view.build()
    qtbot.waitUntil(lambda: view.build_result.text().startswith("built"), timeout=10000)
    verified = safe.verify(tmp_path / "mirror.safe", [keys.load_public(pub)])
    assert verified.name == "mirror"
    assert view.build_button.isEnabled()


def test_build_refuses_an_invalid_module_with_the_reason(qtbot, view, tmp_path: Path):
    key, _pub = keys.generate(tmp_path / "keys")
    type_into(qtbot, view, ("dir", 0), "relative/path")
    view.module_dir.setText(str(tmp_path / "mod"))
    view.key_path.setText(str(key))
    view.build()
    qtbot.waitUntil(lambda: view.build_result.text().startswith("⚠"), timeout=10000)
    assert "not valid" in view.build_result.text()
    assert not (tmp_path / "mod.safe").exists()


def test_open_safe_verifies_it_and_loads_its_scripts(qtbot, workers, tmp_path: Path):
    key, pub = keys.generate(tmp_path / "keys")
    built = DesignerModel.from_template("mirror")
    built.set_field(("module", "name"), "ledger")
    built.build(tmp_path / "ledger", key, tmp_path / "ledger.safe")
    view = DesignerView(DesignerModel(module()), workers, trust_pub=str(pub))
    qtbot.addWidget(view)
    view.open_safe(str(tmp_path / "ledger.safe"))
    qtbot.waitUntil(lambda: view.model.module.name == "ledger", timeout=10000)
    assert "start_prim" in view.model.scripts
    assert view.form.editor(("module", "name")).text() == "ledger"


def test_open_safe_signed_by_an_untrusted_key_is_refused(qtbot, workers, tmp_path: Path):
    key, _pub = keys.generate(tmp_path / "author")
    _other_key, other_pub = keys.generate(tmp_path / "site")
    built = DesignerModel.from_template("mirror")
    built.build(tmp_path / "m", key, tmp_path / "m.safe")
    view = DesignerView(DesignerModel(module()), workers, trust_pub=str(other_pub))
    qtbot.addWidget(view)
    view.open_safe(str(tmp_path / "m.safe"))
    qtbot.waitUntil(lambda: view.status.text().startswith("⚠"), timeout=10000)
    assert view.model.module.name == "web"  # the open module stays
