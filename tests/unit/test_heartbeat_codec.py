"""Heartbeat packet codec: round trip and every way a datagram is refused."""

from __future__ import annotations

import hashlib
import hmac
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node_service.cluster import heartbeat as hb
from node_service.cluster.pki import heartbeat_key

SECRET = bytes(range(32))
KEY = heartbeat_key(SECRET, "web")


def _packet(**changes) -> hb.Heartbeat:
    fields = dict(
        node="lab-n1",
        module="web",
        incarnation=1_700_000_000_000_000_000,
        seq=42,
        source="198.51.100.11",
        sent_ns=123_456_789,
        payload={"state": "PRIM", "generation": [7, 3], "uptodate": True},
        echo=hb.Echo(seq=41, sent_ns=120_000_000, hold_ns=1_500_000),
    )
    fields.update(changes)
    return hb.Heartbeat(**fields)


def test_round_trip_keeps_every_field():
    packet = _packet()
    data = hb.encode(packet, KEY)
    assert len(data) < 200
    assert hb.decode(data, KEY) == packet
    assert hb.decode(data, KEY).state == "PRIM"
    assert hb.read_module(data) == "web"


def test_round_trip_without_echo():
    packet = _packet(echo=None, payload={})
    assert hb.decode(hb.encode(packet, KEY), KEY) == packet


def test_key_may_be_chosen_by_module():
    data = hb.encode(_packet(), KEY)
    assert hb.decode(data, {"web": KEY}.get).seq == 42
    with pytest.raises(hb.MalformedHeartbeat, match="not run on this node"):
        hb.decode(data, {"db": KEY}.get)


def test_bad_tag_when_any_byte_changes():
    data = bytearray(hb.encode(_packet(), KEY))
    data[20] ^= 0x01  # inside seq
    with pytest.raises(hb.BadTag, match="bad authentication tag"):
        hb.decode(bytes(data), KEY)


def test_other_site_secret_is_bad_tag():
    other = heartbeat_key(b"\xff" * 32, "web")
    with pytest.raises(hb.BadTag, match=r"another site secret\?"):
        hb.decode(hb.encode(_packet(), other), KEY)


def test_other_module_key_is_bad_tag():
    with pytest.raises(hb.BadTag):
        hb.decode(hb.encode(_packet(), heartbeat_key(SECRET, "db")), KEY)


@pytest.mark.parametrize("cut", [0, 3, 30, 60, 70, -33, -1])
def test_truncated_is_malformed_or_bad_tag(cut):
    data = hb.encode(_packet(), KEY)
    with pytest.raises(hb.HeartbeatError) as err:
        hb.decode(data[:cut], KEY)
    assert err.value.kind in {"malformed", "bad_tag"}
    assert "\n" not in str(err.value)


def test_oversize_datagram_is_refused_before_parsing():
    with pytest.raises(hb.OversizeHeartbeat, match="oversize heartbeat"):
        hb.decode(b"RH" + b"\x01" * 1300, KEY)


def test_oversize_payload_is_refused_at_encode():
    with pytest.raises(hb.OversizeHeartbeat, match="limit 1200"):
        hb.encode(_packet(payload={"blob": "x" * 1200}), KEY)


def test_wrong_version_is_named():
    data = bytearray(hb.encode(_packet(), KEY))
    data[2] = 2
    with pytest.raises(hb.WrongVersion, match="version 2, this node speaks 1"):
        hb.decode(bytes(data), KEY)


def test_not_a_heartbeat():
    with pytest.raises(hb.MalformedHeartbeat, match="not a Rampart heartbeat"):
        hb.decode(b"GET / HTTP/1.0\r\n" * 10, KEY)


def test_payload_must_be_json_object_even_when_authentic():
    # A well-authenticated packet whose payload is a JSON list.
    body = hb.encode(_packet(payload={}), KEY)[: -hb.TAG_SIZE]
    body = body[:-4] + struct.pack("!H", 2) + b"[]"
    data = body + hmac.digest(KEY, body, hashlib.sha256)
    with pytest.raises(hb.MalformedHeartbeat, match="not a JSON object"):
        hb.decode(data, KEY)


def test_unserialisable_payload_is_a_clear_error():
    with pytest.raises(hb.MalformedHeartbeat, match="not JSON"):
        hb.encode(_packet(payload={"x": object()}), KEY)


@given(st.binary(max_size=1400))
def test_random_bytes_never_escape_as_other_exceptions(data):
    with pytest.raises(hb.HeartbeatError):
        hb.decode(data, KEY)


@given(
    seq=st.integers(1, 2**64 - 1),
    incarnation=st.integers(0, 2**64 - 1),
    state=st.sampled_from(["STOP", "WAIT", "ALONE", "PRIM", "SECOND", "UP"]),
    node=st.text(min_size=1, max_size=40),
)
def test_round_trip_property(seq, incarnation, state, node):
    packet = _packet(seq=seq, incarnation=incarnation, node=node, payload={"state": state})
    assert hb.decode(hb.encode(packet, KEY), KEY) == packet
