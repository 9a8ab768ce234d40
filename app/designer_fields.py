"""Pure editing of a module model, field by field, for the designer's forms.

A field is addressed by a tuple path: ``("module", "name")``,
``("node", 0, "address", 1)``, ``("checker", 2, "interval")``... ``edit``
converts the text typed into the form and returns a new ``Module``;
``problems_by_field`` runs the node's own ``validate.check`` and attaches
each message to the key of the place it is about (the same keys check uses:
``("node", 0)``, ``("dir", 1)``...), so the designer shows exactly the words
a node would refuse the module with, next to the right field.
"""

from __future__ import annotations

import math
import re
from dataclasses import MISSING, fields, replace
from typing import Any

from node_service.errors import UserError
from node_service.module import validate
from node_service.module.model import (
    CHECKER_TYPES,
    FARM,
    MIRROR,
    Checker,
    Farm,
    FarmRule,
    Module,
    Node,
    Replication,
    ScriptTimeout,
    VirtualIP,
)

Field = tuple[Any, ...]
Key = tuple[Any, ...]
INDEXED = ("node", "vip", "dir", "rule", "checker", "script")


class FieldError(UserError):
    """What was typed into a field cannot be converted (not a number, ...)."""


# -- converting typed text ------------------------------------------------------------


def _int(text: str, what: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise FieldError(f"{what} {text!r} is not a whole number") from None


def _seconds(text: str, what: str) -> float:
    try:
        value = float(text.strip().removesuffix("s"))
    except ValueError:
        raise FieldError(f"{what} {text!r} is not a number of seconds") from None
    if not math.isfinite(value):
        raise FieldError(f"{what} {text!r} is not a number of seconds")
    return value


def _bool(text: str, what: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "yes", "1", "on"):
        return True
    if value in ("false", "no", "0", "off"):
        return False
    raise FieldError(f"{what} {text!r} is not true or false")


def _ports(text: str, what: str) -> tuple[int, ...]:
    parts = [p for p in re.split(r"[,\s]+", text.strip()) if p]
    return tuple(_int(p, what) for p in parts)


def _optional(text: str) -> str | None:
    return text.strip() or None


# attribute -> converter, for the scalar attributes of each section
CONVERT = {
    "weight": _int, "prefix": _int, "port": _int, "failures": _int, "restarts": _int,
    "heartbeat_interval_ms": _int, "heartbeat_timeout_ms": _int,
    "interval": _seconds, "timeout": _seconds, "window": _seconds,
    "failback": _bool, "ports": _ports,
}  # fmt: skip
OPTIONAL = {"interface", "witness", "description"}


def convert(attr: str, text: str) -> Any:
    if attr in CONVERT:
        return CONVERT[attr](text, attr.replace("_", " "))
    if attr in OPTIONAL:
        return _optional(text) if attr != "description" else text
    return text.strip()


# -- reading a field's current text ------------------------------------------------------


def text_of(module: Module, field: Field) -> str:
    value = _get(module, field)
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _get(module: Module, field: Field) -> Any:
    section = field[0]
    if section == "module":
        return getattr(module, field[1])
    if section == "node":
        node = module.nodes[field[1]]
        return node.addresses[field[3]] if field[2] == "address" else getattr(node, field[2])
    if section == "vip":
        return getattr(module.vips[field[1]], field[2])
    if section == "replication":
        return getattr(module.replication, field[1]) if module.replication else None
    if section == "dir":
        return module.replicated_dirs[field[1]]
    if section == "rule":
        return getattr(module.farm.rules[field[1]], field[2]) if module.farm else None
    if section == "checker":
        return getattr(module.checkers[field[1]], field[2])
    if section == "scripts":
        return getattr(module.scripts, field[1])
    if section == "script":
        attr = "script" if field[2] == "name" else field[2]
        return getattr(module.scripts.overrides[field[1]], attr)
    if section == "failover":
        return getattr(module.failover, field[1])
    raise FieldError(f"unknown field {field!r}")


# -- editing ------------------------------------------------------------------------------------


def _set_item(items: tuple[Any, ...], index: int, value: Any) -> tuple[Any, ...]:
    if index == len(items):
        return (*items, value)
    if not 0 <= index < len(items):
        raise FieldError(f"there is no item {index + 1} (there are {len(items)})")
    return (*items[:index], value, *items[index + 1 :])


def _with_kind(module: Module, kind: str) -> Module:
    # A kind change brings the section the new kind needs and drops the other.
    if kind == MIRROR:
        return replace(module, kind=kind, farm=None,
                       replication=module.replication or Replication(dirs=()))  # fmt: skip
    if kind == FARM:
        return replace(module, kind=kind, replication=None, farm=module.farm or Farm(rules=()))
    return replace(module, kind=kind)


def edit(module: Module, field: Field, text: str) -> Module:
    """A new module with ``field`` set to ``text`` (converted); FieldError if it cannot be."""
    section = field[0]
    try:
        if section == "module":
            if field[1] == "kind":
                return _with_kind(module, text.strip())
            return replace(module, **{field[1]: convert(field[1], text)})
        if section == "node":
            i = field[1]
            node = module.nodes[i]
            if field[2] == "address":
                node = replace(node, addresses=_set_item(node.addresses, field[3], text.strip()))
            else:
                node = replace(node, **{field[2]: convert(field[2], text)})
            return replace(module, nodes=_set_item(module.nodes, i, node))
        if section == "vip":
            vip = replace(module.vips[field[1]], **{field[2]: convert(field[2], text)})
            return replace(module, vips=_set_item(module.vips, field[1], vip))
        if section == "replication":
            rep = module.replication or Replication(dirs=())
            return replace(module, replication=replace(rep, **{field[1]: text.strip()}))
        if section == "dir":
            rep = module.replication or Replication(dirs=())
            dirs = _set_item(rep.dirs, field[1], text.strip())
            return replace(module, replication=replace(rep, dirs=dirs))
        if section == "rule":
            farm = module.farm or Farm(rules=())
            rule = replace(farm.rules[field[1]], **{field[2]: convert(field[2], text)})
            return replace(module, farm=Farm(_set_item(farm.rules, field[1], rule)))
        if section == "checker":
            checker = module.checkers[field[1]]
            names = {f.name for f in fields(checker)}
            if field[2] not in names:
                raise FieldError(f"a {checker.kind} checker has no {field[2]!r}")
            checker = replace(checker, **{field[2]: convert(field[2], text)})
            return replace(module, checkers=_set_item(module.checkers, field[1], checker))
        if section == "scripts":
            return replace(
                module, scripts=replace(module.scripts, timeout=convert("timeout", text))
            )
        if section == "script":
            attr = "script" if field[2] == "name" else field[2]
            item = replace(module.scripts.overrides[field[1]], **{attr: convert(attr, text)})
            overrides = _set_item(module.scripts.overrides, field[1], item)
            return replace(module, scripts=replace(module.scripts, overrides=overrides))
        if section == "failover":
            return replace(
                module, failover=replace(module.failover, **{field[1]: convert(field[1], text)})
            )
    except (IndexError, TypeError, AttributeError):
        raise FieldError(f"unknown field {field!r}") from None
    raise FieldError(f"unknown field {field!r}")


def add(module: Module, section: str, at: int | None = None) -> Module:
    """Append an empty item: "node", "address" (of node ``at``), "vip", "dir",
    "rule", "script" or "checker:KIND". The validator then says what to fill in."""
    if section == "node":
        return replace(module, nodes=(*module.nodes, Node(f"node{len(module.nodes) + 1}", ())))
    if section == "address":
        if at is None or not 0 <= at < len(module.nodes):
            raise FieldError("adding an address needs the node it belongs to")
        node = module.nodes[at]
        node = replace(node, addresses=(*node.addresses, ""))
        return replace(module, nodes=_set_item(module.nodes, at, node))
    if section == "vip":
        return replace(module, vips=(*module.vips, VirtualIP("", 24)))
    if section == "dir":
        rep = module.replication or Replication(dirs=())
        return replace(module, replication=replace(rep, dirs=(*rep.dirs, "")))
    if section == "rule":
        farm = module.farm or Farm(rules=())
        return replace(module, farm=Farm((*farm.rules, FarmRule(ports=()))))
    if section == "script":
        overrides = (*module.scripts.overrides, ScriptTimeout(module.lifecycle_scripts[0], 60.0))
        return replace(module, scripts=replace(module.scripts, overrides=overrides))
    if section.startswith("checker:"):
        kind = section.split(":", 1)[1]
        cls = CHECKER_TYPES.get(kind)
        if cls is None:
            raise FieldError(f"unknown checker {kind!r}; expected {', '.join(CHECKER_TYPES)}")
        return replace(module, checkers=(*module.checkers, _blank_checker(cls)))
    raise FieldError(f"cannot add {section!r}")


def _blank_checker(cls: type[Checker]) -> Checker:
    needed = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
    # Numbers start at 0 and texts empty: the validator then names what to fill in.
    return cls(**{name: 0 if name == "port" else "" for name in needed})


def remove(module: Module, key: Key) -> Module:
    """Remove the item at ``key``: ("node", i), ("node", i, "address", j), ("vip", i)..."""

    def drop(items: tuple[Any, ...], i: int) -> tuple[Any, ...]:
        if not 0 <= i < len(items):
            raise FieldError(f"there is no item {i + 1} to remove (there are {len(items)})")
        return (*items[:i], *items[i + 1 :])

    section, i = key[0], key[1]
    if section == "node" and len(key) == 4:
        node = module.nodes[i]
        return replace(
            module,
            nodes=_set_item(module.nodes, i, replace(node, addresses=drop(node.addresses, key[3]))),
        )
    if section == "node":
        return replace(module, nodes=drop(module.nodes, i))
    if section == "vip":
        return replace(module, vips=drop(module.vips, i))
    if section == "dir" and module.replication:
        return replace(
            module, replication=replace(module.replication, dirs=drop(module.replication.dirs, i))
        )
    if section == "rule" and module.farm:
        return replace(module, farm=Farm(drop(module.farm.rules, i)))
    if section == "checker":
        return replace(module, checkers=drop(module.checkers, i))
    if section == "script":
        return replace(
            module, scripts=replace(module.scripts, overrides=drop(module.scripts.overrides, i))
        )
    raise FieldError(f"cannot remove {key!r}")


# -- problems attached to fields ----------------------------------------------------------------


def problem_key(field: Field) -> Key:
    """The validation key a form field's problems are reported under."""
    if field[0] == "node" and len(field) >= 4 and field[2] == "address":
        return field[:4]
    if field[0] in INDEXED:
        return field[:2]
    return field[:1]


def all_keys(module: Module) -> list[Key]:
    keys: list[Key] = [("module",), ("nodes",), ("vips",), ("replication",), ("farm",),
                       ("scripts",), ("failover",)]  # fmt: skip
    for i, node in enumerate(module.nodes):
        keys.append(("node", i))
        keys += [("node", i, "address", j) for j in range(len(node.addresses))]
    keys += [("vip", i) for i in range(len(module.vips))]
    keys += [("dir", i) for i in range(len(module.replicated_dirs))]
    keys += [("rule", i) for i in range(len(module.farm.rules if module.farm else ()))]
    keys += [("checker", i) for i in range(len(module.checkers))]
    keys += [("script", i) for i in range(len(module.scripts.overrides))]
    return keys


_RULE_LINE = re.compile(r"the rule on line (\d+)")


def problems_by_field(module: Module) -> dict[Key, tuple[str, ...]]:
    """validate.check's messages keyed by the place they are about."""
    keys = all_keys(module)
    # check() reports lines; give every place its own pseudo-line and map back.
    lines = {key: n for n, key in enumerate(keys, start=1)}
    by_line = {n: key for key, n in lines.items()}
    found: dict[Key, list[str]] = {}
    for problem in validate.check(module, lines):
        key = by_line.get(problem.line or 0, ("module",))
        message = _RULE_LINE.sub(
            lambda m: f"rule {by_line.get(int(m.group(1)), ('rule', -1))[1] + 1}",
            problem.message,
        )
        found.setdefault(key, []).append(message)
    return {k: tuple(v) for k, v in found.items()}
