"""Held TCP flows (flows.py) and guarded buckets (guard.py): the pure decisions."""

from __future__ import annotations

from node_service.farm import flows, guard

A, B, C = ("198.51.100.5", 40000), ("198.51.100.6", 40001), ("198.51.100.7", 40002)


def test_a_loss_holds_every_flow_found_and_the_next_reading_adds_late_ones():
    lost = flows.losing(flows.nothing(), frozenset({A}), now=10.0)
    assert lost.held == {A} and lost.adding and lost.check_at == 10.0
    after = flows.after_reading(lost, frozenset({A, B}), now=10.1)
    assert after.held == {A, B} and not after.adding and after.check_at == 11.1


def test_later_readings_only_let_go_of_ended_flows_never_add():
    held = flows.Flows(frozenset({A, B}), 5.0, "x")
    after = flows.after_reading(held, frozenset({B, C}), now=6.0)
    assert after.held == {B} and "1 ended" in after.reason
    done = flows.after_reading(after, frozenset({C}), now=7.0)
    assert done.held == frozenset() and done.check_at is None
    assert "no flow of this node left" in done.reason


def test_a_second_loss_keeps_what_was_held():
    held = flows.Flows(frozenset({A}), 5.0, "x")
    assert flows.losing(held, frozenset({B}), now=6.0).held == {A, B}


def test_module_flows_keep_only_the_vips_and_ports_and_never_a_listener():
    sockets = [
        ("198.51.100.200", 80, A[0], A[1]),
        ("198.51.100.200", 81, B[0], B[1]),  # another port
        ("198.51.100.9", 80, C[0], C[1]),  # another address
        ("198.51.100.200", 80, "0.0.0.0", 0),  # no peer
    ]
    assert flows.module_flows(sockets, ["198.51.100.200"], [80]) == {A}


def peer(name, alive="d", held=0, reachable=True, state="UP"):
    return guard.PeerHolds(name, reachable, state, alive, held)


def test_gained_buckets_are_guarded_and_buckets_given_up_are_not():
    first = guard.after_load(guard.unguarded(), None, frozenset({1, 2}))
    assert first.guarded == {1, 2}
    later = guard.after_load(first, frozenset({1, 2}), frozenset({2, 3}))
    assert later.guarded == {2, 3}
    assert guard.after_load(guard.unguarded(), frozenset({1}), frozenset({1})).guarded == set()


def test_the_guard_lifts_only_when_every_running_peer_applied_the_map_and_holds_nothing():
    g = guard.Guard(frozenset({1}), "x")
    assert guard.after_peers(g, [peer("n2"), peer("n3", held=2)], "d").guarded == {1}
    assert "n3 may hold flows" in guard.after_peers(g, [peer("n3", held=2)], "d").reason
    assert guard.after_peers(g, [peer("n2", alive="old")], "d").guarded == {1}
    assert guard.after_peers(g, [peer("n2", held=None)], "d").guarded == {1}
    lifted = guard.after_peers(g, [peer("n2"), peer("n3")], "d")
    assert lifted.guarded == frozenset() and "guard lifted" in lifted.reason


def test_lost_and_stopped_peers_hold_nothing_that_can_be_saved():
    g = guard.Guard(frozenset({1}), "x")
    peers = [peer("n2", reachable=False, held=5), peer("n3", state="STOP", held=5, alive=None)]
    assert guard.after_peers(g, peers, "d").guarded == frozenset()


def test_the_alive_digest_is_the_same_for_the_same_membership_on_every_node():
    assert guard.alive_digest(["n2", "n1"]) == guard.alive_digest({"n1", "n2"})
    assert guard.alive_digest(["n1"]) != guard.alive_digest(["n1", "n2"])
    assert guard.alive_digest(None) is None
