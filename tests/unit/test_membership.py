"""Membership rules: reachability per network, loss, replays, restarts, RTT."""

from __future__ import annotations

import pytest

from node_service.cluster import membership as mb
from node_service.cluster.heartbeat import Echo, Heartbeat
from node_service.errors import ConfigError

LAN, HB2 = "198.51.100.12", "203.0.113.12"


def _view(now: float = 0.0) -> mb.View:
    spec = mb.ModuleSpec.build("web", "lab-n1", {"lab-n2": [LAN, HB2]}, 0.25, 3.0)
    return mb.new_view(spec, now)


def _hb(seq: int, source: str = LAN, incarnation: int = 7, **changes) -> Heartbeat:
    fields = dict(
        node="lab-n2",
        module="web",
        incarnation=incarnation,
        seq=seq,
        source=source,
        sent_ns=0,
        payload={"state": "SECOND", "generation": 4},
    )
    fields.update(changes)
    return Heartbeat(**fields)


class Peer:
    """Feeds a view like a peer sending on both networks every 0.25 s."""

    def __init__(self, view: mb.View):
        self.view = view
        self.seq = {LAN: 0, HB2: 0}
        self.events: list[mb.Event] = []

    def send(self, now: float, networks=(LAN, HB2), incarnation: int = 7) -> None:
        for net in networks:
            self.seq[net] += 1
            v = mb.receive(self.view, _hb(self.seq[net], net, incarnation), net, now)
            assert v.accepted, v.reason
            self.view = v.view
            self.events += v.events

    def tick(self, now: float) -> list[mb.Event]:
        t = mb.tick(self.view, now)
        self.view = t.view
        self.events += t.events
        return list(t.events)

    def run(self, start: float, stop: float, networks=(LAN, HB2)) -> None:
        now = start
        while now < stop:
            self.send(now, networks)
            self.tick(now)
            now = round(now + 0.25, 6)


def test_both_networks_reachable_and_payload_known():
    p = Peer(_view())
    p.run(0.0, 1.0)
    assert mb.peer_reachable(p.view, "lab-n2", 1.0)
    assert mb.networks(p.view, "lab-n2", 1.0) == {LAN: True, HB2: True}
    assert mb.peer_payload(p.view, "lab-n2") == {"state": "SECOND", "generation": 4}
    assert [e.reason for e in p.events] == [f"peer lab-n2 back (incarnation 7) on {LAN}"]
    status = mb.status(p.view, 1.0)["lab-n2"]
    assert status["state"] == "SECOND" and status["reachable"] is True


def test_one_network_lost_is_a_warning_never_peer_lost():
    p = Peer(_view())
    p.run(0.0, 2.0)
    p.events.clear()
    p.run(2.0, 10.0, networks=(LAN,))
    assert mb.peer_reachable(p.view, "lab-n2", 10.0)
    assert mb.networks(p.view, "lab-n2", 10.0) == {LAN: True, HB2: False}
    assert len(p.events) == 1
    event = p.events[0]
    assert (event.kind, event.severity, event.address) == ("network_lost", "warning", HB2)
    assert event.reason == (
        f"network to lab-n2 at {HB2} lost; still heard on {LAN} (warning, no failover)"
    )


def test_network_back_is_reported():
    p = Peer(_view())
    p.run(0.0, 1.0)
    p.run(1.0, 6.0, networks=(LAN,))
    p.events.clear()
    p.run(6.0, 6.5)
    assert [e.reason for e in p.events] == [f"network to lab-n2 at {HB2} back"]


