"""The node .deb under a real systemd: install, run hardened, crash, upgrade, purge.

The host is booted by systemd 252 as PID 1 of its own namespaces (see
systemd_host.py); dpkg runs inside it while systemd runs, so the maintainer
scripts take their systemd branch (daemon-reload, deb-systemd-invoke) and
the shipped unit starts rampartd exactly as on a server. The steps share one
host and run in order, each from the previous one's result.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from node_service.cluster import pki
from node_service.module import keys, safe, userconfig
from node_service.module.model import (
    Failover,
    Farm,
    FarmRule,
    Module,
    Node,
    Replication,
    VirtualIP,
)
from tests.node.systemd_host import HOSTNAME, LAN_ADDRESS, SystemdHost
from tests.node.test_packages import DPKG_TIMEOUT_S, build_deb, project_version

pytestmark = pytest.mark.node

UNIT = "rampartd.service"
MIRROR_VIP = "198.51.100.200"
FARM_VIP = "198.51.100.201"
STATE_TIMEOUT_S = 30
SYSTEMD_DEV = ("log", "initctl", "hugepages", "mqueue")
CAP_SYS_TIME, CAP_WAKE_ALARM, CAP_SYS_ADMIN, CAP_NET_ADMIN = 25, 35, 21, 12


@pytest.fixture(scope="module")
def debs() -> dict[str, Path]:
    version = project_version()
    return {"v1": build_deb("node", f"{version}-1"), "v2": build_deb("node", f"{version}-2")}


MACHINE: dict = {}  # what the machine looked like before the host booted


def machine_dev() -> dict[str, bool]:
    """What a systemd booting with the machine's /dev would create there."""
    return {name: os.path.lexists(f"/dev/{name}") for name in SYSTEMD_DEV}


@pytest.fixture(scope="module")
def host() -> Iterator[SystemdHost]:
    MACHINE.update(
        hostname=socket.gethostname(),
        pid_max=Path("/proc/sys/kernel/pid_max").read_text(),
        dev=machine_dev(),
    )
    booted = SystemdHost()
    try:
        booted.boot()
        yield booted
    finally:
        booted.close()


@pytest.fixture(scope="module")
def site_key() -> Iterator[tuple[Path, Path]]:
    """A site (CA, heartbeat secret) and a module signing key, on the machine."""
    with tempfile.TemporaryDirectory(prefix="rt-sd-site-") as tmp:
        pki.create_site(Path(tmp) / "site")
        key, _ = keys.generate(Path(tmp) / "keys")
        yield Path(tmp) / "site", key


def main_pid(host: SystemdHost) -> int:
    return int(host.show(UNIT, "MainPID")["MainPID"])


def wait_for(what: str, check, timeout: float = STATE_TIMEOUT_S):
    """Poll ``check`` (bounded) until it returns a true value: systemd's
    restart of a killed service has no event to wait on from outside."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.2)


def journal(host: SystemdHost, *args: str) -> str:
    return host.run("journalctl", "--no-pager", "-o", "cat", *args).stdout


def module_safe(workdir: Path, key: Path, module: Module) -> Path:
    src = workdir / f"src-{module.name}-{secrets.token_hex(3)}"
    (src / "bin").mkdir(parents=True)
    (src / "userconfig.xml").write_bytes(userconfig.emit(module))
    out = workdir / f"{module.name}.safe"
    safe.build(src, key, out)
    return out


def modules() -> tuple[Module, Module]:
    nodes = (Node(HOSTNAME, (LAN_ADDRESS,)), Node("rt-other", ("198.51.100.12",)))
    # The peer never exists: declare it lost after 1 s instead of 3 at each start.
    quick = Failover(heartbeat_interval_ms=200, heartbeat_timeout_ms=1000)
    mirror = Module(
        name="web", kind="mirror", nodes=nodes, vips=(VirtualIP(MIRROR_VIP, 24),),
        replication=Replication(("/srv/web",)), failover=quick,
    )  # fmt: skip
    farm = Module(
        name="lb", kind="farm", nodes=nodes, vips=(VirtualIP(FARM_VIP, 24),),
        farm=Farm((FarmRule((80,)),)), failover=quick,
    )  # fmt: skip
    return mirror, farm


def wait_state(host: SystemdHost, module: str, wanted: str) -> None:
    """The product's own wait: returns when the module reaches the state."""
    host.run("rampart", "wait", "-m", module, "--state", wanted,
             "--timeout", str(STATE_TIMEOUT_S), timeout=STATE_TIMEOUT_S + 10)  # fmt: skip


