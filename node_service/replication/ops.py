"""Replication operation records: what the primary did, in the order it did it.

Pure code. One frozen dataclass per operation, a compact versioned binary
codec (a struct header, then fixed-size integers, then length-prefixed
strings and raw bytes — never pickle), and the map from an operation to the
64 KiB regions it dirties, for the dirty tracker.

Data operations name an open-file *handle* rather than a path: a file can be
unlinked (or renamed) while open and still be written, so the secondary keeps
a handle table that mirrors the primary's. Namespace operations carry paths
relative to the replicated directory's root, validated here so that no
record, however forged, can name anything outside the tree.

Operations that change a modification time carry the time the primary ended
up with (``mtime_ns`` on the handle's file, ``stamps`` for paths such as the
parent directory of a created name) so both trees end identical to the
nanosecond, which a clock on the secondary could never give.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Protocol

from node_service.errors import RampartError, RetryableError

CODEC_VERSION = 1
REGION_SIZE = 64 * 1024

# Region markers next to data region indexes (>= 0).
META = -1  # size, mode, owner, times of the entry
ENTRY = -2  # existence, type, symlink target; for a directory its whole subtree

_HEADER = struct.Struct(">BB")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_STAMP_TIME = struct.Struct(">q")
MAX_PATH_BYTES = 4096
MAX_DATA_BYTES = 16 * 1024 * 1024


class ReplicationError(RampartError):
    """Base of the replication data path's errors."""


class OpFormatError(ReplicationError):
    """Bytes that are not a valid operation record (truncated, unknown, hostile)."""


class OpPathError(ReplicationError):
    """A path in an operation record would leave the replicated directory."""


class ReplicationUnavailable(RetryableError):
    """The Replicator cannot take operations now (peer gone, link down)."""


class SecondaryApplyError(ReplicationError):
    """Applying an operation on the secondary failed: the secondary is stale.

    Never swallowed: the transport marks the secondary stale and the dirty
    tracker/resync repairs the regions of ``op``.
    """

    def __init__(self, op: Op, errno_: int | None, message: str):
        self.op = op
        self.errno = errno_
        super().__init__(message)


class UnknownHandleError(SecondaryApplyError):
    """A data operation names a handle the secondary has not opened (restart, gap)."""


def check_path(path: str, *, root_ok: bool = False, where: str = "path") -> str:
    """Return ``path`` if it names something inside the tree, else raise OpPathError.

    ``""`` is the replicated directory itself, allowed only where an operation
    may act on the root (chmod, utimens, stamps); creating or removing it never is.
    """
    if path == "":
        if root_ok:
            return path
        raise OpPathError(f"{where}: empty path; expected a name inside the replicated directory")
    if "\0" in path:
        raise OpPathError(f"{where}: {path!r} contains NUL; expected a plain relative path")
    if path.startswith("/"):
        raise OpPathError(f"{where}: {path!r} is absolute; expected a path relative to the root")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise OpPathError(
                f"{where}: {path!r} has an empty, '.' or '..' component; expected a/b/c"
            )
    if len(os.fsencode(path)) > MAX_PATH_BYTES:
        raise OpPathError(f"{where}: path longer than {MAX_PATH_BYTES} bytes")
    return path


@dataclass(frozen=True)
class Stamp:
    """After the operation, ``path`` (``""`` = root) has this modification time."""

    path: str
    mtime_ns: int

    def __post_init__(self) -> None:
        check_path(self.path, root_ok=True, where="stamp")


# -- operations -------------------------------------------------------------
#
# Field types drive the codec: int (signed 64-bit), bool, str (a path or a
# symlink target, u16 length), bytes (u32 length), stamps. `CODE` is the wire
# opcode and must never be reused for a different layout.


class Op:
    """Base of every operation record."""

    CODE: ClassVar[int] = 0
    PATH_FIELDS: ClassVar[tuple[str, ...]] = ()
    ROOT_OK: ClassVar[bool] = False

    def __post_init__(self) -> None:
        for name in self.PATH_FIELDS:
            value = getattr(self, name)
            # handle-based setattr ops leave the path empty on purpose
            if value == "" and getattr(self, "handle", 0):
                continue
            check_path(value, root_ok=self.ROOT_OK, where=f"{type(self).__name__}.{name}")


@dataclass(frozen=True)
class Open(Op):
    """Open ``path`` for writing as ``handle``; ``created`` = the primary made the file."""

    CODE: ClassVar[int] = 1
    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("path",)
    handle: int
    path: str
    flags: int
    mode: int
    uid: int
    gid: int
    created: bool
    stamps: tuple[Stamp, ...] = ()


