"""Module designer window: forms, live userconfig.xml, raw XML, scripts, build & sign.

``DesignerView`` shows an ``app.designer.DesignerModel``. The form tab has the
section forms beside a read-only, highlighted preview of the XML the model
emits; the raw XML tab is an editor whose text is handed to the model (after
a short pause in typing) and either updates the forms or lists the parser's
problems with their lines. Opening a template or a module directory and
building & signing run in workers; the view swaps in the new model when the
work reports back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PySide6.QtCore import QTimer
from PySide6.QtGui import QFont, QFontDatabase
from PySide6.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QInputDialog,
    QLabel,
    QLineEdit,
    QListWidget,
    QPlainTextEdit,
    QPushButton,
    QScrollArea,
    QSplitter,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from app.credentials import Credentials
from app.designer import DesignerModel, PassphraseNeeded
from app.workers import CancelToken, Workers
from node_service.module import templates
from node_service.module.model import SCRIPT_NAMES
from ui.bridge import Relay, Runner, relay
from ui.designer_forms import ModuleForm
from ui.highlight import shell_highlighter, xml_highlighter

RAW_XML_PAUSE_MS = 400


def load_safe(_token: CancelToken, path: str, trust_pub: str | None) -> DesignerModel:
    """A designer model from a .safe (worker): verified and with its scripts when the
    site has a trusted key, else its userconfig.xml only (checked, not verified)."""
    return DesignerModel.from_safe(path, trust_pub)


def mono() -> QFont:
    return QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont)


def code_editor(read_only: bool = False) -> QPlainTextEdit:
    editor = QPlainTextEdit()
    editor.setFont(mono())
    editor.setReadOnly(read_only)
    editor.setLineWrapMode(QPlainTextEdit.LineWrapMode.NoWrap)
    return editor


class DesignerView(QWidget):
    """The module designer (a view of ``DesignerModel``)."""

    def __init__(
        self, model: DesignerModel, workers: Workers, creds: Credentials | None = None,
        signing_key: str | None = None, trust_pub: str | None = None,
        parent: QWidget | None = None,
    ) -> None:  # fmt: skip
        super().__init__(parent)
        self.setObjectName("designer-view")
        self.workers = workers
        self.creds = creds
        self.trust_pub = trust_pub
        self.runner = Runner(self, workers)
        self.model = model
        self._relay: Relay | None = None

        # -- top bar: templates and opening
        self.template_choice = QComboBox()
        self.template_choice.setMinimumContentsLength(12)
        self.template_button = QPushButton("New from template")
        self.template_button.clicked.connect(
            lambda: self.open_template(self.template_choice.currentText())
        )
        self.open_button = QPushButton("Open module directory…")
        self.open_button.clicked.connect(self._ask_open_dir)
        self.open_safe_button = QPushButton("Open .safe…")
        self.open_safe_button.clicked.connect(self._ask_open_safe)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        top = QHBoxLayout()
        top.addWidget(QLabel("Template"))
        top.addWidget(self.template_choice)
        top.addWidget(self.template_button)
        top.addWidget(self.open_button)
        top.addWidget(self.open_safe_button)
        top.addStretch(1)

        # -- form tab: forms | live preview
        self.form_scroll = QScrollArea()
        self.form_scroll.setWidgetResizable(True)
        self.preview = code_editor(read_only=True)
        self.preview.setObjectName("xml-preview")
        self.preview_highlighter = xml_highlighter(self.preview.document())
        split = QSplitter()
        split.addWidget(self.form_scroll)
        preview_box = QWidget()
        preview_layout = QVBoxLayout(preview_box)
        preview_layout.setContentsMargins(0, 0, 0, 0)
        preview_layout.addWidget(QLabel("userconfig.xml (live)"))
        preview_layout.addWidget(self.preview)
        split.addWidget(preview_box)
        split.setSizes([560, 440])

        # -- raw XML tab
        self.raw = code_editor()
        self.raw.setObjectName("raw-xml")
        self.raw_highlighter = xml_highlighter(self.raw.document())
        self.xml_errors = QLabel("")
        self.xml_errors.setObjectName("problem")
        self.xml_errors.setWordWrap(True)
        self.raw_timer = QTimer(self)
        self.raw_timer.setObjectName("designer-raw-xml")
        self.raw_timer.setSingleShot(True)
        self.raw_timer.setInterval(RAW_XML_PAUSE_MS)
        self.raw_timer.timeout.connect(self.apply_raw_xml)
        self.raw.textChanged.connect(self._raw_typed)
        raw_tab = QWidget()
        raw_layout = QVBoxLayout(raw_tab)
        raw_layout.addWidget(QLabel("Edit userconfig.xml here; the forms follow when it parses."))
        raw_layout.addWidget(self.raw, 1)
        raw_layout.addWidget(self.xml_errors)

        # -- scripts tab
        self.script_list = QListWidget()
        self.script_list.setMaximumWidth(180)
        self.script_list.currentTextChanged.connect(self._show_script)
        self.script_editor = code_editor()
        self.script_editor.setObjectName("script-editor")
        self.script_highlighter = shell_highlighter(self.script_editor.document())
        self.script_editor.textChanged.connect(self._script_typed)
        scripts_tab = QWidget()
        scripts_layout = QHBoxLayout(scripts_tab)
        scripts_layout.addWidget(self.script_list)
        scripts_layout.addWidget(self.script_editor, 1)
        self._script_shown: str | None = None

        # -- build & sign tab
        self.module_dir = QLineEdit()
        self.module_dir.setPlaceholderText("directory to save the module in")
        self.key_path = QLineEdit(signing_key or "")
        self.key_path.setPlaceholderText("signing.key (Ed25519, PEM)")
        self.out_path = QLineEdit()
        self.out_path.setPlaceholderText("output .safe file")
        self.build_button = QPushButton("Build && Sign")
        self.build_button.clicked.connect(self.build)
        self.build_result = QLabel("")
        self.build_result.setWordWrap(True)
        build_tab = QWidget()
        build_form = QFormLayout(build_tab)
        build_form.addRow("module directory", self.module_dir)
        build_form.addRow("signing key", self.key_path)
        build_form.addRow(".safe file", self.out_path)
        build_form.addRow(self.build_button)
        build_form.addRow(self.build_result)

        self.tabs = QTabWidget()
        self.tabs.addTab(split, "Forms")
        self.tabs.addTab(raw_tab, "Raw XML")
        self.tabs.addTab(scripts_tab, "Scripts")
        self.tabs.addTab(build_tab, "Build && Sign")
        layout = QVBoxLayout(self)
        layout.addLayout(top)
        layout.addWidget(self.tabs, 1)
        layout.addWidget(self.status)

        self.form: ModuleForm | None = None
        self.set_model(model)
        self.runner.run("designer-templates", lambda _t: templates.available(),
                        on_done=self._templates_listed)  # fmt: skip

    # -- model
    def set_model(self, model: DesignerModel) -> None:
        if self._relay is not None:
            self._relay.detach()
        self.model = model
        self.form = ModuleForm(model)
        self.form_scroll.setWidget(self.form)
        self._relay = relay(self, model.changed, self.model_changed)
        self._set_raw(model.xml)
        self.model_changed("xml")
        self._list_scripts()

    def model_changed(self, source: str) -> None:
        m = self.model
        if source != "scripts" and self.form is not None:
            self.form.refresh(source)
        if self.preview.toPlainText() != m.xml:
            self.preview.setPlainText(m.xml)
        if source == "form":
            self._set_raw(m.xml)
        problems = m.xml_problems
        self.xml_errors.setText("\n".join(f"⚠ {p}" for p in problems))
        self.xml_errors.setVisible(bool(problems))
        self.tabs.setTabText(1, "Raw XML ⚠" if problems else "Raw XML")
        self._list_scripts()
        self.status.setText(
            f"module {m.module.name} ({m.module.kind}): "
            + ("valid" if m.valid else f"not valid yet: {m.first_problem()}")
        )

    # -- raw XML
    def _set_raw(self, text: str) -> None:
        if self.raw.toPlainText() != text:
            self.raw.blockSignals(True)
            self.raw.setPlainText(text)
            self.raw.blockSignals(False)

    def _raw_typed(self) -> None:
        self.raw_timer.start()  # parse once the typing pauses

    def apply_raw_xml(self) -> bool:
        self.raw_timer.stop()
        return self.model.set_xml(self.raw.toPlainText())

    # -- scripts
    def _wanted_scripts(self) -> list[str]:
        m = self.model.module
        names = list(m.lifecycle_scripts) + list(m.checker_scripts)
        names += [n for n in self.model.scripts if n not in names and n in SCRIPT_NAMES]
        return names

    def _list_scripts(self) -> None:
        names = self._wanted_scripts()
        have = [self.script_list.item(i).text() for i in range(self.script_list.count())]
        if have != names:
            current = self._script_shown
            self.script_list.blockSignals(True)
            self.script_list.clear()
            self.script_list.addItems(names)
            self.script_list.blockSignals(False)
            if current in names:
                self.script_list.setCurrentRow(names.index(current))
            elif names:
                self.script_list.setCurrentRow(0)

    def _show_script(self, name: str) -> None:
        self._script_shown = name or None
        self.script_editor.blockSignals(True)
        self.script_editor.setPlainText(self.model.scripts.get(name, "#!/bin/sh\n"))
        self.script_editor.blockSignals(False)

    def _script_typed(self) -> None:
        if self._script_shown:
            self.model.set_script(self._script_shown, self.script_editor.toPlainText())

    # -- opening (workers)
    def _templates_listed(self, names: list[str]) -> None:
        self.template_choice.clear()
        self.template_choice.addItems(names)

    def open_template(self, name: str) -> None:
        if not name:
            return
        self.status.setText(f"opening template {name}…")
        self.runner.run(f"template-{name}", lambda _t: DesignerModel.from_template(name),
                        on_done=self.set_model, on_error=self._failed)  # fmt: skip

    def open_dir(self, path: str) -> None:
        self.status.setText(f"opening {path}…")
        self.runner.run("open-module", lambda _t: DesignerModel.from_dir(path),
                        on_done=self._opened(path), on_error=self._failed)  # fmt: skip

    def _opened(self, path: str) -> Any:
        def done(model: DesignerModel) -> None:
            self.module_dir.setText(path)
            self.set_model(model)

        return done

    def _ask_open_dir(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Open module directory")
        if path:
            self.open_dir(path)

    def open_safe(self, path: str) -> None:
        how = "verifying" if self.trust_pub else "reading (no trusted key in the site)"
        self.status.setText(f"{how} {path}…")
        self.runner.run("open-safe", load_safe, path, self.trust_pub,
                        on_done=self.set_model, on_error=self._failed)  # fmt: skip

    def _ask_open_safe(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open a signed module", "", "*.safe")
        if path:
            self.open_safe(path)

    def _failed(self, error: BaseException) -> None:
        self.status.setText(f"⚠ {error}")

    # -- build & sign (worker)
    def build(self) -> None:
        module_dir, key = self.module_dir.text().strip(), self.key_path.text().strip()
        out = self.out_path.text().strip() or (
            str(Path(module_dir).with_suffix(".safe")) if module_dir else ""
        )
        missing = [n for n, v in (("module directory", module_dir), ("signing key", key)) if not v]
        if missing:
            self.build_result.setText(f"⚠ choose a {' and a '.join(missing)} first")
            return
        self.build_button.setEnabled(False)
        self.build_result.setText(f"building {out}…")

        def work(_token: CancelToken) -> Any:
            return self.model.build(module_dir, key, out, self.creds)

        self.runner.run("build-module", work, on_done=self._built, on_error=self._build_failed)

    def _built(self, result: Any) -> None:
        self.build_button.setEnabled(True)
        warnings = "".join(f"\n⚠ {w}" for w in getattr(result, "warnings", ()))
        self.build_result.setText(
            f"built {result.path}: {result.name} {result.version}, signed by {result.signer}"
            + warnings
        )

    def _build_failed(self, error: BaseException) -> None:
        self.build_button.setEnabled(True)
        if isinstance(error, PassphraseNeeded) and self.creds is not None:
            secret, ok = QInputDialog.getText(
                self, "Signing key passphrase", str(error), QLineEdit.EchoMode.Password
            )
            if ok and secret:
                creds = self.creds
                self.runner.run(
                    "store-passphrase",
                    lambda _t: creds.set_key_passphrase(self.key_path.text().strip(), secret),
                    on_done=lambda _r: self.build(),
                    on_error=self._build_failed,
                )
                return
        self.build_result.setText(f"⚠ {error}")
