"""`rampart lab` for real: namespaces, bridges, sshd, crash/boot, cut/heal, down."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from node_service.lab import control, netns
from node_service.lab.site import LabError
from tests.node.conftest import RAMPART, lab_status, rampart, unique_lab_name

pytestmark = pytest.mark.node

LAB_NETS = [ipaddress.ip_network("198.51.100.0/24"), ipaddress.ip_network("203.0.113.0/24")]


def lab_exec(lab: dict, host: str, *cmd: str, timeout: float = 20, check: bool = False):
    return rampart(
        "lab", "exec", "--name", lab["name"], host, "--", *cmd, check=check, timeout=timeout
    )


def pings(lab: dict, host: str, address: str) -> bool:
    """One reply within 5 s (ping retries each second until then)."""
    return lab_exec(lab, host, "ping", "-c1", "-w5", address).returncode == 0


def silent(lab: dict, host: str, address: str) -> bool:
    """No reply to one ping within 1 s (or no route at all)."""
    return lab_exec(lab, host, "ping", "-c1", "-W1", address).returncode != 0


def wait_for(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def node(lab: dict, short: str) -> dict:
    return next(n for n in lab["nodes"] if n["name"] == f"{lab['name']}-{short}")


def test_status_json_shape(fresh_lab):
    lab = fresh_lab
    name = lab["name"]
    assert [n["name"] for n in lab["nodes"]] == [f"{name}-n1", f"{name}-n2"]
    assert [n["addresses"] for n in lab["nodes"]] == [
        ["198.51.100.11", "203.0.113.11"],
        ["198.51.100.12", "203.0.113.12"],
    ]
    assert lab["client"]["name"] == f"{name}-client"
    assert lab["client"]["address"] == "198.51.100.100"
    assert lab["vip_pool"][0] == "198.51.100.200" and len(lab["vip_pool"]) == 20
    for entry in lab["nodes"]:
        assert entry["up"] is True and entry["sshd"] is True
        assert isinstance(entry["rampartd"], bool)
        assert entry["networks"] == {"lan": True, "hb2": True}
    for key in ("site_file", "signing_key", "trust_pub", "known_hosts", "console_key"):
        assert Path(lab[key]).is_file(), key
    site = yaml.safe_load(Path(lab["site_file"]).read_text())
    assert site["site"] == name
    assert [n["name"] for n in site["nodes"]] == [f"{name}-n1", f"{name}-n2"]
    assert site["nodes"][0]["ssh"]["host"] == "198.51.100.11"
    assert f"--netns {name}-client" in site["nodes"][0]["ssh"]["proxy_command"]


def test_factory_lab_with_three_nodes(lab_factory):
    lab = lab_factory(nodes=3)
    assert [n["addresses"][0] for n in lab["nodes"]][-1] == "198.51.100.13"
    assert pings(lab, "n1", "203.0.113.13")
    assert pings(lab, "n3", "198.51.100.100")


def test_human_status_and_lan_flood_hook(fresh_lab):
    lab = fresh_lab
    text = rampart("lab", "status", "--name", lab["name"]).stdout
    for entry in [*lab["nodes"], lab["client"]]:
        assert entry["name"] in text and entry["addresses"][0] in text
    layout = control.load(lab["name"])
    try:
        netns.set_lan_ageing(layout, 0)
        bridge = subprocess.run(
            ["ip", "-n", lab["switch"], "-j", "-d", "link", "show", "br-lan"],
            capture_output=True, text=True, check=True, timeout=10,
        )  # fmt: skip
        assert json.loads(bridge.stdout)[0]["linkinfo"]["info_data"]["ageing_time"] == 0
        assert pings(lab, "client", "198.51.100.12")  # flooding still delivers
    finally:
        netns.set_lan_ageing(layout, 30000)


def test_hosts_have_private_dirs(fresh_lab):
    lab = fresh_lab
    marker = f"/srv/{lab['name']}-marker"
    assert lab_exec(lab, "n1", "sh", "-c", f"echo n1 > {marker}").returncode == 0
    assert lab_exec(lab, "n1", "cat", marker).stdout == "n1\n"
    assert lab_exec(lab, "n2", "test", "-e", marker).returncode == 1
    assert not os.path.exists(marker)
    for short in ("n1", "n2"):
        done = lab_exec(lab, short, "cat", "/etc/rampart/node.yaml", check=True)
        assert yaml.safe_load(done.stdout)["node"] == f"{lab['name']}-{short}"
        trust = lab_exec(lab, short, "cat", "/etc/rampart/trust/lab.pub", check=True)
        assert trust.stdout == Path(lab["trust_pub"]).read_text()
        site = lab_exec(lab, short, "ls", "/etc/rampart/site", check=True).stdout.split()
        assert {"ca.pem", "heartbeat.secret", "node.pem", "node.key"} <= set(site)
    # Shared paths are shared: the project's venv is visible inside.
    assert lab_exec(lab, "n1", "test", "-x", sys.executable).returncode == 0


def test_ping_on_both_networks_and_from_client(fresh_lab):
    lab = fresh_lab
    assert pings(lab, "n1", "198.51.100.12")
    assert pings(lab, "n1", "203.0.113.12")
    assert pings(lab, "n2", "203.0.113.11")
    assert pings(lab, "client", "198.51.100.11")
    assert pings(lab, "client", "198.51.100.12")
    assert silent(lab, "client", "203.0.113.11")  # the client is on the LAN only


def test_root_namespace_has_no_lab_address(fresh_lab):
    links = json.loads(subprocess.run(["ip", "-j", "addr"], capture_output=True, check=True).stdout)
    addresses = [
        ipaddress.ip_address(a["local"]) for link in links for a in link.get("addr_info", [])
    ]
    assert not [a for a in addresses if any(a in net for net in LAB_NETS)]
    assert not [link["ifname"] for link in links if link["ifname"].startswith(("n1-", "br-"))]


def ssh(lab: dict, address: str, command: str) -> subprocess.CompletedProcess:
    site = yaml.safe_load(Path(lab["site_file"]).read_text())
    proxy = site["nodes"][0]["ssh"]["proxy_command"]
    argv = [
        "ssh", "-o", f"ProxyCommand={proxy}", "-i", lab["console_key"],
        "-o", f"UserKnownHostsFile={lab['known_hosts']}", "-o", "StrictHostKeyChecking=yes",
        "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", f"root@{address}", command,
    ]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


def test_sshd_answers_through_the_relay(fresh_lab):
    lab = fresh_lab
    for entry in lab["nodes"]:
        done = ssh(lab, entry["addresses"][0], "cat /etc/rampart/node.yaml; command -v rampart")
        assert done.returncode == 0, done.stderr
        assert f"node: {entry['name']}" in done.stdout
        # sshd's SetEnv PATH makes `rampart` on a node the venv's, as the console expects.
        assert done.stdout.strip().splitlines()[-1] == str(Path(sys.prefix, "bin", "rampart"))


def test_node_shells_do_not_run_the_machines_root_rc(fresh_lab):
    # An ssh command runs root's shell start-up file; the machine's could
    # do slow or locking work, so each host has its own plain one.
    lab = fresh_lab
    entry = lab["nodes"][0]
    done = ssh(lab, entry["addresses"][0], "cat ~/.bashrc")
    assert done.returncode == 0, done.stderr
    header = f"# root's shell start-up on lab host {entry['name']} (written by rampart lab)"
    assert done.stdout == header + "\n"


FUSE_SCRIPT = textwrap.dedent(
    """
    import errno, stat, sys
    from mfusepy import FUSE, FuseOSError, Operations

    class Empty(Operations):
        use_ns = True

        def getattr(self, path, fh=None):
            if path != "/":
                raise FuseOSError(errno.ENOENT)
            return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2}

        def readdir(self, path, fh):
            return [".", ".."]

    FUSE(Empty(), sys.argv[1], foreground=True)
    """
)


def wchan(pid: int) -> str:
    """Where in the kernel ``pid`` sleeps (request_wait_answer: waiting on FUSE)."""
    try:
        return Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return ""


def host_mounts(lab: dict, short: str) -> str:
    return lab_exec(lab, short, "cat", "/proc/self/mountinfo", check=True).stdout


def test_crash_kills_processes_and_fuse_then_boot(fresh_lab, tmp_path):
    lab = fresh_lab
    n2 = f"{lab['name']}-n2"
    sleeper = subprocess.Popen([*RAMPART, "lab", "exec", n2, "--", "sleep", "300"])
    script = tmp_path / "emptyfs.py"
    script.write_text(FUSE_SCRIPT)
    lab_exec(lab, "n2", "mkdir", "-p", "/srv/fusemnt", check=True)
    fuse = subprocess.Popen(
        [*RAMPART, "lab", "exec", n2, "--", sys.executable, str(script), "/srv/fusemnt"],
        stderr=subprocess.PIPE,
    )
    procs = [sleeper, fuse]
    try:
        assert wait_for(lambda: " /srv/fusemnt " in host_mounts(lab, "n2")), "FUSE not mounted"
        # A hung filesystem: its daemon stopped, a reader waiting on it.
        os.kill(fuse.pid, signal.SIGSTOP)
        reader = subprocess.Popen([*RAMPART, "lab", "exec", n2, "--", "stat", "/srv/fusemnt/x"])
        procs.append(reader)
        assert wait_for(lambda: wchan(reader.pid) == "request_wait_answer"), "stat not blocked"
        rampart("lab", "crash", n2)
        assert sleeper.wait(timeout=10) == -9
        assert fuse.wait(timeout=10) == -9
        assert reader.wait(timeout=10) != 0
        after = lab_status(lab["name"])
        assert node(after, "n2")["up"] is False and node(after, "n2")["sshd"] is False
        assert node(after, "n1")["up"] is True
        assert silent(lab, "n1", "198.51.100.12")
        assert " /srv/fusemnt " not in host_mounts(lab, "n2")
        assert lab_exec(lab, "n2", "ls", "/srv/fusemnt", timeout=10).returncode == 0

        rampart("lab", "boot", n2)
        booted = lab_status(lab["name"])
        assert node(booted, "n2")["up"] is True and node(booted, "n2")["sshd"] is True
        assert pings(lab, "n1", "198.51.100.12")
        assert ssh(lab, "198.51.100.12", "true").returncode == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        if fuse.stderr:
            fuse.stderr.close()
        rampart("lab", "boot", n2, check=False)


def test_crash_leaves_the_machines_own_fuse_mounts_alone(fresh_lab, tmp_path):
    # A host booted while the machine has a FUSE mount sees a copy of it; the
    # host's crash must detach that copy only, not abort the machine's mount.
    lab = fresh_lab
    n2 = f"{lab['name']}-n2"
    script = tmp_path / "emptyfs.py"
    script.write_text(FUSE_SCRIPT)
    mnt = tmp_path / "machine-fuse"
    mnt.mkdir()
    fuse = subprocess.Popen([sys.executable, str(script), str(mnt)], stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: os.path.ismount(mnt)), "FUSE not mounted"
        rampart("lab", "crash", n2)
        rampart("lab", "boot", n2)  # the new mount namespace copies the machine's FUSE mount
        assert str(mnt) in host_mounts(lab, "n2")
        rampart("lab", "crash", n2)
        assert os.listdir(mnt) == []  # still served: ENOTCONN if it had been aborted
        assert fuse.poll() is None
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False, timeout=10)
        fuse.kill()
        fuse.wait(timeout=10)
        rampart("lab", "boot", n2, check=False)


def test_cut_and_heal_one_network_then_all(fresh_lab):
    lab = fresh_lab
    name = lab["name"]
    try:
        rampart("lab", "cut", "--net", "hb2", "--name", name, "n1")
        cut = node(lab_status(name), "n1")
        assert cut["networks"] == {"lan": True, "hb2": False} and cut["up"] is True
        assert silent(lab, "n2", "203.0.113.11")
        assert pings(lab, "n2", "198.51.100.11")
        rampart("lab", "heal", "--net", "hb2", "--name", name, "n1")
        assert pings(lab, "n2", "203.0.113.11")

        sleeper = subprocess.Popen([*RAMPART, "lab", "exec", f"{name}-n1", "--", "sleep", "60"])
        rampart("lab", "cut", f"{name}-n1")
        assert silent(lab, "n2", "198.51.100.11")
        assert silent(lab, "n2", "203.0.113.11")
        assert sleeper.poll() is None  # processes keep running through a cut
        sleeper.kill()
        sleeper.wait(timeout=10)
        rampart("lab", "heal", f"{name}-n1")
        assert node(lab_status(name), "n1")["networks"] == {"lan": True, "hb2": True}
        assert pings(lab, "n2", "198.51.100.11")
    finally:
        rampart("lab", "heal", "--name", name, "n1", check=False)


def test_clear_refusals(fresh_lab):
    lab = fresh_lab
    unknown = lab_exec(lab, "n9", "true")
    assert unknown.returncode == 1 and "unknown host 'n9'" in unknown.stderr
    again = rampart("lab", "up", "--name", lab["name"], check=False)
    assert again.returncode == 1
    assert f"rampart lab down --name {lab['name']}" in again.stderr
    assert lab_exec(lab, "n1", "sh", "-c", "exit 7").returncode == 7
    bad = rampart("lab", "up", "--name", "Bad-Name", check=False)
    assert bad.returncode == 1 and "invalid lab name" in bad.stderr
    missing = rampart("lab", "status", "--name", unique_lab_name(), check=False)
    assert missing.returncode == 1 and "no lab named" in missing.stderr


def test_not_root_is_refused():
    argv = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        *RAMPART,
        "lab",
        "status",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd="/", check=False)
    assert done.returncode == 1
    assert "rampart lab needs root" in done.stderr
    assert "Traceback" not in done.stderr


# -- down leaves nothing ------------------------------------------------------
def lab_ns_ids(name: str) -> set[tuple[int, int]]:
    paths = [f"/run/netns/{e}" for e in os.listdir("/run/netns") if e.startswith(f"{name}-")]
    run_dir = Path("/run/rampart-lab") / name
    paths += [str(p) for p in run_dir.glob("*.mnt")] if run_dir.exists() else []
    ids = set()
    for path in paths:
        st = os.stat(path)
        ids.add((st.st_dev, st.st_ino))
    return ids


def assert_nothing_left(name: str, ns_ids: set[tuple[int, int]]) -> None:
    assert not [e for e in os.listdir("/run/netns") if e.startswith(f"{name}-")]
    mountinfo = Path("/proc/self/mountinfo").read_text()
    assert f"/{name}/" not in mountinfo and f"/{name}-" not in mountinfo
    assert not Path("/var/lib/rampart-lab", name).exists()
    assert not Path("/run/rampart-lab", name).exists()
    survivors = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        for kind in ("net", "mnt"):
            try:
                st = os.stat(f"/proc/{pid}/ns/{kind}")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in ns_ids:
                survivors.append(pid)
    assert not survivors


def test_down_leaves_nothing_and_is_idempotent():
    name = unique_lab_name()
    try:
        rampart("lab", "up", "--name", name, "--nodes", "1")
        ids = lab_ns_ids(name)
        assert len(ids) == 5  # sw, n1, client netns + n1, client mount ns
        rampart(
            "lab",
            "exec",
            f"{name}-n1",
            "--",
            "sh",
            "-c",
            "sleep 300 >/dev/null 2>&1 & sleep 300 >/dev/null 2>&1 &",
        )
        rampart("lab", "down", "--name", name)
        assert_nothing_left(name, ids)
        again = rampart("lab", "down", "--name", name)
        assert "not up" in again.stdout
    finally:
        rampart("lab", "down", "--name", name, check=False)


def test_down_cleans_a_half_created_lab():
    name = unique_lab_name()
    try:
        subprocess.run(["ip", "netns", "add", f"{name}-n1"], check=True, timeout=10)
        Path("/var/lib/rampart-lab", name, "hosts").mkdir(parents=True)
        ids = lab_ns_ids(name)
        done = rampart("lab", "down", "--name", name)
        assert "is down" in done.stdout
        assert_nothing_left(name, ids)
    finally:
        rampart("lab", "down", "--name", name, check=False)


def test_failed_up_cleans_up_after_itself(monkeypatch):
    name = unique_lab_name()

    def broken(layout):
        raise LabError("injected failure while writing secrets")

    monkeypatch.setattr(control, "_write_secrets", broken)
    ids: set[tuple[int, int]] = set()
    real_build = control._build

    def build_and_remember(layout):
        # Remember the namespaces as they are created, to check none survive.
        original = control.hosts.create_mount_ns

        def create(layout_, host):
            original(layout_, host)
            ids.update(lab_ns_ids(name))

        monkeypatch.setattr(control.hosts, "create_mount_ns", create)
        return real_build(layout)

    monkeypatch.setattr(control, "_build", build_and_remember)
    try:
        with pytest.raises(LabError, match="injected"):
            control.up(name, 1)
        assert len(ids) == 5
        assert_nothing_left(name, ids)
    finally:
        rampart("lab", "down", "--name", name, check=False)
