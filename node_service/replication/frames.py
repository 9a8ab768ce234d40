"""The replication wire format: versioned binary frames (pure code, no I/O).

Every frame is a 16-byte header followed by its payload::

    magic "RP" (2) | version (1) | type (1) | sequence number (8) | payload length (4)

all big-endian. The sequence number orders operations on one connection: the
primary numbers each OP frame 1, 2, 3...; ACK frames carry the highest
sequence number received or written so far (acks are cumulative, so a lost
or coalesced ack never leaves a waiter behind). Control frames (HELLO,
WELCOME, ERROR) carry a small JSON object; OP frames carry the index of the
replicated directory (2 bytes, in the module's order) and the operation
bytes produced by ``ops.encode``. RESYNC_BEGIN/RESYNC_END bracket a
reintegration pass; DIRTY_REQUEST, SCAN and RESYNC_END are requests whose
sequence number is a request id, answered by DIRTY or MANIFEST chunks and a
final REPLY_END carrying the same id.

Decoding is strict: a wrong magic, an unknown version or type, a payload
larger than the limit, or a malformed control object raises ``ProtocolError``
naming what was wrong, and the connection is dropped. Nothing here trusts the
peer beyond the TLS handshake: limits are checked before any allocation.
"""

from __future__ import annotations

import enum
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from node_service.errors import RetryableError

MAGIC = b"RP"
VERSION = 1
HEADER = struct.Struct(">2sBBQI")
HEADER_SIZE = HEADER.size  # 16
# An OP carries at most one FUSE write (max_write is 1 MiB) plus its path and
# header; 8 MiB leaves room for resync writes without letting a hostile peer
# make us allocate gigabytes.
MAX_PAYLOAD = 8 * 1024 * 1024
MAX_CONTROL = 4096
MAX_SEQ = 2**64 - 1
MODES = ("sync", "semi", "async")  # link.Mode's values; frames stays free of imports


class ProtocolError(RetryableError):
    """The peer sent something that is not a valid replication frame."""


class FrameType(enum.IntEnum):
    HELLO = 1  # primary -> secondary: who I am, which module
    WELCOME = 2  # secondary -> primary: accepted, and what it already wrote
    OP = 3  # one operation (ops.encode bytes)
    ACK_RECEIVED = 4  # every OP up to seq is in the secondary's hands
    ACK_WRITTEN = 5  # every OP up to seq is applied (fsync ops: fsynced)
    ERROR = 6  # the secondary could not apply seq; it is stale now
    PING = 7  # keepalive; answered with the current ACK_WRITTEN
    RESYNC_BEGIN = 8  # the following OPs are a reintegration pass
    RESYNC_END = 9  # the reintegration pass is complete: settle, clear stale
    DIRTY_REQUEST = 10  # primary -> secondary: send me your dirty regions (seq = request)
    DIRTY = 11  # secondary -> primary: a chunk of its dirty regions (JSON)
    SCAN = 12  # primary -> secondary: describe these paths (JSON), in op order
    MANIFEST = 13  # secondary -> primary: a chunk of its tree manifest (JSON)
    REPLY_END = 14  # secondary -> primary: request seq is fully answered


CONTROL_TYPES = frozenset({FrameType.HELLO, FrameType.WELCOME, FrameType.ERROR})
EMPTY_TYPES = frozenset(
    {
        FrameType.ACK_RECEIVED,
        FrameType.ACK_WRITTEN,
        FrameType.PING,
        FrameType.RESYNC_BEGIN,
        FrameType.RESYNC_END,
        FrameType.DIRTY_REQUEST,
        FrameType.REPLY_END,
    }
)


@dataclass(frozen=True)
class Frame:
    type: FrameType
    seq: int
    payload: bytes = b""


def encode(frame: Frame) -> bytes:
    """The bytes of one frame; refuses what ``decode`` would refuse."""
    _check_body(frame.type, len(frame.payload))
    if not 0 <= frame.seq <= MAX_SEQ:
        raise ProtocolError(f"frame sequence number {frame.seq} out of range 0..2^64-1")
    return HEADER.pack(MAGIC, VERSION, frame.type, frame.seq, len(frame.payload)) + frame.payload


def encode_header(ftype: FrameType, seq: int, length: int) -> bytes:
    """The header alone, so large payloads can be sent without copying them."""
    _check_body(ftype, length)
    return HEADER.pack(MAGIC, VERSION, ftype, seq, length)


