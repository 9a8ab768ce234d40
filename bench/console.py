"""Console benchmarks: start-up, GUI-thread stalls while deploying, live-graph CPU.

The issue's figures: "console start to usable window ≤ 2 s; GUI thread never
blocked more than 100 ms while deploying to 3 nodes; live graphs for 8 nodes
at 1 Hz cost ≤ 10% of one core". Each is measured next to a baseline taken in
the same run (docs/dev/bench.md, "Console"):

- start: `rampart-console --site LAB --screenshot PNG --after 0` — the grab
  fires on the first turn of the event loop after the window is shown, so
  spawn → PNG written is "start to usable window" plus one grab. Baseline:
  a bare QMainWindow program doing the same grab. Median of 5 each.
- stalls: a 5 ms precise QTimer in the GUI thread records every tick; the
  largest gap minus the period is the longest the GUI thread was blocked.
  Measured while the real Deploy view deploys a signed farm module to the 3
  nodes of lab `benchcs` (connect, upload, verify, install), with the
  console monitoring those nodes; baseline: the same window idle.
- graphs: the main window on the Graphs tab, 8 nodes with five minutes of
  history, fed one watch line per node per second (the path `rampart watch`
  lines take: Console.take_line) for 20 s; process CPU time / wall time.
  Baseline: the same window idle before any data arrived (its own timers:
  dashboard, timeline, the scrolling graphs).

Qt runs offscreen in this process (the benchmarks run without a display).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.figures import Figure, failed, median
from node_service.demo import VENV_BIN, DemoError, LabDriver

NAME = "console"
LAB_NAME = "benchcs"
START_RUNS = 5
START_TIMEOUT_S = 60.0
START_LIMIT_S = 2.0
TICK_MS = 5
IDLE_S = 8.0
DEPLOY_TIMEOUT_S = 180.0
STALL_LIMIT_MS = 100.0
GRAPH_NODES = 8
GRAPH_S = 20.0
GRAPH_HISTORY_S = 299
GRAPH_LIMIT_PCT = 10.0

BARE_WINDOW = """
import sys
from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QApplication, QMainWindow
app = QApplication([sys.argv[0]])
w = QMainWindow()
w.resize(1280, 800)
w.show()
def shoot():
    w.grab().toImage().save(sys.argv[1], "PNG")
    app.quit()
QTimer.singleShot(0, shoot)
app.exec()
"""


def offscreen_env() -> dict[str, str]:
    return {**os.environ, "QT_QPA_PLATFORM": "offscreen", "XDG_RUNTIME_DIR": "/tmp"}


def time_to_png(argv: list[str], png: Path) -> float:
    """Seconds from spawning ``argv`` to ``png`` being written (its mtime)."""
    png.unlink(missing_ok=True)
    began = time.time()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=START_TIMEOUT_S,
                          env=offscreen_env(), check=False)  # fmt: skip
    if done.returncode != 0 or not png.exists():
        last = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        raise DemoError(f"`{' '.join(argv[:2])} ...` did not write {png.name}: {last}")
    return png.stat().st_mtime - began


def start_figure(site_file: str, work: Path) -> Figure:
    console = [str(VENV_BIN / "rampart-console"), "--site", site_file, "--after", "0",
               "--screenshot", str(work / "console.png")]  # fmt: skip
    bare = [sys.executable, "-c", BARE_WINDOW, str(work / "bare.png")]
    runs: list[float] = []
    bases: list[float] = []
    for _ in range(START_RUNS):  # interleaved, so machine load hits both alike
        bases.append(time_to_png(bare, work / "bare.png"))
        runs.append(time_to_png(console, work / "console.png"))
    return Figure(
        "console start to usable window", median(runs), "s", median(bases),
        "empty QMainWindow", START_LIMIT_S,
        detail=f"runs {fmt(runs)} s; baseline {fmt(bases)} s (Python + Qt start and one grab "
        "are in both)",
    )  # fmt: skip


def fmt(values: list[float], scale: float = 1.0) -> str:
    return ", ".join(f"{v * scale:.2f}" for v in values)


# -- in-process measurements (GUI thread) -------------------------------------


class StallMeter:
    """Records the GUI thread's longest gap between ticks of a precise timer."""

    def __init__(self) -> None:
        from PySide6.QtCore import Qt, QTimer

        self.gaps: list[float] = []
        self._last: float | None = None
        self.timer = QTimer()
        self.timer.setObjectName("bench-stall-meter")
        self.timer.setTimerType(Qt.TimerType.PreciseTimer)
        self.timer.setInterval(TICK_MS)
        self.timer.timeout.connect(self._tick)

    def _tick(self) -> None:
        now = time.monotonic()
        if self._last is not None:
            self.gaps.append(now - self._last)
        self._last = now

    def start(self) -> None:
        self.gaps, self._last = [], None
        self.timer.start()

    def stop(self) -> tuple[float, int]:
        """(longest block in ms beyond the timer's period, ticks)."""
        self.timer.stop()
        worst = max(self.gaps, default=0.0) * 1000 - TICK_MS
        return max(0.0, worst), len(self.gaps)


