"""The site file: which nodes make up one installation and how to reach them.

A site file is YAML (the lab writes one). Loading validates every field and
refuses with ``site.yaml:LINE: what is wrong; expected ...``; secrets are
refused outright because passwords and key passphrases live in the OS
keyring only. Saving is atomic (temp file, fsync, rename), so a crash or a
bad model never leaves a half-written site file behind.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from node_service.errors import ConfigError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
SECRET_KEYS = {"password", "passphrase", "secret", "key_passphrase"}
TOP_KEYS = {"site", "nodes", "known_hosts", "signing_key", "trust_pub", "vip_pool"}
NODE_KEYS = {"name", "addresses", "ssh"}
SSH_KEYS = {"host", "port", "user", "key", "agent", "proxy_command"}
MAX_BYTES = 1 << 20


class SiteError(ConfigError):
    """The site file is unreadable or invalid."""


@dataclass(frozen=True)
class SshAccess:
    host: str
    port: int = 22
    user: str = "root"
    key: str | None = None  # private key file; its passphrase (if any) is in the keyring
    agent: bool = False
    proxy_command: str | None = None  # %h %p %r are replaced, as ssh does


@dataclass(frozen=True)
class SiteNode:
    name: str
    addresses: tuple[str, ...]
    ssh: SshAccess


@dataclass(frozen=True)
class Site:
    name: str
    nodes: tuple[SiteNode, ...]
    known_hosts: str | None = None
    signing_key: str | None = None
    trust_pub: str | None = None
    vip_pool: tuple[str, ...] = ()
    path: str | None = field(default=None, compare=False)

    def node(self, name: str) -> SiteNode:
        for node in self.nodes:
            if node.name == name:
                return node
        known = ", ".join(n.name for n in self.nodes) or "none"
        raise SiteError(f"site {self.name}: no node named {name!r}; its nodes are {known}")

    @property
    def node_names(self) -> tuple[str, ...]:
        return tuple(n.name for n in self.nodes)

    def resolve(self, path: str) -> Path:
        """A path from the site file: relative ones are relative to the file's directory."""
        p = Path(os.path.expanduser(path))
        if p.is_absolute() or self.path is None:
            return p
        return Path(self.path).resolve().parent / p


# -- reading ---------------------------------------------------------------------


