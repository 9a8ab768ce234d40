"""ProxyCommand relay: reach a lab node's TCP port from the machine's namespace.

    python -m node_service.lab.relay --netns LAB-client HOST PORT

The lab's addresses exist only inside its namespaces and nothing routes to
them, so ssh (or paramiko) in the root namespace runs this as its
ProxyCommand: we connect from inside the client host's network namespace,
then copy stdin to the socket and the socket to stdout until the far side
closes. Only the socket lives in the namespace; the process stays put.

Kept import-light: ssh starts one per connection.
"""

from __future__ import annotations

import argparse
import os
import selectors
import socket
import sys

CONNECT_TIMEOUT_S = 10.0
CHUNK = 65536


def connect(netns_name: str, host: str, port: int) -> socket.socket:
    from node_service.net.netns import enter

    with enter(netns_name):
        # A socket keeps the namespace it was created in after we leave it.
        sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)
    sock.settimeout(None)
    return sock


def pump(sock: socket.socket, in_fd: int = 0, out_fd: int = 1) -> None:
    """Copy both ways; stdin EOF half-closes the socket, socket EOF ends the relay."""
    sel = selectors.DefaultSelector()
    sel.register(in_fd, selectors.EVENT_READ, "in")
    sel.register(sock, selectors.EVENT_READ, "sock")
    try:
        while True:  # ends when the connection ends: socket EOF or error
            for key, _ in sel.select():
                if key.data == "in":
                    data = os.read(in_fd, CHUNK)
                    if not data:
                        sel.unregister(in_fd)
                        sock.shutdown(socket.SHUT_WR)
                        continue
                    sock.sendall(data)
                else:
                    data = sock.recv(CHUNK)
                    if not data:
                        return
                    view = memoryview(data)
                    while view:
                        view = view[os.write(out_fd, view) :]
    finally:
        sel.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m node_service.lab.relay",
        description="Relay stdin/stdout to HOST:PORT, connecting from a lab namespace.",
    )
    parser.add_argument("--netns", required=True, help="lab host to connect from, e.g. lab-client")
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    args = parser.parse_args(argv)
    from node_service.errors import RampartError

    try:
        sock = connect(args.netns, args.host, args.port)
    except (OSError, RampartError) as exc:
        print(
            f"relay: cannot reach {args.host}:{args.port} from {args.netns}: {exc}", file=sys.stderr
        )
        return 1
    try:
        pump(sock)
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