def spin(until: Callable[[], bool], timeout: float) -> bool:
    """Run the Qt event loop until ``until()`` or ``timeout`` seconds (bounded)."""
    from PySide6.QtCore import QCoreApplication, QEventLoop

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        QCoreApplication.processEvents(QEventLoop.ProcessEventsFlag.AllEvents, 20)
        if until():
            return True
        time.sleep(0.002)  # the loop's own pacing, not a synchronisation
    return until()


@contextmanager
def console_window(site: Any) -> Iterator[Any]:
    """The console's main window on ``site``, shown offscreen; closed however it ends."""
    from ui.console import Console
    from ui.main_window import MainWindow

    console = Console(site)
    window = MainWindow(console)
    window.show()
    try:
        yield window
    finally:
        window.stop_timers()
        console.close(15.0)
        window.deleteLater()
        spin(lambda: False, 0.2)


def farm_package(lab: LabDriver, work: Path) -> Path:
    """A farm module over the lab's 3 nodes, built and signed by the designer model."""
    from app.designer import DesignerModel

    dm = DesignerModel.from_template("farm")
    dm.set_field(("module", "name"), "benchweb")
    while len(dm.module.nodes) < len(lab.status["nodes"]):
        dm.add("node")
    for i, node in enumerate(lab.status["nodes"]):
        dm.set_field(("node", i, "name"), node["name"])
        for j, address in enumerate(node["addresses"]):
            if j >= len(dm.module.nodes[i].addresses):
                dm.add("address", at=i)
            dm.set_field(("node", i, "address", j), address)
    if not dm.valid:
        raise DemoError(f"the bench's farm module is not valid: {dm.first_problem()}")
    return Path(dm.build(work / "benchweb", lab.status["signing_key"], work / "benchweb.safe").path)


def stall_figure(lab: LabDriver, work: Path) -> Figure:
    from app.site import load

    package = farm_package(lab, work)
    site = load(lab.status["site_file"])
    meter = StallMeter()
    with console_window(site) as window:
        model = window.console.site_model
        window.console.start()
        if not spin(lambda: all(s.reachable for s in model.statuses().values()), 60.0):
            raise DemoError(f"lab {LAB_NAME}: the console did not reach every node in 60 s")
        window.show_tab("deploy")
        meter.start()
        spin(lambda: False, IDLE_S)
        idle_ms, idle_ticks = meter.stop()

        view = window.deploy
        view.package.setText(str(package))
        view.start_after.setChecked(False)
        meter.start()
        began = time.monotonic()
        deployment = view.deploy()
        finished = spin(lambda: deployment is not None and deployment.wait(0)
                        and view.deploy_button.isEnabled(), DEPLOY_TIMEOUT_S)  # fmt: skip
        took = time.monotonic() - began
        busy_ms, busy_ticks = meter.stop()
        if not finished or deployment is None:
            raise DemoError(f"deploy to {len(site.nodes)} nodes did not finish in "
                            f"{DEPLOY_TIMEOUT_S:g} s: {view.status.text()}")  # fmt: skip
        bad = [p.summary for p in deployment.all_progress().values() if not p.ok]
        if bad:
            raise DemoError("deploy failed: " + "; ".join(bad))
    return Figure(
        f"GUI thread blocked while deploying to {len(site.nodes)} nodes", busy_ms, "ms",
        idle_ms, "idle console", STALL_LIMIT_MS,
        detail=f"deploy took {took:.1f} s, {busy_ticks} ticks of a {TICK_MS} ms timer; "
        f"idle {IDLE_S:g} s, {idle_ticks} ticks",
    )  # fmt: skip


def graph_site(work: Path) -> Any:
    """A site of 8 nodes whose SSH nobody answers (the window is fed directly)."""
    from app.site import load

    lines = ["site: benchgraphs", "nodes:"]
    for n in range(1, GRAPH_NODES + 1):
        lines += [f"  - name: g-n{n}", f"    addresses: [198.51.100.{10 + n}, 203.0.113.{10 + n}]",
                  "    ssh: {host: 127.0.0.1, port: 9, user: root}"]  # fmt: skip
    path = work / "graphs-site.yaml"
    path.write_text("\n".join(lines) + "\n")
    return load(path)