def decode_header(data: bytes) -> tuple[FrameType, int, int]:
    """(type, seq, payload length) from exactly HEADER_SIZE bytes."""
    if len(data) != HEADER_SIZE:
        raise ProtocolError(f"frame header is {len(data)} bytes, expected {HEADER_SIZE}")
    magic, version, ftype, seq, length = HEADER.unpack(data)
    if magic != MAGIC:
        raise ProtocolError(f"bad frame magic {magic!r}, expected {MAGIC!r}: not a Rampart peer")
    if version != VERSION:
        raise ProtocolError(
            f"replication protocol version {version} from peer, this node speaks {VERSION}; "
            "upgrade both nodes to the same Rampart release"
        )
    try:
        kind = FrameType(ftype)
    except ValueError:
        raise ProtocolError(f"unknown frame type {ftype} (seq {seq})") from None
    _check_body(kind, length)
    return kind, seq, length


def _check_body(ftype: FrameType, length: int) -> None:
    limit = MAX_CONTROL if ftype in CONTROL_TYPES else MAX_PAYLOAD
    if ftype in EMPTY_TYPES:
        limit = 0
    if length > limit:
        raise ProtocolError(f"{ftype.name} frame payload of {length} bytes exceeds {limit}")


# Payloads at least this large are filled in place (FrameReader)
BIG_PAYLOAD = 64 * 1024


class FrameReader:
    """Cuts a byte stream into frames; feed it whatever the socket returned.

    A large payload (a write's piece) is filled in place as its bytes
    arrive and handed out as that ``bytearray``: one copy of each byte here,
    instead of gathering it in the stream buffer and copying it out twice.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._head: tuple[FrameType, int, int] | None = None
        self._big: bytearray | None = None  # the large payload being filled
        self._filled = 0

    def feed(self, data: bytes) -> Iterator[Frame]:
        view = memoryview(data)
        while len(view):
            if self._big is None:
                self._buf += view
                yield from self._cut()
                return
            n = min(len(self._big) - self._filled, len(view))
            self._big[self._filled : self._filled + n] = view[:n]
            self._filled += n
            view = view[n:]
            if self._filled == len(self._big):
                assert self._head is not None
                ftype, seq, _length = self._head
                payload, self._big, self._head = self._big, None, None
                yield Frame(ftype, seq, payload)  # type: ignore[arg-type]

    def _cut(self) -> Iterator[Frame]:
        while True:
            if self._head is None:
                if len(self._buf) < HEADER_SIZE:
                    return
                self._head = decode_header(bytes(self._buf[:HEADER_SIZE]))
                del self._buf[:HEADER_SIZE]
            ftype, seq, length = self._head
            if len(self._buf) < length:
                if length >= BIG_PAYLOAD:
                    # every byte in the buffer is this payload's: fill in place from now on
                    self._big = bytearray(length)
                    self._filled = len(self._buf)
                    self._big[: self._filled] = self._buf
                    self._buf.clear()
                return
            with memoryview(self._buf) as view:
                payload = bytes(view[:length])
            del self._buf[:length]
            self._head = None
            yield Frame(ftype, seq, payload)

    @property
    def buffered(self) -> int:
        return len(self._buf) + (self._filled if self._big is not None else 0)


# ---- control payloads -----------------------------------------------------


@dataclass(frozen=True)
class Hello:
    """Sent by the primary: the module, the sending node, and the pass kind."""

    module: str
    node: str
    generation: int = 0
    # The primary's mode: the secondary applies in its receiving thread only
    # for a sync primary (see receiver.py); absent (older primary): sync.
    mode: str = "sync"


@dataclass(frozen=True)
class Welcome:
    """Sent by the secondary once it accepts the connection."""

    module: str
    node: str
    stale: bool = False
    history: bool = True  # False: it crashed, or never synced: only a full sync will do


@dataclass(frozen=True)
class PeerError:
    """The secondary could not apply an operation: it is stale from now on."""

    errno: int
    message: str


def op_payload(dir_index: int, op_bytes: bytes) -> bytes:
    """An OP payload: the replicated dir's index (2 bytes) then ``ops.encode`` bytes."""
    return dir_prefix(dir_index) + op_bytes


def dir_prefix(dir_index: int) -> bytes:
    """The first 2 bytes of an OP payload (``ops.encode(op, prefix=...)`` builds it whole)."""
    if not 0 <= dir_index < 2**16:
        raise ProtocolError(f"replicated dir index {dir_index} out of range 0..65535")
    return dir_index.to_bytes(2, "big")


def split_op(frame: Frame, dir_count: int) -> tuple[int, memoryview]:
    """(dir index, op bytes) of an OP frame, refusing a dir the module does not have."""
    if frame.type != FrameType.OP or len(frame.payload) < 2:
        raise ProtocolError(f"{frame.type.name} frame {frame.seq} is not an operation")
    index = int.from_bytes(frame.payload[:2], "big")
    if index >= dir_count:
        raise ProtocolError(
            f"operation {frame.seq} names replicated dir #{index}; the module has {dir_count}"
        )
    return index, memoryview(frame.payload)[2:]


