"""Membership: which peers of a module are alive, on which networks. Pure.

Everything here is a plain function over frozen data with the time passed in
(monotonic seconds); the transport owns the clock and the sockets. Each
function returns the new view plus what changed, with a human reason, so the
journal, the console timeline and the tests all read the same sentence.

Rules (docs/dev/heartbeats.md):
- a network to a peer is reachable while a valid packet arrived on it within
  the module's timeout; a peer is reachable while any network is;
- losing one network while another still carries heartbeats is a warning,
  never a failover; silence on every network is "peer lost";
- a packet with an older incarnation than the peer's current one, or a seq
  not above the highest seen on that network for the current incarnation, is
  a replay and is dropped; a higher incarnation means the peer restarted and
  resets seq tracking;
- a packet from a node that is not a peer of the module, or from an address
  not listed for that node, is dropped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from node_service.cluster.heartbeat import Echo, Heartbeat
from node_service.errors import ConfigError

# TCP's smoothing factor: steady enough to graph, quick enough to show a change.
RTT_ALPHA = 0.125

UNKNOWN, UP, DOWN = "unknown", "up", "down"


@dataclass(frozen=True)
class PeerSpec:
    name: str
    addresses: tuple[str, ...]


@dataclass(frozen=True)
class ModuleSpec:
    module: str
    node: str
    peers: tuple[PeerSpec, ...]
    interval: float = 0.25
    timeout: float = 3.0

    @classmethod
    def build(
        cls,
        module: str,
        node: str,
        peers: Mapping[str, Sequence[str]],
        interval: float = 0.25,
        timeout: float = 3.0,
    ) -> ModuleSpec:
        specs = tuple(PeerSpec(name, tuple(addrs)) for name, addrs in peers.items())
        return cls(module, node, specs, float(interval), float(timeout))


@dataclass(frozen=True)
class Link:
    """This node's view of one peer on one network (one peer address)."""

    address: str
    status: str = UNKNOWN
    last_heard: float | None = None
    highest_seq: int = 0
    peer_sent_ns: int = 0
    rtt: float | None = None


@dataclass(frozen=True)
class PeerView:
    name: str
    links: tuple[Link, ...]
    status: str = UNKNOWN
    incarnation: int | None = None
    payload: Mapping[str, Any] | None = None
    up_since: float | None = None

    def link(self, address: str) -> Link | None:
        return next((lk for lk in self.links if lk.address == address), None)


@dataclass(frozen=True)
class View:
    spec: ModuleSpec
    started: float
    peers: tuple[PeerView, ...]

    def peer(self, name: str) -> PeerView | None:
        return next((p for p in self.peers if p.name == name), None)


@dataclass(frozen=True)
class Event:
    """A change worth a journal line: kind, who, where, how bad, and why."""

    kind: str  # peer_back, peer_lost, peer_restarted, network_lost, network_back
    module: str
    peer: str
    address: str | None
    severity: str  # info, warning, critical
    reason: str


@dataclass(frozen=True)
class Verdict:
    view: View
    accepted: bool
    reason: str
    events: tuple[Event, ...] = ()
    payload_changed: bool = False
    drop: str = ""  # why it was dropped, as a short counter name ("replay"...)


@dataclass(frozen=True)
class Tick:
    view: View
    events: tuple[Event, ...] = field(default_factory=tuple)


def new_view(spec: ModuleSpec, now: float) -> View:
    """An empty view of ``spec``'s peers, nobody heard yet."""
    if spec.interval <= 0 or spec.timeout <= spec.interval:
        raise ConfigError(
            f"module {spec.module}: heartbeat timeout {spec.timeout:g} s must be longer "
            f"than the interval {spec.interval:g} s (> 0)"
        )
    for peer in spec.peers:
        if not peer.addresses:
            raise ConfigError(f"module {spec.module}: node {peer.name} has no heartbeat address")
        if peer.name == spec.node:
            raise ConfigError(f"module {spec.module}: node {spec.node} listed as its own peer")
    peers = tuple(PeerView(p.name, tuple(Link(a) for a in p.addresses)) for p in spec.peers)
    return View(spec, now, peers)


