"""Deploy window: choose a .safe and nodes, watch each node go through each step.

``DeployView`` makes an ``app.deploy.Deployment`` and shows it: one row per
node, one column per step (connect, upload, verify, install, start), each
cell coloured by the step's state, the upload with its percentage, and the
node's summary (with the failing step's message) at the end of the row.
The local check and the per-node work run in workers; "Cancel" stops every
node between steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from PySide6.QtGui import QBrush, QColor
from PySide6.QtWidgets import (
    QCheckBox,
    QFileDialog,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from app.credentials import Credentials
from app.deploy import STEPS, Deployment, NodeProgress, StepStatus
from app.site import Site
from app.workers import Cancelled, CancelToken, Workers
from ui.bridge import Relay, Runner, relay

STEP_COLOURS = {
    "pending": "#eceff1",
    "running": "#fff3c4",
    "done": "#c8e6c9",
    "failed": "#ffcdd2",
    "cancelled": "#e0e0e0",
    "skipped": "#f5f5f5",
}
COLUMNS = (*STEPS, "result")
DeploymentFactory = Callable[..., Deployment]


def step_text(step: StepStatus) -> str:
    if step.state == "running" and 0 < step.progress < 1:
        return f"running {step.progress:.0%}"
    return step.state


class DeployView(QWidget):
    """Per-node, per-step progress of deployments (a view of ``Deployment``)."""

    def __init__(
        self, site: Site, workers: Workers, creds: Credentials | None = None,
        factory: DeploymentFactory = Deployment, parent: QWidget | None = None,
    ) -> None:  # fmt: skip
        super().__init__(parent)
        self.setObjectName("deploy-view")
        self.site = site
        self.workers = workers
        self.creds = creds
        self.factory = factory
        self.runner = Runner(self, workers)
        self.deployment: Deployment | None = None
        self._cancel_requested = False  # read by the check worker: cancel before any node
        self._relays: list[Relay] = []

        self.package = QLineEdit()
        self.package.setPlaceholderText("signed module (.safe)")
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._ask_package)
        self.node_boxes: dict[str, QCheckBox] = {}
        nodes = QGroupBox("Nodes")
        nodes_layout = QHBoxLayout(nodes)
        for node in site.nodes:
            box = QCheckBox(node.name)
            box.setChecked(True)
            self.node_boxes[node.name] = box
            nodes_layout.addWidget(box)
        nodes_layout.addStretch(1)
        self.start_after = QCheckBox("start the module after installing")
        self.start_after.setChecked(True)
        self.restart_running = QCheckBox("restart it where it already runs (new version now)")
        self.restart_running.setToolTip(
            "Unchecked, a node already running the module keeps running the old version "
            "until its next start"
        )
        self.deploy_button = QPushButton("Deploy")
        self.deploy_button.clicked.connect(self.deploy)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        self.status = QLabel("Choose a signed module and the nodes to deploy it to.")
        self.status.setWordWrap(True)

        row = QHBoxLayout()
        row.addWidget(QLabel("Module"))
        row.addWidget(self.package, 1)
        row.addWidget(browse)
        buttons = QHBoxLayout()
        buttons.addWidget(self.start_after)
        buttons.addWidget(self.restart_running)
        buttons.addStretch(1)
        buttons.addWidget(self.deploy_button)
        buttons.addWidget(self.cancel_button)

        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(list(COLUMNS))
        self.table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setStretchLastSection(True)
        self._rows: dict[str, int] = {}

        layout = QVBoxLayout(self)
        layout.addLayout(row)
        layout.addWidget(nodes)
        layout.addLayout(buttons)
        layout.addWidget(self.table, 1)
        layout.addWidget(self.status)

    def chosen_nodes(self) -> list[str]:
        return [name for name, box in self.node_boxes.items() if box.isChecked()]

    def _ask_package(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Module to deploy", "", "Modules (*.safe)")
        if path:
            self.package.setText(path)

    # -- starting
    def deploy(self) -> Deployment | None:
        path = self.package.text().strip()
        if not path:
            self.status.setText("⚠ choose a .safe file first")
            return None
        self._cancel_requested = False
        d = self.factory(
            self.site, path, self.chosen_nodes(), self.creds, self.workers,
            start=self.start_after.isChecked(), restart_running=self.restart_running.isChecked(),
        )  # fmt: skip
        self.show_deployment(d)
        self.deploy_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.status.setText(f"checking {path} before touching any node…")

        def start(_token: CancelToken) -> str:
            summary = d.check()  # reads and verifies the .safe: a worker's job
            if self._cancel_requested:
                raise Cancelled("deploy cancelled before any node was touched")
            d.run()
            return summary

        self.runner.run("deploy-check", start, on_done=self._started, on_error=self._refused)
        return d

    def _started(self, summary: str) -> None:
        d = self.deployment
        if d is not None and d.wait(0):
            return  # the nodes were quicker than this report: "finished" is already shown
        self.status.setText(f"{summary}; deploying to {', '.join(self._rows)}")

    def _refused(self, error: BaseException) -> None:
        self.status.setText(f"⚠ {error}")
        self._idle()

    def cancel(self) -> None:
        self._cancel_requested = True
        if self.deployment is not None:
            self.deployment.cancel()
            self.status.setText("cancelling: running steps finish, the rest are not done")

    def _idle(self) -> None:
        self.deploy_button.setEnabled(True)
        self.cancel_button.setEnabled(False)

    # -- showing
    def show_deployment(self, d: Deployment) -> None:
        for r in self._relays:
            r.detach()
        self.deployment = d
        progress = d.all_progress()
        self._rows = {node: i for i, node in enumerate(progress)}
        self.table.setRowCount(len(progress))
        self.table.setVerticalHeaderLabels(list(progress))
        for node, p in progress.items():
            self.show_progress(node, p)
        self._relays = [relay(self, d.changed, self.show_progress),
                        relay(self, d.finished, self._finished)]  # fmt: skip

    def show_progress(self, node: str, progress: NodeProgress) -> None:
        row = self._rows.get(node)
        if row is None:
            return
        for column, step in enumerate(progress.steps):
            item = QTableWidgetItem(step_text(step))
            item.setBackground(QBrush(QColor(STEP_COLOURS.get(step.state, "#ffffff"))))
            item.setToolTip(step.message or step.state)
            self.table.setItem(row, COLUMNS.index(step.name) if step.name in COLUMNS else column,
                               item)  # fmt: skip
        result = QTableWidgetItem(progress.summary)
        result.setToolTip(progress.summary)
        if progress.failed_step is not None:
            result.setForeground(QBrush(QColor("#b42318")))
        self.table.setItem(row, len(COLUMNS) - 1, result)

    def _finished(self) -> None:
        d = self.deployment
        self._idle()
        if d is None:
            return
        done = d.all_progress().values()
        failed = [p for p in done if p.failed_step is not None]
        ok = [p for p in done if p.ok]
        self.status.setText(
            f"finished: {len(ok)} deployed, {len(failed)} failed"
            + "".join(f"\n⚠ {p.summary}" for p in failed)
        )

    def cell_text(self, node: str, column: str) -> str:
        item = self.table.item(self._rows[node], COLUMNS.index(column))
        return item.text() if item is not None else ""

    def cell_tip(self, node: str, column: str) -> Any:
        item = self.table.item(self._rows[node], COLUMNS.index(column))
        return item.toolTip() if item is not None else ""
