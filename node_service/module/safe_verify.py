"""Verify and unpack `.safe` files that may be hostile.

A `.safe` file comes from outside (a laptop, a console, a download), so it is
read in an order where each step only trusts what the previous one proved:

1. the zip's shape, from its central directory alone: entry count, names,
   types, declared sizes and compression ratios (nothing is decompressed);
2. the signature over the exact MANIFEST.json bytes, by a trusted key;
3. the manifest's fields, then that it lists exactly the archive's entries;
4. every entry's size and SHA-256, counted while reading, never trusting the
   sizes the headers declare;
5. userconfig.xml (no DTD/entities) through the model's parser.

Extraction verifies everything first, then unpacks into a temporary directory
beside DEST and renames it into place, so a refusal leaves DEST absent or
empty and nothing is ever written outside it.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import stat
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from node_service.errors import (
    ModuleError,
    Problem,
    SignatureError,
    UnsafeArchiveError,
    ValidationError,
)
from node_service.module import keys
from node_service.module.safe_format import (
    MANIFEST,
    MAX_CENTRAL_DIRECTORY,
    MAX_ENTRIES,
    MAX_FILE_BYTES,
    MAX_MANIFEST_BYTES,
    MAX_TOTAL_BYTES,
    SIGNATURE,
    SIGNATURE_BYTES,
    USERCONFIG,
    Manifest,
    ManifestEntry,
    ZipEntry,
    dtd_problem,
    listing_problem,
    load_manifest_json,
    parse_manifest,
    structure_problem,
)

if TYPE_CHECKING:
    from node_service.module.model import Module

_CHUNK = 64 * 1024
_END_RECORD = b"PK\x05\x06"
_END_RECORD_SIZE = 22
_MAX_COMMENT = 0xFFFF
# Everything zipfile/zlib raise on damaged input; none of it may escape as a traceback.
_DAMAGE = (
    zipfile.BadZipFile,
    zlib.error,
    EOFError,
    OSError,
    ValueError,
    struct.error,
    NotImplementedError,
)


@dataclass(frozen=True)
class VerifiedModule:
    """A .safe whose signature, listing, hashes and userconfig all checked out."""

    name: str
    version: str
    module: Module
    entries: tuple[ManifestEntry, ...]
    signer: str = ""  # fingerprint of the trusted key that signed it


@dataclass
class _Archive:
    """An open .safe being checked; use as a context manager to close it."""

    path: Path
    file: BinaryIO
    zf: zipfile.ZipFile
    entries: list[ZipEntry]
    manifest_data: bytes = b""
    signature: bytes = b""
    read_budget: int = MAX_TOTAL_BYTES
    infos: dict[str, zipfile.ZipInfo] = field(default_factory=dict)

    def unsafe(self, reason: str) -> UnsafeArchiveError:
        return UnsafeArchiveError(f"{self.path}: {reason}")

    def __enter__(self) -> _Archive:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.zf.close()
        self.file.close()


def _prescan(path: Path, fh: BinaryIO) -> None:
    """Refuse what is not a zip, or is too big, from the file's size and end record alone."""
    st = os.fstat(fh.fileno())
    if not stat.S_ISREG(st.st_mode):
        raise ModuleError(f"{path} is not a regular file (expected a FILE.safe)")
    if st.st_size == 0:
        raise UnsafeArchiveError(f"{path}: empty file (expected a signed .safe zip)")
    if st.st_size > MAX_FILE_BYTES:
        raise UnsafeArchiveError(
            f"{path}: {st.st_size:,} bytes is larger than any valid .safe file "
            f"(limit {MAX_TOTAL_BYTES // (1024 * 1024)} MiB of content)"
        )
    head = fh.read(4)
    tail_size = min(st.st_size, _END_RECORD_SIZE + _MAX_COMMENT)
    fh.seek(st.st_size - tail_size)
    tail = fh.read(tail_size)
    fh.seek(0)
    at = tail.rfind(_END_RECORD)
    if at < 0 or len(tail) - at < _END_RECORD_SIZE:
        if head == b"PK\x03\x04":
            raise UnsafeArchiveError(
                f"{path}: truncated zip (its end-of-archive record is missing)"
            )
        raise UnsafeArchiveError(f"{path}: not a zip archive (expected a signed .safe file)")
    _, _, _, _, count, cd_size, _, _ = struct.unpack("<4s4H2LH", tail[at : at + _END_RECORD_SIZE])
    # 0xFFFF means "see the zip64 record": our files never need zip64, so it
    # is simply one more way of saying "too many entries".
    if count > MAX_ENTRIES:
        raise UnsafeArchiveError(
            f"{path}: more than {MAX_ENTRIES:,} entries (declares {count:,}); "
            "refusing a possible zip bomb"
        )
    if cd_size > MAX_CENTRAL_DIRECTORY:
        raise UnsafeArchiveError(f"{path}: zip directory of {cd_size:,} bytes is too large")