def receive(view: View, packet: Heartbeat, source: str, now: float) -> Verdict:
    """Account for ``packet`` that arrived from address ``source`` at ``now``."""
    spec = view.spec
    dropped = _drop_reason(view, packet, source)
    if dropped:
        return Verdict(view, False, dropped[1], drop=dropped[0])
    peer = view.peer(packet.node)
    assert peer is not None  # _drop_reason checked it
    events: list[Event] = []
    if peer.incarnation is not None and packet.incarnation < peer.incarnation:
        return Verdict(
            view,
            False,
            f"stale incarnation {packet.incarnation} from {peer.name} on {source} "
            f"(current {peer.incarnation}): an old packet replayed",
            drop="stale_incarnation",
        )
    if peer.incarnation is not None and packet.incarnation > peer.incarnation:
        events.append(
            _event(
                spec,
                "peer_restarted",
                peer.name,
                None,
                "info",
                f"peer {peer.name} restarted (incarnation {peer.incarnation} -> "
                f"{packet.incarnation})",
            )
        )
        # Seqs start again with a new incarnation; liveness times stay true.
        peer = dataclasses.replace(
            peer, links=tuple(dataclasses.replace(lk, highest_seq=0) for lk in peer.links)
        )
    link = peer.link(source)
    assert link is not None
    if packet.seq <= link.highest_seq:
        return Verdict(
            view,
            False,
            f"replayed heartbeat from {peer.name} on {source} "
            f"(seq {packet.seq} <= {link.highest_seq} already seen)",
            drop="replay",
        )
    new_link = dataclasses.replace(
        link,
        status=UP,
        last_heard=now,
        highest_seq=packet.seq,
        peer_sent_ns=packet.sent_ns,
        rtt=_rtt(link.rtt, packet.echo, now, spec.timeout),
    )
    if peer.status != UP:
        events.append(
            _event(
                spec,
                "peer_back",
                peer.name,
                source,
                "info",
                f"peer {peer.name} back (incarnation {packet.incarnation}) on {source}",
            )
        )
    elif link.status == DOWN:
        events.append(
            _event(
                spec,
                "network_back",
                peer.name,
                source,
                "info",
                f"network to {peer.name} at {source} back",
            )
        )
    payload_changed = dict(packet.payload) != dict(peer.payload or {}) or peer.payload is None
    new_peer = dataclasses.replace(
        peer,
        status=UP,
        up_since=now if peer.status != UP else peer.up_since,
        incarnation=packet.incarnation,
        payload=dict(packet.payload),
        links=tuple(new_link if lk.address == source else lk for lk in peer.links),
    )
    return Verdict(
        _with_peer(view, new_peer),
        True,
        f"heartbeat from {peer.name} on {source} seq {packet.seq}",
        tuple(events),
        payload_changed,
    )


def tick(view: View, now: float) -> Tick:
    """Declare networks and peers lost once they have been silent past the timeout."""
    spec = view.spec
    events: list[Event] = []
    peers = []
    for peer in view.peers:
        alive = [lk for lk in peer.links if _fresh(lk, now, spec.timeout)]
        if peer.status == UP and not alive:
            silent = now - max(lk.last_heard or view.started for lk in peer.links)
            events.append(
                _event(
                    spec,
                    "peer_lost",
                    peer.name,
                    None,
                    "critical",
                    f"peer {peer.name} lost: silent on all networks for {silent:.1f} s",
                )
            )
            peer = _all_down(peer)
        elif peer.status == UNKNOWN and now - view.started > spec.timeout:
            events.append(
                _event(
                    spec,
                    "peer_lost",
                    peer.name,
                    None,
                    "critical",
                    f"peer {peer.name} not heard on any network for {spec.timeout:.1f} s "
                    "since start",
                )
            )
            peer = _all_down(peer)
        elif peer.status == UP:
            still = ", ".join(lk.address for lk in alive)
            links = []
            for lk in peer.links:
                stale = lk.status == UP and not _fresh(lk, now, spec.timeout)
                since = max(view.started, peer.up_since or view.started)
                never = lk.status == UNKNOWN and now - since > spec.timeout
                if stale or never:
                    what = "lost" if stale else "silent"
                    events.append(
                        _event(
                            spec,
                            "network_lost",
                            peer.name,
                            lk.address,
                            "warning",
                            f"network to {peer.name} at {lk.address} {what}; still heard "
                            f"on {still} (warning, no failover)",
                        )
                    )
                    lk = dataclasses.replace(lk, status=DOWN)
                links.append(lk)
            peer = dataclasses.replace(peer, links=tuple(links))
        peers.append(peer)
    return Tick(dataclasses.replace(view, peers=tuple(peers)), tuple(events))


def peer_reachable(view: View, peer: str, now: float) -> bool:
    pv = _peer(view, peer)
    return any(_fresh(lk, now, view.spec.timeout) for lk in pv.links)


