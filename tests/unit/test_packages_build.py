"""installers/deb/build.py: the pure layout decisions and its one-line refusals."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from node_service.errors import UserError

REPO = Path(__file__).resolve().parents[2]
BUILD_PY = REPO / "installers" / "deb" / "build.py"


def load_build():
    spec = importlib.util.spec_from_file_location("rampart_deb_build", BUILD_PY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


build = load_build()


@pytest.mark.parametrize("version", ["0.1.0-1", "0.1.0", "1.2.3+git5-2", "0.1~rc1-1"])
def test_debian_versions_accepted(version):
    assert build.check_deb_version(version) == version


@pytest.mark.parametrize("version", ["v1", "", "0.1.0-", "0.1 -1", "0.1.0-1-2", "1_0"])
def test_bad_debian_versions_refused_with_what_is_expected(version):
    with pytest.raises(UserError, match=r"expected e\.g\. 0\.1\.0-1"):
        build.check_deb_version(version)


def test_python_is_pinned_to_the_wheels_minor_version():
    assert build.python_depends(3, 11) == "python3 (>= 3.11), python3 (<< 3.12)"


def test_control_is_a_dpkg_paragraph_with_folded_description():
    text = build.control_text(build.PACKAGES["node"], "0.1.0-2", "amd64", 1234, "python3")
    fields = dict(line.split(": ", 1) for line in text.splitlines() if not line.startswith(" "))
    assert fields["Package"] == "rampart"
    assert fields["Version"] == "0.1.0-2"
    assert fields["Installed-Size"] == "1234"
    assert fields["Depends"].startswith("python3, python3-venv, fuse3, nftables")
    continuation = [line for line in text.splitlines() if line.startswith(" ")]
    assert continuation and all(line.strip() for line in continuation)
    assert text.endswith("\n")


def test_wheel_cache_key_ignores_order_but_not_pins_or_python():
    key = build.wheel_cache_key(["a>=1", "b"], ["a==1.0", "b==2.0"], "cp311-x86_64")
    assert key == build.wheel_cache_key(["b", "a>=1"], ["b==2.0", "a==1.0"], "cp311-x86_64")
    assert key != build.wheel_cache_key(["a>=1", "b"], ["a==1.1", "b==2.0"], "cp311-x86_64")
    assert key != build.wheel_cache_key(["a>=1", "b"], ["a==1.0", "b==2.0"], "cp312-x86_64")


def test_deb_filename_escapes_an_epoch():
    assert build.deb_filename(build.PACKAGES["console"], "1:0.2-1", "amd64") == (
        "rampart-console_1%3a0.2-1_amd64.deb"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["node", "--version", "v2"], "build.py: --version 'v2': not a Debian version"),
        (["server"], "build.py: unknown package 'server'; expected node or console"),
    ],
)
def test_cli_refuses_bad_input_in_one_line(args, message, tmp_path):
    done = subprocess.run(
        [sys.executable, str(BUILD_PY), *args, "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.startswith(message) and len(done.stderr.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # refused before anything was built


def test_every_resource_file_goes_into_the_wheel_at_its_place():
    """pyproject's data-files must carry all of resources/ to share/rampart/resources/."""
    with (REPO / "pyproject.toml").open("rb") as f:
        data_files = tomllib.load(f)["tool"]["setuptools"]["data-files"]
    placed = {}
    for dest, patterns in data_files.items():
        for pattern in patterns:
            for path in REPO.glob(pattern):
                if path.is_file():
                    placed[path.relative_to(REPO).as_posix()] = dest
    shipped = {
        p.relative_to(REPO).as_posix()
        for p in (REPO / "resources").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert sorted(shipped - placed.keys()) == []  # a new file or directory needs an entry
    for source, dest in placed.items():
        assert dest == "share/rampart/" + source.rsplit("/", 1)[0], source
