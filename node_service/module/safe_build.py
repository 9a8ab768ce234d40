"""Build a signed `.safe` file from a module directory.

The build is reproducible: the same tree and key give a byte-identical file
(fixed zip timestamps, sorted entries, fixed attributes, canonical manifest
JSON, and Ed25519 signatures are deterministic), so a console and a CI job
can check each other's output. It refuses anything the verifier would
refuse, and it writes through a temporary file so a failed build leaves no
partial output behind.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from node_service.errors import ModuleError, UnsafeArchiveError
from node_service.module import keys
from node_service.module.safe_format import (
    MANIFEST,
    MAX_ENTRIES,
    MAX_RATIO,
    MAX_TOTAL_BYTES,
    MODE_FILE,
    MODE_SCRIPT,
    SIGNATURE,
    USERCONFIG,
    ZIP_EPOCH,
    Manifest,
    ManifestEntry,
    ZipEntry,
    manifest_bytes,
    path_problem,
    structure_problem,
)
from node_service.module.safe_verify import check_userconfig

_COMPRESS_LEVEL = 9


@dataclass(frozen=True)
class SourceFile:
    """One regular file of the module tree and how it will be stored."""

    path: str  # relative, '/'-separated: the name inside the .safe
    source: Path
    mode: int


@dataclass(frozen=True)
class BuildResult:
    path: Path
    name: str
    version: str
    entries: tuple[ManifestEntry, ...]
    signer: str
    warnings: tuple[str, ...]


def stored_mode(path: str) -> int:
    """Scripts (everything under bin/) are stored executable; the rest read-only data."""
    return MODE_SCRIPT if path.startswith("bin/") else MODE_FILE


def collect(
    module_dir: Path, exclude: frozenset[Path] = frozenset()
) -> tuple[list[SourceFile], list[str]]:
    """The files a module directory contributes, and the warnings to show.

    Symlinks and special files are refused rather than followed or skipped:
    a module that silently loses a file fails later, on a node, at 3 a.m.
    Hidden entries (.git, editor swap files) are left out with a warning.
    """
    files: list[SourceFile] = []
    warnings: list[str] = []
    hidden: list[str] = []
    # os.walk never follows symlinks to directories here; each entry is lstat'ed.
    for top, dirnames, filenames in os.walk(module_dir, onerror=_walk_error, followlinks=False):
        top_path = Path(top)
        rel_top = top_path.relative_to(module_dir)
        for name in sorted(dirnames):
            rel = (rel_top / name).as_posix()
            if name.startswith("."):
                hidden.append(rel + "/")
            elif (top_path / name).is_symlink():
                raise ModuleError(_symlink_reason(module_dir, rel))
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and not (top_path / d).is_symlink()
        )
        for name in sorted(filenames):
            full = top_path / name
            rel = (rel_top / name).as_posix()
            if full.resolve() in exclude:
                continue
            if name.startswith("."):
                hidden.append(rel)
                continue
            st = full.lstat()
            if stat.S_ISLNK(st.st_mode):
                raise ModuleError(_symlink_reason(module_dir, rel))
            if not stat.S_ISREG(st.st_mode):
                raise ModuleError(
                    f"{module_dir}/{rel} is a special file (device, FIFO or socket); "
                    "a module holds regular files only"
                )
            reason = path_problem(rel)
            if reason:
                raise ModuleError(f"{module_dir}: {reason}")
            mode = stored_mode(rel)
            if mode == MODE_SCRIPT and not st.st_mode & 0o111:
                warnings.append(f"{rel} is not executable; stored as executable (0755)")
            files.append(SourceFile(rel, full, mode))
    if hidden:
        warnings.append("left out hidden files: " + ", ".join(sorted(hidden)))
    files.sort(key=lambda f: f.path)
    return files, warnings


def _walk_error(exc: OSError) -> None:
    # An unreadable sub-directory must not silently drop files from the module.
    raise ModuleError(f"cannot read {exc.filename}: {exc.strerror}")


def _symlink_reason(module_dir: Path, rel: str) -> str:
    return (
        f"{module_dir}/{rel} is a symlink; a module holds regular files only "
        "(copy the target into the module instead)"
    )


def _compress_type(data: bytes) -> int:
    # Data that would deflate past the verifier's ratio limit, or not shrink,
    # is stored as is, so every honest build passes the zip-bomb check.
    if not data:
        return zipfile.ZIP_STORED
    compressor = zlib.compressobj(_COMPRESS_LEVEL, zlib.DEFLATED, -15)
    size = len(compressor.compress(data) + compressor.flush())
    if size >= len(data) or len(data) > MAX_RATIO * size:
        return zipfile.ZIP_STORED
    return zipfile.ZIP_DEFLATED


def _zip_info(name: str, mode: int, compress_type: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=ZIP_EPOCH)
    info.create_system = 3  # unix: external_attr carries the file mode
    info.external_attr = (stat.S_IFREG | mode) << 16
    info.compress_type = compress_type
    return info


def _read_sources(files: list[SourceFile]) -> dict[str, bytes]:
    if len(files) + 2 > MAX_ENTRIES:
        raise ModuleError(
            f"the module has {len(files):,} files; a .safe holds at most {MAX_ENTRIES - 2:,}"
        )
    contents: dict[str, bytes] = {}
    total = 0
    for f in files:
        # Read one byte past the budget so a file growing meanwhile is caught.
        try:
            with open(f.source, "rb") as fh:
                data = fh.read(MAX_TOTAL_BYTES - total + 1)
        except OSError as exc:
            raise ModuleError(f"cannot read {f.source}: {exc.strerror}") from None
        total += len(data)
        if total > MAX_TOTAL_BYTES:
            raise ModuleError(
                f"the module holds more than {MAX_TOTAL_BYTES // (1024 * 1024)} MiB; "
                "a .safe file is limited to that"
            )
        contents[f.path] = data
    return contents


def plan(module_dir: Path, out_path: Path) -> tuple[list[SourceFile], list[str]]:
    """Check the module directory and list its files before reading any of them."""
    if not module_dir.is_dir():
        raise ModuleError(f"{module_dir} is not a directory (expected a module directory)")
    config = module_dir / USERCONFIG
    if config.is_symlink():
        raise ModuleError(_symlink_reason(module_dir, USERCONFIG))
    if not config.is_file():
        raise ModuleError(
            f"{module_dir} has no {USERCONFIG} (a module directory holds {USERCONFIG} and bin/; "
            "create one with `rampart module new`)"
        )
    exclude = frozenset({out_path.resolve()})
    return collect(module_dir, exclude)


def build(
    module_dir: str | os.PathLike[str],
    key_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
) -> list[str]:
    """Validate, pack and sign MODULE_DIR into OUT_PATH; returns the warnings."""
    return list(build_module(module_dir, key_path, out_path).warnings)


def build_module(
    module_dir: str | os.PathLike[str],
    key_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    passphrase: bytes | None = None,
) -> BuildResult:
    module_dir, out = Path(module_dir), Path(out_path)
    private = keys.load_private(key_path, passphrase)
    files, warnings = plan(module_dir, out)
    contents = _read_sources(files)

    module = check_userconfig(contents[USERCONFIG])

    entries = tuple(
        ManifestEntry(
            f.path, len(contents[f.path]), hashlib.sha256(contents[f.path]).hexdigest(), f.mode
        )
        for f in files
    )
    public = private.public_key()
    manifest = Manifest(module.name, module.version, keys.public_raw(public), entries)
    manifest_data = manifest_bytes(manifest)
    signature = private.sign(manifest_data)

    members = [(MANIFEST, manifest_data, MODE_FILE), (SIGNATURE, signature, MODE_FILE)]
    members += [(e.path, contents[e.path], e.mode) for e in entries]
    infos = [_zip_info(name, mode, _compress_type(data)) for name, data, mode in members]
    # The builder holds itself to the verifier's rules (ratio, names, sizes).
    reason = structure_problem(
        [
            ZipEntry(i.filename, i.external_attr, len(d), len(d), zipfile.ZIP_STORED, 0)
            for i, (_, d, _) in zip(infos, members, strict=True)
        ]
    )
    if reason:
        raise UnsafeArchiveError(f"{module_dir}: {reason}")
    _write_atomically(out, infos, members)
    return BuildResult(
        out, module.name, module.version, entries, keys.fingerprint(public), tuple(warnings)
    )


def _write_atomically(
    out: Path, infos: list[zipfile.ZipInfo], members: list[tuple[str, bytes, int]]
) -> None:
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise ModuleError(f"cannot write {out}: directory {parent} does not exist")
    if out.is_dir():
        raise ModuleError(f"cannot write {out}: it is a directory (expected a FILE.safe path)")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent)
    except OSError as exc:
        raise ModuleError(f"cannot write {out}: {exc.strerror}") from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            with zipfile.ZipFile(fh, "w") as zf:
                for info, (_, data, _) in zip(infos, members, strict=True):
                    zf.writestr(info, data, compresslevel=_COMPRESS_LEVEL)
            fh.flush()
            os.fchmod(fh.fileno(), 0o644)
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ModuleError(f"cannot write {out}: {exc.strerror or exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