def capabilities(status: str, field: str) -> int:
    return int(re.search(rf"^{field}:\s*([0-9a-f]+)$", status, re.M).group(1), 16)


# -- the steps -------------------------------------------------------------------


def test_install_starts_rampartd_as_a_notify_service_logging_to_journald(host, debs):
    assert host.show(UNIT, "LoadState")["LoadState"] == "not-found"

    host.run("dpkg", "-i", host.copy_in(debs["v1"]), timeout=DPKG_TIMEOUT_S)

    # postinst enabled and started the unit; Type=notify means "active" only
    # once systemd received READY=1, and the STATUS= sent with it is shown.
    shown = host.show(UNIT, "ActiveState", "SubState", "Type", "UnitFileState", "StatusText",
                      "Result")  # fmt: skip
    assert shown == {
        "ActiveState": "active",
        "SubState": "running",
        "Type": "notify",
        "UnitFileState": "enabled",
        "StatusText": "serving 0 module(s)",
        "Result": "success",
    }
    answer = json.loads(host.run("rampart", "state", "--json").stdout)
    assert answer == {"node": HOSTNAME, "modules": []}
    # rampartd's stderr goes to journald under its own identifier.
    logged = journal(host, "-u", UNIT, "-t", "rampartd")
    assert f"rampartd {project_version()} started on node {HOSTNAME}" in logged
    assert "Started rampartd.service" in journal(host, "-u", UNIT, "-t", "systemd")
    socket = host.run("stat", "-c", "%U:%G %a", "/run/rampart/api.sock").stdout.strip()
    assert socket == "root:rampart 660"


def test_hardening_applies_and_still_allows_vip_fuse_and_nft(host, site_key, tmp_path):
    site, key = site_key
    pid = main_pid(host)
    status = host.run("cat", f"/proc/{pid}/status").stdout
    # The unit's filters are really in force (seccomp mode 2, bounding set)...
    assert re.search(r"^Seccomp:\s*2$", status, re.M)
    bounding = capabilities(status, "CapBnd")
    assert not bounding & (1 << CAP_SYS_TIME | 1 << CAP_WAKE_ALARM)
    assert bounding & (1 << CAP_SYS_ADMIN) and bounding & (1 << CAP_NET_ADMIN)

    # ...and rampartd still does its job under them.
    pki.issue_node(site, HOSTNAME, host.path("/etc/rampart/site"))
    pub = key.with_name("signing.pub")
    host.path("/etc/rampart/trust/test.pub").write_bytes(pub.read_bytes())
    mirror, farm = modules()
    for module in (mirror, farm):
        path = host.copy_in(module_safe(tmp_path, key, module))
        host.run("rampart", "module", "install", path)
        host.run("rampart", "start", "-m", module.name)
    # The peer never answers: the mirror serves alone once it is declared lost.
    wait_state(host, "web", "ALONE")
    wait_state(host, "lb", "UP")

    addresses = host.run("ip", "-o", "address", "show").stdout
    assert f"{MIRROR_VIP}/24" in addresses  # netlink (AF_NETLINK, CAP_NET_ADMIN)
    assert f"{FARM_VIP}/" in addresses
    mounts = host.run("cat", "/proc/self/mounts").stdout
    fuse = [line for line in mounts.splitlines() if line.split()[1] == "/srv/web"]
    assert fuse and fuse[0].split()[2].startswith("fuse"), mounts  # FUSE (CAP_SYS_ADMIN)
    host.run("sh", "-c", "echo replicated > /srv/web/file")
    assert host.run("cat", "/srv/web/file").stdout == "replicated\n"
    ruleset = host.run("nft", "list", "ruleset").stdout
    assert FARM_VIP in ruleset  # nftables (netlink)