def open_archive(safe_path: str | os.PathLike[str]) -> _Archive:
    """Open a .safe and run every check that needs no content (step 1).

    The file is opened once and every later step reads that same open file,
    so swapping the path meanwhile changes nothing.
    """
    path = Path(safe_path)
    try:
        # O_NONBLOCK: a FIFO given as FILE.safe must be refused, not waited on.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        fh = os.fdopen(fd, "rb")
    except IsADirectoryError:
        raise ModuleError(f"{path} is a directory (expected a FILE.safe)") from None
    except FileNotFoundError:
        raise ModuleError(f"{path}: no such file (expected a FILE.safe)") from None
    except OSError as exc:
        raise ModuleError(f"cannot read {path}: {exc.strerror}") from None
    try:
        _prescan(path, fh)
        try:
            zf = zipfile.ZipFile(fh)
        except _DAMAGE as exc:
            raise UnsafeArchiveError(f"{path}: damaged zip archive ({exc})") from None
        arc = _Archive(path, fh, zf, [ZipEntry.from_info(i) for i in zf.infolist()])
        reason = structure_problem(arc.entries)
        if reason:
            raise arc.unsafe(reason)
        arc.infos = {i.filename: i for i in zf.infolist()}
        if MANIFEST not in arc.infos:
            raise arc.unsafe(f"missing {MANIFEST} (not a Rampart module file)")
        if arc.infos[MANIFEST].file_size > MAX_MANIFEST_BYTES:
            raise arc.unsafe(f"{MANIFEST} is larger than {MAX_MANIFEST_BYTES // (1024 * 1024)} MiB")
        arc.manifest_data = _read_all(arc, MANIFEST, MAX_MANIFEST_BYTES)
        if SIGNATURE in arc.infos:
            # Read a little more than a signature so a wrong length is reported
            # as a bad signature, by the signature step.
            arc.signature = _read_all(arc, SIGNATURE, 64 * SIGNATURE_BYTES)
    except BaseException:
        fh.close()
        raise
    return arc


def _chunks(arc: _Archive, name: str, limit: int) -> Iterator[bytes]:
    """An entry's bytes, counted as they come: never more than `limit` or the read budget."""
    seen = 0
    try:
        with arc.zf.open(arc.infos[name]) as fh:
            while True:
                # Ask for one byte past the limit so an oversized entry shows itself.
                chunk = fh.read(min(_CHUNK, limit - seen + 1))
                if not chunk:
                    return
                seen += len(chunk)
                arc.read_budget -= len(chunk)
                if seen > limit:
                    raise arc.unsafe(
                        f"entry {name!r} holds more than the {limit:,} bytes it may hold"
                    )
                if arc.read_budget < 0:
                    raise arc.unsafe(
                        f"content exceeds {MAX_TOTAL_BYTES // (1024 * 1024)} MiB uncompressed; "
                        "refusing a possible zip bomb"
                    )
                yield chunk
    except _DAMAGE as exc:
        raise arc.unsafe(f"damaged entry {name!r} ({exc})") from None


def _read_all(arc: _Archive, name: str, limit: int) -> bytes:
    return b"".join(_chunks(arc, name, limit))