def networks(view: View, peer: str, now: float) -> dict[str, bool]:
    """Reachability of ``peer`` per network address, e.g. {"198.51.100.12": True}."""
    pv = _peer(view, peer)
    return {lk.address: _fresh(lk, now, view.spec.timeout) for lk in pv.links}


def peer_payload(view: View, peer: str) -> Mapping[str, Any] | None:
    """The payload of the peer's latest accepted heartbeat (None before the first)."""
    return _peer(view, peer).payload


def rtts(view: View, peer: str) -> dict[str, float | None]:
    """Smoothed round-trip time in seconds per network (None until measured)."""
    return {lk.address: lk.rtt for lk in _peer(view, peer).links}


def echo_for(view: View, peer: str, address: str, now: float) -> Echo | None:
    """What our next packet to ``peer`` at ``address`` echoes back, for its RTT."""
    pv = view.peer(peer)
    link = pv.link(address) if pv else None
    if link is None or link.last_heard is None or link.highest_seq == 0:
        return None
    hold = max(0, int((now - link.last_heard) * 1e9))
    return Echo(link.highest_seq, link.peer_sent_ns, hold)


def status(view: View, now: float) -> dict[str, dict[str, Any]]:
    """The JSON-ready per-peer status (the `peers` part of `rampart state --json`)."""
    out: dict[str, dict[str, Any]] = {}
    for pv in view.peers:
        payload = dict(pv.payload) if pv.payload is not None else None
        reachable = peer_reachable(view, pv.name, now)
        out[pv.name] = {
            # A silent peer's last state is history, not its state.
            "state": payload.get("state") if payload and reachable else None,
            "reachable": reachable,
            "networks": networks(view, pv.name, now),
            "rtt_ms": {
                lk.address: round(lk.rtt * 1000, 3) if lk.rtt is not None else None
                for lk in pv.links
            },
            "incarnation": pv.incarnation,
            "payload": payload,
        }
    return out


def _drop_reason(view: View, packet: Heartbeat, source: str) -> tuple[str, str] | None:
    spec = view.spec
    if packet.module != spec.module:
        return "wrong_module", (
            f"heartbeat for module {packet.module} delivered to module {spec.module}"
        )
    if packet.node == spec.node:
        return "self", (
            f"heartbeat from {source} claims to be this node {spec.node} "
            "(looped back, or two nodes share a name)"
        )
    peer = view.peer(packet.node)
    if peer is None:
        return "unknown_node", (
            f"heartbeat from unknown node {packet.node!r} (not a peer in module {spec.module})"
        )
    if peer.link(source) is None:
        listed = ", ".join(lk.address for lk in peer.links)
        return "unknown_address", (
            f"heartbeat from {packet.node} arrived from {source}, "
            f"not one of its addresses ({listed})"
        )
    if packet.source != source:
        return "wrong_source", (
            f"heartbeat from {packet.node} was sent from {packet.source} but arrived "
            f"from {source} (replayed across networks?)"
        )
    return None


def _rtt(previous: float | None, echo: Echo | None, now: float, timeout: float) -> float | None:
    if echo is None or echo.sent_ns == 0:
        return previous
    sample = now - echo.sent_ns / 1e9 - echo.hold_ns / 1e9
    # An echo of a timestamp from before our restart, or a reboot, is nonsense.
    if not 0 <= sample <= timeout:
        return previous
    if previous is None:
        return sample
    return previous + RTT_ALPHA * (sample - previous)


def _fresh(link: Link, now: float, timeout: float) -> bool:
    return link.last_heard is not None and now - link.last_heard <= timeout


def _all_down(peer: PeerView) -> PeerView:
    # Links go back to "unknown": when the peer returns, its other networks
    # coming up with it are not news, and one staying silent is warned anew.
    links = tuple(dataclasses.replace(lk, status=UNKNOWN) for lk in peer.links)
    return dataclasses.replace(peer, status=DOWN, links=links, up_since=None)


def _peer(view: View, name: str) -> PeerView:
    pv = view.peer(name)
    if pv is None:
        raise KeyError(f"node {name} is not a peer in module {view.spec.module}")
    return pv


def _with_peer(view: View, new: PeerView) -> View:
    return dataclasses.replace(
        view, peers=tuple(new if p.name == new.name else p for p in view.peers)
    )


def _event(
    spec: ModuleSpec, kind: str, peer: str, address: str | None, severity: str, reason: str
) -> Event:
    return Event(kind, spec.module, peer, address, severity, reason)
