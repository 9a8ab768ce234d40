"""The console's main window: the site first, then one tab per window.

Tabs: Site, Dashboard, Designer, Deploy, Graphs, Timeline, Logs. Each tab is
a view of one model of the ``Console``; the window itself holds no state but
the tabs, and closing it closes the console (monitors stopped, threads
joined). ``grab_tabs`` renders every tab to an image for --screenshot-all.
"""

from __future__ import annotations

from PySide6.QtCore import QCoreApplication, QEventLoop
from PySide6.QtGui import QCloseEvent, QImage
from PySide6.QtWidgets import QLabel, QMainWindow, QTabWidget, QWidget

from app.nodes import NodeStatus
from ui.bridge import relay
from ui.console import Console
from ui.dashboard_view import DashboardView
from ui.deploy_view import DeployView
from ui.designer_view import DesignerView
from ui.graphs_view import GraphsView
from ui.logs_view import LogsView
from ui.site_view import SiteView
from ui.timeline_view import TimelineView

TAB_NAMES = ("site", "dashboard", "designer", "deploy", "graphs", "timeline", "logs")


class MainWindow(QMainWindow):
    """Every window of the console for one site, as tabs."""

    def __init__(self, console: Console, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("main-window")
        self.console = console
        self.setWindowTitle(f"Rampart console — site {console.site.name}")
        self.resize(1280, 800)
        self.site_view = SiteView(console.site_model)
        self.dashboard = DashboardView(console.site_model)
        self.designer = DesignerView(console.designer, console.workers, console.creds,
                                     console.signing_key, console.trust_pub)  # fmt: skip
        self.deploy = DeployView(console.site, console.workers, console.creds)
        self.graphs = GraphsView(console.feed)
        self.timeline = TimelineView(console.timeline, console.workers)
        self.logs = LogsView(console.logs)
        self.tabs = QTabWidget()
        self.tabs.setDocumentMode(True)
        for name, view in zip(TAB_NAMES, self.views(), strict=True):
            self.tabs.addTab(view, name.capitalize())
        self.setCentralWidget(self.tabs)
        self.reachability = QLabel("")
        self.statusBar().addPermanentWidget(self.reachability)
        relay(self, console.site_model.status_changed, self._status_changed)
        self._status_changed("", None)

    def views(self) -> tuple[QWidget, ...]:
        return (self.site_view, self.dashboard, self.designer, self.deploy, self.graphs,
                self.timeline, self.logs)  # fmt: skip

    def _status_changed(self, _name: str, _status: NodeStatus | None) -> None:
        statuses = self.console.site_model.statuses().values()
        up = sum(1 for s in statuses if s.reachable)
        down = sum(1 for s in statuses if s.reachable is False)
        self.reachability.setText(f"{up} reachable, {down} unreachable, "
                                  f"{len(statuses) - up - down} checking")  # fmt: skip

    def show_tab(self, name: str) -> QWidget:
        index = TAB_NAMES.index(name)
        self.tabs.setCurrentIndex(index)
        return self.tabs.widget(index)

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
        for view in (self.dashboard, self.graphs, self.timeline, self.logs):
            view.stop()

    def closeEvent(self, event: QCloseEvent) -> None:
        self.stop_timers()
        self.console.close()
        super().closeEvent(event)
