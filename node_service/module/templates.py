"""Module templates: a starting module directory per kind of application.

A template (``resources/templates/NAME/``) is a complete, valid module:
``userconfig.xml`` with example values, ``bin/`` scripts, ``README.md`` and
usually an ``app.env`` the scripts source. ``rampart module new`` never edits
XML text: it parses the template into a model, replaces the example values
with the author's (``fill``, pure), validates the result and emits it in
canonical form. The other text files get a few ``@TOKEN@`` substitutions
(``tokens``) so that the scripts know the VIP, port and directory chosen.

The directory is assembled in a temporary sibling and renamed into place, so
an interrupted or refused ``new`` leaves nothing half written.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from node_service.errors import ModuleError, UserError, ValidationError
from node_service.module import userconfig
from node_service.module.model import FARM, MIRROR, Farm, Module, Node, TcpChecker, VirtualIP
from node_service.resources import templates_dir

TEXT_SUFFIXES = ("", ".md", ".env", ".txt", ".sh", ".yml", ".yaml", ".conf")


@dataclass(frozen=True)
class Fill:
    """What the author chose on the command line; empty means "keep the template's"."""

    name: str
    nodes: tuple[Node, ...] = ()
    vip: VirtualIP | None = None
    dirs: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()
    lb: str | None = None


def available(root: Path | None = None) -> list[str]:
    root = root or templates_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / userconfig.FILENAME).is_file())


def template_path(name: str, root: Path | None = None) -> Path:
    root = root or templates_dir()
    names = available(root)
    if name not in names:
        raise UserError(
            f"unknown template {name!r}; available templates: {', '.join(names) or 'none'}"
        )
    return root / name


def load(name: str, root: Path | None = None) -> Module:
    return userconfig.load_dir(template_path(name, root))


def parse_node(text: str) -> Node:
    """``n1=ADDR[,ADDR2...]`` as given to ``--node``."""
    name, sep, addresses = text.partition("=")
    parts = tuple(a.strip() for a in addresses.split(",") if a.strip())
    if not sep or not name.strip() or not parts:
        raise UserError(f"--node {text!r}: expected NAME=ADDRESS[,ADDRESS2], e.g. n1=198.51.100.11")
    normal = []
    for part in parts:
        try:
            normal.append(str(ipaddress.ip_address(part)))
        except ValueError:
            raise UserError(
                f"--node {text!r}: {part!r} is not an IP address; expected IPv4 or IPv6"
            ) from None
    return Node(name.strip(), tuple(normal))


def parse_vip(text: str) -> VirtualIP:
    """``ADDR[/PREFIX]`` as given to ``--vip`` (prefix 24 for IPv4, 64 for IPv6)."""
    address, _, prefix = text.partition("/")
    try:
        ip = ipaddress.ip_address(address.strip())
    except ValueError:
        raise UserError(f"--vip {text!r}: not an IP address; expected ADDRESS[/PREFIX]") from None
    if not prefix:
        return VirtualIP(str(ip), 24 if ip.version == 4 else 64)
    if not prefix.isdigit():
        raise UserError(f"--vip {text!r}: prefix {prefix!r} is not a number; expected e.g. /24")
    return VirtualIP(str(ip), int(prefix))


def fill(template: Module, choice: Fill) -> tuple[Module, str]:
    """The template with the author's values in place, and what was changed."""
    changed = [f"name {choice.name}"]
    module = dataclasses.replace(template, name=choice.name)
    if choice.nodes:
        module = dataclasses.replace(module, nodes=choice.nodes)
        changed.append("nodes " + ", ".join(n.name for n in choice.nodes))
    if choice.vip is not None:
        old = {v.address for v in template.vips}
        checkers = tuple(
            dataclasses.replace(c, address=choice.vip.address)
            if isinstance(c, TcpChecker) and c.address in old
            else c
            for c in module.checkers
        )
        module = dataclasses.replace(module, vips=(choice.vip,), checkers=checkers)
        changed.append(f"vip {choice.vip.address}/{choice.vip.prefix}")
    if choice.dirs:
        if template.kind != MIRROR or template.replication is None:
            raise UserError(
                f"--dir replicates a mirror's directories; this template is a {template.kind}"
            )
        replication = dataclasses.replace(template.replication, dirs=choice.dirs)
        module = dataclasses.replace(module, replication=replication)
        changed.append("dirs " + " ".join(choice.dirs))
    if choice.ports:
        module = _with_ports(module, template, choice.ports)
        changed.append("ports " + ",".join(str(p) for p in choice.ports))
    if choice.lb is not None:
        if template.kind != FARM or module.farm is None:
            raise UserError(
                f"--lb chooses how a farm shares clients; this template is a {template.kind}"
            )
        rules = tuple(dataclasses.replace(r, criterion=choice.lb) for r in module.farm.rules)
        module = dataclasses.replace(module, farm=Farm(rules))
        changed.append(f"load balancing by {choice.lb}")
    return module, "; ".join(changed)