class _Reader:
    """Walks the YAML node tree so every complaint carries its line."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.constructor = yaml.SafeLoader("")

    def fail(self, node: yaml.Node | None, message: str) -> SiteError:
        line = node.start_mark.line + 1 if node is not None else 1
        return SiteError(f"{self.filename}:{line}: {message}")

    def mapping(self, node: yaml.Node, what: str, allowed: set[str]) -> dict[str, yaml.Node]:
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, f"{what} must be a mapping of keys to values")
        out: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key in SECRET_KEYS:
                raise self.fail(
                    key_node,
                    f"{what} has a {key!r}; secrets are never stored in the site file, "
                    "they go in the OS keyring (the console asks for them)",
                )
            if key not in allowed:
                expected = ", ".join(sorted(allowed))
                raise self.fail(key_node, f"unknown key {key!r} in {what}; expected {expected}")
            if key in out:
                raise self.fail(key_node, f"key {key!r} appears twice in {what}")
            out[key] = value_node
        return out

    def scalar(self, node: yaml.Node, what: str) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            raise self.fail(node, f"{what} must be a single value")
        try:
            return self.constructor.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            raise self.fail(node, f"{what}: {exc}") from None

    def text(self, node: yaml.Node, what: str, pattern: re.Pattern[str] | None = None) -> str:
        value = self.scalar(node, what)
        if not isinstance(value, str) or not value.strip():
            raise self.fail(node, f"{what} must be a non-empty string, got {value!r}")
        if pattern is not None and not pattern.fullmatch(value):
            raise self.fail(node, f"{what} {value!r} is not a valid name (letters, digits, _ . -)")
        return value

    def integer(self, node: yaml.Node, what: str, low: int, high: int) -> int:
        value = self.scalar(node, what)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.fail(node, f"{what} must be an integer {low}-{high}, got {value!r}")
        return value

    def boolean(self, node: yaml.Node, what: str) -> bool:
        value = self.scalar(node, what)
        if not isinstance(value, bool):
            raise self.fail(node, f"{what} must be true or false, got {value!r}")
        return value

    def address(self, node: yaml.Node, what: str) -> str:
        value = self.scalar(node, what)
        try:
            return str(ipaddress.ip_address(str(value)))
        except ValueError:
            raise self.fail(node, f"{what} {value!r} is not an IP address") from None

    def sequence(self, node: yaml.Node, what: str) -> list[yaml.Node]:
        if not isinstance(node, yaml.SequenceNode):
            raise self.fail(node, f"{what} must be a list")
        return list(node.value)

    def ssh(self, node: yaml.Node, where: str, default_host: str | None) -> SshAccess:
        fields = self.mapping(node, f"ssh of {where}", SSH_KEYS)
        if "host" in fields:
            host = self.text(fields["host"], f"ssh host of {where}")
        elif default_host is not None:
            host = default_host
        else:
            raise self.fail(node, f"ssh of {where} has no host; expected host: ADDRESS")
        opt = {}
        if "port" in fields:
            opt["port"] = self.integer(fields["port"], f"ssh port of {where}", 1, 65535)
        if "user" in fields:
            opt["user"] = self.text(fields["user"], f"ssh user of {where}")
        if "key" in fields:
            opt["key"] = self.text(fields["key"], f"ssh key of {where}")
        if "agent" in fields:
            opt["agent"] = self.boolean(fields["agent"], f"ssh agent of {where}")
        if "proxy_command" in fields:
            opt["proxy_command"] = self.text(fields["proxy_command"], f"proxy_command of {where}")
        return SshAccess(host=host, **opt)

    def site_node(self, node: yaml.Node, index: int) -> SiteNode:
        fields = self.mapping(node, f"node {index + 1}", NODE_KEYS)
        if "name" not in fields:
            raise self.fail(node, f"node {index + 1} has no name; expected name: HOSTNAME")
        name = self.text(fields["name"], f"name of node {index + 1}", NAME_RE)
        where = f"node {name}"
        if "addresses" not in fields:
            raise self.fail(node, f"{where} has no addresses; expected addresses: [LAN, ...]")
        items = self.sequence(fields["addresses"], f"addresses of {where}")
        if not items:
            raise self.fail(fields["addresses"], f"{where} has no addresses; expected at least one")
        addresses = tuple(self.address(a, f"address of {where}") for a in items)
        if "ssh" in fields:
            ssh = self.ssh(fields["ssh"], where, addresses[0])
        else:
            ssh = SshAccess(host=addresses[0])
        return SiteNode(name, addresses, ssh)

    def site(self, root: yaml.Node | None, path: str | None) -> Site:
        if root is None:
            raise self.fail(None, "the site file is empty; expected site: NAME and nodes: [...]")
        fields = self.mapping(root, "the site file", TOP_KEYS)
        if "site" not in fields:
            raise self.fail(root, "no site name; expected site: NAME")
        name = self.text(fields["site"], "site name", NAME_RE)
        if "nodes" not in fields:
            raise self.fail(root, "no nodes; expected nodes: [{name, addresses, ssh}, ...]")
        nodes = tuple(
            self.site_node(n, i) for i, n in enumerate(self.sequence(fields["nodes"], "nodes"))
        )
        seen: set[str] = set()
        for item, parsed in zip(fields["nodes"].value, nodes, strict=True):
            if parsed.name in seen:
                raise self.fail(item, f"node name {parsed.name!r} is used twice")
            seen.add(parsed.name)
        paths = {
            key: self.text(fields[key], key)
            for key in ("known_hosts", "signing_key", "trust_pub")
            if key in fields
        }
        pool: tuple[str, ...] = ()
        if "vip_pool" in fields:
            pool = tuple(
                self.address(a, "vip_pool address")
                for a in self.sequence(fields["vip_pool"], "vip_pool")
            )
        return Site(name=name, nodes=nodes, vip_pool=pool, path=path, **paths)


def parse(text: str, filename: str = "site.yaml", path: str | None = None) -> Site:
    """The site a YAML text describes, or SiteError naming the line."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        raise SiteError(
            f"{filename}:{line}: not valid YAML ({exc.problem}); expected a site file"
        ) from None
    except yaml.YAMLError as exc:
        raise SiteError(f"{filename}:1: not valid YAML ({exc}); expected a site file") from None
    return _Reader(filename).site(root, path)


def load(path: str | os.PathLike[str]) -> Site:
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise SiteError(f"{p}: no such site file") from None
    except IsADirectoryError:
        raise SiteError(f"{p} is a directory; expected a site file (YAML)") from None
    except OSError as exc:
        raise SiteError(f"{p}: cannot read: {exc.strerror}") from None
    if len(data) > MAX_BYTES:
        raise SiteError(f"{p}: {len(data)} bytes is too large for a site file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SiteError(f"{p}: not UTF-8 text; expected a YAML site file") from None
    return parse(text, p.name, str(p))


# -- writing ---------------------------------------------------------------------


def to_document(site: Site) -> dict[str, Any]:
    nodes = []
    for n in site.nodes:
        ssh: dict[str, Any] = {"host": n.ssh.host, "port": n.ssh.port, "user": n.ssh.user}
        if n.ssh.key is not None:
            ssh["key"] = n.ssh.key
        if n.ssh.agent:
            ssh["agent"] = True
        if n.ssh.proxy_command is not None:
            ssh["proxy_command"] = n.ssh.proxy_command
        nodes.append({"name": n.name, "addresses": list(n.addresses), "ssh": ssh})
    doc: dict[str, Any] = {"site": site.name, "nodes": nodes}
    for key in ("known_hosts", "signing_key", "trust_pub"):
        if getattr(site, key) is not None:
            doc[key] = getattr(site, key)
    if site.vip_pool:
        doc["vip_pool"] = list(site.vip_pool)
    return doc


def save(site: Site, path: str | os.PathLike[str]) -> None:
    """Write the site file atomically; the old file stays intact on any failure."""
    target = Path(path)
    text = yaml.safe_dump(to_document(site), sort_keys=False)
    # Check before writing: what we save must load again as the same site.
    if parse(text, target.name) != site:
        raise SiteError(f"{target}: the site would not read back the same; not saved")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise SiteError(f"cannot write {target}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise SiteError(f"cannot write {target}: {exc.strerror}") from None
        raise
