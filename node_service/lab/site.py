"""The shape of a lab: host names, addresses, interface names and paths.

Pure code: everything here is derived from the lab's name and node count, so
`up`, `status` and `down` (even of a half-created lab) agree on what exists
without asking the kernel. Side effects live in netns.py, hosts.py, sshd.py
and control.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from node_service.errors import UserError

NAME_RE = re.compile(r"[a-z][a-z0-9]{0,7}")
HOST_RE = re.compile(r"(?P<lab>[a-z][a-z0-9]{0,7})-(?P<short>n[0-9]+|client)")
MAX_NODES = 8
DEFAULT_NAME = "lab"

LAN_PREFIX = "198.51.100."
HB2_PREFIX = "203.0.113."
NODE_HOST_OFFSET = 10  # node k gets .1k on both networks
CLIENT_HOST = 100
VIP_FIRST, VIP_COUNT = 200, 20
PREFIX_LEN = 24

STATE_ROOT = Path("/var/lib/rampart-lab")
RUN_ROOT = Path("/run/rampart-lab")
NETNS_DIR = Path("/run/netns")

# Paths a lab host sees as its own; every other path is the machine's.
PRIVATE_DIRS = {
    "/etc/rampart": "etc",
    "/var/lib/rampart": "lib",
    "/var/log/rampart": "log",
    "/run": "run",
    "/srv": "srv",
}

SSH_PORT = 22
HEARTBEAT_PORT = 7810
REPLICATION_PORT = 7811
API_SOCKET = "/run/rampart/api.sock"


class LabError(UserError):
    """A lab command cannot do what was asked (name, node, state of the lab)."""


@dataclass(frozen=True)
class Link:
    """One cable: the host's interface, its switch port and the bridge it is on."""

    network: str  # "lan" or "hb2"
    ifname: str  # inside the host
    port: str  # inside the switch namespace
    bridge: str
    address: str


@dataclass(frozen=True)
class Host:
    lab: str
    short: str  # "n1".."n8" or "client"
    links: tuple[Link, ...]

    @property
    def name(self) -> str:
        return f"{self.lab}-{self.short}"

    @property
    def is_node(self) -> bool:
        return self.short != "client"

    @property
    def addresses(self) -> list[str]:
        return [link.address for link in self.links]

    def link(self, network: str) -> Link:
        for link in self.links:
            if link.network == network:
                return link
        raise LabError(f"{self.name} has no {network} network (it has {self._networks()})")

    def _networks(self) -> str:
        return ", ".join(link.network for link in self.links)


@dataclass(frozen=True)
class Layout:
    name: str
    node_count: int

    @property
    def nodes(self) -> tuple[Host, ...]:
        return tuple(self._node(k) for k in range(1, self.node_count + 1))

    def _node(self, k: int) -> Host:
        short = f"n{k}"
        host = NODE_HOST_OFFSET + k
        return Host(
            self.name,
            short,
            (
                Link("lan", "eth0", f"{short}-lan", "br-lan", f"{LAN_PREFIX}{host}"),
                Link("hb2", "eth1", f"{short}-hb2", "br-hb2", f"{HB2_PREFIX}{host}"),
            ),
        )

    @property
    def client(self) -> Host:
        return Host(
            self.name,
            "client",
            (Link("lan", "eth0", "client-lan", "br-lan", f"{LAN_PREFIX}{CLIENT_HOST}"),),
        )

    @property
    def hosts(self) -> tuple[Host, ...]:
        return (*self.nodes, self.client)

    @property
    def switch(self) -> str:
        return f"{self.name}-sw"

    @property
    def netns_names(self) -> list[str]:
        return [self.switch, *(h.name for h in self.hosts)]

    @property
    def vip_pool(self) -> list[str]:
        return [f"{LAN_PREFIX}{VIP_FIRST + i}" for i in range(VIP_COUNT)]

    # -- paths -------------------------------------------------------------
    @property
    def state_dir(self) -> Path:
        return STATE_ROOT / self.name

    @property
    def run_dir(self) -> Path:
        return RUN_ROOT / self.name

    @property
    def record_file(self) -> Path:
        return self.state_dir / "lab.json"

    @property
    def site_file(self) -> Path:
        return self.state_dir / "site.yaml"

    @property
    def site_secrets(self) -> Path:
        return self.state_dir / "site"

    @property
    def keys_dir(self) -> Path:
        return self.state_dir / "keys"

    @property
    def signing_key(self) -> Path:
        return self.keys_dir / "signing.key"

    @property
    def trust_pub(self) -> Path:
        return self.keys_dir / "signing.pub"

    @property
    def console_dir(self) -> Path:
        return self.state_dir / "console"

    @property
    def console_key(self) -> Path:
        return self.console_dir / "id_ed25519"

    @property
    def authorized_keys(self) -> Path:
        return self.console_dir / "authorized_keys"

    @property
    def known_hosts(self) -> Path:
        return self.console_dir / "known_hosts"

    def host_dir(self, host: Host) -> Path:
        return self.state_dir / "hosts" / host.short

    def private_dir(self, host: Host, path: str) -> Path:
        """Where the host's private ``path`` lives, seen from the root namespace."""
        return self.host_dir(host) / PRIVATE_DIRS[path]

    def ssh_dir(self, host: Host) -> Path:
        return self.host_dir(host) / "ssh"

    def netns_file(self, host_name: str) -> Path:
        return NETNS_DIR / host_name

    def mnt_file(self, host: Host) -> Path:
        return self.run_dir / f"{host.short}.mnt"

    def api_socket(self, host: Host) -> Path:
        return self.private_dir(host, "/run") / "rampart" / "api.sock"


