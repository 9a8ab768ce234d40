"""Ed25519 signing keys for modules: generate, load, fingerprint, trust.

A site has one or more signing keys; nodes run only modules whose manifest is
signed by a key in their trust directory. Private keys are PEM PKCS8 files
(0600), public keys PEM SubjectPublicKeyInfo, so the usual tools
(`openssl pkey -in signing.key -pubout`) read them too.

Every failure is a KeyFileError with one line saying which file is wrong and
what was expected, because a key given on the command line is user input.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from node_service.errors import KeyFileError

KEY_NAME = "signing.key"
PUB_NAME = "signing.pub"

# A PEM Ed25519 key is about 120 bytes; anything far larger is not one of ours
# and is not worth reading into memory.
_MAX_KEY_FILE = 64 * 1024

_PRIVATE_MARKERS = (b"-----BEGIN PRIVATE KEY", b"-----BEGIN ENCRYPTED PRIVATE KEY")
_PUBLIC_MARKER = b"-----BEGIN PUBLIC KEY"


def generate(out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Create DIR/signing.key (0600) and DIR/signing.pub; never overwrite a key."""
    out = Path(out_dir)
    key_path, pub_path = out / KEY_NAME, out / PUB_NAME
    for path in (key_path, pub_path):
        if path.exists() or path.is_symlink():
            raise KeyFileError(
                f"{path} already exists; refusing to overwrite a signing key "
                "(choose another --out directory or move the old keys away)"
            )
    if out.exists() and not out.is_dir():
        raise KeyFileError(f"{out} is not a directory (expected a directory for the new keys)")
    out.mkdir(parents=True, exist_ok=True)

    private = Ed25519PrivateKey.generate()
    key_pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    pub_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_new(key_path, key_pem, 0o600)
    try:
        _write_new(pub_path, pub_pem, 0o644)
    except BaseException:
        key_path.unlink(missing_ok=True)
        raise
    return key_path, pub_path


def _write_new(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL closes the race between the exists() check and the write: a key
    # that appeared meanwhile is still never overwritten.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    except FileExistsError:
        raise KeyFileError(f"{path} already exists; refusing to overwrite a signing key") from None
    except OSError as exc:
        raise KeyFileError(f"cannot create {path}: {exc.strerror}") from None
    try:
        os.fchmod(fd, mode)  # the umask must not loosen or tighten it
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_key_file(path: str | os.PathLike[str], what: str) -> bytes:
    p = Path(path)
    try:
        if p.is_dir():
            raise KeyFileError(f"{p} is a directory (expected a {what} file)")
        with open(p, "rb") as f:
            data = f.read(_MAX_KEY_FILE + 1)
    except FileNotFoundError:
        raise KeyFileError(f"{p}: no such key file (expected a {what})") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {p}: {exc.strerror}") from None
    if len(data) > _MAX_KEY_FILE:
        raise KeyFileError(f"{p} is too large to be a key file (expected a {what})")
    if not data.strip():
        raise KeyFileError(f"{p} is empty (expected a {what})")
    return data


def load_private(
    path: str | os.PathLike[str], passphrase: bytes | None = None
) -> Ed25519PrivateKey:
    """The Ed25519 private key in a PEM file, or a KeyFileError saying why not.

    ``passphrase`` opens an encrypted key in memory (the console gets it from
    the OS keyring), so a decrypted copy never has to touch a disk.
    """
    data = _read_key_file(path, "PEM Ed25519 private key such as signing.key")
    if _PUBLIC_MARKER in data and not any(m in data for m in _PRIVATE_MARKERS):
        raise KeyFileError(
            f"{path} is a public key; signing needs the private key (signing.key from "
            "`rampart keygen`)"
        )
    # A passphrase given for a plain key is not needed, and not an error.
    password = passphrase if b"ENCRYPTED" in data else None
    try:
        key = serialization.load_pem_private_key(data, password=password)
    except TypeError:
        raise KeyFileError(
            f"{path} is an encrypted private key; rampart needs an unencrypted PKCS8 key"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        if password is not None:
            raise KeyFileError(
                f"the passphrase does not open signing key {path}; expected the one it was "
                "encrypted with"
            ) from None
        raise KeyFileError(
            f"{path} is not a PEM private key (expected signing.key from `rampart keygen`)"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(
            f"{path} holds {_kind(key)}; Rampart signs modules with Ed25519 keys "
            "(make one with `rampart keygen`)"
        )
    return key


def load_public(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """The Ed25519 public key in a PEM file, or a KeyFileError saying why not."""
    data = _read_key_file(path, "PEM Ed25519 public key such as signing.pub")
    if any(m in data for m in _PRIVATE_MARKERS):
        # Trust lists must hold public halves only; a private key there would
        # be copied to every node.
        raise KeyFileError(f"{path} is a private key; trust its public half (signing.pub) instead")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise KeyFileError(
            f"{path} is not a PEM public key (expected signing.pub from `rampart keygen`)"
        ) from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(
            f"{path} holds {_kind(key)}; Rampart trusts Ed25519 keys only "
            "(signing.pub from `rampart keygen`)"
        )
    return key


def load_trusted(paths: list[str | os.PathLike[str]]) -> list[Ed25519PublicKey]:
    """Public keys from files and directories of *.pub files (sorted, deduplicated)."""
    if not paths:
        raise KeyFileError("no trusted key given (expected --trust signing.pub or a directory)")
    keys: list[Ed25519PublicKey] = []
    seen: set[bytes] = set()
    for entry in paths:
        p = Path(entry)
        if p.is_dir():
            files = sorted(f for f in p.glob("*.pub") if f.is_file())
            if not files:
                raise KeyFileError(f"{p} holds no *.pub files (expected trusted public keys)")
        else:
            files = [p]
        for f in files:
            key = load_public(f)
            raw = public_raw(key)
            if raw not in seen:
                seen.add(raw)
                keys.append(key)
    return keys


def public_raw(key: Ed25519PublicKey) -> bytes:
    """The 32 raw bytes of a public key (what manifests and fingerprints use)."""
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_from_raw(raw: bytes) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(raw)


def fingerprint(key: Ed25519PublicKey | bytes) -> str:
    """`SHA256:<base64>` of the raw public key: short, stable, easy to compare by eye."""
    raw = key if isinstance(key, bytes) else public_raw(key)
    digest = hashlib.sha256(raw).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def _kind(key: object) -> str:
    """'an RSA key', 'an ECDSA key'...: for messages about the wrong kind of key."""
    kinds = (
        ((rsa.RSAPrivateKey, rsa.RSAPublicKey), "an RSA key"),
        ((ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey), "an ECDSA key"),
        ((dsa.DSAPrivateKey, dsa.DSAPublicKey), "a DSA key"),
        ((ed448.Ed448PrivateKey, ed448.Ed448PublicKey), "an Ed448 key"),
    )
    for types, name in kinds:
        if isinstance(key, types):
            return name
    return "a non-Ed25519 key"