def test_all_networks_silent_past_timeout_is_peer_lost():
    p = Peer(_view())
    p.run(0.0, 1.0)  # last packets at 0.75
    assert p.tick(3.7) == []  # 2.95 s of silence: not yet
    assert mb.peer_reachable(p.view, "lab-n2", 3.7)
    events = p.tick(3.8)
    assert [(e.kind, e.severity) for e in events] == [("peer_lost", "critical")]
    assert events[0].reason == "peer lab-n2 lost: silent on all networks for 3.0 s"
    assert not mb.peer_reachable(p.view, "lab-n2", 3.8)
    assert mb.networks(p.view, "lab-n2", 3.8) == {LAN: False, HB2: False}
    status = mb.status(p.view, 3.8)["lab-n2"]
    assert status["state"] is None and status["payload"]["state"] == "SECOND"
    assert p.tick(10.0) == []  # said once


def test_peer_never_heard_is_lost_after_timeout_from_start():
    p = Peer(_view(now=100.0))
    assert p.tick(102.0) == []
    events = p.tick(103.5)
    assert [e.kind for e in events] == ["peer_lost"]
    assert "not heard on any network for 3.0 s since start" in events[0].reason


def test_peer_back_after_loss_names_incarnation():
    p = Peer(_view())
    p.run(0.0, 1.0)
    p.tick(5.0)
    p.events.clear()
    p.send(6.0, incarnation=8)
    assert [e.reason for e in p.events] == [
        "peer lab-n2 restarted (incarnation 7 -> 8)",
        f"peer lab-n2 back (incarnation 8) on {LAN}",
    ]


def test_replayed_seq_is_dropped_with_reason():
    view = _view()
    v = mb.receive(view, _hb(5), LAN, 0.0)
    assert v.accepted
    again = mb.receive(v.view, _hb(5), LAN, 0.1)
    assert not again.accepted
    assert again.drop == "replay"
    assert again.reason == f"replayed heartbeat from lab-n2 on {LAN} (seq 5 <= 5 already seen)"
    older = mb.receive(v.view, _hb(3), LAN, 0.1)
    assert older.drop == "replay"
    assert older.view is v.view


def test_seq_is_tracked_per_network():
    v = mb.receive(_view(), _hb(10, LAN), LAN, 0.0).view
    assert mb.receive(v, _hb(1, HB2), HB2, 0.0).accepted


def test_stale_incarnation_is_dropped():
    v = mb.receive(_view(), _hb(1, incarnation=8), LAN, 0.0).view
    old = mb.receive(v, _hb(999, incarnation=7), LAN, 0.1)
    assert not old.accepted
    assert old.drop == "stale_incarnation"
    assert "stale incarnation 7 from lab-n2" in old.reason and "(current 8)" in old.reason


def test_restart_with_new_incarnation_resets_seq_tracking():
    v = mb.receive(_view(), _hb(500, incarnation=7), LAN, 0.0).view
    restarted = mb.receive(v, _hb(1, incarnation=9), LAN, 0.5)
    assert restarted.accepted
    assert [e.kind for e in restarted.events] == ["peer_restarted"]
    assert restarted.view.peer("lab-n2").incarnation == 9
    # The other network's seq tracking restarted too.
    assert mb.receive(restarted.view, _hb(1, HB2, incarnation=9), HB2, 0.6).accepted


def test_unknown_node_is_dropped():
    v = mb.receive(_view(), _hb(1, node="lab-n9"), LAN, 0.0)
    assert v.drop == "unknown_node"
    assert v.reason == "heartbeat from unknown node 'lab-n9' (not a peer in module web)"


def test_unlisted_address_is_dropped():
    v = mb.receive(_view(), _hb(1, "198.51.100.99"), "198.51.100.99", 0.0)
    assert v.drop == "unknown_address"
    assert "not one of its addresses (198.51.100.12, 203.0.113.12)" in v.reason


def test_packet_moved_to_another_network_is_dropped():
    v = mb.receive(_view(), _hb(1, LAN), HB2, 0.0)
    assert v.drop == "wrong_source"
    assert "replayed across networks" in v.reason


def test_own_name_is_dropped():
    v = mb.receive(_view(), _hb(1, node="lab-n1"), LAN, 0.0)
    assert v.drop == "self"


