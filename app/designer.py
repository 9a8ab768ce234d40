"""Module designer model: a form over a module, its live userconfig.xml, build & sign.

The form and the XML text stay in sync both ways: every form edit re-emits
the canonical XML (``userconfig.emit``); every XML edit is parsed with the
node's own parser, and when it parses the form shows the new model. When it
does not, ``xml_problems`` holds the parser's ``line: message`` list and the
form keeps the last model that parsed. Field problems come from the node's
``validate.check`` (see designer_fields), so what the designer accepts is
exactly what a node accepts.

Build & sign saves the module directory and calls ``safe.build_module``; a
signing key encrypted with a passphrase is opened in memory with the
passphrase from the OS keyring (never decrypted to a file).
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

from app import designer_fields as df
from app.credentials import Credentials, key_account
from app.signals import Signal
from node_service.errors import KeyFileError, Problem, UserError, ValidationError
from node_service.module import keys, safe, templates, userconfig
from node_service.module.model import SCRIPT_NAMES, Module

MAX_SCRIPT_BYTES = 256 * 1024


class DesignerError(UserError):
    """The module cannot be saved or built as it is."""


class PassphraseNeeded(DesignerError):
    """The signing key is encrypted and the keyring has no passphrase for it."""

    def __init__(self, message: str, account: str) -> None:
        super().__init__(message)
        self.account = account


class DesignerModel:
    def __init__(
        self, module: Module, scripts: dict[str, str] | None = None,
        files: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        self._lock = threading.RLock()
        # The module's other text files (a template's app.env, README.md): the
        # scripts source them, so a module built without them cannot start.
        self._files = dict(files or {})
        self._module = module
        self._xml = userconfig.emit(module).decode("utf-8")
        self._xml_problems: tuple[Problem, ...] = ()
        self._field_errors: dict[df.Field, str] = {}
        self._scripts = dict(scripts or {})
        self._problems = df.problems_by_field(module)
        self.changed = Signal("designer_changed")  # (source: "form" | "xml" | "scripts")

    # -- construction
    @classmethod
    def from_template(cls, name: str) -> DesignerModel:
        path = templates.template_path(name)
        return cls(templates.load(name), _read_scripts(path / "bin"), _read_files(path))

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> DesignerModel:
        module = userconfig.load_dir(path)
        return cls(module, _read_scripts(Path(path) / "bin"), _read_files(Path(path)))

    @classmethod
    def from_safe(
        cls, path: str | os.PathLike[str], trust_pub: str | os.PathLike[str] | None = None
    ) -> DesignerModel:
        """A model from a signed module (worker): verified against ``trust_pub`` and with
        its scripts and files; without a trusted key, its userconfig.xml only (checked by
        the node's parser, not verified)."""
        if trust_pub:
            with tempfile.TemporaryDirectory(prefix="rampart-open-") as tmp:
                dest = Path(tmp) / "module"
                safe.extract(path, dest, [keys.load_public(trust_pub)])
                return cls.from_dir(dest)
        data = safe.read_userconfig(path)
        return cls(userconfig.parse(data, f"{Path(path).name}:userconfig.xml"))

    # -- reading
    @property
    def module(self) -> Module:
        return self._module

    @property
    def xml(self) -> str:
        return self._xml

    @property
    def xml_problems(self) -> tuple[Problem, ...]:
        return self._xml_problems

    @property
    def problems(self) -> dict[df.Key, tuple[str, ...]]:
        """Validation messages by place, plus conversion errors of typed fields."""
        with self._lock:
            merged = {k: list(v) for k, v in self._problems.items()}
            for field, message in self._field_errors.items():
                merged.setdefault(df.problem_key(field), []).append(message)
            return {k: tuple(v) for k, v in merged.items()}

    def problems_for(self, field: df.Field) -> tuple[str, ...]:
        return self.problems.get(df.problem_key(field), ())

    def text(self, field: df.Field) -> str:
        return df.text_of(self._module, field)

    @property
    def valid(self) -> bool:
        return not self._problems and not self._field_errors and not self._xml_problems

    @property
    def scripts(self) -> dict[str, str]:
        with self._lock:
            return dict(self._scripts)

    # -- form edits
    def _apply(self, module: Module) -> None:
        self._module = module
        self._xml = userconfig.emit(module).decode("utf-8")
        self._xml_problems = ()
        self._problems = df.problems_by_field(module)

    def set_field(self, field: df.Field, text: str) -> bool:
        """Set a form field; False when the text cannot be converted (error kept on it)."""
        with self._lock:
            try:
                module = df.edit(self._module, field, text)
            except df.FieldError as exc:
                self._field_errors[field] = str(exc)
                ok = False
            else:
                self._field_errors.pop(field, None)
                self._apply(module)
                ok = True
        self.changed.emit("form")
        return ok

    def add(self, section: str, at: int | None = None) -> None:
        with self._lock:
            self._apply(df.add(self._module, section, at))
        self.changed.emit("form")

    def remove(self, key: df.Key) -> None:
        with self._lock:
            self._apply(df.remove(self._module, key))
            # Indexes shift: conversion errors of removed/moved fields are stale.
            self._field_errors.clear()
        self.changed.emit("form")

    # -- XML edits
    def set_xml(self, text: str) -> bool:
        """Take the XML the user typed; True when it parsed and the form now shows it."""
        with self._lock:
            self._xml = text
            try:
                module = userconfig.parse(text.encode("utf-8"))
            except ValidationError as exc:
                self._xml_problems = tuple(exc.problems)
                ok = False
            else:
                self._module = module
                self._xml_problems = ()
                self._field_errors.clear()
                self._problems = df.problems_by_field(module)
                ok = True
        self.changed.emit("xml")
        return ok

    # -- scripts
    def set_script(self, name: str, text: str) -> None:
        if name not in SCRIPT_NAMES and name not in self._module.checker_scripts:
            allowed = ", ".join((*SCRIPT_NAMES, *self._module.checker_scripts))
            raise DesignerError(f"script {name!r} is not used by this module; expected {allowed}")
        with self._lock:
            self._scripts[name] = text
        self.changed.emit("scripts")

    # -- files (call from a worker)
    def save(self, module_dir: str | os.PathLike[str]) -> Path:
        """Write userconfig.xml and bin/ scripts; each file replaced atomically."""
        with self._lock:
            if self._xml_problems:
                first = self._xml_problems[0]
                raise DesignerError(f"userconfig.xml has problems ({first}); fix them first")
            xml, scripts, files = self._xml, dict(self._scripts), dict(self._files)
            values = templates.tokens(self._module)
        root = Path(module_dir)
        (root / "bin").mkdir(parents=True, exist_ok=True)
        _write_atomic(root / userconfig.FILENAME, xml.encode("utf-8"), 0o644)
        for name, text in scripts.items():
            _write_atomic(root / "bin" / name, text.encode("utf-8"), 0o755)
        for name, text in files.items():
            # A template's @VIP@/@DIR@... take the values the form has now,
            # as `rampart module new` does; a file without tokens is unchanged.
            _write_atomic(root / name, templates.substitute(text, values).encode("utf-8"), 0o644)
        return root

    def build(
        self, module_dir: str | os.PathLike[str], key_path: str | os.PathLike[str],
        out_path: str | os.PathLike[str], creds: Credentials | None = None,
    ) -> safe.BuildResult:  # fmt: skip
        """Save, then validate, pack and sign into ``out_path`` (.safe)."""
        with self._lock:
            if not self.valid:
                raise DesignerError(
                    f"module {self._module.name} is not valid: {self.first_problem()}"
                )
        self.save(module_dir)
        # The key is opened in memory with the keyring's passphrase: no
        # decrypted copy is ever written anywhere.
        passphrase = _passphrase(Path(key_path), creds or Credentials())
        return safe.build_module(module_dir, key_path, out_path, passphrase=passphrase)

    def first_problem(self) -> str:
        if self._xml_problems:
            return str(self._xml_problems[0])
        for key, messages in self.problems.items():
            return f"{'/'.join(str(k) for k in key)}: {messages[0]}"
        return "no problem"


def _read_scripts(bin_dir: Path) -> dict[str, str]:
    scripts: dict[str, str] = {}
    if not bin_dir.is_dir():
        return scripts
    for path in sorted(bin_dir.iterdir()):
        if not path.is_file() or path.stat().st_size > MAX_SCRIPT_BYTES:
            continue
        try:
            scripts[path.name] = path.read_text("utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # binaries stay as they are on disk; the editor shows text only
    return scripts


def _read_files(root: Path) -> dict[str, str]:
    """Top-level text files beside userconfig.xml (app.env, README.md...)."""
    files: dict[str, str] = {}
    if not root.is_dir():
        return files
    for path in sorted(root.iterdir()):
        if path.name == userconfig.FILENAME or path.name.startswith("."):
            continue
        if path.is_symlink() or not path.is_file() or path.stat().st_size > MAX_SCRIPT_BYTES:
            continue
        try:
            files[path.name] = path.read_text("utf-8")
        except (UnicodeDecodeError, OSError):
            continue
    return files


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _passphrase(path: Path, creds: Credentials) -> bytes | None:
    """The keyring's passphrase for an encrypted signing key; None for a plain key."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read signing key {path}: {exc.strerror}") from None
    if b"ENCRYPTED PRIVATE KEY" not in data:
        return None
    passphrase = creds.key_passphrase(path)
    if passphrase is None:
        raise PassphraseNeeded(
            f"signing key {path} is encrypted and its passphrase is not in the keyring; enter it",
            key_account(path),
        )
    return passphrase.encode("utf-8")
