"""The `.safe` format as pure decisions: limits, entry names, manifest.

A `.safe` file is a zip whose `MANIFEST.json` lists every other entry
(path, size, sha256, mode) with the module name and version, and whose
`MANIFEST.sig` is the raw Ed25519 signature of the exact manifest bytes.

Everything here is a plain function over plain data and returns a reason
(a one-line sentence) or raises UnsafeArchiveError with it, so the builder
and the verifier apply the very same rules: a module that builds is a module
that verifies. The reading and writing live in safe_build / safe_verify.
"""

from __future__ import annotations

import base64
import json
import re
import stat
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from node_service.errors import Problem, UnsafeArchiveError

FORMAT = 1
MANIFEST = "MANIFEST.json"
SIGNATURE = "MANIFEST.sig"
USERCONFIG = "userconfig.xml"
SIGNATURE_BYTES = 64

MAX_ENTRIES = 10_000
MAX_TOTAL_BYTES = 256 * 1024 * 1024
MAX_RATIO = 200
# The manifest of 10,000 entries is about 2 MiB; more is not ours.
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_NAME_BYTES = 1024
# Central directory records are ~46 bytes plus the name; bounding the whole
# directory keeps a hostile file from making zipfile allocate millions of
# records before the entry-count check can run.
MAX_CENTRAL_DIRECTORY = MAX_ENTRIES * (46 + MAX_NAME_BYTES)
# The compressed file cannot exceed what it holds by more than its headers.
MAX_FILE_BYTES = MAX_TOTAL_BYTES + 32 * 1024 * 1024

MODE_SCRIPT = 0o755
MODE_FILE = 0o644
ALLOWED_MODES = (MODE_FILE, MODE_SCRIPT)

# Zip timestamps cannot go below 1980; fixing them makes builds reproducible.
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)

_DRIVE = re.compile(r"^[A-Za-z]:")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_TYPE_NAMES = {
    stat.S_IFLNK: "a symlink",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a directory",
}


@dataclass(frozen=True)
class ZipEntry:
    """What the structural check needs from one zip central-directory record."""

    name: str
    external_attr: int = (stat.S_IFREG | MODE_FILE) << 16
    file_size: int = 0
    compress_size: int = 0
    compress_type: int = zipfile.ZIP_DEFLATED
    flag_bits: int = 0

    @classmethod
    def from_info(cls, info: zipfile.ZipInfo) -> ZipEntry:
        return cls(
            info.filename,
            info.external_attr,
            info.file_size,
            info.compress_size,
            info.compress_type,
            info.flag_bits,
        )


@dataclass(frozen=True)
class ManifestEntry:
    path: str
    size: int
    sha256: str
    mode: int

    def as_json(self) -> dict[str, object]:
        return {
            "path": self.path,
            "size": self.size,
            "sha256": self.sha256,
            "mode": f"{self.mode:04o}",
        }


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    signer: bytes  # raw Ed25519 public key the builder signed with (a hint, not trust)
    entries: tuple[ManifestEntry, ...]
    format: int = FORMAT


def path_problem(name: str) -> str | None:
    """Why an entry name is unsafe to unpack, or None when it is a plain relative path."""
    shown = repr(name)
    if not name:
        return "an entry has an empty name"
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        return f"entry name longer than {MAX_NAME_BYTES} bytes: {shown[:60]}..."
    if "\\" in name:
        return f"entry {shown} contains a backslash (paths inside a .safe use '/')"
    if name.startswith("/") or _DRIVE.match(name):
        return f"entry {shown} is an absolute path (expected a path relative to the module)"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return f"entry {shown} contains a control character"
    parts = name.split("/")
    if ".." in parts:
        return f"entry {shown} has a '..' component (it would escape the module directory)"
    if "." in parts:
        return f"entry {shown} has a '.' component (expected a normalised path)"
    if name.endswith("/"):
        return f"entry {shown} is a directory entry (a .safe lists files only)"
    if "" in parts:
        return f"entry {shown} has an empty path component"
    return None


def type_problem(entry: ZipEntry) -> str | None:
    """Why an entry is not a regular file (symlink, device...), judged by its zip attributes."""
    unix_mode = entry.external_attr >> 16
    kind = stat.S_IFMT(unix_mode)
    if kind and kind != stat.S_IFREG:
        what = _TYPE_NAMES.get(kind, f"a special file (type {kind:#o})")
        return f"entry {entry.name!r} is {what}; a .safe holds regular files only"
    if entry.external_attr & 0x10:  # MS-DOS directory bit
        return f"entry {entry.name!r} is a directory; a .safe holds regular files only"
    return None


