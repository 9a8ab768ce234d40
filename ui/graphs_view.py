"""Live graphs: replication throughput and lag, resync progress, heartbeat RTT.

``GraphsView`` draws an ``app.feeds.LiveFeed``. The feed keeps the last five
minutes per series; this view only copies snapshots into pyqtgraph curves
on a timer (twice a second, so the window scrolls at ≥1 Hz even when no
sample arrives) and never redraws per line. "Pause" freezes the picture
while the feed keeps collecting, so nothing is lost when it resumes.
Hovering a plot shows the value of every curve at that time.
"""

from __future__ import annotations

import bisect
import time

import pyqtgraph as pg
from PySide6.QtCore import QPointF
from PySide6.QtWidgets import (
    QComboBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from app.feeds import WINDOW_S, LiveFeed
from ui.bridge import Coalescer, relay

MB = 1_000_000.0
REDRAW_MS = 1000
ALL = "(all modules)"
PALETTE = ("#1565c0", "#2e7d32", "#c62828", "#6a1b9a", "#ef6c00", "#00838f", "#5d4037", "#ad1457")

# plot name -> (title, unit, feed series, scale)
PLOTS = {
    "throughput": ("Replication", "MB/s", "bytes_per_s", MB),
    "lag": ("Replication lag", "MB", "lag_bytes", MB),
    "resync": ("Resync remaining", "MB", "resync_remaining_bytes", MB),
    "rtt": ("Heartbeat round trip", "ms", None, 0.001),
}


def eta_text(seconds: float | None) -> str:
    if seconds is None:
        return "no resync progress"
    if seconds <= 0:
        return "resync done"
    s = int(seconds)
    return f"resync ETA {s // 60}m{s % 60:02d}s" if s >= 60 else f"resync ETA {s}s"


def value_at(xs: tuple[float, ...], ys: tuple[float, ...], x: float) -> float | None:
    """The sample at or just before ``x`` (what the curve shows there)."""
    i = bisect.bisect_right(xs, x) - 1
    return ys[i] if 0 <= i < len(ys) else None


class GraphsView(QWidget):
    """Four scrolling five-minute plots of a ``LiveFeed``."""

    def __init__(self, feed: LiveFeed, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("graphs-view")
        self.feed = feed
        self.window = min(WINDOW_S, feed.window)
        self.paused = False
        self.now = time.time  # replaceable clock (tests feed synthetic times)
        pg.setConfigOptions(antialias=False, background="w", foreground="#1f2933")

        self.module_choice = QComboBox()
        self.module_choice.addItem(ALL)
        self.module_choice.setMinimumContentsLength(14)
        self.module_choice.currentTextChanged.connect(lambda _t: self.redraw())
        self.pause_button = QPushButton("Pause")
        self.pause_button.setCheckable(True)
        self.pause_button.toggled.connect(self.set_paused)
        self.eta = QLabel(eta_text(None))
        self.hover = QLabel("hover a graph to read its values")
        top = QHBoxLayout()
        top.addWidget(QLabel("Module"))
        top.addWidget(self.module_choice)
        top.addWidget(self.pause_button)
        top.addWidget(self.eta)
        top.addStretch(1)

        self.layout_widget = pg.GraphicsLayoutWidget()
        self.plots: dict[str, pg.PlotItem] = {}
        self.curves: dict[str, dict[str, pg.PlotDataItem]] = {name: {} for name in PLOTS}
        self.data: dict[str, dict[str, tuple[tuple[float, ...], tuple[float, ...]]]] = {}
        self.cursors: dict[str, pg.InfiniteLine] = {}
        for i, (name, (title, unit, _series, _scale)) in enumerate(PLOTS.items()):
            plot = self.layout_widget.addPlot(
                row=i // 2, col=i % 2, title=title,
                axisItems={"bottom": pg.DateAxisItem(orientation="bottom")},
            )  # fmt: skip
            plot.setLabel("left", unit)
            plot.showGrid(x=True, y=True, alpha=0.25)
            plot.addLegend(offset=(5, 5))
            plot.setMouseEnabled(x=False, y=False)
            plot.enableAutoRange(axis="y")
            cursor = pg.InfiniteLine(angle=90, movable=False, pen=pg.mkPen("#9aa5b1"))
            cursor.setVisible(False)
            plot.addItem(cursor, ignoreBounds=True)
            self.cursors[name] = cursor
            self.plots[name] = plot
        self.layout_widget.scene().sigMouseMoved.connect(self._mouse_moved)

        layout = QVBoxLayout(self)
        layout.addLayout(top)
        layout.addWidget(self.layout_widget, 1)
        layout.addWidget(self.hover)

        self.redraw_timer = Coalescer(self, self.redraw, REDRAW_MS, "graphs-redraw", always=True)
        relay(self, feed.changed, self.redraw_timer.mark)
        self.redraw()  # built late (first shown): the feed's buffered samples, at once
        self.redraw_timer.start()

    # -- controls
    def set_paused(self, paused: bool) -> None:
        self.paused = paused
        self.pause_button.setChecked(paused)
        self.pause_button.setText("Resume" if paused else "Pause")
        if not paused:
            self.redraw()

    def _sync_modules(self) -> list[tuple[str, str]]:
        pairs = list(self.feed.modules())
        names = sorted({m for _n, m in pairs})
        have = [self.module_choice.itemText(i) for i in range(1, self.module_choice.count())]
        if have != names:
            chosen = self.module_choice.currentText()
            self.module_choice.blockSignals(True)
            self.module_choice.clear()
            self.module_choice.addItem(ALL)
            self.module_choice.addItems(names)
            self.module_choice.setCurrentText(chosen if chosen in names else ALL)
            self.module_choice.blockSignals(False)
        chosen = self.module_choice.currentText()
        return [(n, m) for n, m in pairs if chosen == ALL or m == chosen]

    # -- drawing
    def _curve(self, plot: str, key: str) -> pg.PlotDataItem:
        curves = self.curves[plot]
        if key not in curves:
            colour = PALETTE[len(curves) % len(PALETTE)]
            curves[key] = self.plots[plot].plot(name=key, pen=pg.mkPen(colour, width=1))
        return curves[key]

    def _set(self, plot: str, key: str, ts: tuple[float, ...], values: tuple[float, ...]):
        scale = PLOTS[plot][3]
        scaled = tuple(v / scale for v in values)
        self.data.setdefault(plot, {})[key] = (ts, scaled)
        self._curve(plot, key).setData(list(ts), list(scaled))

    def redraw(self) -> None:
        if self.paused:
            return
        pairs = self._sync_modules()
        wanted: dict[str, set[str]] = {name: set() for name in PLOTS}
        etas = []
        for node, module in pairs:
            key = f"{module}@{node}"
            for plot, (_t, _u, series, _s) in PLOTS.items():
                if series is None:
                    continue
                ts, values = self.feed.series(node, module, series)
                if ts:
                    self._set(plot, key, ts, values)
                    wanted[plot].add(key)
            eta = self.feed.resync_eta(node, module)
            remaining = self.feed.series(node, module, "resync_remaining_bytes")[1]
            if remaining and remaining[-1] > 0:
                etas.append(f"{key}: {eta_text(eta)}")
        for node in sorted({n for n, _m in pairs}):
            for address, (ts, values) in sorted(self.feed.rtt(node).items()):
                key = f"{node} via {address}"
                if ts:
                    self._set("rtt", key, ts, values)
                    wanted["rtt"].add(key)
        for plot, curves in self.curves.items():
            for key in list(curves):
                if key not in wanted[plot]:
                    self.plots[plot].removeItem(curves.pop(key))
                    legend = self.plots[plot].legend
                    if legend is not None:
                        legend.removeItem(key)
                    self.data.get(plot, {}).pop(key, None)
        self.eta.setText("; ".join(etas) if etas else eta_text(None))
        now = self.now()
        for plot in self.plots.values():
            plot.setXRange(now - self.window, now, padding=0)

    def x_range(self, plot: str = "throughput") -> tuple[float, float]:
        low, high = self.plots[plot].viewRange()[0]
        return float(low), float(high)

    # -- hover
    def hover_text(self, plot: str, x: float) -> str:
        """The values of every curve of ``plot`` at time ``x``."""
        title, unit, _series, _scale = PLOTS[plot]
        parts = []
        for key, (xs, ys) in sorted(self.data.get(plot, {}).items()):
            value = value_at(xs, ys, x)
            if value is not None:
                parts.append(f"{key} {value:.3g} {unit}")
        stamp = time.strftime("%H:%M:%S", time.localtime(x))
        return f"{title} at {stamp}: " + (", ".join(parts) if parts else "no data")

    def _mouse_moved(self, position: QPointF) -> None:
        for name, plot in self.plots.items():
            inside = plot.sceneBoundingRect().contains(position)
            self.cursors[name].setVisible(inside)
            if inside:
                x = plot.vb.mapSceneToView(position).x()
                self.cursors[name].setPos(x)
                self.hover.setText(self.hover_text(name, x))

    def stop(self) -> None:
        self.redraw_timer.stop()
