"""The console .deb: its contents, desktop entry and icon; an offline install
into a clean host (see test_packages.py) that starts Qt; then purge."""

from __future__ import annotations

import configparser
import io
import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from defusedxml import ElementTree

from tests.node.test_packages import DPKG_TIMEOUT_S, CleanHost, build_deb, project_version

pytestmark = pytest.mark.node

DESKTOP = "./usr/share/applications/rampart-console.desktop"
ICON = "./usr/share/icons/hicolor/scalable/apps/rampart.svg"
LAUNCHER = "./usr/bin/rampart-console"


@pytest.fixture(scope="module")
def deb() -> Path:
    return build_deb("console", f"{project_version()}-1")


@pytest.fixture(scope="module")
def files(deb) -> dict[str, tarfile.TarInfo | bytes]:
    """name -> TarInfo, and name + ':data' -> bytes for the few files read."""
    tar_bytes = subprocess.run(
        ["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True, timeout=120
    ).stdout
    found: dict = {}
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        for member in tar:
            found[member.name] = member
            if member.name in (DESKTOP, ICON):
                found[member.name + ":data"] = tar.extractfile(member).read()
    return found


@pytest.fixture(scope="module")
def host() -> Iterator[CleanHost]:
    clean = CleanHost()
    try:
        clean.open()
        yield clean
    finally:
        clean.close()


def control(deb: Path) -> dict[str, str]:
    text = subprocess.run(
        ["dpkg-deb", "--field", str(deb)], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    fields, key = {}, None
    for line in text.splitlines():
        if line.startswith(" ") and key:
            fields[key] += "\n" + line.strip()
        else:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def test_control_names_the_package_and_its_runtime(deb):
    fields = control(deb)
    assert fields["Package"] == "rampart-console"
    assert fields["Version"] == f"{project_version()}-1"
    depends = fields["Depends"]
    for needed in ("python3 (>= 3.11)", "python3-venv", "openssh-client", "libxcb-cursor0"):
        assert needed in depends


def test_carries_the_console_wheels_and_a_launcher(files):
    wheels = [Path(n).name.lower() for n in files if n.startswith("./opt/rampart-console/wheels/")]
    for name in ("rampart-", "pyside6_essentials-", "pyqtgraph-", "paramiko-", "keyring-"):
        assert any(w.startswith(name) and w.endswith(".whl") for w in wheels), name
    launcher = files[LAUNCHER]
    assert launcher.issym()
    assert launcher.linkname == "/opt/rampart-console/venv/bin/rampart-console"
    assert "./opt/rampart-console/resources/theme/console.qss" in files
    # Offline bootstrap of nodes: the node package of the same version rides along.
    node = f"./opt/rampart-console/share/node/rampart_{project_version()}-1_"
    assert any(n.startswith(node) and n.endswith(".deb") for n in files)


def test_desktop_entry_is_valid_and_points_at_the_launcher_and_icon(files, tmp_path):
    data = files[DESKTOP + ":data"]
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # keys are case-sensitive
    parser.read_string(data.decode("utf-8"))
    entry = parser["Desktop Entry"]
    assert entry["Type"] == "Application"
    assert entry["Name"] and entry["Comment"]
    assert entry["Exec"].split()[0] == Path(LAUNCHER).name
    assert entry["Icon"] == Path(ICON).stem
    assert entry["Categories"].endswith(";") and "System" in entry["Categories"].split(";")
    assert entry["Terminal"] == "false"
    if shutil.which("desktop-file-validate"):
        path = tmp_path / "rampart-console.desktop"
        path.write_bytes(data)
        checked = subprocess.run(
            ["desktop-file-validate", str(path)], capture_output=True, text=True, timeout=30
        )
        assert checked.returncode == 0 and not checked.stdout.strip(), checked.stdout


def test_icon_is_a_square_svg(files):
    root = ElementTree.fromstring(files[ICON + ":data"])
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    _, _, width, height = (float(v) for v in root.attrib["viewBox"].split())
    assert width == height > 0


def test_installs_offline_starts_qt_and_purges(host, deb):
    assert not os.path.lexists(host.path("/opt/rampart-console"))
    host.run("dpkg", "-i", host.copy_in(deb), timeout=DPKG_TIMEOUT_S)
    usage = host.run("rampart-console", "--help").stdout
    assert "--site" in usage
    # The Qt libraries the package depends on are enough for a QApplication.
    qt = host.run(
        "/opt/rampart-console/venv/bin/python", "-c",
        "from PySide6.QtWidgets import QApplication; "
        "app = QApplication(['rampart-console']); print(app.platformName())",
        env={"QT_QPA_PLATFORM": "offscreen"},
    )  # fmt: skip
    assert qt.stdout.strip() == "offscreen"

    host.run("dpkg", "--purge", "rampart-console", timeout=DPKG_TIMEOUT_S)
    for gone in ("/opt/rampart-console", "/usr/bin/rampart-console", DESKTOP.lstrip(".")):
        assert not os.path.lexists(host.path(gone)), gone