def structure_problem(entries: Sequence[ZipEntry]) -> str | None:
    """The first structural reason to refuse an archive, before any content is read.

    Order matters: count first (cheap, bounds the rest), then names and types,
    then the sizes the headers declare. Reading later enforces the sizes again.
    """
    if len(entries) > MAX_ENTRIES:
        return f"more than {MAX_ENTRIES:,} entries ({len(entries):,}); refusing a possible zip bomb"
    seen: set[str] = set()
    for entry in entries:
        reason = path_problem(entry.name) or type_problem(entry)
        if reason:
            return reason
        if entry.name in seen:
            return f"duplicate entry {entry.name!r} (each path may appear once)"
        seen.add(entry.name)
        if entry.flag_bits & 0x1:
            return f"entry {entry.name!r} is encrypted (a .safe is signed, not encrypted)"
        if entry.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            return (
                f"entry {entry.name!r} uses compression method {entry.compress_type} "
                "(expected stored or deflated)"
            )
    conflict = _path_conflict(seen)
    if conflict:
        return conflict
    total = sum(e.file_size for e in entries)
    if total > MAX_TOTAL_BYTES:
        return (
            f"entries declare {total:,} bytes uncompressed, more than the "
            f"{MAX_TOTAL_BYTES // (1024 * 1024)} MiB limit; refusing a possible zip bomb"
        )
    for entry in entries:
        if entry.file_size and entry.file_size > MAX_RATIO * max(entry.compress_size, 1):
            ratio = entry.file_size / max(entry.compress_size, 1)
            return (
                f"entry {entry.name!r} has a compression ratio of {ratio:,.0f} "
                f"(limit {MAX_RATIO}); refusing a possible zip bomb"
            )
    return None


def _path_conflict(paths: Iterable[str]) -> str | None:
    # "bin" as a file and "bin/x" cannot both be unpacked.
    files = set(paths)
    for path in sorted(files):
        parts = path.split("/")
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            if prefix in files:
                return f"entry {prefix!r} is both a file and the directory of {path!r}"
    return None


def manifest_bytes(manifest: Manifest) -> bytes:
    """Canonical JSON: sorted keys, sorted entries, ASCII, newline-terminated."""
    doc = {
        "format": manifest.format,
        "name": manifest.name,
        "version": manifest.version,
        "signer": base64.b64encode(manifest.signer).decode("ascii"),
        "entries": [e.as_json() for e in sorted(manifest.entries, key=lambda e: e.path)],
    }
    return (json.dumps(doc, sort_keys=True, indent=2, ensure_ascii=True) + "\n").encode("ascii")


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # Two values for one key would let two readers disagree on what was signed.
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise UnsafeArchiveError(f"{MANIFEST} has the key {key!r} twice")
        out[key] = value
    return out


