"""Build the Rampart .deb packages: `rampart` (node) and `rampart-console`.

    python installers/deb/build.py [node] [console] [--version 0.1.0-2] [--out DIR]

Each package carries the wheels of rampart and of its dependencies, and its
postinst builds a venv under /opt from them with `pip install --no-index`:
the install needs no network, and the venv is made at its final path by the
target's own python3 (venvs cannot be moved, so a prebuilt one would tie the
build machine's paths to the package). Wheels are built for this Python
(CPython X.Y, this architecture), so the package depends on python3 X.Y and
must be built on the Debian release and architecture it is installed on.

Dependency wheels are pinned to the versions installed in the build venv (the
ones the tests ran against) and cached under the output directory, keyed by
those pins, so a rebuild only rebuilds the rampart wheel and the archive.
The layout decisions (paths, control fields) are plain functions at the top;
the side effects (pip, copying, dpkg-deb) follow.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script: make node_service importable
    sys.path.insert(0, str(REPO))

from node_service.errors import RampartError, UserError  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = REPO / "build" / "deb"
# Debian policy: digits first, then alphanumerics and . + ~ - (the last '-'
# separates the Debian revision).
_DEB_VERSION = re.compile(r"^[0-9][A-Za-z0-9.+~]*(-[A-Za-z0-9.+~]+)?$")
# resources/ goes into the wheel as data files (pyproject [tool.setuptools.data-files]):
# the venv gets it at share/rampart/resources, where node_service.resources looks.
_SOURCE_PARTS = ("pyproject.toml", "README.md", "node_service", "app", "ui", "resources")
_IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
# Qt's platform plugin (xcb) dlopens these; PySide6's wheel does not carry them.
_QT_LIBS = (
    "libegl1, libgl1, libfontconfig1, libdbus-1-3, libxkbcommon0, libxkbcommon-x11-0, "
    "libxcb-cursor0, libxcb-icccm4, libxcb-image0, libxcb-keysyms1, libxcb-randr0, "
    "libxcb-render-util0, libxcb-shape0, libxcb-xinerama0, libxcb-xkb1, libxcb-xfixes0"
)


class PackageBuildError(RampartError):
    """A step of the package build failed (pip, dpkg-deb, a missing file)."""


@dataclass(frozen=True)
class Package:
    """What distinguishes the two packages; everything else is shared."""

    name: str
    extras: tuple[str, ...]
    prefix: str  # absolute install prefix, e.g. /opt/rampart
    commands: tuple[str, ...]  # venv scripts linked into /usr/bin
    depends: str
    recommends: str
    section: str
    summary: str
    description: str


PACKAGES = {
    "node": Package(
        name="rampart",
        extras=("node",),
        prefix="/opt/rampart",
        commands=("rampart", "rampartd"),
        depends="python3-venv, fuse3, nftables, iproute2, iputils-ping, passwd",
        recommends="openssh-server, arping",
        section="admin",
        summary="Rampart node service: high availability for Linux applications",
        description=(
            "rampartd keeps the applications described by Rampart modules running on\n"
            "a cluster of ordinary servers: mirror modules (active/passive with\n"
            "real-time file replication and a virtual IP) and farm modules\n"
            "(active/active with network load balancing). Includes the `rampart`\n"
            "command line and the systemd unit."
        ),
    ),
    "console": Package(
        name="rampart-console",
        extras=("node", "console"),
        prefix="/opt/rampart-console",
        commands=("rampart-console",),
        depends=f"python3-venv, openssh-client, {_QT_LIBS}",
        recommends="gnome-keyring | kwalletmanager",
        section="admin",
        summary="Rampart console: design, sign, deploy and watch HA modules",
        description=(
            "The desktop console of Rampart: site and node access over SSH, the\n"
            "module designer, signed builds, deployment, a live dashboard, graphs,\n"
            "the failover timeline and logs."
        ),
    ),
}


# -- pure layout decisions ---------------------------------------------------


def check_deb_version(version: str) -> str:
    if not _DEB_VERSION.match(version):
        raise UserError(
            f"--version {version!r}: not a Debian version; expected e.g. 0.1.0-1 "
            "(digits first, then letters, digits and . + ~, one '-' before the revision)"
        )
    return version


def python_depends(major: int, minor: int) -> str:
    """The wheels hold CPython X.Y extension modules: pin python3 to X.Y."""
    return f"python3 (>= {major}.{minor}), python3 (<< {major}.{minor + 1})"


def control_text(package: Package, version: str, arch: str, installed_kib: int, python: str) -> str:
    description = "\n".join(
        f" {line}" if line.strip() else " ." for line in package.description.splitlines()
    )
    return (
        f"Package: {package.name}\n"
        f"Version: {version}\n"
        f"Architecture: {arch}\n"
        "Maintainer: Rampart team <rampart@localhost>\n"
        f"Installed-Size: {installed_kib}\n"
        f"Depends: {python}, {package.depends}\n"
        f"Recommends: {package.recommends}\n"
        f"Section: {package.section}\n"
        "Priority: optional\n"
        f"Description: {package.summary}\n"
        f"{description}\n"
    )


def wheel_cache_key(requirements: list[str], pins: list[str], python_tag: str) -> str:
    """Same requirements, same pins, same Python: the cached wheels still fit."""
    text = "\n".join([python_tag, *sorted(requirements), "--", *sorted(pins)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def deb_filename(package: Package, version: str, arch: str) -> str:
    return f"{package.name}_{version.replace(':', '%3a')}_{arch}.deb"


# -- side effects ------------------------------------------------------------


def run(cmd: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        detail = " | ".join(tail) if tail else f"exit {done.returncode}"
        raise PackageBuildError(f"{what} failed: {detail}")
    return done


def project() -> dict:
    with (REPO / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)["project"]


def pip(*args: str) -> list[str]:
    return [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]


def build_rampart_wheel(dest: Path) -> Path:
    """Build from a copy of the sources, so the shared checkout gets no build/ litter."""
    with tempfile.TemporaryDirectory(prefix="src-", dir=dest.parent) as tmp:
        src = Path(tmp) / "rampart"
        src.mkdir()
        for part in _SOURCE_PARTS:
            path = REPO / part
            if path.is_dir():
                shutil.copytree(path, src / part, ignore=_IGNORED)
            else:
                shutil.copy2(path, src / part)
        run(pip("wheel", "--quiet", "--no-deps", "--wheel-dir", str(dest), str(src)), "pip wheel")
    wheels = sorted(dest.glob("rampart-*.whl"))
    if len(wheels) != 1:
        raise PackageBuildError(f"{dest}: expected one rampart wheel, found {len(wheels)}")
    return wheels[0]


def installed_pins() -> list[str]:
    frozen = run(pip("freeze", "--exclude-editable"), "pip freeze").stdout.splitlines()
    return [line for line in frozen if "==" in line and not line.startswith("rampart")]


def dependency_wheels(extras: tuple[str, ...], cache: Path) -> Path:
    """A directory of wheels for the extras' requirements, built once per pin set."""
    optional = project()["optional-dependencies"]
    requirements = [req for extra in extras for req in optional[extra]]
    pins = installed_pins()
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}-{os.uname().machine}"
    target = cache / f"wheels-{'-'.join(extras)}-{wheel_cache_key(requirements, pins, tag)}"
    if (target / ".complete").exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="wheels-", dir=cache) as tmp:
        constraints = Path(tmp) / "constraints.txt"
        constraints.write_text("\n".join(pins) + "\n")
        wheels = Path(tmp) / "wheels"
        run(
            pip(
                "wheel",
                "--quiet",
                "--wheel-dir",
                str(wheels),
                "-c",
                str(constraints),
                *requirements,
            ),
            f"pip wheel for the {'+'.join(extras)} dependencies",
        )
        (wheels / ".complete").write_text("\n".join(requirements) + "\n")
        try:
            wheels.rename(target)  # atomic: a cache entry is complete or absent
        except OSError:
            if not (target / ".complete").exists():
                raise PackageBuildError(f"{target}: cannot store the wheel cache") from None
            # another build stored the same wheel set first: use that one
    return target


