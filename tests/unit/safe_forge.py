"""Crafting `.safe` files, honest and hostile, for the verifier's tests.

`forge()` writes arbitrary zip members (any name, any file type, duplicates)
plus a MANIFEST.json that by default lists them truthfully and is signed with
the key given, so a hostile archive signed by a TRUSTED key gets past the
signature and proves that the later check is what refuses it. Patch helpers
then make the zip headers lie about sizes and counts.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import stat
import struct
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from node_service.module import keys
from node_service.resources import templates_dir

EPOCH = (1980, 1, 1, 0, 0, 0)
SCRIPT = b"#!/bin/sh\nexit 0\n"


@dataclass(frozen=True)
class Member:
    """One zip entry to write; `mode` is a full st_mode (type bits included)."""

    name: str
    data: bytes = b""
    mode: int = stat.S_IFREG | 0o644
    compress: int = zipfile.ZIP_DEFLATED

    @property
    def manifest_mode(self) -> str:
        return "0755" if self.mode & 0o111 else "0644"


def copy_template(dest: Path, template: str = "mirror") -> Path:
    """A valid module directory: a copy of a shipped template."""
    shutil.copytree(templates_dir() / template, dest)
    return dest


def module_members(module_dir: Path | None = None) -> list[Member]:
    """The members of an honest module (the mirror template unless a dir is given)."""
    root = module_dir or templates_dir() / "mirror"
    members = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        mode = 0o755 if rel.startswith("bin/") else 0o644
        members.append(Member(rel, path.read_bytes(), stat.S_IFREG | mode))
    return members


def userconfig_of(members: list[Member]) -> bytes:
    return next(m.data for m in members if m.name == "userconfig.xml")


def replace(members: list[Member], name: str, data: bytes) -> list[Member]:
    return [Member(m.name, data, m.mode, m.compress) if m.name == name else m for m in members]


def manifest_doc(
    members: list[Member],
    key: Ed25519PrivateKey,
    name: str = "mirror",
    version: str = "1",
) -> dict:
    """The truthful manifest of `members` as a dict, ready to be edited by a test."""
    return {
        "format": 1,
        "name": name,
        "version": version,
        "signer": base64.b64encode(keys.public_raw(key.public_key())).decode(),
        "entries": [
            {
                "path": m.name,
                "size": len(m.data),
                "sha256": hashlib.sha256(m.data).hexdigest(),
                "mode": m.manifest_mode,
            }
            for m in sorted(members, key=lambda m: m.name)
        ],
    }


def manifest_json(doc: dict) -> bytes:
    return (json.dumps(doc, sort_keys=True, indent=2) + "\n").encode()


def forge(
    path: Path,
    members: list[Member],
    key: Ed25519PrivateKey,
    *,
    manifest: dict | bytes | None = None,
    listed: list[Member] | None = None,
    signature: bytes | None = None,
    with_manifest: bool = True,
    with_signature: bool = True,
) -> Path:
    """Write a .safe with exactly these members and a manifest signed by `key`.

    `listed` are the members the manifest describes (default: all of them);
    `manifest` replaces the manifest (a dict is serialised, bytes used as is);
    `signature` replaces the real signature.
    """
    if manifest is None:
        manifest = manifest_doc(listed if listed is not None else members, key)
    data = manifest if isinstance(manifest, bytes) else manifest_json(manifest)
    sig = key.sign(data) if signature is None else signature
    head = []
    if with_manifest:
        head.append(Member("MANIFEST.json", data))
    if with_signature:
        head.append(Member("MANIFEST.sig", sig, compress=zipfile.ZIP_STORED))
    write_zip(path, head + members)
    return path


def write_zip(path: Path, members: list[Member]) -> Path:
    """Raw zip writing: no checks at all, duplicates allowed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about duplicate names
        with zipfile.ZipFile(path, "w") as zf:
            for m in members:
                info = zipfile.ZipInfo(m.name, date_time=EPOCH)
                info.create_system = 3
                info.external_attr = m.mode << 16
                info.compress_type = m.compress
                zf.writestr(info, m.data)
    return path


def _central_records(blob: bytes):
    """(offset, name) of every central directory record."""
    at = blob.find(b"PK\x01\x02")
    while at >= 0:
        name_len = struct.unpack_from("<H", blob, at + 28)[0]
        yield at, blob[at + 46 : at + 46 + name_len].decode("utf-8", "replace")
        at = blob.find(b"PK\x01\x02", at + 46 + name_len)


def patch_central(path: Path, name: str, *, file_size: int | None = None, crc: int | None = None):
    """Make the central directory lie about one entry's uncompressed size or CRC."""
    blob = bytearray(path.read_bytes())
    for at, entry_name in _central_records(bytes(blob)):
        if entry_name == name:
            if file_size is not None:
                struct.pack_into("<L", blob, at + 24, file_size)
            if crc is not None:
                struct.pack_into("<L", blob, at + 16, crc)
            path.write_bytes(bytes(blob))
            return path
    raise AssertionError(f"no central directory record for {name!r}")


def patch_entry_count(path: Path, count: int) -> Path:
    """Make the end-of-archive record declare `count` entries."""
    blob = bytearray(path.read_bytes())
    at = blob.rfind(b"PK\x05\x06")
    struct.pack_into("<HH", blob, at + 8, count, count)
    path.write_bytes(bytes(blob))
    return path