Want = dict[str, list[int] | None] | None


def scan(seq: int, dir_index: int, want: Want, hashes: bool = True) -> Frame:
    """Ask the secondary to describe ``want`` ({path: blocks or None}; None = all).

    ``hashes`` False: names, kinds and attributes only (the namespace pass).
    """
    rows = None if want is None else [[p, b] for p, b in sorted(want.items())]
    body = {"dir": dir_index, "want": rows, "hashes": hashes}
    return Frame(FrameType.SCAN, seq, json.dumps(body, separators=(",", ":")).encode())


def parse_scan(frame: Frame, dir_count: int) -> tuple[int, Want, bool]:
    try:
        body = json.loads(frame.payload.decode("utf-8"))
        index, rows, hashes = body["dir"], body["want"], body["hashes"]
        ok = type(index) is int and 0 <= index < dir_count and isinstance(hashes, bool)
        want = None
        if rows is not None:
            want = {}
            for path, blocks in rows:
                ok = ok and isinstance(path, str)
                ok = ok and (blocks is None or all(type(b) is int for b in blocks))
                want[path] = blocks
    except (UnicodeDecodeError, ValueError, TypeError, KeyError):
        ok = False
    if not ok:
        raise ProtocolError(f"SCAN request {frame.seq} is malformed")
    return index, want, hashes


def hello(module: str, node: str, generation: int = 0, mode: str = "sync") -> Frame:
    body = {"module": module, "node": node, "generation": generation, "mode": mode}
    return Frame(FrameType.HELLO, 0, _json(body))


def welcome(module: str, node: str, stale: bool = False, history: bool = True) -> Frame:
    body = {"module": module, "node": node, "stale": stale, "history": history}
    return Frame(FrameType.WELCOME, 0, _json(body))


def error(seq: int, errno: int, message: str) -> Frame:
    # Truncated so an exotic message can never push the frame past its limit.
    return Frame(FrameType.ERROR, seq, _json({"errno": errno, "message": message[:1000]}))


def parse_hello(frame: Frame) -> Hello:
    fields = {"module": str, "node": str, "generation": int}
    body = _control(frame, FrameType.HELLO, fields, optional={"mode": str})
    mode = body.get("mode", "sync")
    if mode not in MODES:
        raise ProtocolError(f"HELLO frame names mode {mode!r}, expected sync, semi or async")
    return Hello(body["module"], body["node"], body["generation"], mode)


def parse_welcome(frame: Frame) -> Welcome:
    fields = {"module": str, "node": str, "stale": bool, "history": bool}
    body = _control(frame, FrameType.WELCOME, fields)
    return Welcome(body["module"], body["node"], body["stale"], body["history"])


def parse_error(frame: Frame) -> PeerError:
    body = _control(frame, FrameType.ERROR, {"errno": int, "message": str})
    return PeerError(body["errno"], body["message"])


def _json(body: dict[str, object]) -> bytes:
    data = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
    if len(data) > MAX_CONTROL:
        raise ProtocolError(f"control frame of {len(data)} bytes exceeds {MAX_CONTROL}")
    return data


def _control(
    frame: Frame,
    expected: FrameType,
    fields: dict[str, type],
    optional: dict[str, type] | None = None,
) -> dict[str, object]:
    if frame.type != expected:
        raise ProtocolError(f"expected a {expected.name} frame, got {frame.type.name}")
    try:
        body = json.loads(frame.payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError(f"{expected.name} frame payload is not a JSON object") from None
    if not isinstance(body, dict):
        raise ProtocolError(f"{expected.name} frame payload is not a JSON object")
    optional = optional or {}
    if not set(fields) <= set(body) <= set(fields) | set(optional):
        got = ", ".join(sorted(body)) or "nothing"
        want = ", ".join(sorted(fields)) + "".join(f" [{name}]" for name in sorted(optional))
        raise ProtocolError(f"{expected.name} frame has fields {got}, expected {want}")
    for name, kind in {**fields, **optional}.items():
        if name not in body:
            continue
        value = body[name]
        # bool is an int in Python; a generation of `true` is still wrong.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ProtocolError(f"{expected.name} frame field {name!r} must be {kind.__name__}")
    return body


__all__ = [
    "HEADER_SIZE",
    "MAX_PAYLOAD",
    "Frame",
    "FrameReader",
    "FrameType",
    "Hello",
    "PeerError",
    "ProtocolError",
    "Welcome",
    "decode_header",
    "encode",
    "encode_header",
    "error",
    "hello",
    "op_payload",
    "parse_error",
    "parse_hello",
    "parse_scan",
    "parse_welcome",
    "scan",
    "split_op",
    "welcome",
]
