"""One exception tree for the whole node service.

Every message is a single line meant for the person at the terminal: what is
wrong, where (file:line, node, module) and, when it helps, what to do next.
The CLI prints ``str(error)`` and exits with ``error.exit_code``; it never
shows a traceback for a RampartError.

Retryable errors are the ones a daemon loop survives and tries again later
(a peer that is not answering, a busy socket); fatal errors stop the loop.
"""

from __future__ import annotations

from dataclasses import dataclass


class RampartError(Exception):
    """Base of every error Rampart raises on purpose."""

    exit_code = 1


class UserError(RampartError):
    """The input is wrong (a file, a flag, a command in the wrong state)."""


class ConfigError(UserError):
    """node.yaml or another configuration file is invalid."""


class ModuleError(UserError):
    """A module directory or .safe file cannot be used."""


@dataclass(frozen=True)
class Problem:
    """One validation finding: ``file:line: message``."""

    file: str
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.message}"


class ValidationError(ModuleError):
    """userconfig.xml (or another document) has one or more problems.

    All problems are collected, not just the first; ``str()`` gives the first
    line-numbered problem so a one-line refusal still names it.
    """

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        super().__init__(str(self.problems[0]) if self.problems else "invalid")

    def lines(self) -> list[str]:
        return [str(p) for p in self.problems]


class SignatureError(ModuleError):
    """A .safe file's signature is missing, bad, or made by an untrusted key."""


class UnsafeArchiveError(ModuleError):
    """A .safe file is malformed or hostile (paths, sizes, hashes, entries)."""


class KeyFileError(UserError):
    """A key file is missing, not a key, or the wrong kind of key."""


class CommandRefused(UserError):
    """A command is not valid now (wrong state, unknown module, missing role)."""

    exit_code = 3


class RetryableError(RampartError):
    """Something failed that may work later; loops log it and carry on."""


class FatalError(RampartError):
    """The daemon cannot continue; it stops cleanly."""

    exit_code = 2
