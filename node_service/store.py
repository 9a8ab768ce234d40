"""Installed modules on this node: ``state_dir/modules/NAME/``.

Layout of one module::

    NAME/module -> module-<version>-<token>   the verified files (atomic symlink swap)
    NAME/module-<version>-<token>/           userconfig.xml, bin/...
    NAME/install.json                        name, version, kind, installed_at
    NAME/state/                              persistent state, kept across reinstalls
    NAME/state/daemon.json                   admin intent + last state (for resume)

Install verifies the whole .safe file against the trusted keys *before*
anything is written, so a refused file leaves state_dir exactly as it was.
The new files are unpacked beside the old ones and switched in with one
``rename`` of a symlink: a crash mid-install leaves either the old or the new
module, never a mixture.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from node_service.errors import CommandRefused, ModuleError, SignatureError

if TYPE_CHECKING:
    from node_service.config import NodeConfig
    from node_service.module.model import Module

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


@dataclass(frozen=True)
class Installed:
    """What ``rampart module list`` shows for one module."""

    name: str
    version: str
    kind: str
    installed_at: float
    path: Path

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "kind": self.kind,
            "installed_at": self.installed_at,
            "path": str(self.path),
        }


def install_decision(
    name: str,
    kind: str,
    node: str,
    module_nodes: tuple[str, ...],
    current: Installed | None,
    running: bool,
    version: str = "?",
) -> str:
    """Whether a verified module may be installed here; the reason, or CommandRefused."""
    if not _NAME.match(name):
        raise CommandRefused(f"module name {name!r} cannot be used as a directory name")
    if node not in module_nodes:
        nodes = ", ".join(module_nodes) or "none"
        raise CommandRefused(
            f"module {name} does not run on node {node} (its nodes: {nodes}); "
            "check 'node:' in node.yaml or the module's <node name=...>"
        )
    if current is None:
        return f"module {name} installed (new, kind {kind})"
    if running and current.kind != kind:
        raise CommandRefused(
            f"module {name} is running as a {current.kind} module; stop it before "
            f"installing a {kind} module under the same name"
        )
    upgraded = f"module {name} upgraded from version {current.version} to {version}"
    if running:
        return f"{upgraded}; the running module keeps its old files until it is stopped and started"
    return upgraded


class ModuleStore:
    """Install, list and remove modules under ``state_dir/modules``."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.root = config.modules_dir

    # -- reading -------------------------------------------------------------

    def module_dir(self, name: str) -> Path:
        return self.root / name

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir() if _NAME.match(p.name) and (p / "module").exists()
        )

    def get(self, name: str) -> Installed | None:
        meta_path = self.module_dir(name) / "install.json"
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return Installed(
            name=name,
            version=str(meta.get("version", "?")),
            kind=str(meta.get("kind", "?")),
            installed_at=float(meta.get("installed_at", 0)),
            path=self.module_dir(name),
        )

    def list(self) -> list[Installed]:
        return [m for m in (self.get(n) for n in self.names()) if m is not None]

    def load(self, name: str) -> Module:
        """The module model of an installed module (raises ValidationError if damaged)."""
        from node_service.module import userconfig

        return userconfig.load_dir(self.module_dir(name) / "module")

    def trusted_keys(self) -> list[Any]:
        from node_service.module import keys

        trust_dir = self.config.trust_dir
        paths = sorted(trust_dir.glob("*.pub")) if trust_dir.is_dir() else []
        if not paths:
            raise SignatureError(
                f"no trusted keys in {trust_dir} (*.pub): copy the module signer's "
                "signing.pub there before installing modules"
            )
        return [keys.load_public(p) for p in paths]

    # -- daemon records (admin intent, last state) ---------------------------

    def read_record(self, name: str) -> dict[str, Any]:
        try:
            data = json.loads((self.module_dir(name) / "state" / "daemon.json").read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def write_record(self, name: str, **changes: Any) -> None:
        state_dir = self.module_dir(name) / "state"
        if not state_dir.is_dir():
            return
        record = {**self.read_record(name), **changes}
        _write_atomic(state_dir / "daemon.json", json.dumps(record, indent=1))

    # -- changing ------------------------------------------------------------

    def install(self, safe_path: Path, running: bool | None = None) -> tuple[Installed, str]:
        """Verify, then unpack and switch in a module; nothing changes on refusal.

        ``running`` says whether the module of that name is running now
        (the daemon knows; None means "not running").
        """
        from node_service.module import safe

        trusted = self.trusted_keys()
        verified = safe.verify(safe_path, trusted)
        module = verified.module
        current = self.get(verified.name)
        reason = install_decision(
            verified.name,
            module.kind,
            self.config.node,
            tuple(n.name for n in module.nodes),
            current,
            bool(running),
            str(verified.version),
        )
        target = self.module_dir(verified.name)
        created = not target.exists()
        token = secrets.token_hex(4)
        incoming = target / f".incoming-{token}"
        try:
            target.mkdir(parents=True, exist_ok=True)
            safe.extract(safe_path, incoming, trusted)
            release = target / f"module-{_safe_part(verified.version)}-{token}"
            incoming.rename(release)
            link_tmp = target / f".module-link-{token}"
            link_tmp.symlink_to(release.name)
            old_release = _release_of(target)
            os.replace(link_tmp, target / "module")
        except BaseException:
            shutil.rmtree(incoming, ignore_errors=True)
            if created:
                shutil.rmtree(target, ignore_errors=True)
            raise
        (target / "state").mkdir(exist_ok=True)
        installed = Installed(
            verified.name, str(verified.version), module.kind, time.time(), target
        )
        meta = {k: v for k, v in installed.as_json().items() if k != "path"}
        _write_atomic(target / "install.json", json.dumps(meta, indent=1))
        if old_release is not None and old_release != release:
            shutil.rmtree(old_release, ignore_errors=True)
        return installed, reason

    def remove(self, name: str) -> str:
        """Delete a module and its state; the daemon checks first that it is stopped."""
        target = self.module_dir(name)
        if not _NAME.match(name) or not target.is_dir():
            raise ModuleError(f"module {name} is not installed on node {self.config.node}")
        # Rename first so a half-deleted module is never listed as installed.
        doomed = self.root / f".removing-{name}-{secrets.token_hex(4)}"
        target.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        return f"module {name} removed from node {self.config.node}"


def _release_of(target: Path) -> Path | None:
    link = target / "module"
    if link.is_symlink():
        return target / os.readlink(link)
    return None


def _safe_part(version: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(version))[:40] or "0"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, path)
