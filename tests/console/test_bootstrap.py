"""'Add node' end to end: the console bootstraps a bare host over real SSH.

The bare host is test_packages.py's clean host (an overlay over `/` entered
by chroot from private mount and network namespaces: no rampart there, and
dpkg never touches the machine) with a real sshd listening on
198.51.100.11. The console reaches it as it reaches lab nodes: paramiko with
the lab relay as ProxyCommand, connecting from a client namespace joined to
the host by a veth. The real node .deb is built once for the module.

The tests share the host and run in order: refusals first (nothing may be
left on the host), then a failing install, then the full bootstrap on the
same host, which must recover from the failed attempt as a real one would.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from app import bootstrap
from app.deploy import CANCELLED, DONE, FAILED, PENDING, SKIPPED
from app.site import Site, load
from app.ssh import Session
from node_service.cluster import pki
from node_service.lab.sshd import listening
from node_service.module import keys
from tests.node.test_packages import CleanHost, build_deb, project_version

pytestmark = pytest.mark.node

HOST_ADDR, CLIENT_ADDR = "198.51.100.11", "198.51.100.100"
NODE = "bootnode1"
RUN_TIMEOUT_S = 240
SSHD_CONFIG = f"""\
ListenAddress {HOST_ADDR}
Port 22
HostKey /etc/ssh/rt_bootstrap_host_key
PidFile /run/sshd.pid
PermitRootLogin prohibit-password
AuthenticationMethods publickey
PasswordAuthentication no
KbdInteractiveAuthentication no
AuthorizedKeysFile /root/.ssh/rt_authorized_keys
StrictModes no
UsePAM no
UseDNS no
Subsystem sftp internal-sftp
"""


@dataclass
class BareHost:
    clean: CleanHost
    client_ns: str
    site_file: Path
    known_hosts: Path
    site_secrets: Path
    trust_pub: Path

    def site(self) -> Site:
        return load(self.site_file)

    def installed(self) -> str:
        done = self.clean.run("dpkg-query", "-W", "-f=${Status} ${Version}", "rampart", check=False)
        return done.stdout if done.returncode == 0 else ""

    def leftovers(self) -> list[str]:
        return sorted(p.name for p in self.clean.path("/tmp").glob("rampart-bootstrap.*"))


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=False)
    assert done.returncode == 0, f"ip {' '.join(args)}: {done.stderr}"


def _mount_ns_pids(holder: int) -> list[int]:
    """Every process in the host's mount namespace but the holder (sshd, rampartd...)."""
    mine = os.stat(f"/proc/{holder}/ns/mnt").st_ino
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != holder:
            try:
                if os.stat(f"/proc/{entry}/ns/mnt").st_ino == mine:
                    pids.append(int(entry))
            except OSError:
                pass  # gone meanwhile
    return pids


def _kill_host_processes(holder: int) -> None:
    for _ in range(3):  # bounded: a dying daemon's children may appear once
        pids = _mount_ns_pids(holder)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") for p in pids):
            time.sleep(0.05)  # waiting on the kernel to reap, bounded


def _keygen(path: Path) -> str:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "rt-bootstrap", "-f", str(path)],
        check=True, timeout=30, capture_output=True,
    )  # fmt: skip
    return path.with_suffix(".pub").read_text().strip()


@pytest.fixture(scope="module")
def node_deb() -> Path:
    # Its own Debian revision, so a concurrent test_packages run never rewrites it.
    return build_deb("node", f"{project_version()}-1+boot")


