"""TCP flows a node keeps serving after their bucket moved away, known from its own sockets.

A TCP farm rule keeps no per-flow state in the steady state (``nft.py``):
the gate at the LAN interface passes the buckets this node owns and drops
the rest. When a bucket moves away (a node comes back, this node goes
WAIT), the connections this node accepted in it must stay here until they
end ("established flows stay put", docs/dev/farm.md). The node's TCP stack
knows them: each is a socket on a VIP and a farm port. So, for TCP, a
held flow is a client address and port, let through by the gate in a named
set (``held_flows``) even though its bucket is no longer owned.

The decisions are pure:

- **before** a load that stops owning buckets (and at start, when sockets
  of an earlier run may be there), the sockets are read and every flow of
  the module's VIPs and ports is held, in the same nft transaction that
  stops accepting the lost buckets' new clients;
- **right after** that load they are read again and added: a connection
  whose SYN was accepted between the first reading and the load is held
  too (its packets in between were dropped silently and are sent again);
- **then** every ``EVERY_S`` a held flow whose socket is gone is let go
  (only removed, never added: any new connection is in an owned bucket);
  nothing held, nothing read.

The held set is a superset (flows still in owned buckets are in it too):
harmless, the gate accepts them anyway, and they leave it when they end.
A bare SYN from a held address and port is never let through by the set: a
client reusing the port starts a new connection, which belongs to the
bucket's owner.

``read_flows`` is the only side effect; the runner calls it off the event loop.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from node_service.errors import RetryableError

EVERY_S = 1.0  # while some flow is held
LISTEN = 10  # TCP_LISTEN: a listener is not a flow
# Every TCP state but LISTEN, including NEW_SYN_RECV (12): a handshake in
# progress is a flow whose ACK must still reach this node.
STATES = ((1 << 13) - 1) & ~(1 << LISTEN)

Flow = tuple[str, int]  # client address, client port


class FlowsReadError(RetryableError):
    """The node's sockets could not be read (sock_diag)."""


@dataclass(frozen=True)
class Flows:
    """Flows let through outside the owned buckets, when to read again, why.

    ``adding``: the next reading adds what it finds (right after a loss);
    otherwise it only lets go of flows that ended.
    """

    held: frozenset[Flow]
    check_at: float | None
    reason: str
    adding: bool = False


def nothing() -> Flows:
    return Flows(frozenset(), None, "no flow held outside the owned buckets")


def losing(flows: Flows, found: frozenset[Flow], now: float) -> Flows:
    """Buckets are about to move away; ``found`` are this node's flows just before."""
    held = flows.held | found
    if not held:
        return Flows(held, now, "buckets moved away; no flow of this node to keep", adding=True)
    return Flows(held, now, f"{len(held)} flow(s) of this node kept through the move", adding=True)


def after_reading(flows: Flows, found: frozenset[Flow], now: float) -> Flows:
    """``found``: this node's flows now; returns what stays held."""
    held = flows.held | found if flows.adding else flows.held & found
    if not held:
        return Flows(frozenset(), None, "no flow of this node left outside its owned buckets")
    ended = len(flows.held - held)
    reason = f"{len(held)} flow(s) of this node still held" + (f" ({ended} ended)" if ended else "")
    return Flows(frozenset(held), now + EVERY_S, reason)


def module_flows(
    sockets: Iterable[tuple[str, int, str, int]], vips: Iterable[str], ports: Iterable[int]
) -> frozenset[Flow]:
    """Client (address, port) of the sockets (local address, port, remote address, port)."""
    addresses = {str(ipaddress.IPv4Address(v)) for v in vips}
    wanted = set(ports)
    return frozenset(
        (remote, rport)
        for local, lport, remote, rport in sockets
        if local in addresses and lport in wanted and rport
    )


def read_sockets(ports: Iterable[int]) -> list[tuple[str, int, str, int]]:
    """This network namespace's TCP sockets on ``ports`` (every state but LISTEN)."""
    from pyroute2 import DiagSocket
    from pyroute2.netlink.exceptions import NetlinkError

    found = []
    try:
        with DiagSocket() as diag:
            diag.bind()
            for port in sorted(set(ports)):
                # Filtered by local port in the kernel: a busy node's other
                # sockets never cross netlink.
                for msg in diag.get_sock_stats(family=socket.AF_INET, states=STATES, sport=port):
                    found.append(
                        (
                            str(msg["idiag_src"]),
                            int(msg["idiag_sport"]),
                            str(msg["idiag_dst"]),
                            int(msg["idiag_dport"]),
                        )
                    )
    except (OSError, NetlinkError) as exc:
        raise FlowsReadError(f"cannot read this node's TCP sockets: {exc}") from None
    return found


def read_flows(vips: Iterable[str], ports: Iterable[int]) -> frozenset[Flow]:
    """Client address and port of this node's connections to the VIPs on ``ports``."""
    ports = tuple(ports)
    return module_flows(read_sockets(ports), vips, ports)