def metrics_line(node: int, ts: float, k: int) -> dict[str, Any]:
    return {
        "type": "metrics", "ts": ts, "node": f"g-n{node}", "module": "web", "state": "PRIM",
        "metrics": {
            "bytes_per_s": 1e6 * (k % 9), "lag_bytes": 1e4 * (k % 7),
            "resync_remaining_bytes": 0,
            "heartbeat_rtt_seconds": {"198.51.100.1": 0.001 + (k % 5) * 1e-4,
                                      "203.0.113.1": 0.0012},
        },
    }  # fmt: skip


def cpu_share(seconds: float) -> float:
    """Percent of one core this process used while the event loop ran ``seconds``."""
    cpu0, wall0 = time.process_time(), time.monotonic()
    spin(lambda: False, seconds)
    return 100.0 * (time.process_time() - cpu0) / (time.monotonic() - wall0)


def graphs_figure(work: Path) -> Figure:
    site = graph_site(work)
    with console_window(site) as window:
        window.show_tab("graphs")
        take = window.console.take_line
        spin(lambda: False, 2.0)  # the window's first paint, not counted
        idle = cpu_share(GRAPH_S)
        now = time.time()
        for k in range(GRAPH_HISTORY_S):  # five minutes of history: steady-state curves
            for n in range(1, GRAPH_NODES + 1):
                take(f"g-n{n}", metrics_line(n, now - GRAPH_HISTORY_S + k, k))
        spin(lambda: False, 2.0)  # first draw of the 8 × 4 curves, not counted
        stop = threading.Event()

        def feed() -> None:
            k = GRAPH_HISTORY_S
            while not stop.wait(1.0):
                for n in range(1, GRAPH_NODES + 1):
                    take(f"g-n{n}", metrics_line(n, time.time(), k))
                k += 1

        feeder = threading.Thread(target=feed, name="bench-graphs-feed", daemon=True)
        feeder.start()
        try:
            busy = cpu_share(GRAPH_S)
        finally:
            stop.set()
            feeder.join(5)
        curves = sum(len(c) for c in window.graphs.curves.values())
    return Figure(
        f"live graphs, {GRAPH_NODES} nodes at 1 Hz", busy, "% of a core", idle,
        "idle console", GRAPH_LIMIT_PCT,
        detail=f"{GRAPH_S:g} s each, {curves} curves, {GRAPH_HISTORY_S} s of history per curve",
    )  # fmt: skip


def run() -> list[Figure]:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    os.environ.setdefault("XDG_RUNTIME_DIR", "/tmp")
    from PySide6.QtCore import qInstallMessageHandler
    from PySide6.QtWidgets import QApplication

    from ui.main import QUIET_QT_MESSAGES
    from ui.qtcheck import protect

    # As rampart-console does: paramiko's thread tracebacks and the offscreen
    # platform's notices are not results; our own errors are one line each.
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)
    qInstallMessageHandler(lambda _m, _c, text: None if text in QUIET_QT_MESSAGES else print(text))
    app = QApplication.instance() or QApplication(["rampart-bench"])
    ballast = protect(app)  # noqa: F841 (PySide6 6.12 reference guard, as the console has)
    figures: list[Figure] = []
    work = Path(tempfile.mkdtemp(prefix="rampart-bench-console-"))
    lab = LabDriver(LAB_NAME)
    try:
        figures.append(_guarded("console graphs", lambda: graphs_figure(work)))
        if lab.is_up():
            print(f"bench: lab {LAB_NAME} is up from an earlier run: taking it down first")
            lab.down()
        lab.rampart("lab", "up", "--name", LAB_NAME, "--nodes", "3")
        lab.refresh()
        site_file = str(lab.status["site_file"])
        figures.append(_guarded("console start", lambda: start_figure(site_file, work)))
        figures.append(_guarded("console stalls", lambda: stall_figure(lab, work)))
    finally:
        lab.down()
        shutil.rmtree(work, ignore_errors=True)
    return figures


def _guarded(name: str, measure: Callable[[], Figure]) -> Figure:
    """One figure; a measurement that cannot run is a failed figure with its reason."""
    try:
        return measure()
    except (DemoError, OSError, subprocess.TimeoutExpired) as exc:
        return failed(name, f"{name} could not be measured: {exc}")


if __name__ == "__main__":
    for figure in run():
        print(figure)
