"""The designer's forms: one group per userconfig section, a field per attribute.

Every field is bound to a field path of ``app.designer_fields`` (``("node",
0, "address", 1)``...) and writes through ``DesignerModel.set_field``; every
validation message is shown in a red label placed next to the field (or the
item, or the section) its key names, with the node's own words. The form is
rebuilt only when the module's shape changes (a node, a directory, a checker
added or removed, the kind switched); otherwise values and messages are
updated in place so typing is never interrupted.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from PySide6.QtWidgets import (
    QComboBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from app.designer import DesignerModel
from node_service.module.model import (
    CHECKER_TYPES,
    CRITERIA,
    FARM,
    KINDS,
    MIRROR,
    PROTOCOLS,
    REPLICATION_MODES,
    Module,
)

COMMON_CHECKER_FIELDS = ("interval", "timeout", "failures")
LABELS = {
    "heartbeat_interval_ms": "heartbeat every (ms)",
    "heartbeat_timeout_ms": "peer lost after (ms)",
    "failback": "fail back",
    "witness": "split-brain witness",
    "interval": "every (s)",
    "timeout": "timeout (s)",
    "failures": "failures before acting",
    "restarts": "restarts allowed",
    "window": "in window (s)",
    "prefix": "prefix length",
    "criterion": "share clients by",
}


def field_name(field: tuple[Any, ...]) -> str:
    return "field-" + "-".join(str(p) for p in field)


def shape(module: Module) -> tuple[Any, ...]:
    """What decides the form's layout; values do not."""
    return (
        module.kind,
        tuple(len(n.addresses) for n in module.nodes),
        len(module.vips),
        len(module.replicated_dirs),
        len(module.farm.rules) if module.farm else -1,
        tuple(c.kind for c in module.checkers),
        len(module.scripts.overrides),
    )


