"""Tree manifests: what a replicated directory holds, hashed per 64 KiB block.

Both nodes describe their tree (or only some paths, or only some blocks of
them) as a manifest: one ``Entry`` per path with its kind, mode, owner,
size, modification time, symlink target and blake2b digests of its data
blocks. ``diff`` (pure) compares the primary's manifest with the
secondary's and says, per path, what differs; ``rampart repl verify`` lists
those paths, and resync repairs exactly those blocks and attributes.

A block asked for as ``sub_block(i)`` is described finer: its digest is the
concatenation of one digest per 4 KiB sub-block (``SUB_BLOCK``), so a resync
sends again only the sub-blocks that differ (a random 4 KiB write costs 4 KiB,
not the 64 KiB region the dirty log names). A peer that does not know the
marker leaves such blocks out of its answer: they count as differing and go
whole, which costs bytes, never correctness.

Scanning never follows a symlink and never leaves the tree: directories are
opened one component at a time with O_NOFOLLOW relative to the tree's
descriptor. Access times are ignored (reading changes them); directory
modification times are compared too because the primary stamps them on
every namespace operation.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from node_service.errors import RetryableError
from node_service.replication.ops import REGION_SIZE

DIGEST_BYTES = 16
DIGEST_HEX = 2 * DIGEST_BYTES
SUB_BLOCK = 4096
# Wanted block numbers at or above this ask for sub-block digests of block
# (n - SUB_BLOCKS); far above any real block index (2**40 blocks of 64 KiB).
SUB_BLOCKS = 1 << 40
ROW_BYTES = 1024 * 1024  # ~1 MiB of JSON per manifest row
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK

FILE, DIR, SYMLINK, OTHER = "file", "dir", "symlink", "other"


@dataclass(frozen=True)
class Entry:
    path: str  # relative to the tree, "" for the tree itself
    kind: str
    mode: int  # permission bits (and, for OTHER, the file type bits)
    uid: int
    gid: int
    size: int
    mtime_ns: int
    target: str = ""  # symlink only
    blocks: tuple[tuple[int, str], ...] = ()  # (block index, hex digest) hashed


@dataclass(frozen=True)
class Difference:
    """How ``path`` differs; ``blocks`` lists the data blocks to send again.

    ``ranges``: (offset, length) byte ranges to send again, sub-block exact
    where both sides described a block by sub-blocks, else whole blocks.
    """

    path: str
    what: str  # missing | extra | kind | content | meta
    detail: str
    blocks: tuple[int, ...] = ()
    ranges: tuple[tuple[int, int], ...] = ()


# ---- scanning (reads the tree) -------------------------------------------------


def scan(
    root_fd: int,
    want: Mapping[str, Iterable[int] | None] | None = None,
    *,
    hashes: bool = True,
) -> dict[str, Entry]:
    """Describe the tree under ``root_fd``.

    ``want`` None: every path, every block. Otherwise ``{path: blocks}``: those
    paths only, hashing the listed blocks (None: all of them); a directory
    named there brings its whole subtree. ``hashes`` False hashes nothing.
    """
    out: dict[str, Entry] = {}
    everything: set[int] | None = None if hashes else set()
    if want is None:
        _walk(root_fd, "", out, everything)
        return out
    for path, blocks in sorted(want.items()):
        chosen = everything if blocks is None or not hashes else set(blocks)
        entry = _describe(root_fd, path, chosen)
        if entry is None:
            continue
        out[path] = entry
        if entry.kind == DIR and blocks is None:
            _walk(root_fd, path, out, everything)
    return out


def _walk(root_fd: int, top: str, out: dict[str, Entry], blocks: set[int] | None) -> None:
    stack = [top]
    while stack:
        path = stack.pop()
        if path not in out:
            entry = _describe(root_fd, path, blocks)
            if entry is None:
                continue
            out[path] = entry
        if out[path].kind != DIR:
            continue
        fd = _open_dir(root_fd, path)
        if fd is None:
            continue
        try:
            names = sorted(os.listdir(fd))
        finally:
            os.close(fd)
        for name in names:
            child = f"{path}/{name}" if path else name
            entry = _describe(root_fd, child, blocks)
            if entry is not None:
                out[child] = entry
                if entry.kind == DIR:
                    stack.append(child)


def _open_dir(root_fd: int, path: str) -> int | None:
    fd = os.dup(root_fd)
    try:
        for part in path.split("/") if path else ():
            nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
    except (FileNotFoundError, NotADirectoryError, OSError):
        os.close(fd)
        return None
    return fd


def _describe(root_fd: int, path: str, blocks: set[int] | None) -> Entry | None:
    parent_path, _, name = path.rpartition("/")
    parent = _open_dir(root_fd, parent_path) if path else os.dup(root_fd)
    if parent is None:
        return None
    try:
        try:
            st = os.stat(name or ".", dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return None
        base = dict(
            path=path,
            mode=stat.S_IMODE(st.st_mode),
            uid=st.st_uid,
            gid=st.st_gid,
            mtime_ns=st.st_mtime_ns,
        )
        if stat.S_ISDIR(st.st_mode):
            return Entry(kind=DIR, size=0, **base)
        if stat.S_ISLNK(st.st_mode):
            return Entry(kind=SYMLINK, size=0, target=os.readlink(name, dir_fd=parent), **base)
        if not stat.S_ISREG(st.st_mode):
            base["mode"] = st.st_mode
            return Entry(kind=OTHER, size=0, **base)
        fd = os.open(name, _FILE_FLAGS, dir_fd=parent)
        try:
            size = os.fstat(fd).st_size
            return Entry(kind=FILE, size=size, blocks=hash_blocks(fd, size, blocks), **base)
        finally:
            os.close(fd)
    finally:
        os.close(parent)


def sub_block(index: int) -> int:
    """The wanted-block number asking for block ``index`` by 4 KiB sub-blocks."""
    return SUB_BLOCKS + index


def hash_blocks(fd: int, size: int, blocks: set[int] | None) -> tuple[tuple[int, str], ...]:
    count = (size + REGION_SIZE - 1) // REGION_SIZE
    if blocks is None:
        indexes: Iterable[tuple[int, bool]] = ((i, False) for i in range(count))
    else:
        split = {(i - SUB_BLOCKS, True) if i >= SUB_BLOCKS else (i, False) for i in blocks}
        indexes = sorted((i, fine) for i, fine in split if 0 <= i < count)
    out = []
    for i, fine in indexes:
        data = os.pread(fd, REGION_SIZE, i * REGION_SIZE)
        if not fine:
            out.append((i, hashlib.blake2b(data, digest_size=DIGEST_BYTES).hexdigest()))
            continue
        view = memoryview(data)
        digests = (
            hashlib.blake2b(view[at : at + SUB_BLOCK], digest_size=DIGEST_BYTES).hexdigest()
            for at in range(0, len(data), SUB_BLOCK)
        )
        out.append((i, "".join(digests)))
    return tuple(out)


# ---- comparing (pure) ------------------------------------------------------------


def diff(primary: Mapping[str, Entry], secondary: Mapping[str, Entry]) -> tuple[Difference, ...]:
    """Every path whose state on the secondary is not the primary's, in path order."""
    out = []
    for path in sorted(set(primary) | set(secondary)):
        p, s = primary.get(path), secondary.get(path)
        if p is None:
            assert s is not None
            out.append(Difference(path, "extra", f"{s.kind} only on the secondary"))
        elif s is None:
            out.append(
                Difference(
                    path,
                    "missing",
                    f"{p.kind} missing on the secondary",
                    tuple(i for i, _ in p.blocks),
                    changed_ranges(p.blocks, {}, p.size),
                )
            )
        elif p.kind != s.kind:
            out.append(
                Difference(
                    path,
                    "kind",
                    f"{p.kind} on the primary, {s.kind} on the secondary",
                    tuple(i for i, _ in p.blocks),
                    changed_ranges(p.blocks, {}, p.size),
                )
            )
        else:
            d = _compare(p, s)
            if d is not None:
                out.append(d)
    return tuple(out)