def service_port(module: Module) -> int | None:
    """The application's port: the farm's first port, else the first tcp checker's."""
    if module.farm is not None and module.farm.rules and module.farm.rules[0].ports:
        return module.farm.rules[0].ports[0]
    return next((c.port for c in module.checkers if isinstance(c, TcpChecker)), None)


def _with_ports(module: Module, template: Module, ports: tuple[int, ...]) -> Module:
    old = service_port(template)
    if template.kind == MIRROR and len(ports) > 1:
        raise UserError("--port: a mirror template takes one service port")
    checkers = tuple(
        dataclasses.replace(c, port=ports[0]) if isinstance(c, TcpChecker) and c.port == old else c
        for c in module.checkers
    )
    module = dataclasses.replace(module, checkers=checkers)
    if module.farm is not None and module.farm.rules:
        first, *rest = module.farm.rules
        module = dataclasses.replace(
            module, farm=Farm((dataclasses.replace(first, ports=ports), *rest))
        )
    return module


def tokens(module: Module) -> dict[str, str]:
    """``@TOKEN@`` values for the template's scripts, README and app.env."""
    port = service_port(module)
    return {
        "@MODULE@": module.name,
        "@KIND@": module.kind,
        "@VIP@": module.vips[0].address if module.vips else "",
        "@PORT@": str(port) if port is not None else "",
        "@DIR@": module.replicated_dirs[0] if module.replicated_dirs else "",
        "@DIRS@": " ".join(module.replicated_dirs),
    }


def substitute(text: str, values: dict[str, str]) -> str:
    for token, value in values.items():
        text = text.replace(token, value)
    return text


def create(template: str, choice: Fill, out: Path, root: Path | None = None) -> tuple[Module, str]:
    """Write a new module directory at ``out``; returns the module and a summary."""
    source = template_path(template, root)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(
            f"{out}: already exists and is not empty; expected a new or empty directory"
        )
    module, reason = fill(userconfig.load_dir(source), choice)
    data = userconfig.emit(module)
    try:
        userconfig.parse(data, str(out / userconfig.FILENAME))
    except ValidationError as exc:
        # Problems come from the flags (the template itself is valid): name them
        # against the flags, not against lines of a file the author never saw.
        raise ModuleError(
            "the module would be invalid: " + "; ".join(p.message for p in exc.problems)
        ) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _copy(source, staging, tokens(module))
        (staging / userconfig.FILENAME).write_bytes(data)
        staging.chmod(0o755)
        if out.exists():
            out.rmdir()
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return module, reason


def _copy(source: Path, dest: Path, values: dict[str, str]) -> None:
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source)
        target = dest / rel
        if path.is_symlink():
            continue  # a template never needs one; never follow one out of the tree
        if path.is_dir():
            target.mkdir(exist_ok=True)
            continue
        if rel == Path(userconfig.FILENAME):
            continue
        executable = rel.parts[0] == "bin" or os.access(path, os.X_OK)
        if path.suffix in TEXT_SUFFIXES:
            target.write_text(
                substitute(path.read_text(encoding="utf-8"), values), encoding="utf-8"
            )
        else:
            shutil.copyfile(path, target)
        target.chmod(0o755 if executable else 0o644)