@pytest.fixture(scope="module")
def bare(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BareHost]:
    work = tmp_path_factory.mktemp("bootstrap")
    clean = CleanHost()
    client_ns = f"rt-bc{secrets.token_hex(3)}"
    made_ns = False
    try:
        clean.open()
        assert clean.holder is not None
        _ip("netns", "add", client_ns)
        made_ns = True
        _ip("-n", client_ns, "link", "add", "rtb0", "type", "veth",
            "peer", "name", "eth0", "netns", str(clean.holder.pid))  # fmt: skip
        _ip("-n", client_ns, "addr", "add", f"{CLIENT_ADDR}/24", "dev", "rtb0")
        _ip("-n", client_ns, "link", "set", "rtb0", "up")
        clean.enter("ip", "addr", "add", f"{HOST_ADDR}/24", "dev", "eth0")
        clean.enter("ip", "link", "set", "eth0", "up")

        # The host's sshd: its own host key and config, root by the console's key only.
        clean.run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                  "/etc/ssh/rt_bootstrap_host_key")  # fmt: skip
        host_pub = clean.path("/etc/ssh/rt_bootstrap_host_key.pub").read_text().split()
        clean.path("/etc/ssh/rt_bootstrap_sshd_config").write_text(SSHD_CONFIG)
        console_pub = _keygen(work / "console_key")
        ssh_dir = clean.path("/root/.ssh")
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        (ssh_dir / "rt_authorized_keys").write_text(console_pub + "\n")
        clean.path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        assert clean.holder is not None
        sshd = subprocess.Popen(
            [*clean._prefix(), "chroot", str(clean.base / "root"), "/usr/sbin/sshd", "-D",
             "-e", "-f", "/etc/ssh/rt_bootstrap_sshd_config"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        clean.daemons.append(sshd)
        deadline = time.monotonic() + 10
        while not listening(sshd.pid, 22):
            assert sshd.poll() is None, f"sshd exited: {sshd.stdout.read()}"
            assert time.monotonic() < deadline, "sshd did not listen within 10 s"
            time.sleep(0.05)  # polling /proc/net/tcp, bounded by the deadline

        known_hosts = work / "known_hosts"
        known_hosts.write_text(f"{HOST_ADDR} {host_pub[0]} {host_pub[1]}\n")
        site_secrets = work / "site"
        pki.create_site(site_secrets)
        _, trust_pub = keys.generate(work / "keys")
        site_file = work / "site.yaml"
        relay = f"{sys.executable} -m node_service.lab.relay --netns {client_ns} %h %p"
        document = {
            "site": "rtboot",
            "nodes": [{
                "name": NODE, "addresses": [HOST_ADDR],
                "ssh": {"host": HOST_ADDR, "port": 22, "user": "root",
                        "key": str(work / "console_key"), "proxy_command": relay},
            }],
            "known_hosts": str(known_hosts),
            "trust_pub": str(trust_pub),
        }  # fmt: skip
        site_file.write_text(yaml.safe_dump(document, sort_keys=False))
        yield BareHost(clean, client_ns, site_file, known_hosts, site_secrets, Path(trust_pub))
    finally:
        if clean.holder is not None and clean.holder.poll() is None:
            _kill_host_processes(clean.holder.pid)
        clean.close()
        if made_ns:
            subprocess.run(["ip", "netns", "del", client_ns], timeout=10, check=False)


def run_bootstrap(host: BareHost, package: Path) -> tuple[bootstrap.Bootstrap, list]:
    """Bootstrap through the service layer; returns it and every progress it emitted."""
    seen: list = []
    job = bootstrap.Bootstrap(host.site(), NODE, package)
    job.changed.connect(lambda node, progress: seen.append(progress))
    try:
        job.run()
        assert job.wait(RUN_TIMEOUT_S), f"bootstrap did not end: {job.progress().summary}"
    finally:
        job.close()
    for step in job.progress().steps:  # shown with -s: what the console would draw
        print(f"{step.name:9} {step.state:8} {step.message}")
    return job, seen


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited


def states(job: bootstrap.Bootstrap) -> dict[str, str]:
    return {s.name: s.state for s in job.progress().steps}


def test_the_host_is_bare(bare):
    assert bare.installed() == ""
    assert not os.path.lexists(bare.clean.path("/usr/bin/rampart"))
    # (the machine's own / may hold an empty /etc/rampart: only its contents matter)
    for path in ("/etc/rampart/node.yaml", "/etc/rampart/site", "/opt/rampart"):
        assert not os.path.lexists(bare.clean.path(path)), path


def test_a_wrong_host_key_is_refused_before_anything_is_sent(bare, node_deb, tmp_path):
    real = bare.known_hosts.read_text()
    other = _keygen(tmp_path / "impostor").split()
    bare.known_hosts.write_text(f"{HOST_ADDR} {other[0]} {other[1]}\n")
    try:
        job, _ = run_bootstrap(bare, node_deb)
    finally:
        bare.known_hosts.write_text(real)
    progress = job.progress()
    assert progress.failed_step is not None and progress.failed_step.name == "connect"
    assert "CHANGED" in progress.failed_step.message and NODE in progress.failed_step.message
    assert [s.state for s in progress.steps[1:]] == [SKIPPED] * (len(bootstrap.STEPS) - 1)
    assert progress.step("upload").message == "not run: connect failed"
    assert progress.summary.startswith(f"{NODE}: connect over SSH failed: WARNING")
    assert bare.leftovers() == [] and bare.installed() == ""


def test_a_missing_package_is_refused_locally(bare, tmp_path):
    job = bootstrap.Bootstrap(bare.site(), NODE, tmp_path / "rampart_9.9.9-1_amd64.deb")
    try:
        with pytest.raises(bootstrap.BootstrapError) as refused:
            job.run()
    finally:
        job.close()
    message = str(refused.value)
    assert "rampart_9.9.9-1_amd64.deb does not exist" in message
    assert message.endswith(f"nothing was sent to node {NODE}")
    assert all(s.state == PENDING for s in job.progress().steps)
    assert bare.leftovers() == [] and bare.installed() == ""


def test_cancel_stops_between_steps_and_leaves_nothing(bare, node_deb):
    job = bootstrap.Bootstrap(bare.site(), NODE, node_deb)

    def cancel_after_upload(_node, progress):
        if progress.step("upload").state == DONE:
            job.cancel()

    job.changed.connect(cancel_after_upload)
    try:
        job.run()
        assert job.wait(RUN_TIMEOUT_S), job.progress().summary
    finally:
        job.close()
    got = states(job)
    assert got["connect"] == got["upload"] == DONE
    assert {got[s] for s in bootstrap.STEPS[2:]} == {CANCELLED}
    assert job.progress().summary == f"{NODE}: cancelled"
    assert bare.leftovers() == [] and bare.installed() == ""


def test_a_corrupted_package_fails_at_install_and_skips_the_rest(bare, node_deb, tmp_path):
    data = bytearray(node_deb.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 65536] = bytes(65536)  # inside data.tar: control stays readable
    broken = tmp_path / node_deb.name
    broken.write_bytes(bytes(data))

    job, seen = run_bootstrap(bare, broken)

    got = states(job)
    assert got["connect"] == got["upload"] == DONE
    assert got["install"] == FAILED
    failed = job.progress().step("install")
    assert failed.message.startswith(f"dpkg -i {node_deb.name} failed: ")
    for later in bootstrap.STEPS[3:]:
        assert got[later] == SKIPPED
        assert job.progress().step(later).message == "not run: install failed"
    # The failure was shown while it happened, not only at the end.
    assert any(p.step("install").state == FAILED for p in seen)
    assert bare.leftovers() == []
    assert not bare.installed().startswith("install ok installed")
    assert not os.path.lexists(bare.clean.path("/etc/rampart/site/node.key"))


def test_bootstrap_makes_a_bare_host_a_running_node(bare, node_deb):
    started = time.monotonic()
    job, seen = run_bootstrap(bare, node_deb)
    took = time.monotonic() - started

    progress = job.progress()
    assert progress.ok, progress.summary
    assert progress.summary == f"{NODE}: bootstrapped, rampartd running"
    # Each step ran, then finished, in order; none was reported done twice.
    order = []
    for p in seen:
        for s in p.steps:
            if s.state == DONE and s.name not in order:
                order.append(s.name)
    assert order == list(bootstrap.STEPS)
    assert any(0 < p.step("upload").progress < 1 for p in seen), "no upload progress shown"
    assert "no rampart installed yet" in progress.step("connect").message
    assert "no systemd here" in progress.step("start").message
    assert progress.step("check").message == f"rampartd answers as {NODE} (0 modules)"

    host = bare.clean
    assert bare.installed() == f"install ok installed {project_version()}-1+boot"
    node_yaml = host.path("/etc/rampart/node.yaml").read_text()
    assert yaml.safe_load(node_yaml)["node"] == NODE
    site = host.path("/etc/rampart/site")
    assert site.stat().st_mode & 0o777 == 0o700
    assert (site / "ca.pem").read_bytes() == (bare.site_secrets / "ca.pem").read_bytes()
    for secret in ("node.key", "heartbeat.secret"):
        assert (site / secret).stat().st_mode & 0o777 == 0o600, secret
    assert (site / "heartbeat.secret").read_bytes() == (
        bare.site_secrets / "heartbeat.secret"
    ).read_bytes()
    cert = (site / "node.pem").read_bytes()
    from cryptography import x509

    assert x509.load_pem_x509_certificate(cert).subject.rfc4514_string() == f"CN={NODE}"
    assert pki.tls_context(site, server=True) is not None  # CA, cert and key fit together
    trusted = host.path("/etc/rampart/trust/rtboot.pub")
    assert trusted.read_bytes() == bare.trust_pub.read_bytes()
    assert list(site.glob(".*.new")) == [] and bare.leftovers() == []

    pid = int(host.path("/run/rampart/rampartd.pid").read_text())
    assert "rampartd" in Path(f"/proc/{pid}/cmdline").read_bytes().decode()
    with Session(bare.site(), bare.site().node(NODE)).connect() as session:
        answer = session.run(["rampart", "state", "--json"], timeout=30)
    assert answer.rc == 0, answer.err
    assert json.loads(answer.out) == {"node": NODE, "modules": []}
    print(f"bootstrap took {took:.1f} s")


def test_a_second_bootstrap_restarts_the_node_with_its_files(bare, node_deb):
    old_pid = int(bare.clean.path("/run/rampart/rampartd.pid").read_text())
    job, _ = run_bootstrap(bare, node_deb)
    progress = job.progress()
    assert progress.ok, progress.summary
    assert "rampart already there, no module running" in progress.step("connect").message
    new_pid = int(bare.clean.path("/run/rampart/rampartd.pid").read_text())
    assert new_pid != old_pid and not alive(old_pid)
    assert progress.step("check").message == f"rampartd answers as {NODE} (0 modules)"
