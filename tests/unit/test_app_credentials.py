"""Credentials live in the keyring (a test backend set in-process), never in files."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import keyring
import keyring.backend
import keyring.errors
import pytest

from app.credentials import SERVICE, CredentialError, Credentials
from tests.keyrings import MemoryKeyring, installed_memory_keyring


class LockedKeyring(MemoryKeyring):
    def get_password(self, service: str, username: str) -> str | None:
        raise keyring.errors.KeyringLocked("the login keyring is locked\nmore detail")


@pytest.fixture
def backend() -> Iterator[MemoryKeyring]:
    yield from installed_memory_keyring()


def test_node_password_per_site_and_node(backend: MemoryKeyring) -> None:
    creds = Credentials()
    assert creds.password("lab", "lab-n1") is None
    creds.set_password("lab", "lab-n1", "pw1")
    creds.set_password("other", "lab-n1", "pw2")
    assert creds.password("lab", "lab-n1") == "pw1"
    assert creds.password("other", "lab-n1") == "pw2"
    assert backend.store[(SERVICE, "lab/lab-n1/password")] == "pw1"
    assert creds.forget_password("lab", "lab-n1") is True
    assert creds.forget_password("lab", "lab-n1") is False
    assert creds.password("lab", "lab-n1") is None


def test_key_passphrase_is_keyed_by_absolute_path(
    backend: MemoryKeyring, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    creds = Credentials()
    creds.set_key_passphrase("signing.key", "phrase")
    assert creds.key_passphrase(tmp_path / "signing.key") == "phrase"
    assert (SERVICE, f"key:{tmp_path / 'signing.key'}") in backend.store
    assert creds.forget_key_passphrase(tmp_path / "signing.key") is True


def test_empty_secret_is_refused(backend: MemoryKeyring) -> None:
    with pytest.raises(CredentialError, match="refusing to store an empty secret"):
        Credentials().set_password("lab", "n1", "")
    assert backend.store == {}


def test_keyring_failure_is_one_line() -> None:
    old = keyring.get_keyring()
    keyring.set_keyring(LockedKeyring())
    try:
        with pytest.raises(CredentialError) as info:
            Credentials().password("lab", "n1")
    finally:
        keyring.set_keyring(old)
    assert str(info.value) == (
        "cannot read lab/n1/password from the OS keyring: the login keyring is locked"
    )
