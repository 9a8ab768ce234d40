"""The ProxyCommand relay's copy loop, over a socketpair and pipes."""

from __future__ import annotations

import os
import socket
import threading

from node_service.lab.relay import main, pump


def test_pump_copies_both_ways_and_half_closes():
    ours, theirs = socket.socketpair()
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    worker = threading.Thread(target=pump, args=(ours, in_r, out_w), name="relay-pump")
    worker.start()
    try:
        os.write(in_w, b"SSH-2.0-client\r\n")
        os.close(in_w)  # stdin EOF: the far side must see the end of our data
        theirs.settimeout(5)
        received = b""
        while chunk := theirs.recv(1024):
            received += chunk
        assert received == b"SSH-2.0-client\r\n"
        theirs.sendall(b"SSH-2.0-server\r\n")
        theirs.close()  # far side closes: the relay ends
        worker.join(timeout=5)
        assert not worker.is_alive()
        os.close(out_w)
        assert os.read(out_r, 1024) == b"SSH-2.0-server\r\n"
    finally:
        ours.close()
        for fd in (in_r, out_r):
            os.close(fd)


def test_unreachable_namespace_is_one_line(capsys):
    assert main(["--netns", "rt-no-such-ns-here", "198.51.100.11", "22"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("relay: cannot reach 198.51.100.11:22 from rt-no-such-ns-here")
    assert len(err.strip().splitlines()) == 1
