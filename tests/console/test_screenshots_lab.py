"""Screenshots of every console window, on a live lab, under a real X server (Xvfb).

`rampart-console --site <lab site file> --screenshot-all DIR` runs as a user
would start it, with DISPLAY pointing at an Xvfb this test starts on a free
display (Xvfb picks it: -displayfd) and always kills. The lab runs a mirror
module so the dashboard, graphs, timeline and logs have something to show.
Every PNG must be a real picture (window-sized, many colours); they are kept
under out/test-artifacts/console/ (git-ignored) and their paths printed.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from PySide6.QtGui import QImage

from app.designer import DesignerModel
from node_service.demo import LabDriver
from tests.console.conftest import distinct_colours
from tests.node.conftest import lab_running
from ui.main_window import TAB_NAMES

pytestmark = [pytest.mark.node, pytest.mark.console]

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "out" / "test-artifacts" / "console"
XVFB_READY_S = 10.0
RUN_TIMEOUT_S = 90
MIN_WIDTH, MIN_HEIGHT = 800, 500  # the window opens at 1280x800


def console_command() -> list[str]:
    script = Path(sys.executable).with_name("rampart-console")
    return [str(script)] if script.exists() else [sys.executable, "-m", "ui.main"]


@pytest.fixture
def xvfb() -> Iterator[str]:
    """A private X server on a display nobody uses; yields ":N"."""
    binary = shutil.which("Xvfb")
    assert binary, "Xvfb is missing (Makefile APT_PACKAGES has xvfb)"
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen(
        [binary, "-displayfd", str(write_fd), "-screen", "0", "1280x1024x24", "-nolisten", "tcp"],
        pass_fds=(write_fd,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    os.close(write_fd)
    try:
        # Xvfb writes the display number once it accepts clients (bounded wait).
        with os.fdopen(read_fd, "rb") as pipe:
            ready, _, _ = select.select([pipe], [], [], XVFB_READY_S)
            number = pipe.readline().decode().strip() if ready else ""
        assert number.isdigit(), f"Xvfb did not start within {XVFB_READY_S:g} s"
        yield f":{number}"
    finally:
        proc.kill()
        proc.wait(10)


@pytest.fixture(scope="module")
def live_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A 2-node lab with the mirror template installed and serving."""
    with lab_running(2) as status:
        work = tmp_path_factory.mktemp("shots")
        dm = DesignerModel.from_template("mirror")
        dm.set_field(("module", "name"), "web")
        for i, node in enumerate(status["nodes"]):
            dm.set_field(("node", i, "name"), node["name"])
        src = dm.save(work / "web")
        driver = LabDriver(status["name"])
        driver.status = status
        driver.install(src, work)
        driver.roles()
        yield status


def test_every_window_under_xvfb_is_a_real_picture(live_lab: dict, xvfb: str) -> None:
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k not in ("QT_QPA_PLATFORM", "WAYLAND_DISPLAY")}
    env["DISPLAY"] = xvfb
    done = subprocess.run(
        [*console_command(), "--site", live_lab["site_file"],
         "--screenshot-all", str(ARTIFACTS), "--after", "4"],
        capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    printed = done.stdout.split()
    assert printed == [str(ARTIFACTS / f"{name}.png") for name in TAB_NAMES]
    for path in printed:
        image = QImage(path)
        assert not image.isNull(), f"{path}: not a PNG"
        assert image.width() >= MIN_WIDTH and image.height() >= MIN_HEIGHT, (
            f"{path}: {image.width()}x{image.height()}"
        )
        assert distinct_colours(image) > 3, f"{path}: blank"
        print(f"screenshot: {path}")