def validate_name(name: str) -> str:
    if not NAME_RE.fullmatch(name or ""):
        raise LabError(
            f"invalid lab name {name!r}: expected a lowercase letter then up to 7 letters or "
            "digits (interface and namespace names are derived from it)"
        )
    return name


def validate_node_count(count: int) -> int:
    if not 1 <= count <= MAX_NODES:
        raise LabError(f"invalid --nodes {count}: a lab has 1 to {MAX_NODES} nodes")
    return count


def lab_of_host(given: str, default: str) -> str:
    """The lab a host argument names: ``rt12-n1`` carries its lab, ``n1`` does not."""
    match = HOST_RE.fullmatch(given)
    return match.group("lab") if match else default


def resolve_host(layout: Layout, given: str) -> Host:
    for host in layout.hosts:
        if given in (host.name, host.short):
            return host
    known = ", ".join(h.name for h in layout.hosts)
    raise LabError(f"unknown host {given!r} in lab {layout.name}: expected one of {known}")


def networks_arg(host: Host, network: str | None) -> list[Link]:
    """The links a cut/heal acts on: all of them, or the one network asked for."""
    if network is None:
        return list(host.links)
    return [host.link(network)]


def is_lab_netns(name: str, entry: str) -> bool:
    """Whether a /run/netns entry belongs to lab ``name`` (for half-created labs)."""
    return re.fullmatch(rf"{re.escape(name)}-(sw|client|n[1-8])", entry) is not None


# -- documents the lab writes ----------------------------------------------
def node_yaml(host: Host) -> dict:
    return {
        "node": host.name,
        "heartbeat_port": HEARTBEAT_PORT,
        "replication_port": REPLICATION_PORT,
        "api_socket": API_SOCKET,
        "state_dir": "/var/lib/rampart",
        "trust_dir": "/etc/rampart/trust",
        "site_dir": "/etc/rampart/site",
        "log_level": "info",
    }


def proxy_command(layout: Layout, python: str) -> str:
    return f"{python} -m node_service.lab.relay --netns {layout.client.name} %h %p"


def site_document(layout: Layout, python: str) -> dict:
    return {
        "site": layout.name,
        "nodes": [
            {
                "name": node.name,
                "addresses": node.addresses,
                "ssh": {
                    "host": node.addresses[0],
                    "port": SSH_PORT,
                    "user": "root",
                    "key": str(layout.console_key),
                    "proxy_command": proxy_command(layout, python),
                },
            }
            for node in layout.nodes
        ],
        "known_hosts": str(layout.known_hosts),
        "signing_key": str(layout.signing_key),
        "trust_pub": str(layout.trust_pub),
        "vip_pool": layout.vip_pool,
    }