def test_killed_rampartd_is_restarted_by_systemd(host):
    before = main_pid(host)
    restarts = int(host.show(UNIT, "NRestarts")["NRestarts"])
    host.run("kill", "-KILL", str(before))

    def restarted() -> bool:
        shown = host.show(UNIT, "ActiveState", "MainPID", "NRestarts")
        return (shown["ActiveState"] == "active" and int(shown["MainPID"]) not in (0, before)
                and int(shown["NRestarts"]) == restarts + 1)  # fmt: skip

    wait_for("rampartd restarted", restarted)
    assert "Main process exited, code=killed, status=9/KILL" in journal(host, "-u", UNIT)
    # KillMode=mixed took the modules down with it; the new daemon resumes
    # them: the mirror serves again over the data written before the crash.
    wait_state(host, "web", "ALONE")
    wait_state(host, "lb", "UP")
    assert host.run("cat", "/srv/web/file").stdout == "replicated\n"
    assert f"{MIRROR_VIP}/24" in host.run("ip", "-o", "address", "show").stdout


def test_upgrade_restarts_the_new_version_and_purge_removes_everything(host, debs):
    old = main_pid(host)
    host.run("dpkg", "-i", host.copy_in(debs["v2"]), timeout=DPKG_TIMEOUT_S)
    version = host.run("dpkg-query", "-W", "-f=${Version}", "rampart").stdout
    assert version == f"{project_version()}-2"
    assert host.show(UNIT, "ActiveState")["ActiveState"] == "active"
    assert main_pid(host) != old  # prerm stopped it, postinst started the new one
    # The started modules are resumed by the new version.
    wait_state(host, "web", "ALONE")
    wait_state(host, "lb", "UP")

    host.run("dpkg", "--purge", "rampart", timeout=DPKG_TIMEOUT_S)
    assert host.show(UNIT, "LoadState")["LoadState"] == "not-found"
    assert not host.run("pgrep", "-f", "rampartd", check=False).stdout.strip()
    # Stopping the node stopped its modules: no VIP, no mount, no filter left.
    addresses = host.run("ip", "-o", "address", "show").stdout
    assert MIRROR_VIP not in addresses and FARM_VIP not in addresses
    mounts = host.run("cat", "/proc/self/mounts").stdout
    assert " /srv/web " not in mounts, journal(host, "-u", UNIT)[-6000:]
    assert FARM_VIP not in host.run("nft", "list", "ruleset").stdout
    for gone in ("/opt/rampart", "/etc/rampart", "/var/lib/rampart", "/usr/bin/rampartd",
                 "/lib/systemd/system/rampartd.service",
                 "/etc/systemd/system/multi-user.target.wants/rampartd.service"):  # fmt: skip
        assert host.run("test", "-e", gone, check=False).returncode != 0, gone


def test_the_machine_itself_was_never_touched(host):
    # systemd ran with its own UTS namespace, read-only /proc/sys and its own
    # /dev: the machine's host name, kernel settings and /dev are as before.
    assert socket.gethostname() == MACHINE["hostname"] != HOSTNAME
    assert Path("/proc/sys/kernel/pid_max").read_text() == MACHINE["pid_max"]
    assert machine_dev() == MACHINE["dev"]
    assert not Path("/opt/rampart").exists()
    mine = subprocess.run(["dpkg-query", "-W", "rampart"], capture_output=True, check=False)
    assert mine.returncode != 0
