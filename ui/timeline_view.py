"""Failover timeline: one row per node of state bars over time, events as markers.

``TimelineView`` draws an ``app.timeline.Timeline`` for one module at a time:
bars coloured by state (the dashboard's colours), markers for journal events
(checker failures, commands, split brain...) whose reason shows on hover.
The time axis zooms and pans with the mouse; the view follows "now" until the
user zooms or pans, and "Fit" returns to following.

Exports: CSV is the model's (written in a worker); PNG grabs the plot in the
GUI thread (only it may render widgets) and writes the image in a worker.
"""

from __future__ import annotations

import time
from pathlib import Path

import pyqtgraph as pg
from PySide6.QtCore import QPointF
from PySide6.QtGui import QImage
from PySide6.QtWidgets import (
    QComboBox,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from app.dashboard import STATE_COLOURS
from app.timeline import Interval, Marker, Timeline
from app.workers import CancelToken, Task, Workers
from node_service.errors import UserError
from ui.bridge import Coalescer, relay
from ui.theme import state_colour

BAR_HEIGHT = 0.6
MARKER_COLOURS = {"debug": "#9aa5b1", "info": "#1f2933", "warning": "#ef6c00", "error": "#c62828"}
MIN_SPAN_S = 60.0


def when(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts))


def save_image(_token: CancelToken, image: QImage, path: str) -> Path:
    if not image.save(path, "PNG"):
        raise UserError(f"cannot write {path}: the PNG could not be saved there")
    return Path(path)