def sshd_config(layout: Layout, host: Host, venv_bin: str) -> str:
    # Keys and config live outside the host's private dirs so that /etc/rampart
    # holds only what a real node's /etc/rampart would hold.
    lines = [
        f"# sshd of lab host {host.name} (written by rampart lab up)",
        f"ListenAddress {host.addresses[0]}",
        f"Port {SSH_PORT}",
        f"HostKey {layout.ssh_dir(host) / 'ssh_host_ed25519_key'}",
        "PidFile /run/sshd.pid",
        "PermitRootLogin prohibit-password",
        "AllowUsers root",
        "AuthenticationMethods publickey",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        f"AuthorizedKeysFile {layout.authorized_keys}",
        "UsePAM no",
        "X11Forwarding no",
        "PrintMotd no",
        "UseDNS no",
        "MaxStartups 50:30:100",
        # The console runs `rampart ...` on nodes: the lab's rampart is the venv's.
        f"SetEnv PATH={venv_bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "Subsystem sftp internal-sftp",
    ]
    return "\n".join(lines) + "\n"


def known_hosts_line(host: Host, public_key: str) -> str:
    key_type, key_body = public_key.split()[:2]
    return f"{host.addresses[0]},{host.name} {key_type} {key_body}\n"


# -- mountinfo ------------------------------------------------------------
@dataclass(frozen=True)
class Mount:
    mount_id: int
    parent_id: int
    device: str  # "major:minor"
    mountpoint: str
    fstype: str


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 10 or "-" not in fields:
            continue
        sep = fields.index("-")
        mounts.append(
            Mount(
                int(fields[0]),
                int(fields[1]),
                fields[2],
                _unescape(fields[4]),
                fields[sep + 1],
            )
        )
    return mounts


def fuse_mounts(mounts: list[Mount]) -> list[Mount]:
    """FUSE mounts, deepest first so a lazy unmount never skips a child."""
    found = [m for m in mounts if m.fstype == "fuse" or m.fstype.startswith("fuse.")]
    return sorted(found, key=lambda m: m.mountpoint.count("/"), reverse=True)


def topmost_under(mounts: list[Mount], root: str) -> list[str]:
    """Mount points strictly below ``root`` that are not below another one of them.

    A lazy unmount of these detaches everything under ``root``.
    """
    below = sorted(
        {m.mountpoint for m in mounts if m.mountpoint.startswith(root.rstrip("/") + "/")}
    )
    top: list[str] = []
    for point in below:
        if not any(point.startswith(t + "/") for t in top):
            top.append(point)
    return top


def under(mounts: list[Mount], roots: list[Path]) -> list[str]:
    """Mount points at or below any of ``roots``, deepest first."""
    prefixes = [str(r) for r in roots]
    found = {
        m.mountpoint
        for m in mounts
        if any(m.mountpoint == p or m.mountpoint.startswith(p + "/") for p in prefixes)
    }
    return sorted(found, key=lambda p: p.count("/"), reverse=True)


# -- health --------------------------------------------------------------
@dataclass(frozen=True)
class HostFacts:
    """What status observed about one host, before judging it."""

    netns: bool
    links_up: dict[str, bool]  # network -> host side admin up
    ports_up: dict[str, bool]  # network -> switch port up (False = cable cut)
    sshd: bool
    rampartd_process: bool
    api_socket: bool


def judge_host(host: Host, facts: HostFacts) -> tuple[dict, str]:
    """Per-host status entry and a sentence saying why it is in that state."""
    up = facts.netns and bool(facts.links_up) and all(facts.links_up.values())
    networks = {
        net: facts.links_up.get(net, False) and facts.ports_up.get(net, False)
        for net in (link.network for link in host.links)
    }
    rampartd = facts.rampartd_process and facts.api_socket
    if not facts.netns:
        reason = "its network namespace is missing (lab half created?)"
    elif not up:
        reason = "powered off (crashed): its links are down; `rampart lab boot` brings it back"
    elif not all(networks.values()):
        cut = [n for n, ok in networks.items() if not ok]
        reason = f"running, cable cut on {', '.join(cut)}"
    elif not host.is_node:
        reason = "running"
    elif not facts.sshd:
        reason = "running, but sshd is not"
    elif not facts.rampartd_process:
        reason = "running, but rampartd is not (see its /var/log/rampart/rampartd.log)"
    elif not rampartd:
        reason = f"running, rampartd started but {API_SOCKET} is not there yet"
    else:
        reason = "running, sshd and rampartd ready"
    entry = {"name": host.name, "addresses": host.addresses, "up": up, "networks": networks}
    if host.is_node:
        entry.update({"sshd": facts.sshd, "rampartd": rampartd})
    entry["reason"] = reason
    return entry, reason