@dataclass(frozen=True)
class Write(Op):
    CODE: ClassVar[int] = 2
    handle: int
    offset: int
    mtime_ns: int
    data: bytes


@dataclass(frozen=True)
class Truncate(Op):
    """Set the size of ``handle``'s file, or of ``path`` when handle is 0."""

    CODE: ClassVar[int] = 3
    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("path",)
    handle: int
    path: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Fsync(Op):
    CODE: ClassVar[int] = 4
    handle: int
    datasync: bool


@dataclass(frozen=True)
class Fallocate(Op):
    CODE: ClassVar[int] = 5
    handle: int
    mode: int
    offset: int
    length: int
    mtime_ns: int


@dataclass(frozen=True)
class Release(Op):
    CODE: ClassVar[int] = 6
    handle: int


@dataclass(frozen=True)
class Mkdir(Op):
    CODE: ClassVar[int] = 10
    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("path",)
    path: str
    mode: int
    uid: int
    gid: int
    stamps: tuple[Stamp, ...] = ()


@dataclass(frozen=True)
class Rmdir(Op):
    CODE: ClassVar[int] = 11
    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("path",)
    path: str
    stamps: tuple[Stamp, ...] = ()


@dataclass(frozen=True)
class Unlink(Op):
    CODE: ClassVar[int] = 12
    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("path",)
    path: str
    stamps: tuple[Stamp, ...] = ()


@dataclass(frozen=True)
class Rename(Op):
    """Rename ``src`` to ``dst``, replacing an existing ``dst`` as rename(2) does."""

    CODE: ClassVar[int] = 13
    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("src", "dst")
    src: str
    dst: str
    stamps: tuple[Stamp, ...] = ()