class TimelineView(QWidget):
    """State bars and event markers of one module's nodes (a view of ``Timeline``)."""

    def __init__(
        self, timeline: Timeline, workers: Workers | None = None, parent: QWidget | None = None
    ) -> None:
        super().__init__(parent)
        self.setObjectName("timeline-view")
        self.timeline = timeline
        self.workers = workers
        self.now = time.time  # replaceable clock for tests
        self.follow = True  # keep "now" in view until the user zooms or pans
        self.nodes: tuple[str, ...] = ()
        self.rows: dict[str, tuple[Interval, ...]] = {}
        self.markers: tuple[Marker, ...] = ()

        self.module_choice = QComboBox()
        self.module_choice.setMinimumContentsLength(14)
        self.module_choice.currentTextChanged.connect(lambda _t: self.redraw())
        self.fit_button = QPushButton("Fit")
        self.fit_button.clicked.connect(self.fit)
        self.png_button = QPushButton("Export PNG…")
        self.png_button.clicked.connect(self._ask_png)
        self.csv_button = QPushButton("Export CSV…")
        self.csv_button.clicked.connect(self._ask_csv)
        self.status = QLabel("")
        top = QHBoxLayout()
        top.addWidget(QLabel("Module"))
        top.addWidget(self.module_choice)
        top.addWidget(self.fit_button)
        top.addWidget(self.png_button)
        top.addWidget(self.csv_button)
        top.addStretch(1)
        top.addWidget(self.status)

        axis = pg.DateAxisItem(orientation="bottom")
        self.plot_widget = pg.PlotWidget(axisItems={"bottom": axis})
        self.plot_widget.setBackground("w")
        self.plot = self.plot_widget.getPlotItem()
        self.plot.setMouseEnabled(x=True, y=False)
        self.plot.showGrid(x=True, y=False, alpha=0.25)
        self.plot.hideButtons()
        self.bars = pg.BarGraphItem(x0=[], width=[], y=[], height=BAR_HEIGHT, brushes=[])
        self.plot.addItem(self.bars)
        self.points = pg.ScatterPlotItem(size=11, symbol="t", hoverable=True, tip=self._tip)
        self.plot.addItem(self.points)
        self.plot.vb.sigRangeChangedManually.connect(self._user_moved)
        self.plot_widget.scene().sigMouseMoved.connect(self._mouse_moved)

        legend = " ".join(
            f'<span style="background:{c}; color:#fff">&nbsp;{s}&nbsp;</span>'
            for s, c in STATE_COLOURS.items()
        )
        self.legend = QLabel(legend)
        self.hover = QLabel("hover a bar or a marker for its reason")
        self.hover.setWordWrap(True)

        layout = QVBoxLayout(self)
        layout.addLayout(top)
        layout.addWidget(self.plot_widget, 1)
        layout.addWidget(self.legend)
        layout.addWidget(self.hover)

        self.redraw_timer = Coalescer(self, self.redraw, 1000, "timeline-redraw", always=True)
        relay(self, timeline.changed, self.redraw_timer.mark)
        self.redraw()
        self.redraw_timer.start()

    @property
    def module(self) -> str | None:
        return self.module_choice.currentText() or None

    def _sync_modules(self) -> None:
        names = list(self.timeline.modules())
        have = [self.module_choice.itemText(i) for i in range(self.module_choice.count())]
        if have != names:
            chosen = self.module_choice.currentText()
            self.module_choice.blockSignals(True)
            self.module_choice.clear()
            self.module_choice.addItems(names)
            if chosen in names:
                self.module_choice.setCurrentText(chosen)
            self.module_choice.blockSignals(False)

    # -- drawing
    def redraw(self) -> None:
        self._sync_modules()
        module = self.module
        now = self.now()
        self.rows = self.timeline.rows(module) if module else {}
        self.markers = self.timeline.markers(module) if module else ()
        self.nodes = tuple(sorted(set(self.rows) | {m.node for m in self.markers}))
        row_of = {node: i for i, node in enumerate(self.nodes)}
        x0, width, y, brushes = [], [], [], []
        for node, intervals in self.rows.items():
            for interval in intervals:
                x0.append(interval.start)
                width.append(max(0.0, interval.duration(now)))
                y.append(row_of[node])
                brushes.append(pg.mkBrush(state_colour(interval.state)))
        self.bars.setOpts(x0=x0, width=width, y=y, height=BAR_HEIGHT, brushes=brushes)
        spots = [
            {"pos": (m.ts, row_of[m.node] + BAR_HEIGHT / 2 + 0.12), "data": m,
             "brush": pg.mkBrush(MARKER_COLOURS.get(m.severity, "#1f2933"))}
            for m in self.markers
        ]  # fmt: skip
        self.points.setData(spots)
        axis = self.plot.getAxis("left")
        axis.setTicks([[(i, node) for i, node in enumerate(self.nodes)]])
        self.plot.setYRange(-0.7, max(len(self.nodes), 1) - 0.3, padding=0)
        if self.follow:
            self._fit_x(now)

    def _fit_x(self, now: float) -> None:
        starts = [i.start for row in self.rows.values() for i in row[:1]]
        starts += [m.ts for m in self.markers[:1]]
        first = min(starts) if starts else now - MIN_SPAN_S
        span = max(MIN_SPAN_S, now - first)
        self.plot.setXRange(now - span, now + span * 0.03, padding=0)

    def fit(self) -> None:
        self.follow = True
        self.redraw()

    def _user_moved(self, *_args: object) -> None:
        self.follow = False

    def zoom(self, factor: float) -> None:
        """Zoom the time axis around its centre (>1 zooms out), as the mouse wheel does."""
        self.follow = False
        self.plot.vb.scaleBy(x=factor, y=1)

    def x_range(self) -> tuple[float, float]:
        low, high = self.plot.viewRange()[0]
        return float(low), float(high)

    # -- hover
    @staticmethod
    def _tip(x: float, y: float, data: Marker) -> str:
        return f"{when(data.ts)} {data.node} {data.kind} ({data.severity}): {data.message}"

    def describe(self, x: float, y: float) -> str:
        """What lies under (x, y): the bar's state and reason, or a marker's message."""
        row = round(y)
        if not 0 <= row < len(self.nodes):
            return ""
        node = self.nodes[row]
        near = [m for m in self.markers if m.node == node and abs(m.ts - x) < self._tolerance()]
        if near:
            m = min(near, key=lambda m: abs(m.ts - x))
            return self._tip(m.ts, row, m)
        now = self.now()
        for interval in self.rows.get(node, ()):
            end = interval.end if interval.end is not None else now
            if interval.start <= x <= end:
                until = when(end) if interval.end is not None else "now"
                return (f"{node}: {interval.state} {when(interval.start)}–{until}"
                        f" ({interval.reason})")  # fmt: skip
        return f"{node}: no state known at {when(x)}"

    def _tolerance(self) -> float:
        low, high = self.x_range()
        return (high - low) / 100

    def _mouse_moved(self, position: QPointF) -> None:
        if self.plot.sceneBoundingRect().contains(position):
            point = self.plot.vb.mapSceneToView(position)
            text = self.describe(point.x(), point.y())
            if text:
                self.hover.setText(text)

    # -- export
    def export_png(self, path: str) -> Task | Path:
        image = self.plot_widget.grab().toImage()
        if self.workers is None:
            return save_image(CancelToken(), image, path)
        return self.workers.submit("timeline-png", save_image, image, path)

    def export_csv(self, path: str) -> Task | Path:
        module = self.module
        if self.workers is None:
            return self.timeline.export_csv(path, module)
        return self.workers.submit(
            "timeline-csv", lambda _token: self.timeline.export_csv(path, module)
        )

    def _ask_png(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export timeline", "timeline.png", "*.png")
        if path:
            self.export_png(path)
            self.status.setText(f"exporting {path}")

    def _ask_csv(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export timeline", "timeline.csv", "*.csv")
        if path:
            self.export_csv(path)
            self.status.setText(f"exporting {path}")

    def stop(self) -> None:
        self.redraw_timer.stop()
