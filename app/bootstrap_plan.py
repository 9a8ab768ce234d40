"""What "Add node" decides before and between its steps: plain functions over plain data.

The node package is read here (a .deb is an ar archive; its control fields
say what it is and what it needs), the files sent to a node are computed
here, and the node's answers are judged here, each judgement with the
sentence the console shows. The side effects (SSH, SFTP, dpkg on the node)
are in ``app.bootstrap``.
"""

from __future__ import annotations

import hashlib
import io
import ipaddress
import json
import os
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from app.deploy import CANCELLED, RUNNING, NodeProgress, StepStatus
from app.site import Site
from app.ssh import RunResult
from node_service.errors import UserError

STEPS = ("connect", "upload", "install", "node_yaml", "site", "trust", "start", "check")
LABELS = {
    "connect": "Connect over SSH",
    "upload": "Upload the node package",
    "install": "Install the package (dpkg -i, offline)",
    "node_yaml": "Write /etc/rampart/node.yaml",
    "site": "Write the site files",
    "trust": "Write the trusted module key",
    "start": "Start rampartd",
    "check": "Check `rampart state`",
}
PACKAGE_NAME = "rampart"


class BootstrapError(UserError):
    """A node cannot be bootstrapped as asked (refused before, or by a step)."""


# -- pure decisions ---------------------------------------------------------------


@dataclass(frozen=True)
class NodePackage:
    """The node .deb the console carries: what it is, and its fingerprint."""

    path: Path
    name: str
    version: str
    architecture: str
    depends: str
    size: int
    sha256: str


def _ar_members(data: bytes, where: str) -> dict[str, bytes]:
    """The members of an ar archive (a .deb is one), by name."""
    if not data.startswith(b"!<arch>\n"):
        raise BootstrapError(f"{where}: not a Debian package (no ar header); expected a .deb")
    members, pos = {}, 8
    while pos + 60 <= len(data):
        header = data[pos : pos + 60]
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        try:
            size = int(header[48:58].decode("ascii").strip())
        except ValueError:
            raise BootstrapError(f"{where}: damaged .deb (bad member header at {pos})") from None
        members[name] = data[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size & 1)
    return members


def parse_control(text: str) -> dict[str, str]:
    """Debian control fields (continuation lines joined)."""
    fields: dict[str, str] = {}
    last = None
    for line in text.splitlines():
        if line[:1] in (" ", "\t") and last is not None:
            fields[last] += "\n" + line.strip()
        elif ":" in line:
            last, value = line.split(":", 1)
            fields[last] = value.strip()
    return fields


def read_package(path: str | os.PathLike[str]) -> NodePackage:
    """Read a node .deb's control fields, refusing anything but Rampart's node package."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise BootstrapError(
            f"node package {p} does not exist; build it with `make deb` "
            "(build/deb/rampart_VERSION_ARCH.deb)"
        ) from None
    except OSError as exc:
        raise BootstrapError(f"node package {p}: cannot read: {exc.strerror}") from None
    members = _ar_members(data, str(p))
    control_name = next((n for n in members if n.startswith("control.tar")), None)
    if control_name is None or "debian-binary" not in members:
        raise BootstrapError(f"{p}: not a Debian package (no control archive); expected a .deb")
    try:
        with tarfile.open(fileobj=io.BytesIO(members[control_name])) as tar:
            member = tar.extractfile("./control")
            text = member.read().decode("utf-8") if member else ""
    except (tarfile.TarError, KeyError, UnicodeDecodeError, EOFError, OSError) as exc:
        raise BootstrapError(f"{p}: unreadable {control_name}: {exc}") from None
    fields = parse_control(text)
    if fields.get("Package") != PACKAGE_NAME:
        raise BootstrapError(
            f"{p} is package {fields.get('Package')!r}, not {PACKAGE_NAME!r}; "
            "expected the Rampart node package (rampart_VERSION_ARCH.deb)"
        )
    return NodePackage(
        p, PACKAGE_NAME, fields.get("Version", "?"), fields.get("Architecture", "?"),
        fields.get("Depends", ""), len(data), hashlib.sha256(data).hexdigest(),
    )  # fmt: skip


def dependency_names(depends: str) -> tuple[tuple[str, ...], ...]:
    """Each Depends entry as its alternatives' package names (versions dropped)."""
    out = []
    for entry in depends.split(","):
        names = tuple(
            alt.split("(")[0].split(":")[0].strip() for alt in entry.split("|") if alt.strip()
        )
        if names:
            out.append(names)
    return tuple(out)


def missing_dependencies(depends: str, query_out: str) -> list[str]:
    """Depends entries none of whose alternatives ``dpkg-query`` lists as installed.

    ``query_out`` holds lines ``NAME STATUS...`` (``-f '${Package} ${Status}\\n'``).
    """
    installed = {
        line.split()[0]
        for line in query_out.splitlines()
        if line.strip() and line.rstrip().endswith("install ok installed")
    }
    return [
        " | ".join(alts)
        for alts in dependency_names(depends)
        if not any(a in installed for a in alts)
    ]


def node_yaml_text(node: str) -> str:
    """node.yaml for a bootstrapped node: its name, every other key at its default.

    Checked with the node's own parser, so what we write is what rampartd accepts.
    """
    from node_service import config

    text = (
        "# Written by the Rampart console (Add node). Every key but `node` has its\n"
        "# default; see /opt/rampart/share/node.yaml.example.\n"
        f"node: {node}\n"
    )
    parsed = config.parse(text, "node.yaml")
    if parsed.node != node:
        raise BootstrapError(f"node.yaml for {node!r} would name {parsed.node!r}")
    return text


