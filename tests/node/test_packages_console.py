"""The console .deb: its contents, desktop entry and icon; in a clean host (see
test_packages.py): an offline install that starts the console, an upgrade to
a newer version, and a purge that leaves nothing behind."""

from __future__ import annotations

import configparser
import functools
import io
import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from defusedxml import ElementTree

from tests.console.conftest import site_text
from tests.node.test_packages import DPKG_TIMEOUT_S, CleanHost, build_deb, project_version

pytestmark = pytest.mark.node

DESKTOP = "/usr/share/applications/rampart-console.desktop"
ICON = "/usr/share/icons/hicolor/scalable/apps/rampart.svg"
LAUNCHER = "/usr/bin/rampart-console"
PREFIX = "/opt/rampart-console"
CARRIED = f"{PREFIX}/share/node"
ARCH = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                      check=True).stdout.strip()  # fmt: skip
CLOSED_PORT = 2222  # the clean host has only loopback, where nothing listens
START_TIMEOUT_S = 60
# What dpkg itself keeps about any package it installed and purged.
DPKG_BOOKKEEPING = ("/var/lib/dpkg/", "/var/log/dpkg.log", "/var/log/alternatives.log")
SHARED_CACHES = ("/usr/share/applications/mimeinfo.cache",
                 "/usr/share/icons/hicolor/icon-theme.cache")  # fmt: skip
BEFORE: set[str] = set()  # the host's changes before the first install


@pytest.fixture(scope="module")
def debs() -> dict[str, Path]:
    version = project_version()
    return {"v1": build_deb("console", f"{version}-1"), "v2": build_deb("console", f"{version}-2")}


@pytest.fixture(scope="module")
def deb(debs) -> Path:
    return debs["v1"]


@functools.cache
def files_of(deb: Path) -> dict[str, tarfile.TarInfo | bytes]:
    """name -> TarInfo, and name + ':data' -> bytes for the few files read."""
    tar_bytes = subprocess.run(
        ["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True, timeout=120
    ).stdout
    found: dict = {}
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        for member in tar:
            name = member.name.removeprefix(".")
            found[name] = member
            if name in (DESKTOP, ICON):
                found[name + ":data"] = tar.extractfile(member).read()
    return found


@pytest.fixture(scope="module")
def files(deb) -> dict[str, tarfile.TarInfo | bytes]:
    return files_of(deb)


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
    wheels = [Path(n).name.lower() for n in files if n.startswith(f"{PREFIX}/wheels/")]
    for name in ("rampart-", "pyside6_essentials-", "pyqtgraph-", "paramiko-", "keyring-"):
        assert any(w.startswith(name) and w.endswith(".whl") for w in wheels), name
    launcher = files[LAUNCHER]
    assert launcher.issym()
    assert launcher.linkname == f"{PREFIX}/venv/bin/rampart-console"
    # resources/ rides in the rampart wheel (venv/share/rampart/resources), not beside it.
    assert not any(n.startswith(f"{PREFIX}/resources") for n in files)
    # Offline bootstrap of nodes: the node package of the same version rides along.
    assert f"{CARRIED}/rampart_{project_version()}-1_{ARCH}.deb" in files


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


# The steps below share one clean host and run in order: install, upgrade, purge.


def carried_node_debs(host: CleanHost) -> list[str]:
    return sorted(p.name for p in host.path(CARRIED).iterdir())


def test_installs_offline_and_the_console_starts_with_its_theme(host, debs):
    assert not os.path.lexists(host.path(PREFIX))
    BEFORE.update(host.changes())
    host.run("dpkg", "-i", host.copy_in(debs["v1"]), timeout=DPKG_TIMEOUT_S)

    assert "--site" in host.run("rampart-console", "--help").stdout
    for path in (DESKTOP, ICON):
        assert host.path(path).read_bytes() == files_of(debs["v1"])[path + ":data"]
    assert carried_node_debs(host) == [f"rampart_{project_version()}-1_{ARCH}.deb"]
    # The real console, offscreen, from the package's venv: the theme must be
    # found in venv/share/rampart/resources (from the wheel).
    host.path("/tmp/site.yaml").write_text(site_text(CLOSED_PORT, nodes=1))
    shot = host.run(
        "rampart-console", "--site", "/tmp/site.yaml", "--screenshot", "/tmp/window.png",
        "--after", "0.5", env={"QT_QPA_PLATFORM": "offscreen", "XDG_RUNTIME_DIR": "/tmp"},
        timeout=START_TIMEOUT_S,
    )  # fmt: skip
    assert shot.stdout.strip() == "/tmp/window.png"
    assert "theme" not in shot.stderr, shot.stderr
    assert host.path("/tmp/window.png").read_bytes().startswith(b"\x89PNG")
    theme = f"{PREFIX}/venv/share/rampart/resources/theme/console.qss"
    assert host.path(theme).is_file()


def test_upgrade_replaces_the_venv_and_the_carried_node_package(host, debs):
    marker = host.path(f"{PREFIX}/venv/rt-old-venv")
    marker.write_text("from the first install\n")
    host.run("dpkg", "-i", host.copy_in(debs["v2"]), timeout=DPKG_TIMEOUT_S)

    version = host.run("dpkg-query", "-W", "-f=${Version}", "rampart-console").stdout
    assert version == f"{project_version()}-2"
    assert not os.path.lexists(marker)  # postinst rebuilt the venv (--clear)
    assert carried_node_debs(host) == [f"rampart_{project_version()}-2_{ARCH}.deb"]
    qt = host.run(
        f"{PREFIX}/venv/bin/python", "-c",
        "from PySide6.QtWidgets import QApplication; "
        "from node_service.resources import resources_dir; "
        "app = QApplication(['rampart-console']); "
        "print(app.platformName(), (resources_dir() / 'theme/console.qss').is_file())",
        env={"QT_QPA_PLATFORM": "offscreen"},
    )  # fmt: skip
    assert qt.stdout.split() == ["offscreen", "True"]
    assert host.path(DESKTOP).is_file() and host.path(ICON).is_file()


def test_purge_leaves_nothing_behind(host):
    host.run("dpkg", "--purge", "rampart-console", timeout=DPKG_TIMEOUT_S)
    for gone in (PREFIX, "/usr/bin/rampart-console", DESKTOP, ICON):
        assert not os.path.lexists(host.path(gone)), gone
    # Everything the three steps changed on the host, minus dpkg's own records
    # and the machine's directories the overlay copied up to hold new files.
    left = sorted(
        path for path in host.changes() - BEFORE
        if not path.startswith(DPKG_BOOKKEEPING)
        and not (host.path(path).is_dir() and Path(path).is_dir())
    )  # fmt: skip
    # The desktop's shared caches, rebuilt by dpkg triggers (desktop-file-utils,
    # the icon theme): they may stay, without a trace of the console.
    for cache in SHARED_CACHES:
        if cache in left:
            left.remove(cache)
            assert b"rampart" not in host.path(cache).read_bytes(), cache
    assert left == []