def check_signature(arc: _Archive, trusted: list[Ed25519PublicKey]) -> str:
    """Step 2: the fingerprint of the trusted key that signed the manifest."""
    if SIGNATURE not in arc.infos:
        raise SignatureError(f"{arc.path}: missing {SIGNATURE} (the module is not signed)")
    if len(arc.signature) != SIGNATURE_BYTES:
        raise SignatureError(
            f"{arc.path}: bad signature ({SIGNATURE} is {len(arc.signature)} bytes; "
            f"an Ed25519 signature is {SIGNATURE_BYTES})"
        )
    if not trusted:
        raise SignatureError(f"{arc.path}: no trusted keys to check the signature against")
    for key in trusted:
        try:
            key.verify(arc.signature, arc.manifest_data)
        except InvalidSignature:
            continue
        return keys.fingerprint(key)
    # Not ours. The manifest names the key it claims; if the signature really
    # is that key's, the file is intact but its signer is unknown here.
    claimed = _claimed_signer(arc.manifest_data)
    if claimed is not None:
        try:
            claimed.verify(arc.signature, arc.manifest_data)
        except InvalidSignature:
            pass
        else:
            raise SignatureError(
                f"{arc.path}: signed by an untrusted key {keys.fingerprint(claimed)} "
                "(add its public key with --trust if you trust it)"
            )
    raise SignatureError(
        f"{arc.path}: bad signature ({SIGNATURE} does not match {MANIFEST}: "
        "the file was altered after signing or is damaged)"
    )


def _claimed_signer(manifest_data: bytes) -> Ed25519PublicKey | None:
    # Only a hint for the refusal message: nothing else is read from an
    # unverified manifest.
    try:
        doc = load_manifest_json(manifest_data)
        signer = doc.get("signer") if isinstance(doc, dict) else None
        if not isinstance(signer, str):
            return None
        return keys.public_from_raw(base64.b64decode(signer, validate=True))
    except (UnsafeArchiveError, ValueError):
        return None


def check_listing(arc: _Archive) -> Manifest:
    """Step 3: a well-formed manifest that lists exactly the archive's entries."""
    try:
        manifest = parse_manifest(arc.manifest_data)
    except UnsafeArchiveError as exc:
        raise arc.unsafe(str(exc)) from None
    reason = listing_problem(arc.entries, manifest)
    if reason:
        raise arc.unsafe(reason)
    return manifest


def _hashed(arc: _Archive, entry: ManifestEntry) -> Iterator[bytes]:
    """Step 4 for one entry: yields its bytes, then checks size and SHA-256 at the end."""
    digest = hashlib.sha256()
    size = 0
    for chunk in _chunks(arc, entry.path, entry.size):
        digest.update(chunk)
        size += len(chunk)
        yield chunk
    if size != entry.size:
        raise arc.unsafe(
            f"size mismatch for {entry.path!r}: {MANIFEST} says {entry.size:,} bytes, read {size:,}"
        )
    if digest.hexdigest() != entry.sha256:
        raise arc.unsafe(f"hash mismatch for {entry.path!r}: its SHA-256 differs from {MANIFEST}")


def check_content(arc: _Archive, manifest: Manifest) -> bytes:
    """Step 4 for every entry; returns userconfig.xml's bytes."""
    arc.read_budget = MAX_TOTAL_BYTES
    xml = b""
    for entry in sorted(manifest.entries, key=lambda e: e.path):
        chunks = _hashed(arc, entry)
        if entry.path == USERCONFIG:
            xml = b"".join(chunks)
        else:
            for _ in chunks:
                pass
    return xml


def check_userconfig(xml: bytes, manifest: Manifest | None = None) -> Module:
    """Step 5: parse userconfig.xml; its name/version must match the signed manifest."""
    from node_service.module import userconfig  # heavy: XML parser and model

    dtd = dtd_problem(xml)
    if dtd:
        raise ValidationError([dtd])
    try:
        module = userconfig.parse(xml, USERCONFIG)
    except (LookupError, UnicodeError) as exc:
        # e.g. an XML declaration naming an encoding Python does not know:
        # still a hostile-input refusal, never a traceback.
        raise ValidationError([Problem(USERCONFIG, 1, f"cannot be decoded ({exc})")]) from None
    if manifest and (module.name, module.version) != (manifest.name, manifest.version):
        raise UnsafeArchiveError(
            f"{MANIFEST} says module {manifest.name} {manifest.version} but {USERCONFIG} "
            f"says {module.name} {module.version}"
        )
    return module


