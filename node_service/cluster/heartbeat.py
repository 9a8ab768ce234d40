"""Heartbeat packets: the wire format, pure encode/decode.

One UDP datagram per heartbeat, at most ``MAX_PACKET`` bytes so it never
fragments on any sane network::

    fixed header (52 bytes, big-endian)
      magic "RH" · version u8 · flags u8 (0)
      incarnation u64 · seq u64 · sent_ns u64
      echo_seq u64 · echo_sent_ns u64 · echo_hold_ns u64
    node    u8 length + UTF-8
    module  u8 length + UTF-8
    source  u8 length + UTF-8   (the address the sender sent from)
    payload u16 length + compact JSON object (state, generation...)
    tag     32 bytes HMAC-SHA256 of everything before it

The echo fields carry back the last packet this sender received from the
destination on the same network, so the destination measures round-trip
time with its own clock only: ``rtt = now - echo_sent_ns - echo_hold_ns``.
The source address is authenticated so a packet captured on one network
cannot be replayed on another. Full notes: docs/dev/heartbeats.md.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from node_service.errors import RetryableError

MAGIC = b"RH"
VERSION = 1
MAX_PACKET = 1200
TAG_SIZE = 32
_FIXED = struct.Struct("!2sBBQQQQQQ")
_U64_MAX = 2**64 - 1


class HeartbeatError(RetryableError):
    """A datagram is not a heartbeat this node can accept; it is dropped."""

    kind = "malformed"


class MalformedHeartbeat(HeartbeatError):
    kind = "malformed"


class OversizeHeartbeat(HeartbeatError):
    kind = "oversize"


class WrongVersion(HeartbeatError):
    kind = "version"


class BadTag(HeartbeatError):
    kind = "bad_tag"


@dataclass(frozen=True)
class Echo:
    """What the sender last received from the destination on this network."""

    seq: int
    sent_ns: int
    hold_ns: int


@dataclass(frozen=True)
class Heartbeat:
    node: str
    module: str
    incarnation: int
    seq: int
    source: str
    sent_ns: int
    payload: Mapping[str, Any] = field(default_factory=dict)
    echo: Echo | None = None

    @property
    def state(self) -> str | None:
        value = self.payload.get("state")
        return value if isinstance(value, str) else None


def encode(packet: Heartbeat, key: bytes) -> bytes:
    """The datagram for ``packet``; raises OversizeHeartbeat if it would not fit."""
    for name in ("incarnation", "seq", "sent_ns"):
        value = getattr(packet, name)
        if not 0 <= value <= _U64_MAX:
            raise MalformedHeartbeat(f"heartbeat {name} {value} out of range (0..2^64-1)")
    echo = packet.echo or Echo(0, 0, 0)
    try:
        payload = json.dumps(
            dict(packet.payload), separators=(",", ":"), sort_keys=True, allow_nan=False
        ).encode()
    except (TypeError, ValueError) as exc:
        raise MalformedHeartbeat(
            f"heartbeat payload of module {packet.module} is not JSON: {exc}"
        ) from None
    parts = [
        _FIXED.pack(
            MAGIC,
            VERSION,
            0,
            packet.incarnation,
            packet.seq,
            packet.sent_ns,
            _clamp(echo.seq),
            _clamp(echo.sent_ns),
            _clamp(echo.hold_ns),
        )
    ]
    fields = (("node", packet.node), ("module", packet.module), ("source", packet.source))
    for label, text in fields:
        raw = text.encode("utf-8")
        if not raw or len(raw) > 255:
            raise MalformedHeartbeat(f"heartbeat {label} {text!r} must be 1-255 bytes")
        parts.append(bytes([len(raw)]) + raw)
    parts.append(struct.pack("!H", len(payload)) + payload)
    body = b"".join(parts)
    if len(body) + TAG_SIZE > MAX_PACKET:
        raise OversizeHeartbeat(
            f"heartbeat of module {packet.module} would be {len(body) + TAG_SIZE} bytes, "
            f"limit {MAX_PACKET}; keep the payload small"
        )
    return body + hmac.digest(key, body, hashlib.sha256)


def read_module(data: bytes) -> str:
    """The module a datagram claims to belong to, to pick its key (not yet trusted)."""
    return _parse(data).module


def decode(data: bytes, key: bytes | Callable[[str], bytes | None]) -> Heartbeat:
    """The heartbeat in ``data``, checked against ``key`` (or ``key(module)``).

    Raises a HeartbeatError whose message is the drop reason for the journal.
    """
    header = _parse(data)
    chosen = key(header.module) if callable(key) else key
    if chosen is None:
        raise MalformedHeartbeat(f"heartbeat for module {header.module!r}, not run on this node")
    body, tag = data[:-TAG_SIZE], data[-TAG_SIZE:]
    if not hmac.compare_digest(hmac.digest(chosen, body, hashlib.sha256), tag):
        raise BadTag("bad authentication tag (another site secret?)")
    try:
        payload = json.loads(header.payload_raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise MalformedHeartbeat("heartbeat payload is not valid JSON") from None
    if not isinstance(payload, dict):
        raise MalformedHeartbeat("heartbeat payload is not a JSON object")
    echo = None
    if header.echo_seq:
        echo = Echo(header.echo_seq, header.echo_sent_ns, header.echo_hold_ns)
    return Heartbeat(
        node=header.node,
        module=header.module,
        incarnation=header.incarnation,
        seq=header.seq,
        source=header.source,
        sent_ns=header.sent_ns,
        payload=payload,
        echo=echo,
    )


@dataclass(frozen=True)
class _Header:
    incarnation: int
    seq: int
    sent_ns: int
    echo_seq: int
    echo_sent_ns: int
    echo_hold_ns: int
    node: str
    module: str
    source: str
    payload_raw: bytes


def _parse(data: bytes) -> _Header:
    if len(data) > MAX_PACKET:
        raise OversizeHeartbeat(f"oversize heartbeat ({len(data)} bytes, limit {MAX_PACKET})")
    if len(data) < _FIXED.size + TAG_SIZE or data[:2] != MAGIC:
        raise MalformedHeartbeat(f"not a Rampart heartbeat ({len(data)} bytes)")
    _, version, flags, inc, seq, sent, e_seq, e_sent, e_hold = _FIXED.unpack_from(data)
    if version != VERSION:
        raise WrongVersion(
            f"heartbeat format version {version}, this node speaks {VERSION} "
            "(run the same Rampart version on every node)"
        )
    if flags != 0:
        raise MalformedHeartbeat(f"heartbeat has unknown flags {flags:#x}")
    end = len(data) - TAG_SIZE
    pos = _FIXED.size
    texts = []
    for label in ("node", "module", "source"):
        if pos >= end:
            raise MalformedHeartbeat(f"truncated heartbeat (no {label})")
        size = data[pos]
        pos += 1
        if size == 0 or pos + size > end:
            raise MalformedHeartbeat(f"truncated heartbeat ({label} field)")
        try:
            texts.append(data[pos : pos + size].decode("utf-8"))
        except UnicodeDecodeError:
            raise MalformedHeartbeat(f"heartbeat {label} is not UTF-8") from None
        pos += size
    if pos + 2 > end:
        raise MalformedHeartbeat("truncated heartbeat (no payload length)")
    (size,) = struct.unpack_from("!H", data, pos)
    pos += 2
    if pos + size != end:
        raise MalformedHeartbeat(
            f"truncated heartbeat (payload says {size} bytes, {end - pos} present)"
        )
    return _Header(inc, seq, sent, e_seq, e_sent, e_hold, *texts, data[pos:end])


def _clamp(value: int) -> int:
    return max(0, min(int(value), _U64_MAX))
