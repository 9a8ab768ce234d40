"""The console's main window: the site first, then one tab per window.

Tabs: Site, Dashboard, Designer, Deploy, Graphs, Timeline, Logs. Each tab is
a view of one model of the ``Console``; the window itself holds no state but
the tabs, and closing it closes the console (monitors stopped, threads
joined). ``grab_tabs`` renders every tab to an image for --screenshot-all.

The Designer, Graphs and Timeline tabs are built the first time they are
shown (or asked for), not with the window: pyqtgraph's import alone is about
half of the console's start-up, and the designer's highlighters and forms
are another tenth, all for tabs nobody sees before the window is usable.
Their models (feed, timeline, designer) live in the ``Console`` from the
start, so a view built late draws everything buffered since.
``start_prefetch`` imports those views in a worker a moment after the window
is up, so the first click on a late tab does not wait for imports either.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from PySide6.QtCore import QCoreApplication, QEventLoop, QTimer
from PySide6.QtGui import QCloseEvent, QImage
from PySide6.QtWidgets import QLabel, QMainWindow, QTabWidget, QVBoxLayout, QWidget

from app.nodes import NodeStatus
from app.workers import CancelToken, Task
from node_service.errors import RampartError
from ui.bridge import relay
from ui.console import Console
from ui.dashboard_view import DashboardView
from ui.deploy_view import DeployView
from ui.logs_view import LogsView
from ui.site_view import SiteView

if TYPE_CHECKING:
    from ui.designer_view import DesignerView
    from ui.graphs_view import GraphsView
    from ui.timeline_view import TimelineView

TAB_NAMES = ("site", "dashboard", "designer", "deploy", "graphs", "timeline", "logs")
# Tabs whose views run redraw timers (stopped before the console closes).
TIMED_TABS = ("dashboard", "graphs", "timeline", "logs")
# A worker's import may still be running when a late tab is first shown; the
# GUI thread waits for it rather than import the same modules concurrently.
PREFETCH_WAIT_S = 30.0


def _designer(console: Console) -> QWidget:
    from ui.designer_view import DesignerView

    return DesignerView(console.designer, console.workers, console.creds,
                        console.signing_key, console.trust_pub)  # fmt: skip


def _graphs(console: Console) -> QWidget:
    from ui.graphs_view import GraphsView

    return GraphsView(console.feed)


def _timeline(console: Console) -> QWidget:
    from ui.timeline_view import TimelineView

    return TimelineView(console.timeline, console.workers)


LATE_TABS: dict[str, Callable[[Console], QWidget]] = {
    "designer": _designer,
    "graphs": _graphs,
    "timeline": _timeline,
}
LATE_MODULES = ("ui.designer_view", "ui.graphs_view", "ui.timeline_view")


def _import_late_modules(_token: CancelToken) -> tuple[str, ...]:
    for name in LATE_MODULES:
        importlib.import_module(name)
    return LATE_MODULES


class MainWindow(QMainWindow):
    """Every window of the console for one site, as tabs."""

    def __init__(self, console: Console, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("main-window")
        self.console = console
        self.setWindowTitle(f"Rampart console — site {console.site.name}")
        self.resize(1280, 800)
        self._views: dict[str, QWidget] = {
            "site": SiteView(console.site_model),
            "dashboard": DashboardView(console.site_model),
            "deploy": DeployView(console.site, console.workers, console.creds),
            "logs": LogsView(console.logs),
        }
        self._slots: dict[str, QWidget] = {}  # late tab -> its (empty until shown) page
        self.tabs = QTabWidget()
        self.tabs.setDocumentMode(True)
        for name in TAB_NAMES:
            page = self._views.get(name)
            if page is None:
                page = self._slots[name] = QWidget()
                page.setObjectName(f"{name}-page")
                QVBoxLayout(page).setContentsMargins(0, 0, 0, 0)
            self.tabs.addTab(page, name.capitalize())
        self.tabs.currentChanged.connect(self._tab_shown)
        self.setCentralWidget(self.tabs)
        self.reachability = QLabel("")
        self.statusBar().addPermanentWidget(self.reachability)
        self._prefetch: Task | None = None
        self._prefetch_timer = QTimer(self)
        self._prefetch_timer.setObjectName("prefetch-views-timer")
        self._prefetch_timer.setSingleShot(True)
        self._prefetch_timer.timeout.connect(self.prefetch)
        relay(self, console.site_model.status_changed, self._status_changed)
        self._status_changed("", None)

    # -- views (late ones built on first use)
    def view(self, name: str) -> QWidget:
        """The view of tab ``name``, built now if it is a late tab not shown yet."""
        found = self._views.get(name)
        if found is not None:
            return found
        if name not in LATE_TABS:
            raise KeyError(f"no tab {name!r}; expected one of {', '.join(TAB_NAMES)}")
        if self._prefetch is not None:
            self._prefetch.wait(PREFETCH_WAIT_S)
        built = self._views[name] = LATE_TABS[name](self.console)
        self._slots[name].layout().addWidget(built)
        return built

    def built(self) -> tuple[str, ...]:
        """Names of the tabs whose views exist, in tab order."""
        return tuple(name for name in TAB_NAMES if name in self._views)

    def views(self) -> tuple[QWidget, ...]:
        """Every tab's view, in tab order (building the late ones)."""
        return tuple(self.view(name) for name in TAB_NAMES)

    @property
    def site_view(self) -> SiteView:
        return cast(Any, self._views["site"])

    @property
    def dashboard(self) -> DashboardView:
        return cast(Any, self._views["dashboard"])

    @property
    def deploy(self) -> DeployView:
        return cast(Any, self._views["deploy"])

    @property
    def logs(self) -> LogsView:
        return cast(Any, self._views["logs"])

    @property
    def designer(self) -> DesignerView:
        return cast(Any, self.view("designer"))

    @property
    def graphs(self) -> GraphsView:
        return cast(Any, self.view("graphs"))

    @property
    def timeline(self) -> TimelineView:
        return cast(Any, self.view("timeline"))

    def _tab_shown(self, index: int) -> None:
        if 0 <= index < len(TAB_NAMES):
            self.view(TAB_NAMES[index])

    def start_prefetch(self, after_ms: int) -> None:
        """Import the late tabs' modules in a worker ``after_ms`` from now."""
        self._prefetch_timer.start(max(0, after_ms))

    def prefetch(self) -> Task | None:
        """Import the late tabs' modules in a worker now (once); None when all are built."""
        if self._prefetch is None and any(name not in self._views for name in LATE_TABS):
            try:
                self._prefetch = self.console.workers.submit("prefetch-views", _import_late_modules)
            except RampartError:
                return None  # the console is closing: nothing left to show faster
        return self._prefetch

    def _status_changed(self, _name: str, _status: NodeStatus | None) -> None:
        statuses = self.console.site_model.statuses().values()
        up = sum(1 for s in statuses if s.reachable)
        down = sum(1 for s in statuses if s.reachable is False)
        self.reachability.setText(f"{up} reachable, {down} unreachable, "
                                  f"{len(statuses) - up - down} checking")  # fmt: skip

    def show_tab(self, name: str) -> QWidget:
        view = self.view(name)
        self.tabs.setCurrentIndex(TAB_NAMES.index(name))
        return view

    def grab_image(self) -> QImage:
        QCoreApplication.processEvents(QEventLoop.ProcessEventsFlag.AllEvents, 50)
        return self.grab().toImage()

    def grab_tabs(self) -> dict[str, QImage]:
        """Every tab rendered in turn (the current tab is restored afterwards)."""
        current = self.tabs.currentIndex()
        images = {}
        for name in TAB_NAMES:
            self.show_tab(name)
            images[name] = self.grab_image()
        self.tabs.setCurrentIndex(current)
        return images

    def stop_timers(self) -> None:
        self._prefetch_timer.stop()
        for name in TIMED_TABS:
            view: Any = self._views.get(name)
            if view is not None:
                view.stop()

    def closeEvent(self, event: QCloseEvent) -> None:
        self.stop_timers()
        self.console.close()
        super().closeEvent(event)