def load_manifest_json(data: bytes) -> object:
    """Decode the manifest bytes as JSON (no schema yet); UnsafeArchiveError if not JSON."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UnsafeArchiveError(f"{MANIFEST} is not UTF-8 text") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as exc:
        raise UnsafeArchiveError(
            f"{MANIFEST} is malformed JSON (line {exc.lineno}: {exc.msg})"
        ) from None
    except RecursionError:
        raise UnsafeArchiveError(f"{MANIFEST} is nested too deeply to be a manifest") from None


def parse_manifest(data: bytes) -> Manifest:
    """The manifest, checked field by field; UnsafeArchiveError names the first bad field."""
    doc = load_manifest_json(data)
    if not isinstance(doc, dict):
        raise UnsafeArchiveError(f"{MANIFEST} must be a JSON object, not {_json_type(doc)}")
    _exact_keys(doc, {"format", "name", "version", "signer", "entries"}, MANIFEST)
    fmt = doc["format"]
    if type(fmt) is not int or fmt != FORMAT:
        raise UnsafeArchiveError(
            f"{MANIFEST}: format {fmt!r} is not supported (expected {FORMAT}); "
            "a newer rampart may be needed"
        )
    name = _string(doc, "name", MANIFEST)
    version = _string(doc, "version", MANIFEST)
    signer_text = _string(doc, "signer", MANIFEST)
    try:
        signer = base64.b64decode(signer_text, validate=True)
    except ValueError:
        signer = b""
    if len(signer) != 32:
        raise UnsafeArchiveError(f"{MANIFEST}: 'signer' must be a base64 Ed25519 public key")
    raw_entries = doc["entries"]
    if not isinstance(raw_entries, list):
        raise UnsafeArchiveError(
            f"{MANIFEST}: 'entries' must be a list, not {_json_type(raw_entries)}"
        )
    if len(raw_entries) > MAX_ENTRIES:
        raise UnsafeArchiveError(f"{MANIFEST} lists more than {MAX_ENTRIES:,} entries")
    entries = tuple(_entry(raw, i) for i, raw in enumerate(raw_entries))
    paths = [e.path for e in entries]
    if len(set(paths)) != len(paths):
        dup = next(p for p in paths if paths.count(p) > 1)
        raise UnsafeArchiveError(f"{MANIFEST} lists {dup!r} twice")
    if sum(e.size for e in entries) > MAX_TOTAL_BYTES:
        raise UnsafeArchiveError(f"{MANIFEST} lists more than {MAX_TOTAL_BYTES:,} bytes in total")
    return Manifest(name, version, signer, entries, fmt)


def _entry(raw: object, index: int) -> ManifestEntry:
    where = f"{MANIFEST}: entries[{index}]"
    if not isinstance(raw, dict):
        raise UnsafeArchiveError(f"{where} must be an object, not {_json_type(raw)}")
    _exact_keys(raw, {"path", "size", "sha256", "mode"}, where)
    path = _string(raw, "path", where)
    reason = path_problem(path)
    if reason:
        raise UnsafeArchiveError(f"{where}: {reason}")
    if path in (MANIFEST, SIGNATURE):
        raise UnsafeArchiveError(f"{where} lists {path}, which cannot sign itself")
    size = raw["size"]
    if type(size) is not int or not 0 <= size <= MAX_TOTAL_BYTES:
        raise UnsafeArchiveError(f"{where}: 'size' must be a byte count, not {size!r}")
    digest = raw["sha256"]
    if not isinstance(digest, str) or not _SHA256.match(digest):
        raise UnsafeArchiveError(f"{where}: 'sha256' must be 64 lowercase hex digits")
    mode_text = raw["mode"]
    mode = (
        int(mode_text, 8)
        if isinstance(mode_text, str) and re.fullmatch(r"0[0-7]{3}", mode_text)
        else None
    )
    if mode not in ALLOWED_MODES:
        raise UnsafeArchiveError(f'{where}: \'mode\' must be "0644" or "0755", not {mode_text!r}')
    return ManifestEntry(path, size, digest, mode)


def _exact_keys(doc: dict[str, object], expected: set[str], where: str) -> None:
    missing = sorted(expected - doc.keys())
    if missing:
        raise UnsafeArchiveError(f"{where} has no {missing[0]!r} field")
    unknown = sorted(doc.keys() - expected)
    if unknown:
        raise UnsafeArchiveError(f"{where} has an unknown field {unknown[0]!r}")


def _string(doc: dict[str, object], key: str, where: str) -> str:
    value = doc[key]
    if not isinstance(value, str) or not value:
        raise UnsafeArchiveError(f"{where}: {key!r} must be a non-empty string, not {value!r}")
    return value


def _json_type(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), "a number" if isinstance(value, int | float) else "null"
    )


def listing_problem(zip_entries: Sequence[ZipEntry], manifest: Manifest) -> str | None:
    """Why the archive's entries and the manifest disagree, or None.

    Only names and declared sizes: hashes need the content and come later.
    """
    in_zip = {e.name: e for e in zip_entries if e.name not in (MANIFEST, SIGNATURE)}
    listed = {e.path: e for e in manifest.entries}
    for name in sorted(in_zip.keys() - listed.keys()):
        return f"entry {name!r} is in the archive but not listed in {MANIFEST}"
    for name in sorted(listed.keys() - in_zip.keys()):
        return f"{MANIFEST} lists {name!r} but the archive has no such entry"
    for name in sorted(listed):
        if in_zip[name].file_size != listed[name].size:
            return (
                f"size mismatch for {name!r}: {MANIFEST} says {listed[name].size:,} bytes, "
                f"the archive declares {in_zip[name].file_size:,}"
            )
    if USERCONFIG not in listed:
        return f"the module has no {USERCONFIG} (every module needs one at its root)"
    return None


def dtd_problem(xml: bytes) -> Problem | None:
    """DTDs and entity declarations are refused before any XML parser sees them."""
    for marker in (b"<!DOCTYPE", b"<!ENTITY"):
        at = xml.find(marker)
        if at >= 0:
            line = xml.count(b"\n", 0, at) + 1
            return Problem(USERCONFIG, line, "DTD and entity declarations are not allowed")
    return None