def dpkg_reason(result: RunResult) -> str:
    """The line of dpkg's output that says why, not its closing summary."""
    lines = [ln.strip() for ln in (result.err + "\n" + result.out).splitlines() if ln.strip()]
    for i, line in enumerate(lines):
        if "error" in line.lower():
            if line.endswith(":") and i + 1 < len(lines):
                return f"{line} {lines[i + 1]}"
            return line
    return result.first_error_line


def running_modules(state_json: str) -> list[str]:
    """``MODULE STATE`` for every module a node's ``rampart state --json`` shows active."""
    try:
        doc = json.loads(state_json)
    except ValueError:
        return []
    modules = doc.get("modules", []) if isinstance(doc, dict) else []
    out = []
    for m in modules if isinstance(modules, list) else []:
        if isinstance(m, dict) and m.get("state") not in (None, "STOP"):
            out.append(f"{m.get('module', '?')} {m.get('state')}")
    return out


def judge_state(state_json: str, node: str) -> tuple[bool, str]:
    """Whether rampartd answered as ``node``; with the reason either way."""
    try:
        doc = json.loads(state_json)
    except ValueError:
        return False, f"`rampart state --json` printed no JSON: {state_json.strip()[:120]!r}"
    if not isinstance(doc, dict) or "node" not in doc:
        return False, "`rampart state --json` has no node field"
    if doc["node"] != node:
        return False, f"rampartd answers as {doc['node']!r}, not {node!r}; check node.yaml"
    count = len(doc.get("modules") or [])
    return True, f"rampartd answers as {node} ({count} module{'s' if count != 1 else ''})"


def privileged(argv: list[str], user: str) -> list[str]:
    """Run as root: directly when logged in as root, else through sudo (no prompt)."""
    return argv if user == "root" else ["sudo", "-n", "--", *argv]


def secrets_dir(site: Site) -> Path:
    """Where the site CA and heartbeat secret are kept: ``site/`` beside the site file
    (the layout `rampart lab up` writes)."""
    if site.path is None:
        raise BootstrapError(f"site {site.name} has no file; save it before adding nodes")
    return Path(site.path).resolve().parent / "site"


def find_package(search: tuple[Path, ...] | None = None) -> Path:
    """The node .deb the console carries: $RAMPART_NODE_PACKAGE, the console
    package's copy (beside its venv, /opt/rampart-console/share/node, or in
    the venv), then a checkout's build/deb."""
    env = os.environ.get("RAMPART_NODE_PACKAGE")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[1]
    prefix = Path(sys.prefix)
    dirs = search or (
        prefix.parent / "share" / "node",
        prefix / "share" / "rampart" / "node",
        repo / "build" / "deb",
    )
    for d in dirs:
        found = sorted(d.glob(f"{PACKAGE_NAME}_*.deb"), key=lambda p: p.stat().st_mtime)
        if found:
            return found[-1]
    raise BootstrapError(
        "no node package found (looked in " + ", ".join(str(d) for d in dirs) + "); "
        "build it with `make deb` or set RAMPART_NODE_PACKAGE"
    )


def _phrase(step: str) -> str:
    """A step's label inside a sentence ("connect over SSH")."""
    label = LABELS[step]
    return label[:1].lower() + label[1:]


@dataclass(frozen=True)
class BootstrapProgress(NodeProgress):
    @classmethod
    def fresh(cls, node: str) -> BootstrapProgress:
        return cls(node, tuple(StepStatus(s) for s in STEPS))

    @property
    def summary(self) -> str:
        failed = self.failed_step
        if failed is not None:
            return f"{self.node}: {_phrase(failed.name)} failed: {failed.message}"
        if self.ok:
            return f"{self.node}: bootstrapped, rampartd running"
        if any(s.state == CANCELLED for s in self.steps):
            return f"{self.node}: cancelled"
        running = next((s for s in self.steps if s.state == RUNNING), None)
        return f"{self.node}: {_phrase(running.name) if running else 'waiting'}"


def with_node(
    site: Site, name: str, address: str, user: str = "root", port: int = 22,
    key: str | None = None, proxy_command: str | None = None,
) -> Site:  # fmt: skip
    """``site`` plus one node reached over SSH at ``address`` ("Add node" before bootstrapping).

    Judged with the site file's own reader, so the result saves and loads as it is.
    """
    from app.site import NAME_RE, parse, to_document

    where = f"site {site.name}"
    if not NAME_RE.fullmatch(name or ""):
        raise BootstrapError(
            f"{where}: node name {name!r} is not valid; expected letters, digits, '_', '.', '-'"
        )
    if name in site.node_names:
        raise BootstrapError(f"{where} already has a node named {name}; choose another name")
    try:
        address = str(ipaddress.ip_address(address.strip()))
    except ValueError:
        raise BootstrapError(
            f"{where}: {address!r} is not an IP address; expected the node's LAN address"
        ) from None
    if not 1 <= port <= 65535:
        raise BootstrapError(f"{where}: SSH port {port} is not 1-65535")
    ssh: dict[str, object] = {"host": address, "port": port, "user": user.strip() or "root"}
    if key:
        ssh["key"] = key
    if proxy_command:
        ssh["proxy_command"] = proxy_command
    document = to_document(site)
    document["nodes"].append({"name": name, "addresses": [address], "ssh": ssh})
    filename = Path(site.path).name if site.path else "site.yaml"
    return parse(yaml.safe_dump(document, sort_keys=False), filename, site.path)