class ModuleForm(QWidget):
    """All sections of one ``DesignerModel`` as forms with inline messages."""

    def __init__(self, model: DesignerModel, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("module-form")
        self.model = model
        self.editors: dict[tuple[Any, ...], QLineEdit | QComboBox] = {}
        self.problem_labels: dict[tuple[Any, ...], QLabel] = {}
        self.last_edited: tuple[Any, ...] | None = None
        self._shape: tuple[Any, ...] | None = None
        self._layout = QVBoxLayout(self)
        self.rebuild()

    # -- building blocks
    def _problem(self, key: tuple[Any, ...]) -> QLabel:
        label = QLabel("")
        label.setObjectName("problem")
        label.setWordWrap(True)
        label.setVisible(False)
        label.setProperty("problem_key", "-".join(str(p) for p in key))
        self.problem_labels[key] = label
        return label

    def _line(self, field: tuple[Any, ...], placeholder: str = "") -> QLineEdit:
        edit = QLineEdit(self.model.text(field))
        edit.setObjectName(field_name(field))
        edit.setPlaceholderText(placeholder)
        edit.textEdited.connect(lambda text, f=field: self._edited(f, text))
        self.editors[field] = edit
        return edit

    def _choice(self, field: tuple[Any, ...], options: tuple[str, ...]) -> QComboBox:
        combo = QComboBox()
        combo.setObjectName(field_name(field))
        combo.addItems(list(options))
        combo.setCurrentText(self.model.text(field))
        combo.textActivated.connect(lambda text, f=field: self._edited(f, text))
        self.editors[field] = combo
        return combo

    def _button(self, text: str, action: Any, tip: str = "") -> QPushButton:
        b = QPushButton(text)
        b.setToolTip(tip or text)
        b.clicked.connect(lambda _checked=False: action())
        return b

    def _edited(self, field: tuple[Any, ...], text: str) -> None:
        self.last_edited = field
        self.model.set_field(field, text)

    def _with_problem(self, editor: QWidget, key: tuple[Any, ...] | None) -> QWidget:
        """The editor with its message label under it, when it has a key of its own."""
        if key is None:
            return editor
        box = QWidget()
        column = QVBoxLayout(box)
        column.setContentsMargins(0, 0, 0, 0)
        column.setSpacing(1)
        column.addWidget(editor)
        column.addWidget(self._problem(key))
        return box

    def _group(self, title: str, key: tuple[Any, ...]) -> tuple[QGroupBox, QVBoxLayout]:
        group = QGroupBox(title)
        group.setObjectName(f"section-{key[0]}")
        layout = QVBoxLayout(group)
        layout.addWidget(self._problem(key))
        self._layout.addWidget(group)
        return group, layout

    # -- sections
    def rebuild(self) -> None:
        while self._layout.count():
            item = self._layout.takeAt(0)
            if item.widget() is not None:
                item.widget().deleteLater()
        self.editors.clear()
        self.problem_labels.clear()
        m = self.model.module
        self._shape = shape(m)
        self._module_section()
        self._nodes_section(m)
        self._vips_section(m)
        if m.kind == MIRROR:
            self._replication_section(m)
        if m.kind == FARM:
            self._farm_section(m)
        self._checkers_section(m)
        self._scripts_section(m)
        self._failover_section()
        self._layout.addStretch(1)
        self.show_problems()

    def _module_section(self) -> None:
        _group, layout = self._group("Module", ("module",))
        form = QFormLayout()
        form.addRow("name", self._line(("module", "name"), "lowercase, e.g. webapp"))
        form.addRow("kind", self._choice(("module", "kind"), KINDS))
        form.addRow("version", self._line(("module", "version")))
        form.addRow("description", self._line(("module", "description")))
        layout.addLayout(form)

    def _nodes_section(self, m: Module) -> None:
        _group, layout = self._group("Nodes and heartbeat networks", ("nodes",))
        for i, node in enumerate(m.nodes):
            item = QGroupBox(f"node {i + 1}")
            item_layout = QVBoxLayout(item)
            item_layout.addWidget(self._problem(("node", i)))
            form = QFormLayout()
            form.addRow("name", self._line(("node", i, "name"), "host name of the node"))
            if m.kind == FARM:
                form.addRow("weight", self._line(("node", i, "weight")))
            for j in range(len(node.addresses)):
                row = QHBoxLayout()
                edit = self._line(("node", i, "address", j), "IP address")
                row.addWidget(self._with_problem(edit, ("node", i, "address", j)), 1)
                row.addWidget(self._button("−", lambda i=i, j=j: self.model.remove(
                    ("node", i, "address", j)), "remove this network"))  # fmt: skip
                what = "LAN (virtual IP network)" if j == 0 else f"heartbeat network {j + 1}"
                form.addRow(what, row)
            item_layout.addLayout(form)
            buttons = QHBoxLayout()
            add_network = self._button("Add network", lambda i=i: self.model.add("address", i))
            remove_node = self._button("Remove node", lambda i=i: self.model.remove(("node", i)))
            buttons.addWidget(add_network)
            buttons.addWidget(remove_node)
            buttons.addStretch(1)
            item_layout.addLayout(buttons)
            layout.addWidget(item)
        layout.addWidget(self._button("Add node", lambda: self.model.add("node")))

    def _vips_section(self, m: Module) -> None:
        _group, layout = self._group("Virtual IP", ("vips",))
        for i in range(len(m.vips)):
            row = QHBoxLayout()
            row.addWidget(QLabel("address"))
            row.addWidget(self._line(("vip", i, "address"), "e.g. 198.51.100.200"), 2)
            row.addWidget(QLabel("/"))
            row.addWidget(self._line(("vip", i, "prefix")), 1)
            row.addWidget(QLabel("interface"))
            row.addWidget(self._line(("vip", i, "interface"), "automatic"), 1)
            row.addWidget(self._button("−", lambda i=i: self.model.remove(("vip", i)), "remove"))
            layout.addLayout(row)
            layout.addWidget(self._problem(("vip", i)))
        layout.addWidget(self._button("Add virtual IP", lambda: self.model.add("vip")))

    def _replication_section(self, m: Module) -> None:
        _group, layout = self._group("Replicated directories", ("replication",))
        form = QFormLayout()
        form.addRow("mode", self._choice(("replication", "mode"), REPLICATION_MODES))
        layout.addLayout(form)
        for i in range(len(m.replicated_dirs)):
            row = QHBoxLayout()
            edit = self._line(("dir", i), "absolute path, e.g. /srv/data")
            row.addWidget(self._with_problem(edit, ("dir", i)), 1)
            row.addWidget(self._button("−", lambda i=i: self.model.remove(("dir", i)), "remove"))
            layout.addLayout(row)
        layout.addWidget(self._button("Add directory", lambda: self.model.add("dir")))

    def _farm_section(self, m: Module) -> None:
        _group, layout = self._group("Farm rules", ("farm",))
        for i in range(len(m.farm.rules) if m.farm else 0):
            row = QHBoxLayout()
            row.addWidget(QLabel("ports"))
            row.addWidget(self._line(("rule", i, "ports"), "80,443"), 2)
            row.addWidget(self._choice(("rule", i, "protocol"), PROTOCOLS))
            row.addWidget(QLabel(LABELS["criterion"]))
            row.addWidget(self._choice(("rule", i, "criterion"), CRITERIA))
            row.addWidget(self._button("−", lambda i=i: self.model.remove(("rule", i)), "remove"))
            layout.addLayout(row)
            layout.addWidget(self._problem(("rule", i)))
        layout.addWidget(self._button("Add rule", lambda: self.model.add("rule")))

    def _checkers_section(self, m: Module) -> None:
        _group, layout = self._group("Checkers", ("checkers",))
        for i, checker in enumerate(m.checkers):
            item = QGroupBox(f"{checker.kind} checker")
            item_layout = QVBoxLayout(item)
            form = QFormLayout()
            names = [f.name for f in fields(checker)]
            ordered = [n for n in names if n not in COMMON_CHECKER_FIELDS]
            ordered += [n for n in COMMON_CHECKER_FIELDS if n in names]
            for name in ordered:
                form.addRow(LABELS.get(name, name), self._line(("checker", i, name)))
            item_layout.addLayout(form)
            item_layout.addWidget(self._problem(("checker", i)))
            remove = self._button("Remove checker", lambda i=i: self.model.remove(("checker", i)))
            item_layout.addWidget(remove)
            layout.addWidget(item)
        row = QHBoxLayout()
        kinds = QComboBox()
        kinds.setObjectName("checker-kind")
        kinds.addItems(list(CHECKER_TYPES))
        row.addWidget(kinds)
        add = self._button("Add checker", lambda: self.model.add(f"checker:{kinds.currentText()}"))
        row.addWidget(add)
        row.addStretch(1)
        layout.addLayout(row)

    def _scripts_section(self, m: Module) -> None:
        _group, layout = self._group("Scripts", ("scripts",))
        form = QFormLayout()
        form.addRow("default timeout (s)", self._line(("scripts", "timeout")))
        layout.addLayout(form)
        for i in range(len(m.scripts.overrides)):
            row = QHBoxLayout()
            row.addWidget(self._choice(("script", i, "name"), m.lifecycle_scripts))
            row.addWidget(QLabel("timeout (s)"))
            row.addWidget(self._line(("script", i, "timeout")), 1)
            row.addWidget(self._button("−", lambda i=i: self.model.remove(("script", i)), "remove"))
            layout.addLayout(row)
            layout.addWidget(self._problem(("script", i)))
        layout.addWidget(self._button("Add script timeout", lambda: self.model.add("script")))

    def _failover_section(self) -> None:
        _group, layout = self._group("Failover options", ("failover",))
        form = QFormLayout()
        form.addRow(LABELS["failback"], self._choice(("failover", "failback"), ("false", "true")))
        form.addRow(LABELS["witness"], self._line(("failover", "witness"), "optional ping target"))
        for name in ("heartbeat_interval_ms", "heartbeat_timeout_ms"):
            form.addRow(LABELS[name], self._line(("failover", name)))
        layout.addLayout(form)

    # -- updating
    def refresh(self, source: str) -> None:
        """Show the model after an edit; ``source`` is the model's "form"/"xml"/"scripts"."""
        if shape(self.model.module) != self._shape:
            self.rebuild()
            return
        for field, editor in self.editors.items():
            if source == "form" and field == self.last_edited:
                continue  # the user is typing there: never rewrite under the cursor
            text = self.model.text(field)
            if isinstance(editor, QLineEdit):
                if editor.text() != text:
                    editor.setText(text)
            elif editor.currentText() != text:
                editor.setCurrentText(text)
        self.show_problems()

    def show_problems(self) -> None:
        problems = self.model.problems
        leftover: list[str] = []
        for key, messages in problems.items():
            if key not in self.problem_labels:
                leftover += messages  # a place with no field of its own: said at the top
        for key, label in self.problem_labels.items():
            messages = list(problems.get(key, ()))
            if key == ("module",):
                messages += leftover
            label.setText("\n".join(f"⚠ {m}" for m in messages))
            label.setVisible(bool(messages))

    def problem_text(self, key: tuple[Any, ...]) -> str:
        label = self.problem_labels.get(key)
        return label.text() if label is not None else ""

    def editor(self, field: tuple[Any, ...]) -> QLineEdit | QComboBox:
        return self.editors[field]