def _copy(src: Path, dest: Path, mode: int = 0o644) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    dest.chmod(mode)


def _normalise_modes(root: Path) -> None:
    """dpkg installs the modes it is given: do not let the builder's umask leak in."""
    for path in root.rglob("*"):
        if path.is_symlink():
            continue
        if path.is_dir():
            path.chmod(0o755)
        else:
            path.chmod(0o755 if path.stat().st_mode & 0o100 else 0o644)


def assemble(
    kind: str, tree: Path, wheels: list[Path], version_py: str, carried: Path | None = None
) -> None:
    package = PACKAGES[kind]
    prefix = tree / package.prefix.lstrip("/")
    for wheel in wheels:
        _copy(wheel, prefix / "wheels" / wheel.name)
    (prefix / "share").mkdir(parents=True)
    (prefix / "share" / "python-version").write_text(version_py + "\n")
    (tree / "usr" / "bin").mkdir(parents=True)
    for command in package.commands:
        (tree / "usr" / "bin" / command).symlink_to(f"{package.prefix}/venv/bin/{command}")
    doc = tree / "usr" / "share" / "doc" / package.name
    for name, src in (
        ("install.md", REPO / "docs" / "install.md"),
        ("README.md", REPO / "README.md"),
    ):
        if src.exists():
            _copy(src, doc / name)
    if kind == "node":
        _copy(HERE / "node" / "node.yaml.example", prefix / "share" / "node.yaml.example")
        _copy(
            REPO / "installers" / "systemd" / "rampartd.service",
            tree / "lib" / "systemd" / "system" / "rampartd.service",
        )
    else:
        if carried is not None:
            # The console bootstraps nodes offline: it carries the node package
            # (app/bootstrap_plan.find_package looks here).
            _copy(carried, prefix / "share" / "node" / carried.name)
        _copy(
            HERE / "console" / "rampart-console.desktop",
            tree / "usr" / "share" / "applications" / "rampart-console.desktop",
        )
        _copy(
            REPO / "resources" / "icons" / "rampart.svg",
            tree / "usr" / "share" / "icons" / "hicolor" / "scalable" / "apps" / "rampart.svg",
        )
    _normalise_modes(tree)
    for script in ("postinst", "prerm", "postrm"):
        src = HERE / kind / script
        if src.exists():
            _copy(src, tree / "DEBIAN" / script, mode=0o755)


