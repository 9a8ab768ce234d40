"""The farm's pure decisions: states, alive set, refusals, journal sentences."""

from __future__ import annotations

import pytest

from node_service.farm.buckets import plan
from node_service.farm.nft import FilterRule
from node_service.farm.states import (
    STOP,
    UP,
    WAIT,
    CheckerSeen,
    IllegalTransition,
    PeerSeen,
    Snapshot,
    decide,
    farm_use,
    filter_rules,
    membership_change,
    port_clash,
    refuse_command,
    transition,
    weights_problem,
)
from node_service.module.model import FarmRule

WEIGHTS = {"n1": 1, "n2": 1, "n3": 1}
TCP_OK = CheckerSeen("tcp 127.0.0.1:8080", "ok", "connected")


def snap(**kw) -> Snapshot:
    base = dict(node="n1", state=WAIT, started=True, weights=WEIGHTS, checkers=(TCP_OK,))
    return Snapshot(**{**base, **kw})


def peer(name: str, state: str | None = UP, reachable: bool = True) -> PeerSeen:
    return PeerSeen(name, reachable, state, eligible=state == UP)


def test_wait_goes_up_when_checkers_pass_and_counts_serving_peers():
    d = decide(snap(peers=(peer("n2"), peer("n3", WAIT))))
    assert d.state == UP
    assert d.eligible is True
    assert d.alive == {"n1", "n2"}
    assert "tcp 127.0.0.1:8080 ok" in d.reason


def test_a_start_passes_through_wait_first():
    d = decide(snap(state=STOP))
    assert d.state == WAIT
    assert d.alive == frozenset()
    assert d.reason.startswith("starting: ")


def test_failover_verdict_gives_up_the_buckets():
    bad = CheckerSeen("tcp 127.0.0.1:8080", "failover", "refused: failing over (3 failures)")
    d = decide(snap(state=UP, checkers=(bad,), peers=(peer("n2"), peer("n3"))))
    assert d.state == WAIT
    assert d.eligible is False
    assert d.alive == {"n2", "n3"}
    assert "giving up its buckets" in d.reason and "refused" in d.reason


def test_a_tolerated_failure_keeps_up_but_never_brings_a_node_up():
    flaky = CheckerSeen("tcp 127.0.0.1:8080", "failed", "refused (failure 1 of 3)")
    assert decide(snap(state=UP, checkers=(flaky,))).state == UP
    waiting = decide(snap(state=WAIT, checkers=(flaky,)))
    assert waiting.state == WAIT
    assert "not passing yet" in waiting.reason


def test_pending_checker_holds_wait():
    d = decide(snap(checkers=(CheckerSeen("ping 198.51.100.1", "pending"),)))
    assert d.state == WAIT
    assert "first result of checker ping 198.51.100.1" in d.reason


def test_no_checkers_means_up_once_started():
    d = decide(snap(checkers=()))
    assert d.state == UP
    assert "no checker" in d.reason


def test_problem_holds_wait_with_its_reason():
    d = decide(snap(problem="bin/start_both failed with exit status 1"))
    assert (d.state, d.reason) == (WAIT, "bin/start_both failed with exit status 1")
    assert d.alive == frozenset()


def test_every_weight_zero_is_a_clear_problem_and_holds_wait():
    weights = {"n1": 0, "n2": 0}
    problem = weights_problem(weights)
    assert problem is not None and "n1, n2" in problem and "weight of 1 or more" in problem
    d = decide(snap(weights=weights, peers=(peer("n2"),)))
    assert d.state == WAIT and d.reason == problem
    assert weights_problem({"n1": 0, "n2": 3}) is None


def test_weight_zero_node_is_up_as_standby_without_buckets():
    d = decide(snap(weights={"n1": 0, "n2": 1}, peers=(peer("n2"),)))
    assert d.state == UP and "standby" in d.reason
    owners = plan(None, {"n1": 0, "n2": 1}, d.alive, 7).owners
    assert set(owners) == {"n2"}


def test_stopping_leaves_the_map_and_unreachable_peers_do_not_count():
    d = decide(snap(state=UP, started=False, peers=(peer("n2", reachable=False), peer("n3"))))
    assert d.state == STOP
    assert d.alive == {"n3"}


def test_transition_table_refuses_stop_to_up():
    assert transition(WAIT, UP) == UP
    assert transition(UP, UP) == UP
    with pytest.raises(IllegalTransition, match="STOP -> UP"):
        transition(STOP, UP)


def test_membership_change_names_lost_left_and_joined():
    peers = (peer("n2", reachable=False), peer("n3", WAIT), peer("n4"))
    text = membership_change({"n1", "n2", "n3"}, {"n1", "n4"}, peers)
    assert text == "n2 lost, n3 left (WAIT), n4 joined"
    assert membership_change(None, {"n1", "n2"}, ()) == "first map over n1, n2"
    assert membership_change({"n1"}, {"n1"}, ()) == "membership unchanged"


def test_filter_rules_follow_the_model():
    rules = filter_rules((FarmRule((8080, 8443), "tcp", "ip_port"), FarmRule((53,), "udp")))
    assert rules == (FilterRule("tcp", (8080, 8443), "ip_port"), FilterRule("udp", (53,), "ip"))


def test_port_clash_names_the_other_module():
    web = farm_use("web", ["198.51.100.201"], [FilterRule("tcp", (80, 8080))])
    api = farm_use("api", ["198.51.100.201"], [FilterRule("tcp", (8080,), "ip_port")])
    reason = port_clash(api, [web])
    assert reason is not None
    assert "farm module api cannot start" in reason
    assert "farm module web already filters tcp 8080 on VIP 198.51.100.201" in reason
    other_vip = farm_use("dns", ["198.51.100.202"], [FilterRule("tcp", (8080,))])
    udp = farm_use("udp", ["198.51.100.201"], [FilterRule("udp", (8080,))])
    assert port_clash(other_vip, [web]) is None
    assert port_clash(udp, [web]) is None
    assert port_clash(web, [web]) is None  # a module never clashes with itself


def test_mirror_commands_are_refused_with_a_reason():
    reason = refuse_command("web", "swap", UP)
    assert "web is a farm" in reason and "swap is a mirror command" in reason
    assert "unknown command 'frobnicate'" in refuse_command("web", "frobnicate", UP)


def test_crash_of_one_node_moves_only_its_buckets():
    before = plan(None, WEIGHTS, {"n1", "n2", "n3"}, 42)
    d = decide(snap(state=UP, peers=(peer("n2"), peer("n3", reachable=False))))
    after = plan(before.owners, WEIGHTS, d.alive, 42)
    moved = {m.bucket for m in after.moves}
    assert moved == {b for b, o in enumerate(before.owners) if o == "n3"}
    assert all(m.old == "n3" for m in after.moves)


@pytest.mark.parametrize("lab", ["rtab12", "rtzz99", "lab"])
def test_home_map_splits_buckets_exactly_by_weight(lab):
    from node_service.farm.buckets import bucket_map, module_seed, shares

    equal = {f"{lab}-n{i}": 1 for i in (1, 2, 3)}
    counts = sorted(shares(bucket_map(equal, set(equal), module_seed("web"))).values())
    assert counts == [85, 85, 86]
    weighted = {"a": 1, "b": 2, "c": 3}
    assert shares(bucket_map(weighted, set(weighted), 9)) == {"a": 43, "b": 85, "c": 128}
