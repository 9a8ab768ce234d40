"""The main window and `rampart-console` itself: tabs, screenshots, bad site files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PySide6.QtGui import QImage
from PySide6.QtWidgets import QMessageBox

from tests.console.conftest import distinct_colours, free_port, site_text
from ui import main as console_main
from ui.console import Console
from ui.main_window import TAB_NAMES, MainWindow

pytestmark = pytest.mark.console

RUN_TIMEOUT_S = 60


def console_command() -> list[str]:
    script = Path(sys.executable).with_name("rampart-console")
    return [str(script)] if script.exists() else [sys.executable, "-m", "ui.main"]


def lab_like_site(tmp_path: Path) -> Path:
    """A site file shaped like the lab's, whose nodes do not answer (closed loopback port)."""
    extra = (
        f"known_hosts: {tmp_path}/known_hosts\n"
        f"signing_key: {tmp_path}/signing.key\ntrust_pub: {tmp_path}/signing.pub\n"
    )
    path = tmp_path / "lab-site.yaml"
    path.write_text(site_text(free_port(), nodes=2, extra=extra))
    return path


def run_console(*args: str, env: dict[str, str] | None = None, wrapper: tuple[str, ...] = ()):
    return subprocess.run(
        [*wrapper, *console_command(), *args],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        env=env,
    )


def offscreen_env() -> dict[str, str]:
    return {**os.environ, "QT_QPA_PLATFORM": "offscreen"}


@pytest.fixture
def window(qtbot, site, workers):
    console = Console(site, workers=workers)
    w = MainWindow(console)
    qtbot.addWidget(w)
    w.show()
    try:
        yield w
    finally:
        w.close()
        assert console.close() == []


def test_window_comes_up_with_unreachable_nodes(qtbot, window):
    window.console.start()
    view = window.site_view
    for node in ("lab-n1", "lab-n2"):
        qtbot.waitUntil(
            lambda n=node: view.cell_text(n, "Reachable") == "unreachable", timeout=10000
        )
    qtbot.waitUntil(lambda: window.reachability.text().startswith("0 reachable, 2"), timeout=3000)


def test_every_tab_renders_a_non_blank_screenshot(window):
    images = window.grab_tabs()
    assert list(images) == list(TAB_NAMES)
    for name, image in images.items():
        assert image.width() >= 800 and image.height() >= 600, name
        assert distinct_colours(image) > 3, f"tab {name} looks blank"


def test_watch_lines_reach_graphs_timeline_and_logs(qtbot, window):
    ts = 1_700_000_000.0
    console = window.console
    console.take_line(
        "lab-n1",
        {
            "type": "state",
            "ts": ts,
            "node": "lab-n1",
            "module": "web",
            "state": {"state": "PRIM"},
            "reason": "current state",
        },
    )
    console.take_line(
        "lab-n1",
        {
            "type": "metrics",
            "ts": ts,
            "node": "lab-n1",
            "module": "web",
            "state": "PRIM",
            "metrics": {"bytes_per_s": 1e6},
        },
    )
    entry = {
        "ts": ts,
        "node": "lab-n1",
        "module": "web",
        "kind": "command",
        "severity": "info",
        "message": "swap requested by root",
    }
    console.take_line(
        "lab-n1", {"type": "event", "ts": ts, "node": "lab-n1", "module": "web", "entry": entry}
    )
    qtbot.waitUntil(lambda: window.timeline.nodes == ("lab-n1",), timeout=3000)
    qtbot.waitUntil(lambda: "web@lab-n1" in window.graphs.curves["throughput"], timeout=3000)
    shown = lambda: [e.message for e in window.logs.shown()]  # noqa: E731
    qtbot.waitUntil(lambda: shown() == [entry["message"]], timeout=3000)


# Builds the main window in a fresh interpreter (nothing imported yet), as
# rampart-console does, then reports what was imported, built and drawn.
LATE_TABS_SCRIPT = """
import sys, time
from PySide6.QtWidgets import QApplication
from app.site import load
from ui.console import Console
from ui.main_window import MainWindow
app = QApplication([])
console = Console(load(sys.argv[1]))
window = MainWindow(console)
window.show()
app.processEvents()
print("up", "pyqtgraph" in sys.modules, ",".join(window.built()))
ts = time.time()
for k in range(3):
    console.take_line("lab-n1", {"type": "metrics", "ts": ts - 2 + k, "node": "lab-n1",
                                 "module": "web", "metrics": {"bytes_per_s": 1e6 * (k + 1)}})
task = window.prefetch()
print("prefetched", task.wait(60), task.error is None, "pyqtgraph" in sys.modules)
window.tabs.setCurrentIndex(4)
xs, ys = window.graphs.curves["throughput"]["web@lab-n1"].getData()
print("graphs", ",".join(window.built()), ",".join(f"{y:g}" for y in ys))
window.stop_timers()
print("closed", console.close() == [])
"""