def _compare(p: Entry, s: Entry) -> Difference | None:
    if p.kind == SYMLINK and p.target != s.target:
        return Difference(p.path, "kind", f"symlink to {p.target!r}, secondary {s.target!r}")
    if p.kind == OTHER and p.mode != s.mode:
        return Difference(p.path, "kind", f"special file type {p.mode:o} vs {s.mode:o}")
    theirs = dict(s.blocks)
    changed = tuple(i for i, digest in p.blocks if theirs.get(i) != digest)
    if p.size != s.size or changed:
        why = f"size {p.size} vs {s.size}" if p.size != s.size else f"{len(changed)} blocks differ"
        ranges = changed_ranges(p.blocks, theirs, p.size)
        return Difference(p.path, "content", why, changed, ranges)
    notes = []
    if p.mode != s.mode:
        notes.append(f"mode {p.mode:o} vs {s.mode:o}")
    if (p.uid, p.gid) != (s.uid, s.gid):
        notes.append(f"owner {p.uid}:{p.gid} vs {s.uid}:{s.gid}")
    if p.mtime_ns != s.mtime_ns:
        notes.append("modification time")
    if notes:
        return Difference(p.path, "meta", ", ".join(notes))
    return None


def changed_ranges(
    mine: Iterable[tuple[int, str]], theirs: Mapping[int, str], size: int
) -> tuple[tuple[int, int], ...]:
    """Byte ranges of ``mine``'s blocks whose digests differ from ``theirs`` (pure).

    Where both sides gave sub-block digests of a block, only the differing 4 KiB
    sub-blocks count; otherwise the whole block does. Ranges are clipped to
    ``size`` (the primary's file) and adjacent ones joined.
    """
    out: list[list[int]] = []

    def add(start: int, end: int) -> None:
        end = min(end, size)
        if end <= start:
            return
        if out and out[-1][0] + out[-1][1] == start:
            out[-1][1] += end - start
        else:
            out.append([start, end - start])

    for i, digest in sorted(mine):
        other = theirs.get(i)
        if other == digest:
            continue
        base = i * REGION_SIZE
        if other is None or len(digest) <= DIGEST_HEX or len(other) <= DIGEST_HEX:
            add(base, base + REGION_SIZE)
            continue
        for k in range(0, len(digest), DIGEST_HEX):
            if digest[k : k + DIGEST_HEX] != other[k : k + DIGEST_HEX]:
                at = base + (k // DIGEST_HEX) * SUB_BLOCK
                add(at, at + SUB_BLOCK)
    return tuple((start, length) for start, length in out)


def report(differences: Iterable[Difference], dir: str) -> list[str]:
    """One line per differing path, for ``rampart repl verify``."""
    return [f"{dir}/{d.path}".rstrip("/") + f": {d.what}: {d.detail}" for d in differences]


# ---- wire form ---------------------------------------------------------------------


def encode_entries(entries: Iterable[Entry]) -> bytes:
    rows = [
        [
            e.path,
            e.kind,
            e.mode,
            e.uid,
            e.gid,
            e.size,
            e.mtime_ns,
            e.target,
            [list(b) for b in e.blocks],
        ]
        for e in entries
    ]
    return json.dumps(rows, separators=(",", ":")).encode()


def decode_entries(data: bytes) -> list[Entry]:
    try:
        rows = json.loads(data.decode("utf-8"))
        entries = [
            Entry(
                path=_typed(r[0], str),
                kind=_typed(r[1], str),
                mode=_typed(r[2], int),
                uid=_typed(r[3], int),
                gid=_typed(r[4], int),
                size=_typed(r[5], int),
                mtime_ns=_typed(r[6], int),
                target=_typed(r[7], str),
                blocks=tuple((_typed(i, int), _typed(h, str)) for i, h in r[8]),
            )
            for r in rows
        ]
    except (UnicodeDecodeError, ValueError, TypeError, IndexError, KeyError):
        raise RetryableError("manifest from peer is malformed") from None
    if any(e.kind not in (FILE, DIR, SYMLINK, OTHER) for e in entries):
        raise RetryableError("manifest from peer names an unknown kind of entry")
    return entries


def _typed(value: object, kind: type) -> object:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(kind.__name__)
    return value


def chunks(entries: Iterable[Entry], max_bytes: int = 2 * 1024 * 1024) -> Iterable[bytes]:
    """Manifest frames' payloads, each well under the frame limit.

    A large file's blocks are spread over several rows of the same path;
    ``assemble`` puts them back together.
    """
    batch: list[Entry] = []
    size = 0
    for entry in entries:
        for part in _split(entry):
            cost = 120 + len(part.path) + len(part.target) + _blocks_cost(part.blocks)
            if batch and size + cost > max_bytes:
                yield encode_entries(batch)
                batch, size = [], 0
            batch.append(part)
            size += cost
    if batch:
        yield encode_entries(batch)


def _blocks_cost(blocks: tuple[tuple[int, str], ...]) -> int:
    return sum(16 + len(digest) for _, digest in blocks)


def _split(entry: Entry) -> Iterable[Entry]:
    # sub-block digests make a block's row 16x longer: rows are cut by size
    if _blocks_cost(entry.blocks) <= ROW_BYTES:
        yield entry
        return
    start, cost = 0, 0
    for k, (_, digest) in enumerate(entry.blocks):
        if cost and cost + 16 + len(digest) > ROW_BYTES:
            yield replace(entry, blocks=entry.blocks[start:k])
            start, cost = k, 0
        cost += 16 + len(digest)
    yield replace(entry, blocks=entry.blocks[start:])


def assemble(rows: Iterable[Entry]) -> dict[str, Entry]:
    out: dict[str, Entry] = {}
    for row in rows:
        seen = out.get(row.path)
        out[row.path] = row if seen is None else replace(seen, blocks=seen.blocks + row.blocks)
    return out
