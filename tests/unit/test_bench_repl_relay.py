"""The delaying relay (netem's stand-in) on loopback: bytes intact, round trip delayed."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from bench.repl_relay import DelayRelay


@pytest.fixture
def echo() -> Iterator[tuple[str, int]]:
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            for _ in range(1000):  # bounded; ends when the client closes
                data = conn.recv(65536)
                if not data:
                    return
                conn.sendall(data)

    thread = threading.Thread(target=serve, name="test-echo", daemon=True)
    thread.start()
    try:
        yield server.getsockname()
    finally:
        server.close()
        thread.join(5)


def round_trip(sock: socket.socket, payload: bytes) -> tuple[bytes, float]:
    began = time.monotonic()
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        assert chunk, "relay closed early"
        got += chunk
    return got, time.monotonic() - began


def test_the_relay_holds_each_direction_for_half_the_round_trip(echo):
    relay = DelayRelay("127.0.0.1", echo).start()
    try:
        with socket.create_connection(relay.server.getsockname(), timeout=10) as sock:
            got, fast = round_trip(sock, b"ping")
            assert got == b"ping" and fast < 0.05
            relay.one_way_s = 0.05  # 100 ms round trip
            payload = bytes(range(256)) * 400
            got, slow = round_trip(sock, payload)
            assert got == payload
            assert 0.1 <= slow < 2.0
    finally:
        relay.close()
    assert relay.server.fileno() == -1
    assert not any(t.is_alive() for t in relay.threads)
