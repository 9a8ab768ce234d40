"""Site window: every node of the site, whether it answers, its rampart and modules.

``SiteView`` shows a ``app.nodes.SiteModel``. It redraws one row whenever the
model publishes a ``NodeStatus`` (from a monitor thread, marshalled to the GUI
thread by a Relay) and never talks to a node itself: "Refresh" asks the model,
which does the SSH work in its workers.

"Connect…" is how access problems get solved: it opens one session in a
worker and, on an unknown host key, shows the fingerprint and asks before
recording it; a changed host key is refused with the warning, never offered
"connect anyway"; a missing password is asked for and kept in the keyring.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from PySide6.QtGui import QColor
from PySide6.QtWidgets import (
    QHBoxLayout,
    QHeaderView,
    QInputDialog,
    QLabel,
    QLineEdit,
    QMessageBox,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from app.dashboard import STATE_COLOURS, UNKNOWN, UNREACHABLE
from app.nodes import NodeStatus, SiteModel
from app.ssh import CredentialsNeeded, HostKeyChanged, Session, UnknownHostKey, trust_host_key
from app.workers import CancelToken
from ui.bridge import Runner, relay

Ask = Callable[[str, str], bool]  # (title, question) -> yes?
AskSecret = Callable[[str, str], str | None]  # (title, prompt) -> secret or None

COLUMNS = ("Node", "Addresses", "SSH", "Reachable", "Rampart", "Role", "Modules", "Status")
REACHABLE_COLOUR = "#2e7d32"


def reachability(status: NodeStatus) -> tuple[str, str]:
    """(text, colour) of the reachability cell."""
    if status.reachable is None:
        return "checking…", STATE_COLOURS[UNKNOWN]
    if status.reachable:
        return "reachable", REACHABLE_COLOUR
    return "unreachable", STATE_COLOURS[UNREACHABLE]


def module_text(status: NodeStatus) -> str:
    if not status.modules:
        return "—" if status.reachable else ""
    return ", ".join(f"{m.name} {m.version} ({m.state})" for m in status.modules)


def age_text(checked_at: float, now: float) -> str:
    if not checked_at:
        return ""
    seconds = max(0, int(now - checked_at))
    return f"checked {seconds}s ago" if seconds < 120 else f"checked {seconds // 60}m ago"


class SiteView(QWidget):
    """The nodes of one site (a view of ``SiteModel``)."""

    def __init__(
        self, model: SiteModel, parent: QWidget | None = None, ask: Ask | None = None,
        ask_secret: AskSecret | None = None,
    ) -> None:  # fmt: skip
        super().__init__(parent)
        self.setObjectName("site-view")
        self.model = model
        self.runner = Runner(self, model.workers)
        # Injected so tests answer without modal dialogs.
        self.ask: Ask = ask or self._ask
        self.ask_secret: AskSecret = ask_secret or self._ask_secret
        site = model.site
        self.title = QLabel(f"<b>Site {site.name}</b> — {len(site.nodes)} nodes")
        self.refresh_button = QPushButton("Refresh all")
        self.refresh_button.setToolTip("Ask every node again (in the background)")
        self.refresh_button.clicked.connect(self.refresh_all)
        top = QHBoxLayout()
        top.addWidget(self.title)
        top.addStretch(1)
        self.connect_button = QPushButton("Connect…")
        self.connect_button.setToolTip("Connect to the selected node: host key, password")
        self.connect_button.clicked.connect(self._connect_selected)
        top.addWidget(self.connect_button)
        self.add_button = QPushButton("Add node…")
        self.add_button.setToolTip("Install Rampart on a new server over SSH, join it to the site")
        self.add_button.clicked.connect(lambda: self.open_bootstrap(None))
        self.bootstrap_button = QPushButton("Bootstrap…")
        self.bootstrap_button.setToolTip(
            "Reinstall Rampart and the site files on the selected node"
        )
        self.bootstrap_button.clicked.connect(self._bootstrap_selected)
        top.addWidget(self.add_button)
        top.addWidget(self.bootstrap_button)
        top.addWidget(self.refresh_button)
        self.note = QLabel("")
        self.note.setWordWrap(True)

        self.table = QTableWidget(len(site.nodes), len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QTableWidget.SelectionBehavior.SelectRows)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setStretchLastSection(True)
        self._rows = {node.name: i for i, node in enumerate(site.nodes)}

        layout = QVBoxLayout(self)
        layout.addLayout(top)
        layout.addWidget(self.table)
        layout.addWidget(self.note)

        relay(self, model.status_changed, self.show_status)
        for name, status in model.statuses().items():
            self.show_status(name, status)

    def _set(self, row: int, column: int, text: str, tip: str = "") -> QTableWidgetItem:
        item = QTableWidgetItem(text)
        item.setToolTip(tip or text)
        self.table.setItem(row, column, item)
        return item

    def show_status(self, name: str, status: NodeStatus) -> None:
        row = self._rows.get(name)
        if row is None:
            return
        node = self.model.site.node(name)
        ssh = node.ssh
        self._set(row, 0, name)
        self._set(row, 1, ", ".join(node.addresses))
        self._set(row, 2, f"{ssh.user}@{ssh.host}:{ssh.port}")
        text, colour = reachability(status)
        item = self._set(row, 3, text, status.error or text)
        item.setForeground(QColor(colour))
        font = item.font()
        font.setBold(True)
        item.setFont(font)
        self._set(row, 4, status.version or "")
        self._set(row, 5, status.role or "")
        self._set(row, 6, module_text(status))
        detail = status.summary
        age = age_text(status.checked_at, time.time())
        self._set(row, 7, f"{detail} ({age})" if age else detail, status.error or detail)

    def cell_text(self, name: str, column: str) -> str:
        """What the table shows for one node (tests and screenshots read this)."""
        item = self.table.item(self._rows[name], COLUMNS.index(column))
        return item.text() if item is not None else ""

    def refresh_all(self) -> None:
        for name in self._rows:
            self.model.refresh(name)

    # -- bootstrap ("Add node"): the dialog does the work, in the model's workers
    def open_bootstrap(self, node: str | None) -> QWidget:
        from ui.bootstrap_view import BootstrapDialog

        def added(site: object) -> None:
            self.note.setText("node added to the site file; reopen the site to monitor it")

        dialog = BootstrapDialog(self.model.site, self.model.workers, self.model.creds, node,
                                 self, ask=self.ask, on_site_changed=added)  # fmt: skip
        dialog.show()
        return dialog

    def _bootstrap_selected(self) -> None:
        row = self.table.currentRow()
        names = list(self._rows)
        if 0 <= row < len(names):
            self.open_bootstrap(names[row])
        else:
            self.note.setText("select a node first")

    # -- access: host keys and passwords
    def _connect_selected(self) -> None:
        row = self.table.currentRow()
        names = list(self._rows)
        if 0 <= row < len(names):
            self.connect_node(names[row])
        else:
            self.note.setText("select a node first")

    def connect_node(self, name: str) -> None:
        site, creds = self.model.site, self.model.creds

        def probe(_token: CancelToken) -> str:
            with Session(site, site.node(name), creds).connect() as session:
                return session.where

        self.note.setText(f"connecting to {name}…")
        self.runner.run(
            f"connect-{name}", probe,
            on_done=lambda where: self._connected(name, where),
            on_error=lambda error: self._access_failed(name, error),
        )  # fmt: skip

    def _connected(self, name: str, where: str) -> None:
        self.note.setText(f"{name}: logged in as {where}")
        self.model.refresh(name)

    def _access_failed(self, name: str, error: BaseException) -> None:
        site, creds = self.model.site, self.model.creds
        again = lambda _result: self.connect_node(name)  # noqa: E731
        failed = lambda e: self.note.setText(f"⚠ {e}")  # noqa: E731
        if isinstance(error, UnknownHostKey):
            question = (f"Node {name} ({error.host}) presents an unknown {error.key_type} host key"
                        f"\n\n{error.fingerprint}\n\nCompare it with the node's "
                        "(ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub). Trust it?")  # fmt: skip
            if self.ask("Unknown host key", question):
                self.runner.run(f"trust-{name}", lambda _t: trust_host_key(site, error),
                                on_done=again, on_error=failed)  # fmt: skip
                self.note.setText(f"{name}: trusting {error.fingerprint}…")
            else:
                self.note.setText(f"{name}: host key not trusted; not connected")
        elif isinstance(error, HostKeyChanged):
            self.note.setText(f"⚠ {error}")
            self.ask("Host key changed", str(error))
        elif isinstance(error, CredentialsNeeded) and error.kind == "password":
            secret = self.ask_secret("Password", f"{error}\n\nPassword for {name}:")
            if secret:
                self.runner.run(f"store-{name}",
                                lambda _t: creds.set_password(site.name, name, secret),
                                on_done=again, on_error=failed)  # fmt: skip
            else:
                self.note.setText(f"{name}: no password given; not connected")
        else:
            failed(error)

    def _ask(self, title: str, question: str) -> bool:
        buttons = QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No
        answer = QMessageBox.question(self, title, question, buttons, QMessageBox.StandardButton.No)
        return answer == QMessageBox.StandardButton.Yes

    def _ask_secret(self, title: str, prompt: str) -> str | None:
        text, ok = QInputDialog.getText(self, title, prompt, QLineEdit.EchoMode.Password)
        return text if ok and text else None
