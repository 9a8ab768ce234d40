"""Dashboard: the module × node state matrix and the action buttons.

``DashboardView`` shows a ``SiteModel`` through the pure ``app.dashboard``
functions: the matrix is re-rendered from a fresh ``matrix(statuses)`` on
every status change, buttons are enabled by ``button()`` (the same role rule
a node applies) and show its reason when greyed out, and disruptive actions
ask ``confirmation()``'s question first. The action itself runs in the
model's workers; its end comes back through a queued Qt signal (no polling).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from PySide6.QtCore import Qt, Signal, Slot
from PySide6.QtGui import QBrush, QColor
from PySide6.QtWidgets import (
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QMessageBox,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from app.dashboard import ACTIONS, Matrix, button, confirmation, matrix
from app.nodes import ActionResult, NodeStatus, SiteModel
from app.workers import Task
from ui.bridge import Coalescer, relay
from ui.theme import text_colour_on

Confirm = Callable[[str], bool]


def ask(parent: QWidget, question: str) -> bool:
    answer = QMessageBox.question(
        parent, "Confirm action", question,
        QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
        QMessageBox.StandardButton.No,
    )  # fmt: skip
    return answer == QMessageBox.StandardButton.Yes


class DashboardView(QWidget):
    """Module × node states with start/stop/restart/swap/prim/second buttons."""

    # (label, task) from the worker that ran the action, queued to the GUI thread.
    _action_done = Signal(str, object)

    def __init__(
        self, model: SiteModel, parent: QWidget | None = None, confirm: Confirm | None = None
    ) -> None:
        super().__init__(parent)
        self.setObjectName("dashboard-view")
        self.model = model
        # Injected so tests answer the question without a modal dialog.
        self.confirm: Confirm = confirm or (lambda question: ask(self, question))
        self.current: tuple[str, str] | None = None  # (module, node)
        self.matrix_data = Matrix((), (), {})
        self._action_done.connect(self._show_outcome)

        self.table = QTableWidget(0, 0)
        self.table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.table.setSelectionMode(QTableWidget.SelectionMode.SingleSelection)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.table.currentCellChanged.connect(self._cell_selected)
        self.empty = QLabel("No module is installed on any reachable node yet.")

        self.selected = QLabel("Select a cell to act on a module on one node.")
        self.selected.setWordWrap(True)
        self.buttons: dict[str, QPushButton] = {}
        grid = QGridLayout()
        for i, verb in enumerate(ACTIONS):
            b = QPushButton(verb)
            b.setObjectName(f"action-{verb}")
            b.clicked.connect(lambda _checked=False, v=verb: self.act(v))
            self.buttons[verb] = b
            grid.addWidget(b, i // 3, i % 3)
        self.reason = QLabel("")
        self.reason.setObjectName("reason")
        self.reason.setWordWrap(True)
        self.result = QLabel("")
        self.result.setWordWrap(True)
        actions = QGroupBox("Actions")
        box = QVBoxLayout(actions)
        box.addWidget(self.selected)
        box.addLayout(grid)
        box.addWidget(self.reason)
        box.addWidget(self.result)
        box.addStretch(1)
        actions.setMaximumWidth(360)

        left = QVBoxLayout()
        left.addWidget(self.empty)
        left.addWidget(self.table)
        layout = QHBoxLayout(self)
        layout.addLayout(left, 1)
        layout.addWidget(actions)

        self.redraw_timer = Coalescer(self, self.redraw, 1000, "dashboard-redraw", always=True)
        relay(self, model.status_changed, self._status_changed)
        self.redraw()
        self.redraw_timer.start()

    # -- drawing
    def _status_changed(self, _name: str, _status: NodeStatus) -> None:
        self.redraw()

    def redraw(self) -> None:
        self.matrix_data = m = matrix(self.model.statuses())
        now = time.time()
        self.table.blockSignals(True)
        self.table.setRowCount(len(m.modules))
        self.table.setColumnCount(len(m.nodes))
        self.table.setVerticalHeaderLabels(list(m.modules))
        self.table.setHorizontalHeaderLabels(list(m.nodes))
        for r, module in enumerate(m.modules):
            for c, node in enumerate(m.nodes):
                cell = m.cell(module, node)
                item = QTableWidgetItem()
                item.setTextAlignment(Qt.AlignmentFlag.AlignCenter)
                if cell is None:
                    item.setText("—")
                    item.setToolTip(f"{module} is not installed on {node}")
                else:
                    background = QColor(cell.colour)
                    item.setText(cell.text(now))
                    item.setToolTip(cell.reason)
                    item.setBackground(QBrush(background))
                    item.setForeground(QBrush(text_colour_on(background)))
                self.table.setItem(r, c, item)
        if self.current is not None and self.current[0] in m.modules:
            self.table.setCurrentCell(
                m.modules.index(self.current[0]), m.nodes.index(self.current[1])
            )
        self.table.blockSignals(False)
        self.empty.setVisible(not m.modules)
        self._update_buttons()

    def select(self, module: str, node: str) -> None:
        m = self.matrix_data
        self.table.setCurrentCell(m.modules.index(module), m.nodes.index(node))
        self.current = (module, node)
        self._update_buttons()

    def _cell_selected(self, row: int, column: int, *_previous: int) -> None:
        m = self.matrix_data
        if 0 <= row < len(m.modules) and 0 <= column < len(m.nodes):
            self.current = (m.modules[row], m.nodes[column])
        else:
            self.current = None
        self._update_buttons()

    def _update_buttons(self) -> None:
        if self.current is None:
            for b in self.buttons.values():
                b.setEnabled(False)
                b.setToolTip("select a module and a node first")
            self.reason.setText("")
            return
        module, node = self.current
        statuses = self.model.statuses()
        status = statuses.get(node)
        cell = self.matrix_data.cell(module, node)
        state = cell.text() if cell else "not installed"
        self.selected.setText(f"<b>{module}</b> on <b>{node}</b>: {state}")
        refusals = []
        for verb, b in self.buttons.items():
            ok, why = button(status, module, verb)
            b.setEnabled(ok)
            b.setToolTip(why)
            if not ok and why not in refusals:
                refusals.append(why)
        self.reason.setText("\n".join(refusals))

    def button_state(self, verb: str) -> tuple[bool, str]:
        """(enabled, tooltip) of one action button."""
        b = self.buttons[verb]
        return b.isEnabled(), b.toolTip()

    # -- acting
    def act(self, verb: str) -> Task | None:
        if self.current is None:
            return None
        module, node = self.current
        ok, why = button(self.model.statuses().get(node), module, verb)
        if not ok:
            self.result.setText(why)
            return None
        question = confirmation(verb, module, node)
        if question is not None and not self.confirm(question):
            self.result.setText(f"{verb} of {module} on {node} not done: cancelled")
            return None
        self.result.setText(f"{verb} {module} on {node}: running…")
        task = self.model.run_action(node, module, verb)
        label = f"{verb} {module} on {node}"
        task.on_done(lambda t: self._post_outcome(label, t))
        return task

    def _post_outcome(self, label: str, task: Task) -> None:
        """In the worker's thread: hand the outcome to the GUI thread."""
        try:
            self._action_done.emit(label, task)
        except RuntimeError:
            pass  # the view was closed while the action ran; nothing to show

    @Slot(str, object)
    def _show_outcome(self, label: str, task: Task) -> None:
        try:
            outcome: ActionResult = task.result(0)
        except BaseException as exc:  # the action's own error, or cancelled while queued
            self.result.setText(f"{label}: failed: {exc or 'cancelled'}")
        else:
            self.result.setText(f"{label}: {'done' if outcome.ok else 'refused'}: "
                                f"{outcome.reason}")  # fmt: skip

    def stop(self) -> None:
        self.redraw_timer.stop()
