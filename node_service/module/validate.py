"""Rules a module must satisfy, as one pure function over the model.

``check(module, lines)`` returns every problem it finds, never just the
first, so an author fixes a userconfig.xml in one pass. ``lines`` maps a
place in the model (``("node", 0)``, ``("vip", 1)``...) to the line of the
element that defined it; a model built in code (the console designer) has no
lines and its problems carry ``line=None``.

Values the XML reader could not convert arrive here as ``None`` and were
already reported, so each rule skips them instead of reporting twice.
"""

from __future__ import annotations

import ipaddress
import math
import posixpath
import re
from collections.abc import Mapping

from node_service.errors import Problem
from node_service.module.model import (
    CRITERIA,
    FARM,
    KIND_SCRIPTS,
    KINDS,
    MIRROR,
    PROTOCOLS,
    REPLICATION_MODES,
    SCRIPT_NAMES,
    InterfaceChecker,
    Module,
    PingChecker,
    ProcessChecker,
    ScriptChecker,
    TcpChecker,
)

MODULE_NAME = re.compile(r"[a-z][a-z0-9_-]{0,39}")
NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
VERSION = re.compile(r"[0-9A-Za-z][0-9A-Za-z.+_~-]{0,31}")
INTERFACE = re.compile(r"[A-Za-z0-9_.-]{1,15}")
CHECKER_SCRIPT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
MAX_WEIGHT = 1000
MAX_SECONDS = 86400.0
Key = tuple[object, ...]


def check(
    module: Module, lines: Mapping[Key, int] | None = None, filename: str = "userconfig.xml"
) -> list[Problem]:
    """Every problem of ``module``, sorted by line."""
    found = _Found(filename, lines or {})
    _check_module(module, found)
    _check_nodes(module, found)
    _check_vips(module, found)
    _check_replication(module, found)
    _check_farm(module, found)
    _check_checkers(module, found)
    _check_scripts(module, found)
    _check_failover(module, found)
    return sorted(found.problems, key=lambda p: p.line or 0)


class _Found:
    def __init__(self, filename: str, lines: Mapping[Key, int]):
        self.filename = filename
        self.lines = lines
        self.problems: list[Problem] = []

    def add(self, key: Key, message: str) -> None:
        # Fall back to the enclosing element when an exact place is unknown.
        line = None
        for size in range(len(key), 0, -1):
            line = self.lines.get(key[:size])
            if line is not None:
                break
        if line is None:
            line = self.lines.get(("module",))
        self.problems.append(Problem(self.filename, line, message))


