"""The node .deb in a clean host: install, run, upgrade, remove, purge.

A clean host is a throwaway root filesystem: an overlay over the machine's
own `/` (writes land in a tmpfs), entered by chroot from a private mount
namespace and a network namespace with only loopback. dpkg runs inside it
as on a fresh server, so the machine's own dpkg database, /etc and /opt are
never touched, and the install proves it needs no network. Everything dies
with the namespace holder process, even when a test fails.
"""

from __future__ import annotations

import functools
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from node_service import config

pytestmark = pytest.mark.node

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "build" / "deb-test"
BUILD_TIMEOUT_S = 300
DPKG_TIMEOUT_S = 180
READY_TIMEOUT_S = 30
GROUPS = ("rampart", "rampart-admin", "rampart-operator", "rampart-monitor")
HOST_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "DEBIAN_FRONTEND": "noninteractive",
}


@functools.cache  # one build per package and version per test session
def build_deb(kind: str, version: str) -> Path:
    done = subprocess.run(
        [sys.executable, str(REPO / "installers" / "deb" / "build.py"), kind,
         "--version", version, "--out", str(OUT)],
        capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    deb = Path(done.stdout.strip().splitlines()[-1])
    assert deb.is_file()
    return deb


def project_version() -> str:
    with (REPO / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)["project"]["version"]


class CleanHost:
    """A private root filesystem over the machine's `/`, for dpkg to install into."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="rt-host-"))
        self.holder: subprocess.Popen | None = None
        self.daemons: list[subprocess.Popen] = []

    def open(self) -> None:
        # The holder owns the namespaces; "ready" is printed after unshare, so
        # nothing below can run in the machine's own mount namespace.
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--net", "--propagation", "private", "--",
             "sh", "-c", "echo ready; exec sleep 900"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        readable, _, _ = select.select([self.holder.stdout], [], [], 10)
        assert readable and self.holder.stdout.readline().strip() == "ready"
        b = self.base
        self.enter(
            "sh", "-ec",
            f"mount -t tmpfs -o mode=0755 rt-host {b}\n"
            f"mkdir {b}/upper {b}/work {b}/root\n"
            f"mount -t overlay rt-host -o lowerdir=/,upperdir={b}/upper,workdir={b}/work {b}/root\n"
            f"mount -t proc proc {b}/root/proc\n"
            f"mount --rbind /sys {b}/root/sys\n"
            f"mount --rbind /dev {b}/root/dev\n"
            f"mount -t tmpfs -o mode=0755 tmpfs {b}/root/run\n"
            f"mount -t tmpfs -o mode=1777 tmpfs {b}/root/tmp\n"
            # A bare server has no developer shell set-up: the machine's root
            # rc files (a version manager's rehash, say) would run in every
            # ssh command and can hang on a lock left by another session.
            "for f in .bashrc .profile .bash_profile; do\n"
            f"  if [ -f /root/$f ]; then echo '# bare host' > {b}/root/root/$f; fi\n"
            "done\n"
            "ip link set lo up\n",
        )  # fmt: skip

    def close(self) -> None:
        for proc in self.daemons:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
        if self.holder is not None:
            self.holder.kill()
            self.holder.wait(timeout=10)
            self.holder.stdout.close()
        # The mounts lived only in the holder's namespace; the directory is empty.
        shutil.rmtree(self.base, ignore_errors=True)

    def _prefix(self) -> list[str]:
        return ["nsenter", "-t", str(self.holder.pid), "-m", "-n", "--"]

    def enter(self, *cmd: str, timeout: float = 60) -> str:
        """Run a command in the namespaces, outside the chroot (mount setup)."""
        done = subprocess.run(
            [*self._prefix(), *cmd], capture_output=True, text=True, timeout=timeout, check=False
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    def run(self, *cmd: str, timeout: float = 60, check: bool = True, env: dict | None = None):
        """Run a command on the clean host (chroot), with a minimal environment."""
        done = subprocess.run(
            [*self._prefix(), "chroot", str(self.base / "root"), *cmd],
            capture_output=True, text=True, timeout=timeout, check=False,
            env={**HOST_ENV, **(env or {})},
        )  # fmt: skip
        if check:
            assert done.returncode == 0, (
                f"{cmd} exited {done.returncode}:\n{done.stdout}{done.stderr}"
            )
        return done

    def path(self, inside: str) -> Path:
        """A path of the clean host, seen from the machine (through the holder's root).
        Absolute symlinks inside it resolve against the machine: use lexists."""
        return (
            Path(f"/proc/{self.holder.pid}/root")
            / str(self.base / "root").lstrip("/")
            / (inside.lstrip("/"))
        )

    def copy_in(self, deb: Path) -> str:
        shutil.copyfile(deb, self.path(f"/tmp/{deb.name}"))
        return f"/tmp/{deb.name}"

    def changes(self) -> set[str]:
        """Every path the host changed: the overlay's upper layer (whiteouts included)."""
        upper = Path(f"/proc/{self.holder.pid}/root") / str(self.base / "upper").lstrip("/")
        return {"/" + str(path.relative_to(upper)) for path in upper.rglob("*")}

    def groups(self) -> set[str]:
        lines = self.path("/etc/group").read_text().splitlines()
        return {line.split(":", 1)[0] for line in lines}

    def start_rampartd(self) -> tuple[subprocess.Popen, socket.socket]:
        """rampartd as systemd would start it (Type=notify), without systemd."""
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(self.path("/run/rt-notify.sock")))
        proc = subprocess.Popen(
            [*self._prefix(), "chroot", str(self.base / "root"),
             "/usr/bin/rampartd", "--config", "/etc/rampart/node.yaml"],
            env={**HOST_ENV, "NOTIFY_SOCKET": "/run/rt-notify.sock"},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        self.daemons.append(proc)
        return proc, notify

    def stop_rampartd(self, proc: subprocess.Popen, notify: socket.socket) -> int:
        try:
            proc.send_signal(signal.SIGTERM)
            return proc.wait(timeout=30)
        finally:
            notify.close()
            self.path("/run/rt-notify.sock").unlink(missing_ok=True)


def wait_ready(proc: subprocess.Popen, notify: socket.socket) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    notify.settimeout(0.5)
    while time.monotonic() < deadline:
        try:
            if "READY=1" in notify.recv(4096).decode():
                return
        except TimeoutError:
            pass
        if proc.poll() is not None:
            raise AssertionError(f"rampartd exited {proc.returncode}: {proc.stdout.read()}")
    raise AssertionError(f"rampartd not ready within {READY_TIMEOUT_S} s")


@pytest.fixture(scope="module")
def debs() -> dict[str, Path]:
    version = project_version()
    return {"v1": build_deb("node", f"{version}-1"), "v2": build_deb("node", f"{version}-2")}


@pytest.fixture(scope="module")
def host() -> Iterator[CleanHost]:
    clean = CleanHost()
    try:
        clean.open()
        yield clean
    finally:
        clean.close()


def installed_version(host: CleanHost) -> str | None:
    done = host.run("dpkg-query", "-W", "-f=${Status} ${Version}", "rampart", check=False)
    if done.returncode != 0 or not done.stdout.startswith("install ok installed"):
        return None
    return done.stdout.rsplit(" ", 1)[-1]


def run_node_and_query(host: CleanHost) -> dict:
    proc, notify = host.start_rampartd()
    try:
        wait_ready(proc, notify)
        state = host.run("rampart", "state", "--json")
    finally:
        code = host.stop_rampartd(proc, notify)
    assert code == 0, proc.stdout.read()
    return json.loads(state.stdout)


# The steps share one clean host and run in order: each starts from the
# previous one's result, as on a real server.


def test_install_on_a_clean_host_gives_a_working_node(host, debs):
    assert not os.path.lexists(host.path("/opt/rampart"))
    assert not os.path.lexists(host.path("/usr/bin/rampart"))
    assert installed_version(host) is None

    started = time.monotonic()
    host.run("dpkg", "-i", host.copy_in(debs["v1"]), timeout=DPKG_TIMEOUT_S)
    install_s = time.monotonic() - started

    assert installed_version(host) == f"{project_version()}-1"
    assert host.path("/opt/rampart/venv/bin/rampartd").is_file()
    version = host.run("rampart", "--version").stdout
    assert version.strip() == f"rampart {project_version()}"
    assert set(GROUPS) <= host.groups()
    node_yaml = host.path("/etc/rampart/node.yaml").read_text()
    assert config.parse(node_yaml).node  # the skeleton is a valid node.yaml
    assert (host.path("/etc/rampart/site").stat().st_mode & 0o777) == 0o700
    assert host.path("/etc/rampart/trust").is_dir()
    # Enabled for the next boot, though systemd does not run here.
    wants = host.path("/etc/systemd/system/multi-user.target.wants/rampartd.service")
    assert os.readlink(wants) == "/lib/systemd/system/rampartd.service"
    verify = host.run("systemd-analyze", "verify", "/lib/systemd/system/rampartd.service")
    assert verify.stderr.strip() == "", verify.stderr
    # Templates are found in the installed venv, not only in a checkout.
    templates = host.run(
        "/opt/rampart/venv/bin/python", "-c",
        "from node_service.resources import templates_dir; print(templates_dir())",
    ).stdout.strip()  # fmt: skip
    # (checked inside: the path is the host's, venv/share/rampart/resources from the wheel)
    host.run("test", "-f", f"{templates}/mirror/userconfig.xml")

    state = run_node_and_query(host)
    assert state == {"node": config.parse(node_yaml).node, "modules": []}
    assert host.path("/var/log/rampart/journal.jsonl").stat().st_size > 0
    print(f"install took {install_s:.1f} s")


def test_upgrade_keeps_configuration_and_state(host, debs):
    assert installed_version(host) == f"{project_version()}-1"
    node_yaml = host.path("/etc/rampart/node.yaml")
    edited = "# edited by the admin\nnode: rt-upgraded\nlog_level: debug\n"
    node_yaml.write_text(edited)
    marker = host.path("/var/lib/rampart/modules/rt-marker")
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("state before upgrade\n")
    journal_before = host.path("/var/log/rampart/journal.jsonl").read_text()

    host.run("dpkg", "-i", host.copy_in(debs["v2"]), timeout=DPKG_TIMEOUT_S)

    assert installed_version(host) == f"{project_version()}-2"
    assert node_yaml.read_text() == edited
    assert marker.read_text() == "state before upgrade\n"
    assert host.path("/var/log/rampart/journal.jsonl").read_text().startswith(journal_before)
    assert run_node_and_query(host) == {"node": "rt-upgraded", "modules": []}


def test_remove_keeps_configuration_then_purge_removes_everything(host, debs):
    assert installed_version(host) == f"{project_version()}-2"
    host.run("dpkg", "--remove", "rampart", timeout=DPKG_TIMEOUT_S)
    assert not os.path.lexists(host.path("/usr/bin/rampart"))
    assert not os.path.lexists(host.path("/opt/rampart/venv"))
    assert host.path("/etc/rampart/node.yaml").read_text().startswith("# edited by the admin")
    assert host.path("/var/lib/rampart/modules/rt-marker").exists()
    # Masked while removed, so a stale enable link cannot start a missing binary.
    assert os.readlink(host.path("/etc/systemd/system/rampartd.service")) == "/dev/null"

    host.run("dpkg", "--purge", "rampart", timeout=DPKG_TIMEOUT_S)
    assert installed_version(host) is None
    for gone in ("/opt/rampart", "/etc/rampart", "/var/lib/rampart", "/var/log/rampart",
                 "/usr/bin/rampartd", "/lib/systemd/system/rampartd.service",
                 "/etc/systemd/system/rampartd.service",
                 "/etc/systemd/system/multi-user.target.wants/rampartd.service"):  # fmt: skip
        assert not os.path.lexists(host.path(gone)), gone
    assert not set(GROUPS) & host.groups()


def test_the_machine_itself_was_never_touched(host):
    assert not Path("/opt/rampart").exists()
    mine = subprocess.run(["dpkg-query", "-W", "rampart"], capture_output=True, check=False)
    assert mine.returncode != 0