def installed_kib(tree: Path) -> int:
    total = 0
    for path in tree.rglob("*"):
        if "DEBIAN" in path.relative_to(tree).parts:
            continue
        if path.is_file() and not path.is_symlink():
            total += (path.stat().st_size + 1023) // 1024
        else:
            total += 1
    return total


def build(kind: str, out: Path, version: str | None = None) -> Path:
    """Build one package into ``out``; return the .deb path."""
    package = PACKAGES[kind]
    version_py = project()["version"]
    version = check_deb_version(version or f"{version_py}-1")
    arch = run(["dpkg", "--print-architecture"], "dpkg --print-architecture").stdout.strip()
    out.mkdir(parents=True, exist_ok=True)
    carried = None
    if kind == "console":
        carried = out / deb_filename(PACKAGES["node"], version, arch)
        if not carried.exists():
            carried = build("node", out, version)
    cache = out / "cache"
    deps = dependency_wheels(package.extras, cache)
    with tempfile.TemporaryDirectory(prefix=f"{package.name}-", dir=out) as tmp:
        own = build_rampart_wheel(Path(tmp) / "rampart-wheel")
        tree = Path(tmp) / "tree"
        assemble(kind, tree, [own, *sorted(deps.glob("*.whl"))], version_py, carried)
        python = python_depends(sys.version_info.major, sys.version_info.minor)
        control = control_text(package, version, arch, installed_kib(tree), python)
        (tree / "DEBIAN" / "control").write_text(control)
        deb = out / deb_filename(package, version, arch)
        partial = Path(tmp) / deb.name
        # Wheels are already compressed: a fast gzip level costs little size.
        run(
            ["dpkg-deb", "--root-owner-group", "-Zgzip", "-z1", "--build", str(tree), str(partial)],
            "dpkg-deb --build",
        )
        partial.replace(deb)
    return deb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="build.py", description="Build Rampart .deb packages.")
    parser.add_argument("kinds", nargs="*", metavar="node|console",
                        help="packages to build (default: both)")  # fmt: skip
    parser.add_argument("--version", help="Debian version (default: the project version + '-1')")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    args = parser.parse_args(argv)
    try:
        for kind in args.kinds:
            if kind not in PACKAGES:
                raise UserError(f"unknown package {kind!r}; expected node or console")
        for kind in args.kinds or list(PACKAGES):
            print(build(kind, args.out.resolve(), args.version))
    except RampartError as exc:
        print(f"build.py: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
