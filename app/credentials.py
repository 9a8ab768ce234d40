"""Secrets of a site, kept in the OS keyring and nowhere else.

Service name ``rampart``; one account per secret:

- ``SITE/NODE/password``: the SSH password of a node's login;
- ``key:/absolute/path``: the passphrase of a private key file (an SSH key
  or a module signing key), shared by every site that uses the key.

Nothing here writes a file, a log line or a command line holding a secret.
Keyring failures (no backend, locked store) become one CredentialError line.
"""

from __future__ import annotations

import os
from pathlib import Path

import keyring
import keyring.errors

from node_service.errors import UserError

SERVICE = "rampart"


class CredentialError(UserError):
    """The OS keyring cannot be used (no backend, locked, refused)."""


def password_account(site: str, node: str) -> str:
    return f"{site}/{node}/password"


def key_account(key_path: str | os.PathLike[str]) -> str:
    return f"key:{Path(key_path).expanduser().resolve()}"


class Credentials:
    """Read and write the console's secrets through the keyring module's backend."""

    def __init__(self, service: str = SERVICE) -> None:
        self.service = service

    def _get(self, account: str) -> str | None:
        try:
            return keyring.get_password(self.service, account)
        except keyring.errors.KeyringError as exc:
            raise CredentialError(
                f"cannot read {account} from the OS keyring: {_why(exc)}"
            ) from None

    def _set(self, account: str, secret: str) -> None:
        if not secret:
            raise CredentialError(f"refusing to store an empty secret for {account}")
        try:
            keyring.set_password(self.service, account, secret)
        except keyring.errors.KeyringError as exc:
            raise CredentialError(
                f"cannot store {account} in the OS keyring: {_why(exc)}"
            ) from None

    def _forget(self, account: str) -> bool:
        try:
            keyring.delete_password(self.service, account)
        except keyring.errors.PasswordDeleteError:
            return False
        except keyring.errors.KeyringError as exc:
            raise CredentialError(
                f"cannot remove {account} from the OS keyring: {_why(exc)}"
            ) from None
        return True

    # -- node passwords
    def password(self, site: str, node: str) -> str | None:
        return self._get(password_account(site, node))

    def set_password(self, site: str, node: str, secret: str) -> None:
        self._set(password_account(site, node), secret)

    def forget_password(self, site: str, node: str) -> bool:
        return self._forget(password_account(site, node))

    # -- key passphrases
    def key_passphrase(self, key_path: str | os.PathLike[str]) -> str | None:
        return self._get(key_account(key_path))

    def set_key_passphrase(self, key_path: str | os.PathLike[str], secret: str) -> None:
        self._set(key_account(key_path), secret)

    def forget_key_passphrase(self, key_path: str | os.PathLike[str]) -> bool:
        return self._forget(key_account(key_path))


def _why(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
