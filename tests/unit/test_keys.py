"""Signing keys: generate, load, trust, fingerprint, and `rampart keygen`."""

from __future__ import annotations

import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from node_service.errors import KeyFileError
from node_service.module import keys


def test_generate_writes_a_pem_pair_with_safe_modes(tmp_path):
    key_path, pub_path = keys.generate(tmp_path / "new" / "keys")
    assert (key_path.name, pub_path.name) == ("signing.key", "signing.pub")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(pub_path.stat().st_mode) == 0o644
    assert key_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS8
    assert pub_path.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")  # SPKI
    private, public = keys.load_private(key_path), keys.load_public(pub_path)
    public.verify(private.sign(b"manifest"), b"manifest")  # raises if not a pair


def test_generate_never_overwrites_a_key(tmp_path):
    keys.generate(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(KeyFileError, match=r"signing\.key already exists; refusing to overwrite"):
        keys.generate(tmp_path)
    (tmp_path / "signing.key").unlink()
    with pytest.raises(KeyFileError, match=r"signing\.pub already exists"):
        keys.generate(tmp_path)
    assert (tmp_path / "signing.pub").read_bytes() == before["signing.pub"]
    assert not (tmp_path / "signing.key").exists()


def test_generate_refuses_a_file_as_directory(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(KeyFileError, match="is not a directory"):
        keys.generate(tmp_path / "f")


def test_each_key_has_its_own_stable_fingerprint(tmp_path):
    _, pub_a = keys.generate(tmp_path / "a")
    _, pub_b = keys.generate(tmp_path / "b")
    fa = keys.fingerprint(keys.load_public(pub_a))
    assert fa == keys.fingerprint(keys.load_public(pub_a))
    assert fa != keys.fingerprint(keys.load_public(pub_b))
    assert fa.startswith("SHA256:") and len(fa) == len("SHA256:") + 43


def _pem_private(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_public(key) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"just some notes\n", "is not a PEM private key"),
        (b"", "is empty"),
        (b"x" * 70_000, "too large to be a key file"),
        (
            _pem_public(Ed25519PrivateKey.generate()),
            "is a public key; signing needs the private key",
        ),
        (_pem_private(ec.generate_private_key(ec.SECP256R1())), "holds an ECDSA key"),
        (
            Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"secret"),
            ),
            "encrypted private key",
        ),
    ],
    ids=["text", "empty", "huge", "public", "ecdsa", "encrypted"],
)
def test_load_private_says_what_is_wrong(tmp_path, content, message):
    path = tmp_path / "signing.key"
    path.write_bytes(content)
    with pytest.raises(KeyFileError, match=message) as info:
        keys.load_private(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_load_private_refuses_rsa_and_missing_files(tmp_path):
    path = tmp_path / "rsa.key"
    path.write_bytes(_pem_private(rsa.generate_private_key(public_exponent=65537, key_size=2048)))
    with pytest.raises(KeyFileError, match="holds an RSA key; Rampart signs modules with Ed25519"):
        keys.load_private(path)
    with pytest.raises(KeyFileError, match="no such key file"):
        keys.load_private(tmp_path / "absent.key")
    with pytest.raises(KeyFileError, match="is a directory"):
        keys.load_private(tmp_path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (_pem_private(Ed25519PrivateKey.generate()), "is a private key; trust its public half"),
        (b"-----BEGIN PUBLIC KEY-----\nnonsense\n-----END PUBLIC KEY-----\n", "not a PEM public"),
        (_pem_public(ec.generate_private_key(ec.SECP256R1())), "holds an ECDSA key"),
    ],
    ids=["private", "garbage", "ecdsa"],
)
def test_load_public_says_what_is_wrong(tmp_path, content, message):
    path = tmp_path / "trusted.pub"
    path.write_bytes(content)
    with pytest.raises(KeyFileError, match=message):
        keys.load_public(path)


def test_load_trusted_reads_files_and_directories(tmp_path):
    _, pub_a = keys.generate(tmp_path / "a")
    _, pub_b = keys.generate(tmp_path / "b")
    trust_dir = tmp_path / "trust"
    trust_dir.mkdir()
    (trust_dir / "a.pub").write_bytes(pub_a.read_bytes())
    (trust_dir / "b.pub").write_bytes(pub_b.read_bytes())
    (trust_dir / "README").write_text("not a key, and not *.pub: ignored")
    trusted = keys.load_trusted([trust_dir, pub_a])  # a given twice counts once
    assert [keys.fingerprint(k) for k in trusted] == [
        keys.fingerprint(keys.load_public(pub_a)),
        keys.fingerprint(keys.load_public(pub_b)),
    ]


def test_load_trusted_refuses_empty_inputs(tmp_path):
    with pytest.raises(KeyFileError, match="holds no"):
        keys.load_trusted([tmp_path])
    with pytest.raises(KeyFileError, match="no trusted key given"):
        keys.load_trusted([])


def test_keygen_command(rampart, tmp_path):
    result = rampart("keygen", "--out", tmp_path / "k")
    assert result.rc == 0, result.err
    pub = keys.load_public(tmp_path / "k" / "signing.pub")
    assert keys.fingerprint(pub) in result.out
    again = rampart("keygen", "--out", tmp_path / "k")
    assert again.rc == 1
    assert len(again.err_lines) == 1 and "already exists" in again.err
    assert keys.fingerprint(keys.load_public(tmp_path / "k" / "signing.pub")) == keys.fingerprint(
        pub
    )