def test_payload_change_is_flagged():
    v1 = mb.receive(_view(), _hb(1), LAN, 0.0)
    assert v1.payload_changed
    v2 = mb.receive(v1.view, _hb(2), LAN, 0.25)
    assert not v2.payload_changed
    v3 = mb.receive(v2.view, _hb(3, payload={"state": "PRIM", "generation": 5}), LAN, 0.5)
    assert v3.payload_changed
    assert mb.peer_payload(v3.view, "lab-n2")["state"] == "PRIM"


def test_rtt_from_echo_uses_only_our_clock():
    view = mb.receive(_view(), _hb(1), LAN, 10.0).view
    # We sent at 10.000 s; the peer held our packet 5 ms; back at 10.025 s.
    echo = Echo(seq=1, sent_ns=10_000_000_000, hold_ns=5_000_000)
    view = mb.receive(view, _hb(2, echo=echo), LAN, 10.025).view
    assert mb.rtts(view, "lab-n2")[LAN] == pytest.approx(0.020)
    assert mb.rtts(view, "lab-n2")[HB2] is None
    # Smoothed: one slower sample moves the estimate by 1/8 of the difference.
    echo = Echo(seq=2, sent_ns=10_250_000_000, hold_ns=0)
    view = mb.receive(view, _hb(3, echo=echo), LAN, 10.350).view
    assert mb.rtts(view, "lab-n2")[LAN] == pytest.approx(0.020 + (0.100 - 0.020) / 8)
    assert mb.status(view, 10.4)["lab-n2"]["rtt_ms"][LAN] == pytest.approx(30.0)


def test_nonsense_echo_is_ignored():
    view = mb.receive(_view(), _hb(1), LAN, 10.0).view
    echo = Echo(seq=1, sent_ns=50_000_000_000, hold_ns=0)  # from the future
    view = mb.receive(view, _hb(2, echo=echo), LAN, 10.1).view
    assert mb.rtts(view, "lab-n2")[LAN] is None


def test_echo_for_returns_what_the_peer_needs():
    view = mb.receive(_view(), _hb(4, sent_ns=777), LAN, 1.0).view
    assert mb.echo_for(view, "lab-n2", LAN, 1.002) == Echo(4, 777, 2_000_000)
    assert mb.echo_for(view, "lab-n2", HB2, 1.002) is None


def test_network_silent_since_start_is_warned_once_peer_is_up():
    p = Peer(_view())
    p.run(0.0, 5.0, networks=(LAN,))
    lost = [e for e in p.events if e.kind == "network_lost"]
    assert len(lost) == 1
    assert lost[0].reason == (
        f"network to lab-n2 at {HB2} silent; still heard on {LAN} (warning, no failover)"
    )


def test_network_silent_after_peer_came_back_is_warned_again():
    p = Peer(_view())
    p.run(0.0, 1.0)
    p.tick(5.0)  # peer lost
    p.events.clear()
    p.run(6.0, 12.0, networks=(LAN,))
    assert [e.kind for e in p.events] == ["peer_back", "network_lost"]
    assert mb.networks(p.view, "lab-n2", 12.0) == {LAN: True, HB2: False}


@pytest.mark.parametrize(
    ("interval", "timeout", "peers", "match"),
    [
        (0.25, 0.2, {"lab-n2": [LAN]}, "must be longer than the interval"),
        (0.0, 3.0, {"lab-n2": [LAN]}, "must be longer than the interval"),
        (0.25, 3.0, {"lab-n2": []}, "node lab-n2 has no heartbeat address"),
        (0.25, 3.0, {"lab-n1": [LAN]}, "listed as its own peer"),
    ],
)
def test_bad_spec_is_a_config_error(interval, timeout, peers, match):
    spec = mb.ModuleSpec.build("web", "lab-n1", peers, interval, timeout)
    with pytest.raises(ConfigError, match=match):
        mb.new_view(spec, 0.0)
