"""`make demo`'s console step (node_service.demo.show_console), with and without a display."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from PySide6.QtGui import QImage

from node_service import demo
from tests.console.conftest import distinct_colours, free_port, site_text
from tests.console.test_screenshots_lab import xvfb  # noqa: F401 (fixture)
from ui.main_window import TAB_NAMES

pytestmark = pytest.mark.console


LOG = Path("out/demo/console.log")  # relative: the fixture runs the demo in tmp_path


class FakeLab:
    """What show_console reads of a LabDriver: the lab's status (its site file)."""

    def __init__(self, site_file: Path) -> None:
        self.status = {"site_file": str(site_file)}


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeLab:
    # The demo writes under ./out/demo: run it in a scratch directory.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out" / "demo").mkdir(parents=True)
    site = tmp_path / "site.yaml"
    site.write_text(site_text(free_port()))  # nodes on a closed loopback port
    return FakeLab(site)


def test_without_a_display_each_window_is_captured_under_xvfb(lab, monkeypatch, capsys):
    for name in ("DISPLAY", "WAYLAND_DISPLAY"):
        monkeypatch.delenv(name, raising=False)
    demo.show_console(lab, after_s=1)
    out = capsys.readouterr().out
    assert "captured under Xvfb" in out, out
    shots = [Path(line.strip()) for line in out.splitlines() if line.strip().endswith(".png")]
    assert [p.name for p in shots] == [f"{name}.png" for name in TAB_NAMES]
    for path in shots:
        assert distinct_colours(QImage(str(path))) > 3, path


def test_a_failing_console_is_one_line_and_the_demo_goes_on(lab, monkeypatch, capsys):
    for name in ("DISPLAY", "WAYLAND_DISPLAY"):
        monkeypatch.delenv(name, raising=False)
    Path(lab.status["site_file"]).write_text("site: lab\nnodes: [\n")  # corrupted
    demo.show_console(lab, after_s=0.5)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("console: screenshots under Xvfb failed:")
    assert "not valid YAML" in lines[0]


def test_with_a_display_the_console_opens_detached(lab, xvfb, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setenv("DISPLAY", xvfb)
    monkeypatch.delenv("QT_QPA_PLATFORM", raising=False)
    demo.show_console(lab)
    out = capsys.readouterr().out
    assert out.startswith("console: opened on site"), out
    pid = int(out.split("(pid ", 1)[1].split(",", 1)[0])
    try:
        # Still running a while later: a window, not a one-line failure (a
        # console that exits shows up as a reaped child with its status).
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            assert done == 0, f"console exited ({status}): {LOG.read_text()}"
            time.sleep(0.2)
    finally:
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and os.waitpid(pid, os.WNOHANG)[0] == 0:
            time.sleep(0.1)
