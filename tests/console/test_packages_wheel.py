"""The rampart wheel alone is a working console: what `pipx install rampart[console]` gets.

A fresh venv gets the wheel (built from a copy of the sources, as the .deb
build does) and the console's dependencies, offline (`--no-index`, from the
wheels the console .deb build caches), with no pip configuration. Then,
from a directory outside the checkout so nothing can be found beside the
sources, the console starts offscreen and grabs its window, and the CLI
makes a module from a template: both only work if resources/ (theme, icons,
templates) came with the wheel.
"""

from __future__ import annotations

import importlib.util
import os
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.console.conftest import free_port, site_text

pytestmark = pytest.mark.console

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / "build" / "deb-test" / "cache"  # shared with the console .deb tests
INSTALL_TIMEOUT_S = 300
START_TIMEOUT_S = 60


def load_build():
    path = REPO / "installers" / "deb" / "build.py"
    spec = importlib.util.spec_from_file_location("rampart_deb_build", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def clean_env(**extra: str) -> dict[str, str]:
    """No PYTHONPATH, no pip configuration: only what the venv itself has."""
    return {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": "C.UTF-8",
        "PIP_CONFIG_FILE": "/dev/null",
        **extra,
    }


@pytest.fixture(scope="module")
def venv() -> Iterator[Path]:
    build = load_build()
    with tempfile.TemporaryDirectory(prefix="rt-wheel-") as tmp:
        base = Path(tmp)
        (base / "wheel").mkdir()
        wheel = build.build_rampart_wheel(base / "wheel" / "dist")
        deps = build.dependency_wheels(build.PACKAGES["console"].extras, CACHE)
        target = base / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(target)], check=True, timeout=120,
                       env=clean_env())  # fmt: skip
        done = subprocess.run(
            [str(target / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-index",
             "--no-compile", "--disable-pip-version-check", "--find-links", str(wheel.parent),
             "--find-links", str(deps), "rampart[console]"],
            capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, check=False, env=clean_env(),
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        yield target


def test_wheel_installs_resources_where_the_code_looks(venv):
    resources = venv / "share" / "rampart" / "resources"
    for name in ("theme/console.qss", "icons/rampart.svg", "templates/mirror/userconfig.xml"):
        assert (resources / name).is_file(), name
    script = resources / "templates" / "mirror" / "bin" / "start_prim"
    assert script.stat().st_mode & stat.S_IXUSR  # template scripts stay executable
    found = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "from node_service.resources import resources_dir; print(resources_dir())"],
        capture_output=True, text=True, timeout=60, check=True, cwd=venv, env=clean_env(),
    ).stdout.strip()  # fmt: skip
    assert Path(found) == resources


def test_console_from_the_wheel_starts_offscreen_with_its_theme(venv, tmp_path):
    site = tmp_path / "site.yaml"
    site.write_text(site_text(free_port(), nodes=1))
    shot = tmp_path / "window.png"
    done = subprocess.run(
        [str(venv / "bin" / "rampart-console"), "--site", str(site), "--screenshot", str(shot),
         "--after", "0.5"],
        capture_output=True, text=True, timeout=START_TIMEOUT_S, check=False, cwd=tmp_path,
        env=clean_env(QT_QPA_PLATFORM="offscreen", XDG_RUNTIME_DIR=str(tmp_path)),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(shot)
    assert shot.read_bytes().startswith(b"\x89PNG")
    # ui.theme warns "theme PATH not loaded" when resources/ is missing.
    assert "theme" not in done.stderr, done.stderr


def test_cli_from_the_wheel_makes_a_module_from_a_template(venv, tmp_path):
    out = tmp_path / "web"
    done = subprocess.run(
        [str(venv / "bin" / "rampart"), "module", "new", "web", "--template", "mirror",
         "--out", str(out), "--node", "n1=198.51.100.11", "--node", "n2=198.51.100.12",
         "--vip", "198.51.100.200", "--dir", "/srv/web"],
        capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path, env=clean_env(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (out / "userconfig.xml").is_file()
    assert os.access(out / "bin" / "start_prim", os.X_OK)