def test_window_comes_up_without_pyqtgraph_and_builds_graphs_on_first_show(tmp_path: Path):
    done = subprocess.run(
        [sys.executable, "-c", LATE_TABS_SCRIPT, str(lab_like_site(tmp_path))],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        env=offscreen_env(),
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "up False site,dashboard,deploy,logs",
        "prefetched True True True",
        "graphs site,dashboard,deploy,graphs,logs 1,2,3",
        "closed True",
    ], done.stderr


def test_late_tabs_are_built_on_first_show_with_what_was_buffered(qtbot, window):
    assert window.built() == ("site", "dashboard", "deploy", "logs")
    ts = time.time()
    console = window.console
    console.take_line("lab-n1", {"type": "state", "ts": ts - 5, "node": "lab-n1",
                                 "module": "web", "state": {"state": "PRIM"}})  # fmt: skip
    for k in range(4):
        line = {"type": "metrics", "ts": ts - 4 + k, "node": "lab-n1", "module": "web",
                "metrics": {"bytes_per_s": 1e6 * k}}  # fmt: skip
        console.take_line("lab-n1", line)
    window.tabs.setCurrentIndex(TAB_NAMES.index("graphs"))  # as a click on the tab does
    assert "graphs" in window.built() and window.tabs.currentWidget().isAncestorOf(window.graphs)
    _xs, ys = window.graphs.curves["throughput"]["web@lab-n1"].getData()
    assert list(ys) == [0.0, 1.0, 2.0, 3.0]
    assert window.show_tab("timeline") is window.timeline
    assert window.timeline.nodes == ("lab-n1",)
    assert window.timeline.rows["lab-n1"][-1].state == "PRIM"
    assert window.show_tab("designer") is window.designer
    assert window.built() == TAB_NAMES


def test_screenshot_under_offscreen_exits_zero_with_a_non_blank_png(tmp_path: Path):
    out = tmp_path / "out.png"
    done = run_console(
        "--site",
        str(lab_like_site(tmp_path)),
        "--screenshot",
        str(out),
        "--after",
        "1",
        env=offscreen_env(),
    )
    assert done.returncode == 0, done.stderr
    image = QImage(str(out))
    assert not image.isNull() and distinct_colours(image) > 3
    assert "Traceback" not in done.stderr


def test_screenshot_under_xvfb(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if k not in ("QT_QPA_PLATFORM", "DISPLAY")}
    out = tmp_path / "xvfb.png"
    xvfb = shutil.which("xvfb-run")
    assert xvfb, "xvfb-run is missing (Makefile APT_PACKAGES has xvfb)"
    done = run_console(
        "--site",
        str(lab_like_site(tmp_path)),
        "--screenshot",
        str(out),
        "--after",
        "1",
        env=env,
        wrapper=(xvfb, "-a"),
    )
    assert done.returncode == 0, done.stderr
    assert distinct_colours(QImage(str(out))) > 3


def test_screenshot_all_writes_one_png_per_tab(tmp_path: Path):
    shots = tmp_path / "shots"
    done = run_console(
        "--site",
        str(lab_like_site(tmp_path)),
        "--screenshot-all",
        str(shots),
        "--after",
        "0.5",
        env=offscreen_env(),
    )
    assert done.returncode == 0, done.stderr
    printed = done.stdout.split()
    assert printed == [str(shots / f"{name}.png") for name in TAB_NAMES]
    for path in printed:
        assert distinct_colours(QImage(path)) > 3, path


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("site: lab\nnodes: [\n", "not valid YAML"),
        ("site: lab\nnodes:\n  - name: n1\n    addresses: [nope]\n", "is not an IP address"),
        ("site: lab\nnodes: []\npassword: hunter2\n", "keyring"),
        (None, "no such site file"),
    ],
)
def test_bad_site_file_is_one_clear_line_and_a_non_zero_exit(tmp_path: Path, content, expected):
    path = tmp_path / "site.yaml"
    if content is not None:
        path.write_text(content)
    done = run_console(
        "--site", str(path), "--screenshot", str(tmp_path / "x.png"), env=offscreen_env()
    )
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rampart-console: "), done.stderr
    assert expected in lines[0]
    assert not (tmp_path / "x.png").exists()


def test_bad_site_file_in_the_gui_is_a_dialog(qtbot, tmp_path: Path, monkeypatch):
    shown: list[str] = []
    monkeypatch.setattr(QMessageBox, "critical", lambda _parent, _title, text: shown.append(text))
    path = tmp_path / "site.yaml"
    path.write_bytes(b"\xff\xfe garbage")
    assert console_main.main(["--site", str(path)]) == console_main.EXIT_BAD_SITE
    assert len(shown) == 1 and "not UTF-8" in shown[0]


def test_unwritable_screenshot_path_is_one_line_and_exit_one(tmp_path: Path):
    target = tmp_path / "taken.png"
    target.mkdir()  # a directory where the PNG should go
    done = run_console("--site", str(lab_like_site(tmp_path)), "--screenshot", str(target),
                       "--after", "0.2", env=offscreen_env())  # fmt: skip
    assert done.returncode == 1
    assert f"rampart-console: cannot write screenshot {target}" in done.stderr
    assert "Traceback" not in done.stderr
