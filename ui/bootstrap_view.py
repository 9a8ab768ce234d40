"""The "Add node" dialog: a view of ``app.bootstrap.Bootstrap``.

For a new node the form asks where it is (name, address, SSH login) and
which node package to push; Start adds the node to the site file (saved
atomically, in a worker) and starts the bootstrap. For a node already in
the site the form is read-only and Start bootstraps it. Each step is a row
that the bootstrap's progress redraws (through a Relay, in the GUI thread);
Cancel stops between steps. An unknown host key is shown with its
fingerprint and trusted only when the user says so, then Start tries again.
"""

from __future__ import annotations

from collections.abc import Callable

from PySide6.QtGui import QColor
from PySide6.QtWidgets import (
    QDialog,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QMessageBox,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from app.bootstrap import LABELS, STEPS, Bootstrap, BootstrapProgress
from app.bootstrap_plan import find_package, with_node
from app.credentials import Credentials
from app.deploy import DONE, FAILED, RUNNING
from app.site import Site, save
from app.ssh import UnknownHostKey, trust_host_key
from app.workers import CancelToken, Workers
from node_service.errors import RampartError
from ui.bridge import Relay, Runner, relay

Ask = Callable[[str, str], bool]  # (title, question) -> yes?
STATE_COLOURS = {DONE: "#2e7d32", FAILED: "#c62828", RUNNING: "#1565c0"}


class BootstrapDialog(QDialog):
    """Add a node to the site and bootstrap it, showing each step."""

    def __init__(
        self, site: Site, workers: Workers, creds: Credentials | None = None,
        node: str | None = None, parent: QWidget | None = None, ask: Ask | None = None,
        on_site_changed: Callable[[Site], None] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(parent)
        self.setObjectName("bootstrap-dialog")
        self.setWindowTitle("Add node" if node is None else f"Bootstrap {node}")
        self.site = site
        self.workers = workers
        self.creds = creds or Credentials()
        self.ask: Ask = ask or self._ask
        self.on_site_changed = on_site_changed
        self.job: Bootstrap | None = None
        self._relay: Relay | None = None
        self.runner = Runner(self, workers)

        self.name = QLineEdit(node or "")
        self.address = QLineEdit()
        self.user = QLineEdit("root")
        self.port = QSpinBox()
        self.port.setRange(1, 65535)
        self.port.setValue(22)
        self.key = QLineEdit()
        self.key.setPlaceholderText("private key file (optional: agent or keyring password)")
        self.proxy = QLineEdit()
        self.proxy.setPlaceholderText("optional, e.g. ssh -W %h:%p bastion")
        self.package = QLineEdit()
        try:
            self.package.setText(str(find_package()))
        except RampartError:
            self.package.setPlaceholderText("rampart_VERSION_ARCH.deb (make deb)")
        form = QFormLayout()
        for label, widget in (("Node name", self.name), ("LAN address", self.address),
                              ("SSH user", self.user), ("SSH port", self.port),
                              ("SSH key", self.key), ("Proxy command", self.proxy),
                              ("Node package", self.package)):  # fmt: skip
            form.addRow(label, widget)
        if node is not None:
            known = site.node(node)
            self.address.setText(known.addresses[0])
            self.user.setText(known.ssh.user)
            self.port.setValue(known.ssh.port)
            self.key.setText(known.ssh.key or "")
            self.proxy.setText(known.ssh.proxy_command or "")
            for widget in (self.name, self.address, self.user, self.port, self.key, self.proxy):
                widget.setEnabled(False)
        self.is_new = node is None

        self.table = QTableWidget(len(STEPS), 3)
        self.table.setHorizontalHeaderLabels(("Step", "State", "Message"))
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.table.horizontalHeader().setStretchLastSection(True)
        for row, step in enumerate(STEPS):
            self.table.setItem(row, 0, QTableWidgetItem(LABELS[step]))
        self.note = QLabel("")
        self.note.setWordWrap(True)

        self.start_button = QPushButton("Start")
        self.start_button.clicked.connect(self.start)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        self.close_button = QPushButton("Close")
        self.close_button.clicked.connect(self.close)
        buttons = QHBoxLayout()
        buttons.addStretch(1)
        for button in (self.start_button, self.cancel_button, self.close_button):
            buttons.addWidget(button)

        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.table)
        layout.addWidget(self.note)
        layout.addLayout(buttons)
        self.resize(760, 520)

    # -- reading the table (tests, screenshots)
    def row_text(self, step: str) -> tuple[str, str]:
        row = STEPS.index(step)
        state, message = self.table.item(row, 1), self.table.item(row, 2)
        return (state.text() if state else "", message.text() if message else "")

    # -- starting
    def start(self) -> None:
        """Add the node to the site (new node), check locally, then bootstrap in a worker."""
        name = self.name.text().strip()
        site = self.site
        try:
            if self.is_new:
                site = with_node(
                    site, name, self.address.text(), self.user.text(), self.port.value(),
                    self.key.text().strip() or None, self.proxy.text().strip() or None,
                )  # fmt: skip
        except RampartError as exc:
            self.note.setText(f"⚠ {exc}")
            return
        package = self.package.text().strip() or None
        self.start_button.setEnabled(False)
        self.note.setText(f"{name}: checking the package and the site's secrets…")

        def prepare(_token: CancelToken) -> Bootstrap:
            job = Bootstrap(site, name, package, self.creds, self.workers)
            job.check()
            if site is not self.site and site.path is not None:
                save(site, site.path)  # checked, and in the site before any node is touched
            return job

        self.runner.run(f"bootstrap-check-{name}", prepare,
                        on_done=lambda job: self._begin(site, job),
                        on_error=self._refused)  # fmt: skip

    def _refused(self, error: BaseException) -> None:
        self.note.setText(f"⚠ {error}")
        self.start_button.setEnabled(True)

    def _begin(self, site: Site, job: Bootstrap) -> None:
        if site is not self.site:
            self.site = site
            self.is_new = False
            for widget in (self.name, self.address, self.user, self.port, self.key, self.proxy):
                widget.setEnabled(False)
            if self.on_site_changed is not None:
                self.on_site_changed(site)
        if self._relay is not None:
            self._relay.detach()
        self.job = job
        self._relay = relay(self, job.changed, self.show_progress)
        relay(self, job.finished, self._finished)
        self.cancel_button.setEnabled(True)
        self.show_progress(job.node.name, job.progress())
        job.run()

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancel()
            self.note.setText("cancelling after the current step…")

    # -- progress
    def show_progress(self, node: str, progress: BootstrapProgress) -> None:
        for row, step in enumerate(progress.steps):
            state = step.state
            if state == RUNNING and 0 < step.progress < 1:
                state = f"{state} {step.progress:.0%}"
            item = QTableWidgetItem(state)
            if step.state in STATE_COLOURS:
                item.setForeground(QColor(STATE_COLOURS[step.state]))
            self.table.setItem(row, 1, item)
            message = QTableWidgetItem(step.message)
            message.setToolTip(step.message)
            self.table.setItem(row, 2, message)
        self.note.setText(progress.summary)

    def _finished(self, progress: BootstrapProgress) -> None:
        self.show_progress(progress.node, progress)
        self.cancel_button.setEnabled(False)
        self.start_button.setEnabled(not progress.ok)
        self.start_button.setText("Start again")
        error = self.job.error if self.job is not None else None
        if isinstance(error, UnknownHostKey):
            question = (
                f"Node {progress.node} ({error.host}) presents an unknown {error.key_type} "
                f"host key\n\n{error.fingerprint}\n\nCompare it with the node's "
                "(ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub). Trust it and start again?"
            )
            if self.ask("Unknown host key", question):
                site = self.site
                self.runner.run(
                    f"trust-{progress.node}", lambda _t: trust_host_key(site, error),
                    on_done=lambda _p: self.start(), on_error=self._refused,
                )  # fmt: skip

    def _ask(self, title: str, question: str) -> bool:
        buttons = QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No
        answer = QMessageBox.question(self, title, question, buttons, QMessageBox.StandardButton.No)
        return answer == QMessageBox.StandardButton.Yes

    def closeEvent(self, event) -> None:
        self.cancel()
        super().closeEvent(event)
