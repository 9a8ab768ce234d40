"""userconfig.xml: parse (safely, with line numbers), validate and emit.

The file is read with defusedxml, and a DTD is refused outright: entity
expansion (billion laughs) and external entities can never happen, whatever
the file says. The reader is strict: an element or attribute it does not
know is a problem naming what is allowed there, because a misspelt setting
silently ignored is a failover that silently does not happen.

``parse`` collects every problem (reader and ``validate.check``) before it
raises ``ValidationError``; each is ``userconfig.xml:LINE: what, expected``.
``emit`` writes the canonical form described in docs/userconfig.md, so
``parse(emit(m)) == m`` and emitting twice gives the same bytes.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any
from xml.parsers import expat

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import DefusedXMLParser, ParseError

from node_service.errors import ModuleError, Problem, ValidationError
from node_service.module import validate
from node_service.module.model import (
    DEFAULT_CHECK_FAILURES,
    DEFAULT_CHECK_INTERVAL,
    DEFAULT_CHECK_TIMEOUT,
    DEFAULT_HEARTBEAT_INTERVAL_MS,
    DEFAULT_HEARTBEAT_TIMEOUT_MS,
    DEFAULT_PROCESS_RESTARTS,
    DEFAULT_PROCESS_WINDOW,
    DEFAULT_SCRIPT_TIMEOUT,
    DEFAULT_VERSION,
    FARM,
    MIRROR,
    Checker,
    Failover,
    Farm,
    FarmRule,
    InterfaceChecker,
    Module,
    Node,
    PingChecker,
    ProcessChecker,
    Replication,
    ScriptChecker,
    Scripts,
    ScriptTimeout,
    TcpChecker,
    VirtualIP,
)
from node_service.module.validate import Key, ip_or_none

FILENAME = "userconfig.xml"
MAX_BYTES = 1 << 20
_MISSING = object()


def parse(data: bytes, filename: str = FILENAME) -> Module:
    """The module ``data`` describes, or ValidationError with every problem."""
    root, element_lines = _read_xml(data, filename)
    reader = _Reader(filename, element_lines)
    module = reader.module(root)
    problems = reader.problems + validate.check(module, reader.keys, filename)
    if problems:
        raise ValidationError(sorted(problems, key=lambda p: p.line or 0))
    return module


def load_dir(path: str | Path) -> Module:
    """The module of a module directory (``path/userconfig.xml``)."""
    file = Path(path) / FILENAME
    if not Path(path).is_dir():
        raise ModuleError(f"{path}: not a directory; expected a module directory with {FILENAME}")
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise ModuleError(
            f"{path}: no {FILENAME} here; expected a module directory holding {FILENAME} and bin/"
        ) from None
    except OSError as exc:
        raise ModuleError(f"{file}: cannot read: {exc.strerror}") from None
    return parse(data, str(file))


# -- XML with line numbers -------------------------------------------------------


class _LineTarget:
    """TreeBuilder that remembers the line of every start tag."""

    def __init__(self) -> None:
        self.builder = ET.TreeBuilder()
        self.lines: dict[int, int] = {}
        self.parser: DefusedXMLParser | None = None

    def start(self, tag: str, attrs: dict[str, str]) -> ET.Element:
        element = self.builder.start(tag, attrs)
        assert self.parser is not None
        self.lines[id(element)] = self.parser.parser.CurrentLineNumber
        return element

    def end(self, tag: str) -> ET.Element:
        return self.builder.end(tag)

    def data(self, text: str) -> None:
        self.builder.data(text)

    def close(self) -> ET.Element:
        return self.builder.close()


def _read_xml(data: bytes, filename: str) -> tuple[ET.Element, dict[int, int]]:
    def refuse(line: int | None, message: str) -> ValidationError:
        return ValidationError([Problem(filename, line, message)])

    if len(data) > MAX_BYTES:
        raise refuse(1, f"the file is {len(data)} bytes; expected at most {MAX_BYTES} bytes")
    if not data.strip():
        raise refuse(1, "the file is empty; expected a <module> document")
    target = _LineTarget()
    parser = DefusedXMLParser(
        target=target, forbid_dtd=True, forbid_entities=True, forbid_external=True
    )
    target.parser = parser
    try:
        parser.feed(data)
        root = parser.close()
    except DefusedXmlException as exc:
        raise refuse(
            parser.parser.CurrentLineNumber,
            f"{type(exc).__name__}: DTDs and entity declarations are refused; "
            "expected plain XML with no <!DOCTYPE>",
        ) from None
    except LookupError as exc:
        # expat raises this for an encoding name it does not know.
        raise refuse(1, f'{exc}; expected encoding="UTF-8" or no encoding') from None
    except ParseError as exc:
        line = exc.position[0] if getattr(exc, "position", None) else 1
        reason = expat.ErrorString(exc.code) if getattr(exc, "code", None) else str(exc)
        raise refuse(
            line, f"not well-formed XML ({reason}); expected a <module> document"
        ) from None
    if root.tag != "module":
        raise refuse(
            target.lines.get(id(root)), f"the root element is <{root.tag}>; expected <module>"
        )
    return root, target.lines


# -- the reader: elements -> model, with every problem noted -----------------------


def _text(value: str) -> str:
    return value


def _int(value: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise ValueError("is not a whole number; expected digits, e.g. 3") from None


def _seconds(value: str) -> float:
    try:
        number = float(value.strip())
    except ValueError:
        raise ValueError("is not a number of seconds; expected e.g. 5 or 0.5") from None
    if not math.isfinite(number):
        raise ValueError("is not a number of seconds; expected e.g. 5 or 0.5")
    return number


def _bool(value: str) -> bool:
    if value in ("true", "false"):
        return value == "true"
    raise ValueError("is not a boolean; expected true or false")


def _ip(value: str) -> str:
    # Store the normal form so that equal addresses compare equal; an invalid
    # one is kept as written for validate to report with its context.
    ip = ip_or_none(value.strip())
    return str(ip) if ip is not None else value


def _ports(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in value.replace(" ", "").split(",") if p)
    except ValueError:
        raise ValueError('is not a list of ports; expected e.g. "80,443"') from None


Spec = dict[str, tuple[Callable[[str], Any], Any]]
REQUIRED = object()
_CHECK_COMMON: Spec = {
    "interval": (_seconds, DEFAULT_CHECK_INTERVAL),
    "timeout": (_seconds, DEFAULT_CHECK_TIMEOUT),
    "failures": (_int, DEFAULT_CHECK_FAILURES),
}
CHECKER_SPECS: dict[str, tuple[type[Checker], Spec]] = {
    "tcp": (TcpChecker, {"address": (_ip, REQUIRED), "port": (_int, REQUIRED)}),
    "ping": (PingChecker, {"target": (_ip, REQUIRED)}),
    "interface": (InterfaceChecker, {"name": (_text, REQUIRED)}),
    "process": (
        ProcessChecker,
        {
            "pattern": (_text, REQUIRED),
            "restarts": (_int, DEFAULT_PROCESS_RESTARTS),
            "window": (_seconds, DEFAULT_PROCESS_WINDOW),
        },
    ),
    "script": (ScriptChecker, {"name": (_text, REQUIRED)}),
}
# XML attribute -> model field, where they differ.
_CHECKER_FIELD = {"interface": {"name": "interface"}, "script": {"name": "script"}}
MODULE_CHILDREN = (
    "description",
    "nodes",
    "vips",
    "replication",
    "farm",
    "checkers",
    "scripts",
    "failover",
)


class _Reader:
    def __init__(self, filename: str, element_lines: dict[int, int]):
        self.filename = filename
        self.element_lines = element_lines
        self.problems: list[Problem] = []
        self.keys: dict[Key, int] = {}

    def line(self, element: ET.Element) -> int | None:
        return self.element_lines.get(id(element))

    def problem(self, element: ET.Element, message: str) -> None:
        self.problems.append(Problem(self.filename, self.line(element), message))

    def place(self, key: Key, element: ET.Element) -> None:
        line = self.line(element)
        if line is not None:
            self.keys[key] = line

    def attrs(self, element: ET.Element, spec: Spec) -> dict[str, Any]:
        tag = element.tag
        values: dict[str, Any] = {}
        for name, raw in element.attrib.items():
            if name not in spec:
                allowed = ", ".join(spec) or "none"
                self.problem(element, f"<{tag}> has unknown attribute {name!r}; allowed: {allowed}")
                continue
            convert = spec[name][0]
            try:
                values[name] = convert(raw)
            except ValueError as exc:
                self.problem(element, f"<{tag}> {name}={raw!r} {exc}")
                values[name] = None
        for name, (_convert, default) in spec.items():
            if name in values:
                continue
            if default is REQUIRED:
                self.problem(element, f"<{tag}> lacks the attribute {name!r}; it is required")
                values[name] = None
            else:
                values[name] = default
        return values

    def children(
        self, element: ET.Element, allowed: tuple[str, ...], once: bool = False
    ) -> list[ET.Element]:
        self.no_text(element)
        kept: list[ET.Element] = []
        seen: set[str] = set()
        for child in element:
            if child.tag not in allowed:
                names = ", ".join(f"<{a}>" for a in allowed) or "nothing"
                self.problem(
                    child,
                    f"unknown element <{child.tag}> in <{element.tag}>; allowed here: {names}",
                )
            elif once and child.tag in seen:
                self.problem(
                    child, f"<{child.tag}> appears twice in <{element.tag}>; expected once"
                )
            else:
                kept.append(child)
                seen.add(child.tag)
            if (child.tail or "").strip():
                self.problem(child, f"unexpected text after <{child.tag}>; expected only elements")
        return kept

    def no_text(self, element: ET.Element) -> None:
        if (element.text or "").strip():
            self.problem(element, f"unexpected text in <{element.tag}>; expected only elements")

    def leaf(self, element: ET.Element) -> None:
        self.children(element, ())

    def text_only(self, element: ET.Element) -> str:
        for child in element:
            self.problem(child, f"unknown element <{child.tag}> in <{element.tag}>; expected text")
        self.attrs(element, {})
        return " ".join((element.text or "").split())

    # -- sections --------------------------------------------------------------

    def module(self, root: ET.Element) -> Module:
        self.place(("module",), root)
        a = self.attrs(
            root,
            {
                "name": (_text, REQUIRED),
                "kind": (_text, REQUIRED),
                "version": (_text, DEFAULT_VERSION),
            },
        )
        sections = {c.tag: c for c in self.children(root, MODULE_CHILDREN, once=True)}
        kind = a["kind"]
        if "nodes" not in sections:
            self.problem(root, "<module> has no <nodes>; expected <nodes> with a <node> per server")
        get = sections.get
        return Module(
            name=a["name"],
            kind=kind,
            version=a["version"],
            description=self.text_only(get("description")) if "description" in sections else "",
            nodes=self.nodes(get("nodes"), kind) if "nodes" in sections else (),
            vips=self.vips(get("vips")) if "vips" in sections else (),
            replication=self.replication(get("replication")) if "replication" in sections else None,
            farm=self.farm(get("farm")) if "farm" in sections else None,
            checkers=self.checkers(get("checkers")) if "checkers" in sections else (),
            scripts=self.scripts(get("scripts")) if "scripts" in sections else Scripts(),
            failover=self.failover(get("failover")) if "failover" in sections else Failover(),
        )

    def nodes(self, element: ET.Element, kind: str | None) -> tuple[Node, ...]:
        self.place(("nodes",), element)
        self.attrs(element, {})
        nodes = []
        for i, child in enumerate(self.children(element, ("node",))):
            self.place(("node", i), child)
            a = self.attrs(child, {"name": (_text, REQUIRED), "weight": (_int, 1)})
            if kind == MIRROR and "weight" in child.attrib:
                self.problem(child, "weight is for farm nodes only; remove it from a mirror node")
                a["weight"] = 1
            addresses = []
            for j, address in enumerate(self.children(child, ("address",))):
                self.place(("node", i, "address", j), address)
                addresses.append(_ip(self.text_only(address)))
            nodes.append(Node(a["name"], tuple(addresses), a["weight"]))
        return tuple(nodes)

    def vips(self, element: ET.Element) -> tuple[VirtualIP, ...]:
        self.place(("vips",), element)
        self.attrs(element, {})
        vips = []
        for i, child in enumerate(self.children(element, ("vip",))):
            self.place(("vip", i), child)
            a = self.attrs(
                child,
                {
                    "address": (_ip, REQUIRED),
                    "prefix": (_int, _MISSING),
                    "interface": (_text, None),
                },
            )
            prefix = a["prefix"]
            if prefix is _MISSING:
                ip = ip_or_none(a["address"])
                prefix = None if ip is None else (24 if ip.version == 4 else 64)
            self.leaf(child)
            vips.append(VirtualIP(a["address"], prefix, a["interface"]))
        return tuple(vips)

    def replication(self, element: ET.Element) -> Replication:
        self.place(("replication",), element)
        a = self.attrs(element, {"mode": (_text, "sync")})
        dirs = []
        for i, child in enumerate(self.children(element, ("dir",))):
            self.place(("dir", i), child)
            dirs.append(self.attrs(child, {"path": (_text, REQUIRED)})["path"])
            self.leaf(child)
        return Replication(tuple(dirs), a["mode"])

    def farm(self, element: ET.Element) -> Farm:
        self.place(("farm",), element)
        self.attrs(element, {})
        rules = []
        for i, child in enumerate(self.children(element, ("rule",))):
            self.place(("rule", i), child)
            a = self.attrs(
                child,
                {
                    "ports": (_ports, REQUIRED),
                    "protocol": (_text, "tcp"),
                    "criterion": (_text, "ip"),
                },
            )
            self.leaf(child)
            rules.append(FarmRule(a["ports"], a["protocol"], a["criterion"]))
        return Farm(tuple(rules))

    def checkers(self, element: ET.Element) -> tuple[Checker, ...]:
        self.place(("checkers",), element)
        self.attrs(element, {})
        checkers = []
        for i, child in enumerate(self.children(element, tuple(CHECKER_SPECS))):
            self.place(("checker", i), child)
            cls, own = CHECKER_SPECS[child.tag]
            a = self.attrs(child, {**own, **_CHECK_COMMON})
            self.leaf(child)
            rename = _CHECKER_FIELD.get(child.tag, {})
            checkers.append(cls(**{rename.get(k, k): v for k, v in a.items()}))
        return tuple(checkers)

    def scripts(self, element: ET.Element) -> Scripts:
        self.place(("scripts",), element)
        a = self.attrs(element, {"timeout": (_seconds, DEFAULT_SCRIPT_TIMEOUT)})
        overrides = []
        for i, child in enumerate(self.children(element, ("script",))):
            self.place(("script", i), child)
            s = self.attrs(child, {"name": (_text, REQUIRED), "timeout": (_seconds, REQUIRED)})
            self.leaf(child)
            overrides.append(ScriptTimeout(s["name"], s["timeout"]))
        return Scripts(a["timeout"], tuple(overrides))

    def failover(self, element: ET.Element) -> Failover:
        self.place(("failover",), element)
        a = self.attrs(
            element,
            {
                "failback": (_bool, False),
                "witness": (_ip, None),
                "heartbeat_interval_ms": (_int, DEFAULT_HEARTBEAT_INTERVAL_MS),
                "heartbeat_timeout_ms": (_int, DEFAULT_HEARTBEAT_TIMEOUT_MS),
            },
        )
        self.leaf(element)
        return Failover(**a)


# -- emit: the canonical form ---------------------------------------------------------


def emit(module: Module) -> bytes:
    """Canonical userconfig.xml: fixed order, 2-space indent, UTF-8, final newline.

    Attributes that have a default are always written; optional values with
    no default (description, interface, witness) and empty sections are left
    out. A model emitted and parsed again is equal to itself.
    """
    out = ['<?xml version="1.0" encoding="UTF-8"?>']
    m = module
    open_tag = _tag("module", [("name", m.name), ("kind", m.kind), ("version", m.version)])
    out.append(open_tag)
    if m.description:
        out.append(f"  <description>{_escape(m.description)}</description>")
    out.append("  <nodes>")
    for node in m.nodes:
        attrs = [("name", node.name)]
        if m.kind != MIRROR:
            attrs.append(("weight", node.weight))
        out.append("    " + _tag("node", attrs, empty=not node.addresses))
        if node.addresses:
            out.extend(f"      <address>{_escape(a)}</address>" for a in node.addresses)
            out.append("    </node>")
    out.append("  </nodes>")
    if m.vips:
        out.append("  <vips>")
        for vip in m.vips:
            attrs = [("address", vip.address), ("prefix", vip.prefix), ("interface", vip.interface)]
            out.append("    " + _tag("vip", attrs, empty=True))
        out.append("  </vips>")
    if m.replication is not None:
        rep = m.replication
        children = ["    " + _tag("dir", [("path", d)], empty=True) for d in rep.dirs]
        _section(out, "replication", [("mode", rep.mode)], children)
    if m.farm is not None:
        children = [
            "    "
            + _tag(
                "rule",
                [
                    ("ports", ",".join(str(p) for p in r.ports)),
                    ("protocol", r.protocol),
                    ("criterion", r.criterion),
                ],
                empty=True,
            )
            for r in m.farm.rules
        ]
        _section(out, "farm", [], children)
    if m.checkers:
        out.append("  <checkers>")
        out.extend("    " + _tag(c.kind, _checker_attrs(c), empty=True) for c in m.checkers)
        out.append("  </checkers>")
    children = [
        "    " + _tag("script", [("name", o.script), ("timeout", o.timeout)], empty=True)
        for o in m.scripts.overrides
    ]
    _section(out, "scripts", [("timeout", m.scripts.timeout)], children)
    f = m.failover
    attrs = [
        ("failback", f.failback),
        ("witness", f.witness),
        ("heartbeat_interval_ms", f.heartbeat_interval_ms),
        ("heartbeat_timeout_ms", f.heartbeat_timeout_ms),
    ]
    out.append("  " + _tag("failover", attrs, empty=True))
    out.append("</module>")
    return ("\n".join(out) + "\n").encode("utf-8")


def _checker_attrs(c: Checker) -> list[tuple[str, Any]]:
    own: list[tuple[str, Any]]
    if isinstance(c, TcpChecker):
        own = [("address", c.address), ("port", c.port)]
    elif isinstance(c, PingChecker):
        own = [("target", c.target)]
    elif isinstance(c, InterfaceChecker):
        own = [("name", c.interface)]
    elif isinstance(c, ProcessChecker):
        own = [("pattern", c.pattern), ("restarts", c.restarts), ("window", c.window)]
    elif isinstance(c, ScriptChecker):
        own = [("name", c.script)]
    else:
        raise TypeError(f"unknown checker {c!r}")
    return [*own, ("interval", c.interval), ("timeout", c.timeout), ("failures", c.failures)]


def _section(out: list[str], tag: str, attrs: list[tuple[str, Any]], children: list[str]) -> None:
    out.append("  " + _tag(tag, attrs, empty=not children))
    if children:
        out.extend(children)
        out.append(f"  </{tag}>")


def _tag(name: str, attrs: list[tuple[str, Any]], empty: bool = False) -> str:
    parts = [name] + [f'{k}="{_escape(_value(v), attr=True)}"' for k, v in attrs if v is not None]
    return "<" + " ".join(parts) + ("/>" if empty else ">")


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value)


def _escape(text: str, attr: bool = False) -> str:
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    if attr:
        text = text.replace('"', "&quot;").replace("\n", "&#10;").replace("\t", "&#9;")
        text = text.replace("\r", "&#13;")
    return text


__all__ = ["FARM", "FILENAME", "MIRROR", "emit", "load_dir", "parse"]