@dataclass(frozen=True)
class Symlink(Op):
    CODE: ClassVar[int] = 14
    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("path",)
    path: str
    target: str
    uid: int
    gid: int
    stamps: tuple[Stamp, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        # the target is data (it may point anywhere); it is never resolved by us
        if "\0" in self.target or not self.target:
            raise OpPathError(f"Symlink.target: {self.target!r} is empty or contains NUL")


@dataclass(frozen=True)
class Link(Op):
    """A hard link ``dst`` to the existing file ``src``."""

    CODE: ClassVar[int] = 15
    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("src", "dst")
    src: str
    dst: str
    stamps: tuple[Stamp, ...] = ()


@dataclass(frozen=True)
class Mknod(Op):
    """A FIFO or socket node (device nodes are refused on the primary)."""

    CODE: ClassVar[int] = 16
    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("path",)
    path: str
    mode: int
    uid: int
    gid: int
    stamps: tuple[Stamp, ...] = ()


@dataclass(frozen=True)
class Chmod(Op):
    CODE: ClassVar[int] = 20
    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("path",)
    ROOT_OK: ClassVar[bool] = True
    handle: int
    path: str
    mode: int


@dataclass(frozen=True)
class Chown(Op):
    """``uid``/``gid`` -1 leave that id unchanged."""

    CODE: ClassVar[int] = 21
    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("path",)
    ROOT_OK: ClassVar[bool] = True
    handle: int
    path: str
    uid: int
    gid: int


@dataclass(frozen=True)
class Utimens(Op):
    """Concrete times as the primary ended up with them (no UTIME_NOW/OMIT on the wire)."""

    CODE: ClassVar[int] = 22
    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("path",)
    ROOT_OK: ClassVar[bool] = True
    handle: int
    path: str
    atime_ns: int
    mtime_ns: int


OPS: tuple[type[Op], ...] = (
    Open,
    Write,
    Truncate,
    Fsync,
    Fallocate,
    Release,
    Mkdir,
    Rmdir,
    Unlink,
    Rename,
    Symlink,
    Link,
    Mknod,
    Chmod,
    Chown,
    Utimens,
)
DATA_OPS = (Open, Write, Truncate, Fsync, Fallocate, Release)


# -- codec -----------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    cls: type[Op]
    fixed: struct.Struct  # header + every int/bool field, in declaration order
    fixed_names: tuple[str, ...]
    var: tuple[tuple[str, str], ...]  # (name, kind) for str/bytes/stamps fields


def _layout(cls: type[Op]) -> _Layout:
    fmt = ">BB"
    fixed: list[str] = []
    var: list[tuple[str, str]] = []
    for f in fields(cls):  # type: ignore[arg-type]
        kind = str(f.type)
        if kind == "int":
            fmt += "q"
            fixed.append(f.name)
        elif kind == "bool":
            fmt += "?"
            fixed.append(f.name)
        elif kind == "str":
            var.append((f.name, "str"))
        elif kind == "bytes":
            var.append((f.name, "bytes"))
        elif kind.startswith("tuple[Stamp"):
            var.append((f.name, "stamps"))
        else:  # pragma: no cover - a programming error caught at import
            raise TypeError(f"{cls.__name__}.{f.name}: no codec for {kind}")
    return _Layout(cls, struct.Struct(fmt), tuple(fixed), tuple(var))


_BY_CLASS: dict[type[Op], _Layout] = {cls: _layout(cls) for cls in OPS}
_BY_CODE: dict[int, _Layout] = {cls.CODE: _BY_CLASS[cls] for cls in OPS}
assert len(_BY_CODE) == len(OPS), "duplicate opcode"


def _put_str(out: list[bytes], value: str) -> None:
    raw = os.fsencode(value)
    out.append(_U16.pack(len(raw)))
    out.append(raw)


def encode(op: Op, prefix: bytes = b"") -> bytes:
    """The wire form of ``op``: version, opcode, fixed integers, then variable fields.

    ``prefix`` goes in front in the same join (the frame's dir index): a
    large write's data is copied once here, not twice.
    """
    layout = _BY_CLASS[type(op)]
    fixed = layout.fixed.pack(CODEC_VERSION, op.CODE, *(getattr(op, n) for n in layout.fixed_names))
    out = [prefix, fixed] if prefix else [fixed]
    for name, kind in layout.var:
        value: Any = getattr(op, name)
        if kind == "str":
            _put_str(out, value)
        elif kind == "bytes":
            out.append(_U32.pack(len(value)))
            out.append(value)
        else:
            out.append(_U16.pack(len(value)))
            for stamp in value:
                _put_str(out, stamp.path)
                out.append(_STAMP_TIME.pack(stamp.mtime_ns))
    return b"".join(out)


class _Reader:
    def __init__(self, data: bytes | memoryview, pos: int, what: str):
        self.data = memoryview(data)
        self.pos = pos
        self.what = what

    def take(self, n: int) -> memoryview:
        end = self.pos + n
        if end > len(self.data):
            raise OpFormatError(
                f"{self.what}: record truncated at byte {self.pos} "
                f"(needs {n} more bytes, has {len(self.data) - self.pos})"
            )
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def u16(self) -> int:
        return _U16.unpack(self.take(2))[0]

    def text(self) -> str:
        n = self.u16()
        if n > MAX_PATH_BYTES:
            raise OpFormatError(f"{self.what}: string of {n} bytes exceeds {MAX_PATH_BYTES}")
        return os.fsdecode(bytes(self.take(n)))


def decode(data: bytes | memoryview) -> Op:
    """Parse one record; raise OpFormatError/OpPathError on anything malformed."""
    if len(data) < _HEADER.size:
        raise OpFormatError(f"operation record of {len(data)} bytes is shorter than its header")
    version, code = _HEADER.unpack_from(data)
    if version != CODEC_VERSION:
        raise OpFormatError(
            f"operation record version {version}; this node speaks version {CODEC_VERSION}"
        )
    layout = _BY_CODE.get(code)
    if layout is None:
        raise OpFormatError(f"unknown operation code {code} in record")
    what = layout.cls.__name__
    if len(data) < layout.fixed.size:
        raise OpFormatError(f"{what}: record truncated ({len(data)} of {layout.fixed.size} bytes)")
    values: dict[str, Any] = dict(
        zip(layout.fixed_names, layout.fixed.unpack_from(data)[2:], strict=True)
    )
    reader = _Reader(data, layout.fixed.size, what)
    for name, kind in layout.var:
        if kind == "str":
            values[name] = reader.text()
        elif kind == "bytes":
            n = _U32.unpack(reader.take(4))[0]
            if n > MAX_DATA_BYTES:
                raise OpFormatError(f"{what}: data of {n} bytes exceeds {MAX_DATA_BYTES}")
            values[name] = bytes(reader.take(n))
        else:
            count = reader.u16()
            stamps = []
            for _ in range(count):
                path = reader.text()
                (mtime,) = _STAMP_TIME.unpack(reader.take(8))
                stamps.append(Stamp(path, mtime))
            values[name] = tuple(stamps)
    if reader.pos != len(reader.data):
        raise OpFormatError(f"{what}: {len(reader.data) - reader.pos} trailing bytes after record")
    try:
        return layout.cls(**values)
    except (TypeError, ValueError) as exc:  # pragma: no cover - layout mismatch
        raise OpFormatError(f"{what}: {exc}") from None


# -- regions ----------------------------------------------------------------


@dataclass(frozen=True, order=True)
class Region:
    """A 64 KiB region of a path (index >= 0), or the META/ENTRY marker of it.

    Data regions imply META: resyncing any region also brings the entry's size,
    mode, owner and times along.
    """

    path: str
    index: int


class PathOf(Protocol):
    def __call__(self, handle: int) -> str | None: ...


def _span(path: str, offset: int, length: int) -> list[Region]:
    if length <= 0:
        return [Region(path, META)]
    first, last = offset // REGION_SIZE, (offset + length - 1) // REGION_SIZE
    return [Region(path, i) for i in range(first, last + 1)]


def _stamped(op: Op) -> list[Region]:
    return [Region(s.path, META) for s in getattr(op, "stamps", ())]


def regions(op: Op, path_of: PathOf) -> list[Region]:
    """The regions ``op`` dirties; ``path_of(handle)`` gives a handle's current path.

    A handle whose file was unlinked (path None) dirties nothing: there is no
    name left to resync.
    """
    if isinstance(op, Open):
        dirty = [Region(op.path, ENTRY)] if op.created or op.flags & os.O_TRUNC else []
        return dirty + _stamped(op)
    if isinstance(op, Write | Fallocate):
        path = path_of(op.handle)
        if path is None:
            return []
        if isinstance(op, Write):
            return _span(path, op.offset, len(op.data))
        return [*_span(path, op.offset, op.length), Region(path, META)]
    if isinstance(op, Truncate):
        path = path_of(op.handle) if op.handle else op.path
        if path is None:
            return []
        return [Region(path, op.size // REGION_SIZE), Region(path, META)]
    if isinstance(op, Fsync | Release):
        return []
    if isinstance(op, Rename | Link):
        return [Region(op.src, ENTRY), Region(op.dst, ENTRY), *_stamped(op)]
    if isinstance(op, Mkdir | Rmdir | Unlink | Symlink | Mknod):
        return [Region(op.path, ENTRY), *_stamped(op)]
    if isinstance(op, Chmod | Chown | Utimens):
        path = path_of(op.handle) if op.handle else op.path
        return [] if path is None else [Region(path, META)]
    raise TypeError(f"regions: unknown operation {type(op).__name__}")


class HandlePaths:
    """Follows Open/Rename/Unlink/Rmdir/Release to know each open handle's current path.

    The dirty tracker feeds it every operation in order and uses it as
    ``path_of`` for ``regions``. Not thread-safe: one feeder.
    """

    def __init__(self) -> None:
        self._paths: dict[int, str | None] = {}

    def __call__(self, handle: int) -> str | None:
        return self._paths.get(handle)

    def follow(self, op: Op) -> None:
        if isinstance(op, Open):
            self._paths[op.handle] = op.path
        elif isinstance(op, Release):
            self._paths.pop(op.handle, None)
        elif isinstance(op, Rename):
            self._moved(op.dst, None)
            self._moved(op.src, op.dst)
        elif isinstance(op, Unlink | Rmdir):
            self._moved(op.path, None)

    def _moved(self, old: str, new: str | None) -> None:
        prefix = old + "/"
        for handle, path in self._paths.items():
            if path == old:
                self._paths[handle] = new
            elif path is not None and path.startswith(prefix):
                self._paths[handle] = None if new is None else new + path[len(old) :]


def describe(op: Op) -> str:
    """A short human description for logs and error messages (no file data)."""
    parts = []
    for f in fields(op):  # type: ignore[arg-type]
        value = getattr(op, f.name)
        if isinstance(value, bytes | bytearray | memoryview):
            parts.append(f"{f.name}=<{len(value)} bytes>")
        elif f.name == "stamps":
            continue
        elif f.name in ("mode", "flags"):
            parts.append(f"{f.name}={value:#o}")
        else:
            parts.append(f"{f.name}={value!r}")
    return f"{type(op).__name__}({', '.join(parts)})"


# -- the interface between the FUSE layer and the transport ------------------


class Replicator(Protocol):
    """Takes operations in the order the primary applied them.

    ``submit`` must be cheap and non-blocking enough to call under the FUSE
    layer's ordering locks (enqueue, frame, hand to the connection); it returns
    a ticket. ``wait(ticket)`` blocks, outside any lock, until the module's
    replication mode is satisfied for that operation (sync: written on the
    secondary; semi: received; async: queued). Either may raise
    ReplicationUnavailable; the FUSE layer then still reports success for the
    local operation and the transport tracks the dirty regions (ALONE).
    """

    def submit(self, op: Op) -> object: ...

    def wait(self, ticket: object) -> None: ...
