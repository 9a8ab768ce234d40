"""A real sshd per lab node, reachable only through the lab's client host.

Each node runs the machine's /usr/sbin/sshd with its own config and host
key, listening on its LAN address, accepting root with the lab's console key
only. Its pid file and privilege separation dir (/run/sshd) are in the
host's private /run, so several nodes never share them.
"""

from __future__ import annotations

import os
import subprocess

from node_service.lab import hosts, netns
from node_service.lab.site import (
    SSH_PORT,
    Host,
    LabError,
    Layout,
    known_hosts_line,
    sshd_config,
)

SSHD = "/usr/sbin/sshd"
LISTEN_TIMEOUT_S = 5.0
TCP_LISTEN = "0A"


def keygen(path: os.PathLike[str] | str, comment: str) -> str:
    """Create an Ed25519 key pair at ``path`` (and ``path``.pub); return the public line."""
    hosts.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        f"ssh key {path}",
    )
    with open(f"{path}.pub") as f:
        return f.read().strip()


def write_console_keys(layout: Layout) -> None:
    layout.console_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    public = keygen(layout.console_key, f"rampart lab {layout.name} console")
    layout.authorized_keys.write_text(public + "\n")
    os.chmod(layout.authorized_keys, 0o600)


def write_host_keys(layout: Layout) -> None:
    """Host keys and configs for every node, and the known_hosts naming them."""
    lines = []
    for node in layout.nodes:
        ssh_dir = layout.ssh_dir(node)
        ssh_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        public = keygen(ssh_dir / "ssh_host_ed25519_key", f"root@{node.name}")
        (ssh_dir / "sshd_config").write_text(sshd_config(layout, node, hosts.venv_bin()))
        lines.append(known_hosts_line(node, public))
    layout.known_hosts.write_text("".join(lines))
    os.chmod(layout.known_hosts, 0o644)


def pid(layout: Layout, host: Host) -> int | None:
    try:
        text = (layout.private_dir(host, "/run") / "sshd.pid").read_text()
        return int(text.strip())
    except (OSError, ValueError):
        return None


def listening(pid: int, port: int = SSH_PORT) -> bool:
    """Whether something listens on TCP ``port`` in ``pid``'s network namespace."""
    try:
        with open(f"/proc/{pid}/net/tcp") as f:
            rows = f.read().splitlines()[1:]
    except OSError:
        return False
    for row in rows:
        fields = row.split()
        if len(fields) > 3 and fields[3] == TCP_LISTEN and int(fields[1].split(":")[1], 16) == port:
            return True
    return False


def running(layout: Layout, host: Host) -> bool:
    found = pid(layout, host)
    return found is not None and listening(found) and netns_matches(found, host)


def netns_matches(pid: int, host: Host) -> bool:
    try:
        st = os.stat(f"/proc/{pid}/ns/net")
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == netns.ns_id(host.name)


def start(layout: Layout, host: Host) -> None:
    """Start sshd in the host; it daemonizes itself (and so outlives the CLI)."""
    log = "/var/log/rampart/sshd.log"
    config = layout.ssh_dir(host) / "sshd_config"
    argv = [*hosts.nsenter(layout, host), SSHD, "-f", str(config), "-E", log]
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=hosts.CMD_TIMEOUT_S, check=False
    )
    if done.returncode != 0:
        raise LabError(f"sshd of {host.name} did not start: {done.stderr.strip()}")


def wait_listening(layout: Layout, hosts_: list[Host]) -> dict[str, bool]:
    """Wait (bounded) until each host's sshd listens; host name -> listening."""
    hosts.wait_until(lambda: all(running(layout, h) for h in hosts_), LISTEN_TIMEOUT_S)
    return {h.name: running(layout, h) for h in hosts_}