def _verify_open(arc: _Archive, trusted: list[Ed25519PublicKey]) -> VerifiedModule:
    signer = check_signature(arc, trusted)
    manifest = check_listing(arc)
    xml = check_content(arc, manifest)
    try:
        module = check_userconfig(xml, manifest)
    except UnsafeArchiveError as exc:
        raise arc.unsafe(str(exc)) from None
    return VerifiedModule(manifest.name, manifest.version, module, manifest.entries, signer)


def verify(safe_path: str | os.PathLike[str], trusted: list[Ed25519PublicKey]) -> VerifiedModule:
    """Every check, in order; raises SignatureError / UnsafeArchiveError / ValidationError."""
    arc = open_archive(safe_path)
    with arc:
        return _verify_open(arc, trusted)


def read_userconfig(safe_path: str | os.PathLike[str]) -> bytes:
    """userconfig.xml from a .safe: every check but the signature (and the XML itself).

    For `module validate FILE.safe` and `inspect`, which must not need a
    trusted key but must refuse a hostile or damaged file just as verify does.
    """
    arc = open_archive(safe_path)
    with arc:
        return check_content(arc, check_listing(arc))


def _prepare_dest(dest: Path) -> bool:
    """Whether DEST already exists (empty); refuse anything else before any work."""
    if dest.is_symlink():
        raise ModuleError(f"{dest} is a symlink; extract into a plain new or empty directory")
    if dest.exists():
        if not dest.is_dir():
            raise ModuleError(f"{dest} exists and is not a directory (expected a new or empty one)")
        if any(dest.iterdir()):
            raise ModuleError(f"{dest} is not empty; extract into a new or empty directory")
        return True
    if not dest.parent.is_dir():
        raise ModuleError(f"{dest.parent} does not exist (create it, or choose another DEST)")
    return False


def extract(
    safe_path: str | os.PathLike[str], dest: str | os.PathLike[str], trusted: list[Ed25519PublicKey]
) -> VerifiedModule:
    """Verify fully, then unpack into DEST only (created if missing, else must be empty)."""
    dest = Path(dest).absolute()
    existed = _prepare_dest(dest)
    arc = open_archive(safe_path)
    with arc:
        verified = _verify_open(arc, trusted)
        try:
            tmp = Path(
                tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".extract", dir=dest.parent)
            )
        except OSError as exc:
            raise ModuleError(f"cannot extract into {dest}: {exc.strerror}") from None
        try:
            arc.read_budget = MAX_TOTAL_BYTES
            for entry in verified.entries:
                _unpack(arc, entry, tmp)
            os.chmod(tmp, dest.stat().st_mode & 0o7777 if existed else 0o755)
            # rename() replaces an empty directory atomically and fails on a
            # non-empty one, so a DEST filled meanwhile is never overwritten.
            os.rename(tmp, dest)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ModuleError(f"cannot extract into {dest}: {exc.strerror or exc}") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return verified


def _unpack(arc: _Archive, entry: ManifestEntry, root: Path) -> None:
    target = root.joinpath(*entry.path.split("/"))
    for parent in reversed(target.relative_to(root).parents[:-1]):
        directory = root / parent
        if not directory.is_dir():
            directory.mkdir()
            directory.chmod(0o755)  # whatever the umask: modules are readable by their scripts
    # O_EXCL|O_NOFOLLOW: never through a link, never over something already there.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(target, flags, 0o600)
    try:
        with os.fdopen(fd, "wb", closefd=False) as fh:
            for chunk in _hashed(arc, entry):
                fh.write(chunk)
        os.fchmod(fd, entry.mode)
    finally:
        os.close(fd)
