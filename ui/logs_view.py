"""Logs window: every node's journal entries, filtered by node, module, severity, text.

``LogsView`` shows a ``app.logs.LogModel``. Filtering is the model's pure
``LogFilter``; new entries mark the view dirty and a timer re-filters at most
twice a second, so a burst of events never floods the GUI thread.
"""

from __future__ import annotations

import time

from PySide6.QtCore import QAbstractTableModel, QModelIndex, QPersistentModelIndex, Qt
from PySide6.QtGui import QColor
from PySide6.QtWidgets import (
    QComboBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QTableView,
    QVBoxLayout,
    QWidget,
)

from app.logs import LogEntry, LogFilter, LogModel
from node_service.journal import SEVERITIES
from ui.bridge import Coalescer, relay

COLUMNS = ("Time", "Node", "Module", "Severity", "Kind", "Message")
ALL = "(all)"
SEVERITY_COLOURS = {"warning": "#b26a00", "error": "#b42318", "critical": "#8b0000"}
Index = QModelIndex | QPersistentModelIndex


def when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) + f".{int(ts % 1 * 1000):03d}"


class LogTable(QAbstractTableModel):
    """The filtered entries as a Qt table model (read-only)."""

    def __init__(self) -> None:
        super().__init__()
        self.entries: tuple[LogEntry, ...] = ()

    def set_entries(self, entries: tuple[LogEntry, ...]) -> None:
        self.beginResetModel()
        self.entries = entries
        self.endResetModel()

    def rowCount(self, parent: Index = QModelIndex()) -> int:  # noqa: B008 (Qt's API)
        return 0 if parent.isValid() else len(self.entries)

    def columnCount(self, parent: Index = QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else len(COLUMNS)

    def headerData(self, section: int, orientation: Qt.Orientation, role: int = 0) -> object:
        if role == Qt.ItemDataRole.DisplayRole and orientation == Qt.Orientation.Horizontal:
            return COLUMNS[section]
        return None

    def data(self, index: Index, role: int = 0) -> object:
        if not index.isValid():
            return None
        e = self.entries[index.row()]
        if role == Qt.ItemDataRole.DisplayRole:
            values = (when(e.ts), e.node, e.module or "—", e.severity, e.kind, e.message)
            return values[index.column()]
        if role == Qt.ItemDataRole.ForegroundRole and e.severity in SEVERITY_COLOURS:
            return QColor(SEVERITY_COLOURS[e.severity])
        if role == Qt.ItemDataRole.ToolTipRole:
            return e.message
        return None


class LogsView(QWidget):
    """Journal entries of the whole site (a view of ``LogModel``)."""

    def __init__(self, model: LogModel, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("logs-view")
        self.model = model
        self.node_filter = QComboBox()
        self.module_filter = QComboBox()
        self.severity_filter = QComboBox()
        self.severity_filter.addItems(list(SEVERITIES))
        self.severity_filter.setCurrentText("info" if "info" in SEVERITIES else SEVERITIES[0])
        self.search = QLineEdit()
        self.search.setPlaceholderText("search messages…")
        self.search.setClearButtonEnabled(True)
        self.count = QLabel("")
        for combo in (self.node_filter, self.module_filter):
            combo.addItem(ALL)
            combo.setMinimumContentsLength(12)
        filters = QHBoxLayout()
        for label, widget in (("Node", self.node_filter), ("Module", self.module_filter),
                              ("Severity ≥", self.severity_filter)):  # fmt: skip
            filters.addWidget(QLabel(label))
            filters.addWidget(widget)
        filters.addWidget(self.search, 1)
        filters.addWidget(self.count)

        self.table_model = LogTable()
        self.table = QTableView()
        self.table.setModel(self.table_model)
        self.table.verticalHeader().setVisible(False)
        self.table.setSelectionBehavior(QTableView.SelectionBehavior.SelectRows)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setStretchLastSection(True)

        layout = QVBoxLayout(self)
        layout.addLayout(filters)
        layout.addWidget(self.table)

        self.refilter = Coalescer(self, self.apply_filter, 500, "logs-refilter")
        for combo in (self.node_filter, self.module_filter, self.severity_filter):
            combo.currentTextChanged.connect(lambda _t: self.apply_filter())
        self.search.textChanged.connect(lambda _t: self.apply_filter())
        relay(self, model.added, self.refilter.mark)
        self.apply_filter()
        self.refilter.start()

    def current_filter(self) -> LogFilter:
        node, module = self.node_filter.currentText(), self.module_filter.currentText()
        return LogFilter(
            nodes=frozenset() if node in (ALL, "") else frozenset({node}),
            modules=frozenset() if module in (ALL, "") else frozenset({module}),
            min_severity=self.severity_filter.currentText(),
            text=self.search.text().strip(),
        )

    def _sync_choices(self, combo: QComboBox, names: tuple[str, ...]) -> None:
        have = [combo.itemText(i) for i in range(1, combo.count())]
        if have != list(names):
            chosen = combo.currentText()
            combo.blockSignals(True)
            combo.clear()
            combo.addItem(ALL)
            combo.addItems(list(names))
            combo.setCurrentText(chosen if chosen in names else ALL)
            combo.blockSignals(False)

    def apply_filter(self) -> None:
        self._sync_choices(self.node_filter, self.model.nodes())
        self._sync_choices(self.module_filter, self.model.modules())
        shown = self.model.filtered(self.current_filter())
        self.table_model.set_entries(shown)
        self.count.setText(f"{len(shown)} of {len(self.model.entries())} entries")
        self.table.scrollToBottom()

    def shown(self) -> tuple[LogEntry, ...]:
        return self.table_model.entries

    def stop(self) -> None:
        self.refilter.stop()
