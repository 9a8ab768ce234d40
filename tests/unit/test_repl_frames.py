"""The replication frame codec: round trips, strict refusal of malformed input, limits."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node_service.replication import frames
from node_service.replication.frames import (
    HEADER_SIZE,
    MAX_PAYLOAD,
    Frame,
    FrameReader,
    FrameType,
    ProtocolError,
)


def header(magic=b"RP", version=1, ftype=3, seq=1, length=0) -> bytes:
    return struct.pack(">2sBBQI", magic, version, ftype, seq, length)


def test_every_frame_type_round_trips_through_a_stream():
    sent = [
        frames.hello("web", "n1", generation=7),
        frames.welcome("web", "n2", stale=True),
        Frame(FrameType.OP, 1, frames.op_payload(0, b"op-bytes")),
        Frame(FrameType.ACK_RECEIVED, 1),
        Frame(FrameType.ACK_WRITTEN, 2**64 - 1),
        frames.error(9, 28, "No space left on device"),
        Frame(FrameType.PING, 0),
        Frame(FrameType.RESYNC_BEGIN, 3),
        Frame(FrameType.RESYNC_END, 4),
    ]
    stream = b"".join(frames.encode(f) for f in sent)
    reader = FrameReader()
    got = []
    # one byte at a time: frames split anywhere must still come out whole
    for i in range(len(stream)):
        got.extend(reader.feed(stream[i : i + 1]))
    assert got == sent
    assert reader.buffered == 0


def test_control_payloads_parse_back_to_their_values():
    assert frames.parse_hello(frames.hello("web", "n1", 3)) == frames.Hello("web", "n1", 3)
    assert frames.parse_welcome(frames.welcome("web", "n2")) == frames.Welcome("web", "n2", False)
    err = frames.parse_error(frames.error(5, 5, "x" * 5000))
    assert err.errno == 5 and len(err.message) == 1000


def test_hello_names_the_primary_mode_and_an_older_hello_without_it_means_sync():
    hello = frames.parse_hello(frames.hello("web", "n1", 3, mode="semi"))
    assert hello == frames.Hello("web", "n1", 3, "semi")
    older = Frame(FrameType.HELLO, 0, b'{"generation":3,"module":"web","node":"n1"}')
    assert frames.parse_hello(older).mode == "sync"
    with pytest.raises(ProtocolError, match="names mode 'fast', expected sync, semi or async"):
        frames.parse_hello(frames.hello("web", "n1", 3, mode="fast"))
    wrong = b'{"generation":3,"mode":1,"module":"web","node":"n1"}'
    with pytest.raises(ProtocolError, match="field 'mode' must be str"):
        frames.parse_hello(Frame(FrameType.HELLO, 0, wrong))


def test_op_payload_carries_the_dir_index():
    frame = Frame(FrameType.OP, 12, frames.op_payload(2, b"abc"))
    index, data = frames.split_op(frame, dir_count=3)
    assert (index, bytes(data)) == (2, b"abc")
    with pytest.raises(ProtocolError, match="dir #2; the module has 2"):
        frames.split_op(frame, dir_count=2)
    with pytest.raises(ProtocolError, match="out of range"):
        frames.op_payload(70000, b"")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (header(magic=b"XX"), "bad frame magic"),
        (header(version=2), "protocol version 2 from peer"),
        (header(ftype=99), "unknown frame type 99"),
        (header(ftype=0), "unknown frame type 0"),
        (header(length=MAX_PAYLOAD + 1), "exceeds"),
        (header(ftype=FrameType.ACK_WRITTEN, length=1), "ACK_WRITTEN frame payload of 1 bytes"),
        (header(ftype=FrameType.HELLO, length=4097), "HELLO frame payload of 4097 bytes"),
    ],
)
def test_malformed_headers_are_refused_with_a_reason(raw, message):
    with pytest.raises(ProtocolError, match=message):
        list(FrameReader().feed(raw))


def test_oversize_is_refused_before_the_payload_arrives():
    reader = FrameReader()
    with pytest.raises(ProtocolError, match="exceeds"):
        list(reader.feed(header(length=2**32 - 1)))


def test_encode_refuses_what_decode_would_refuse():
    with pytest.raises(ProtocolError, match="exceeds"):
        frames.encode(Frame(FrameType.PING, 0, b"x"))
    with pytest.raises(ProtocolError, match="out of range"):
        frames.encode(Frame(FrameType.ACK_WRITTEN, -1))
    with pytest.raises(ProtocolError, match="header is 3 bytes"):
        frames.decode_header(b"RP\x01")


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\xff", "not a JSON object"),
        (b"[1]", "not a JSON object"),
        (b'{"module": "m"}', "expected generation, module, node"),
        (b'{"module": "m", "node": "n", "generation": true}', "'generation' must be int"),
        (b'{"module": 1, "node": "n", "generation": 1}', "'module' must be str"),
        (b'{"module": "m", "node": "n", "generation": 1, "x": 1}', "has fields"),
    ],
)
def test_malformed_hello_is_refused(payload, message):
    with pytest.raises(ProtocolError, match=message):
        frames.parse_hello(Frame(FrameType.HELLO, 0, payload))


def test_a_control_parser_refuses_the_wrong_frame_type():
    with pytest.raises(ProtocolError, match="expected a WELCOME frame, got HELLO"):
        frames.parse_welcome(frames.hello("m", "n"))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_yield_frames_or_a_protocol_error(data):
    reader = FrameReader()
    try:
        got = list(reader.feed(data))
    except ProtocolError:
        return
    # what came out re-encodes to exactly what went in
    consumed = b"".join(frames.encode(f) for f in got)
    assert data.startswith(consumed)
    assert len(data) - len(consumed) < HEADER_SIZE + MAX_PAYLOAD


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=40_000), min_size=1, max_size=60))
def test_a_large_payload_is_filled_in_place_whatever_the_read_sizes(cuts):
    big = Frame(FrameType.OP, 5, bytes(range(256)) * (frames.BIG_PAYLOAD // 256 + 300))
    small = Frame(FrameType.ACK_WRITTEN, 6)
    stream = frames.encode(big) + frames.encode(small) + frames.encode(big)
    reader = FrameReader()
    got: list[Frame] = []
    pos = 0
    for cut in cuts * (len(stream) // sum(cuts) + 1):  # TLS records of any size
        got.extend(reader.feed(stream[pos : pos + cut]))
        pos += cut
        if pos >= len(stream):
            break
    assert got == [big, small, big]
    assert reader.buffered == 0


def test_a_large_payload_half_read_counts_as_buffered():
    reader = FrameReader()
    raw = frames.encode(Frame(FrameType.OP, 1, b"x" * frames.BIG_PAYLOAD))
    assert list(reader.feed(raw[:1000])) == []
    assert reader.buffered == 1000 - HEADER_SIZE
    (frame,) = reader.feed(raw[1000:])
    assert frame.payload == b"x" * frames.BIG_PAYLOAD and reader.buffered == 0