def ip_or_none(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if text is None:
        return None
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _address(found: _Found, key: Key, what: str, text: str | None) -> None:
    if text is not None and ip_or_none(text) is None:
        found.add(key, f"{what} {text!r} is not an IP address; expected IPv4 or IPv6")


def _seconds(found: _Found, key: Key, what: str, value: float | None) -> None:
    if value is None:
        return
    if not math.isfinite(value) or not 0 < value <= MAX_SECONDS:
        found.add(key, f"{what} {_num(value)} is out of range; expected seconds > 0 and <= 86400")


def _count(found: _Found, key: Key, what: str, value: int | None, low: int, high: int) -> None:
    if value is not None and not low <= value <= high:
        found.add(key, f"{what} {value} is out of range; expected {low} to {high}")


def _check_module(m: Module, found: _Found) -> None:
    key = ("module",)
    if m.name is not None and not MODULE_NAME.fullmatch(m.name):
        found.add(
            key,
            f"module name {m.name!r} is invalid; expected a lowercase letter then up to 39 "
            "of a-z 0-9 _ -",
        )
    if m.kind is not None and m.kind not in KINDS:
        found.add(key, f"module kind {m.kind!r} is unknown; expected mirror or farm")
    if m.version is not None and not VERSION.fullmatch(m.version):
        found.add(
            key,
            f"module version {m.version!r} is invalid; expected up to 32 of 0-9 A-Z a-z . + _ ~ -",
        )


def _check_nodes(m: Module, found: _Found) -> None:
    if m.kind == MIRROR and len(m.nodes) != 2:
        found.add(("nodes",), f"a mirror module has exactly 2 nodes; found {len(m.nodes)}")
    elif m.kind == FARM and len(m.nodes) < 2:
        found.add(("nodes",), f"a farm module has at least 2 nodes; found {len(m.nodes)}")
    names: dict[str, int] = {}
    owners: dict[object, str] = {}
    for i, node in enumerate(m.nodes):
        key: Key = ("node", i)
        if node.name is not None:
            if not NODE_NAME.fullmatch(node.name):
                found.add(
                    key,
                    f"node name {node.name!r} is invalid; expected a host name "
                    "(letters, digits, _ . -, up to 63)",
                )
            elif node.name in names:
                found.add(key, f"node name {node.name!r} is used twice; node names must be unique")
            names.setdefault(node.name, i)
        if not node.addresses:
            found.add(key, f"node {node.name!r} has no <address>; expected at least one")
        for j, text in enumerate(node.addresses):
            akey: Key = ("node", i, "address", j)
            ip = ip_or_none(text)
            if ip is None:
                _address(found, akey, "node address", text)
                continue
            owner = owners.get(ip)
            if owner is not None:
                found.add(
                    akey,
                    f"address {text} is already an address of node {owner!r}; "
                    "expected one address per node and network",
                )
            owners.setdefault(ip, node.name)
        if m.kind == FARM:
            _count(found, key, f"node {node.name!r} weight", node.weight, 1, MAX_WEIGHT)
        elif m.kind == MIRROR and node.weight not in (1, None):
            found.add(key, "weight is for farm nodes only; remove it from a mirror node")
    if len({len(node.addresses) for node in m.nodes if node.addresses}) > 1:
        found.add(
            ("nodes",),
            "nodes have different numbers of heartbeat addresses; expected the same "
            "networks, in the same order, on every node",
        )


def _check_vips(m: Module, found: _Found) -> None:
    node_ips = {ip_or_none(a): n.name for n in m.nodes for a in n.addresses}
    seen: set[object] = set()
    if m.kind == FARM and not m.vips:
        found.add(("vips",), "a farm module needs a <vip>; expected at least one virtual IP")
    for i, vip in enumerate(m.vips):
        key: Key = ("vip", i)
        ip = ip_or_none(vip.address)
        if ip is None:
            _address(found, key, "virtual IP", vip.address)
        elif ip in node_ips:
            found.add(
                key,
                f"virtual IP {vip.address} is the address of node {node_ips[ip]!r}; "
                "expected an address no node uses",
            )
        elif ip in seen:
            found.add(key, f"virtual IP {vip.address} is listed twice")
        seen.add(ip)
        if ip is not None and vip.prefix is not None:
            _count(found, key, "virtual IP prefix", vip.prefix, 1, ip.max_prefixlen)
        if vip.interface is not None and not INTERFACE.fullmatch(vip.interface):
            found.add(
                key, f"interface {vip.interface!r} is not an interface name; expected {_IFHINT}"
            )


_IFHINT = "1 to 15 of letters, digits, _ . -"


def _check_replication(m: Module, found: _Found) -> None:
    rep = m.replication
    if m.kind == MIRROR and rep is None:
        found.add(("module",), "a mirror module needs <replication>; expected at least one <dir>")
    if rep is None:
        return
    if m.kind == FARM:
        found.add(("replication",), "<replication> is for mirror modules only; remove it")
        return
    if rep.mode is not None and rep.mode not in REPLICATION_MODES:
        found.add(
            ("replication",),
            f"replication mode {rep.mode!r} is unknown; expected sync, semi or async",
        )
    if not rep.dirs:
        found.add(("replication",), "<replication> has no <dir>; expected at least one")
    good: list[tuple[int, str]] = []
    for i, path in enumerate(rep.dirs):
        key: Key = ("dir", i)
        if path is None:
            continue
        if not path.startswith("/"):
            found.add(key, f"directory {path!r} is relative; expected an absolute path")
        elif path == "/" or posixpath.normpath(path) == "/":
            found.add(key, "directory / cannot be replicated; expected an application directory")
        elif posixpath.normpath(path) != path or path.startswith("//"):
            found.add(
                key,
                f"directory {path!r} is not normalised; expected {posixpath.normpath(path)!r}",
            )
        elif any(ord(c) < 32 for c in path):
            found.add(key, f"directory {path!r} contains control characters")
        else:
            good.append((i, path))
    for i, path in good:
        for j, other in good:
            if i == j:
                continue
            if path == other and j < i:
                found.add(("dir", i), f"directory {path} is listed twice")
            elif path.startswith(other + "/"):
                found.add(
                    ("dir", i),
                    f"directory {path} is inside {other}; expected directories that do not nest",
                )


def _check_farm(m: Module, found: _Found) -> None:
    farm = m.farm
    if m.kind == FARM and farm is None:
        found.add(("module",), "a farm module needs <farm>; expected at least one <rule>")
    if farm is None:
        return
    if m.kind == MIRROR:
        found.add(("farm",), "<farm> is for farm modules only; remove it")
        return
    if not farm.rules:
        found.add(("farm",), "<farm> has no <rule>; expected at least one")
    used: dict[tuple[str, int], int] = {}
    for i, rule in enumerate(farm.rules):
        key: Key = ("rule", i)
        if rule.protocol is not None and rule.protocol not in PROTOCOLS:
            found.add(key, f"protocol {rule.protocol!r} is unknown; expected tcp or udp")
        if rule.criterion is not None and rule.criterion not in CRITERIA:
            found.add(key, f"criterion {rule.criterion!r} is unknown; expected ip or ip_port")
        if rule.ports is None:
            continue
        if not rule.ports:
            found.add(key, 'rule has no ports; expected ports="80,443"')
        for port in rule.ports:
            if not 1 <= port <= 65535:
                found.add(key, f"port {port} is out of range; expected 1 to 65535")
            elif (rule.protocol, port) in used:
                found.add(
                    key,
                    f"port {rule.protocol}/{port} is already in the rule on line "
                    f"{found.lines.get(('rule', used[(rule.protocol, port)]), '?')}; "
                    "expected each port in one rule",
                )
            else:
                used[(rule.protocol, port)] = i


def _check_checkers(m: Module, found: _Found) -> None:
    for i, c in enumerate(m.checkers):
        key: Key = ("checker", i)
        _seconds(found, key, f"{c.kind} checker interval", c.interval)
        _seconds(found, key, f"{c.kind} checker timeout", c.timeout)
        if _positive(c.interval) and _positive(c.timeout) and c.timeout >= c.interval:
            found.add(
                key,
                f"{c.kind} checker timeout {_num(c.timeout)}s is not below its interval "
                f"{_num(c.interval)}s; expected timeout < interval",
            )
        _count(found, key, f"{c.kind} checker failures", c.failures, 1, 100)
        if isinstance(c, TcpChecker):
            _address(found, key, "tcp checker address", c.address)
            _count(found, key, "tcp checker port", c.port, 1, 65535)
        elif isinstance(c, PingChecker):
            _address(found, key, "ping checker target", c.target)
        elif isinstance(c, InterfaceChecker):
            if c.interface is not None and not INTERFACE.fullmatch(c.interface):
                found.add(
                    key, f"interface {c.interface!r} is not an interface name; expected {_IFHINT}"
                )
        elif isinstance(c, ProcessChecker):
            if c.pattern is not None and not c.pattern.strip():
                found.add(key, "process checker pattern is empty; expected a command line pattern")
            elif c.pattern is not None and any(ord(ch) < 32 for ch in c.pattern):
                found.add(key, "process checker pattern contains control characters")
            _count(found, key, "process checker restarts", c.restarts, 0, 100)
            _seconds(found, key, "process checker window", c.window)
        elif isinstance(c, ScriptChecker) and c.script is not None:
            if not CHECKER_SCRIPT.fullmatch(c.script):
                found.add(
                    key,
                    f"checker script {c.script!r} is not a file name in bin/; expected a name "
                    "like check_app (letters, digits, _ . -)",
                )
            elif c.script in SCRIPT_NAMES:
                found.add(
                    key,
                    f"checker script {c.script!r} is a lifecycle script; expected a script of "
                    "its own, like check_app",
                )


def _check_scripts(m: Module, found: _Found) -> None:
    _seconds(found, ("scripts",), "script timeout", m.scripts.timeout)
    allowed = KIND_SCRIPTS.get(m.kind, SCRIPT_NAMES)
    seen: set[str] = set()
    for i, override in enumerate(m.scripts.overrides):
        key: Key = ("script", i)
        _seconds(found, key, f"{override.script} timeout", override.timeout)
        if override.script is None:
            continue
        if override.script not in allowed:
            found.add(
                key,
                f"script {override.script!r} is not run by a {m.kind} module; expected one of "
                + ", ".join(allowed),
            )
        elif override.script in seen:
            found.add(key, f"script {override.script!r} has two timeouts; expected one")
        seen.add(override.script)


def _check_failover(m: Module, found: _Found) -> None:
    f = m.failover
    key: Key = ("failover",)
    _address(found, key, "witness", f.witness)
    witness = ip_or_none(f.witness)
    if witness is not None and any(ip_or_none(a) == witness for n in m.nodes for a in n.addresses):
        found.add(key, f"witness {f.witness} is a node address; expected a third party to ping")
    _count(found, key, "heartbeat_interval_ms", f.heartbeat_interval_ms, 10, 60000)
    _count(found, key, "heartbeat_timeout_ms", f.heartbeat_timeout_ms, 20, 600000)
    interval, timeout = f.heartbeat_interval_ms, f.heartbeat_timeout_ms
    if interval is not None and timeout is not None and timeout < 2 * interval:
        found.add(
            key,
            f"heartbeat_timeout_ms {timeout} is less than twice heartbeat_interval_ms {interval}; "
            "expected timeout >= 2 x interval so one lost heartbeat is not a failure",
        )


def _positive(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and value > 0


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)
