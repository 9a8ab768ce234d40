"""An in-memory keyring backend for the console's credential tests.

The OS keyring cannot run headless here, and the tests must never touch a
real one: each test installs this backend and the previous one comes back
afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator

import keyring
import keyring.backend
import keyring.errors


class MemoryKeyring(keyring.backend.KeyringBackend):
    priority = 1  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__()
        self.store: dict[tuple[str, str], str] = {}

    def get_password(self, service: str, username: str) -> str | None:
        return self.store.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        self.store[(service, username)] = password

    def delete_password(self, service: str, username: str) -> None:
        if self.store.pop((service, username), None) is None:
            raise keyring.errors.PasswordDeleteError("no such secret")


def installed_memory_keyring() -> Iterator[MemoryKeyring]:
    """Generator for fixtures: an in-memory keyring backend, the old one put back after."""
    old = keyring.get_keyring()
    fake = MemoryKeyring()
    keyring.set_keyring(fake)
    try:
        yield fake
    finally:
        keyring.set_keyring(old)
