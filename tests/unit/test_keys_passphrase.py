"""Signing with an encrypted key: the passphrase opens it in memory (the console's keyring)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from node_service.errors import KeyFileError
from node_service.module import keys, safe, templates

PHRASE = b"author phrase"


@pytest.fixture
def locked(tmp_path: Path) -> tuple[Path, Ed25519PrivateKey]:
    key = Ed25519PrivateKey.generate()
    path = tmp_path / "locked.key"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(PHRASE),
        )
    )
    return path, key


def raw(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def test_the_right_passphrase_opens_the_key(locked) -> None:
    path, key = locked
    assert raw(keys.load_private(path, PHRASE)) == raw(key)


def test_a_wrong_passphrase_is_one_clear_line(locked) -> None:
    path, _key = locked
    with pytest.raises(KeyFileError, match=f"the passphrase does not open signing key {path}"):
        keys.load_private(path, b"wrong")


def test_without_a_passphrase_an_encrypted_key_is_refused_as_before(locked) -> None:
    path, _key = locked
    with pytest.raises(KeyFileError, match="is an encrypted private key"):
        keys.load_private(path)


def test_a_passphrase_for_a_plain_key_is_not_needed(tmp_path: Path) -> None:
    key_path, _pub = keys.generate(tmp_path / "keys")
    assert keys.load_private(key_path, b"anything") is not None


def test_build_module_signs_with_an_encrypted_key_and_verifies(locked, tmp_path: Path) -> None:
    path, key = locked
    src = tmp_path / "web"
    templates.create("mirror", templates.Fill(name="web"), src)
    built = safe.build_module(src, path, tmp_path / "web.safe", passphrase=PHRASE)
    verified = safe.verify(built.path, [key.public_key()])
    assert verified.name == "web" and verified.signer == built.signer
