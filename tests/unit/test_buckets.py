"""Farm bucket map: weighted rendezvous hashing properties."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node_service.errors import UserError
from node_service.farm.buckets import (
    BUCKETS,
    Move,
    bucket_map,
    describe_moves,
    module_seed,
    moves,
    owned_by,
    plan,
    shares,
)

names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=8)
weights = st.integers(min_value=0, max_value=10)
farms = st.dictionaries(names, weights, min_size=1, max_size=6)
seeds = st.one_of(st.integers(min_value=0, max_value=2**32 - 1), st.text(max_size=12))


@st.composite
def farm_and_alive(draw):
    nodes = draw(farms)
    alive = draw(st.sets(st.sampled_from(sorted(nodes))))
    return nodes, alive


@settings(max_examples=60, deadline=None)
@given(farm_and_alive(), seeds)
def test_same_membership_gives_same_map(farm, seed):
    nodes, alive = farm
    reordered = dict(reversed(list(nodes.items())))
    first = bucket_map(nodes, alive, seed)
    assert first == bucket_map(reordered, sorted(alive, reverse=True), seed)
    assert len(first) == BUCKETS


@settings(max_examples=60, deadline=None)
@given(farm_and_alive(), seeds)
def test_every_bucket_has_one_eligible_owner(farm, seed):
    nodes, alive = farm
    owners = bucket_map(nodes, alive, seed)
    eligible = {n for n in alive if nodes[n] > 0}
    if eligible:
        assert set(owners) <= eligible
        assert sum(shares(owners).values()) == BUCKETS
    else:
        assert owners == (None,) * BUCKETS


@settings(max_examples=60, deadline=None)
@given(farm_and_alive(), seeds, st.data())
def test_removing_a_node_moves_only_its_buckets(farm, seed, data):
    nodes, alive = farm
    if not alive:
        return
    gone = data.draw(st.sampled_from(sorted(alive)))
    before = bucket_map(nodes, alive, seed)
    after = bucket_map(nodes, alive - {gone}, seed)
    for change in moves(before, after):
        assert change.old == gone
    assert owned_by(after, gone) == frozenset()


@settings(max_examples=60, deadline=None)
@given(farm_and_alive(), seeds, st.data())
def test_adding_a_node_only_takes_buckets_for_itself(farm, seed, data):
    nodes, alive = farm
    dead = sorted(set(nodes) - alive)
    if not dead:
        return
    back = data.draw(st.sampled_from(dead))
    before = bucket_map(nodes, alive, seed)
    after = bucket_map(nodes, alive | {back}, seed)
    for change in moves(before, after):
        assert change.new == back


def test_weights_are_honoured_over_many_seeds():
    nodes = {"n1": 1, "n2": 2, "n3": 3, "n4": 0}
    total = {"n1": 0, "n2": 0, "n3": 0}
    runs = 150
    for seed in range(runs):
        for name, count in shares(bucket_map(nodes, set(nodes), seed)).items():
            total[name] += count
    samples = runs * BUCKETS
    for name, weight in (("n1", 1), ("n2", 2), ("n3", 3)):
        assert total[name] / samples == pytest.approx(weight / 6, abs=0.02)


def test_equal_weights_split_roughly_evenly_for_one_module_seed():
    owners = bucket_map({"a": 1, "b": 1, "c": 1}, {"a", "b", "c"}, module_seed("web"))
    assert all(60 <= count <= 110 for count in shares(owners).values())
    assert set(shares(owners)) == {"a", "b", "c"}


def test_seed_changes_the_map_and_module_seed_is_stable_32_bit():
    nodes = {"a": 1, "b": 1}
    assert bucket_map(nodes, nodes, 1) != bucket_map(nodes, nodes, 2)
    assert module_seed("web") == module_seed("web")
    assert module_seed("web") != module_seed("db")
    assert 0 <= module_seed("web") < 2**32


def test_moves_and_their_description():
    old = ("a",) * 128 + ("b",) * 128
    new = ("a",) * 127 + ("c",) + ("b",) * 127 + (None,)
    changes = moves(old, new)
    assert changes == (Move(127, "a", "c"), Move(255, "b", None))
    assert describe_moves(changes) == "2 buckets move: a -> c (1), b -> nobody (1)"
    assert describe_moves(()) == "bucket map unchanged"


def test_plan_reason_names_the_split_and_the_moves():
    nodes = {"n1": 1, "n2": 1, "n3": 1}
    first = plan(None, nodes, {"n1", "n2", "n3"}, 7)
    assert first.reason.startswith("buckets over n1, n2, n3 (n1=")
    assert "256 buckets move: nobody -> " in first.reason
    second = plan(first.owners, nodes, {"n1", "n2"}, 7)
    lost = len(owned_by(first.owners, "n3"))
    assert len(second.moves) == lost
    assert f"{lost} buckets move:" in second.reason
    assert "n3 -> n1" in second.reason and "n3 -> n2" in second.reason


def test_no_eligible_node_gives_an_unowned_map_with_a_reason():
    result = plan(None, {"n1": 0, "n2": 1}, {"n1"}, 3)
    assert result.owners == (None,) * BUCKETS
    assert result.moves == ()
    assert result.reason.startswith(
        "no alive node with weight above zero (n1 alive with weight 0): every bucket unowned"
    )


@pytest.mark.parametrize(
    ("nodes", "alive", "message"),
    [
        ({"n1": -1}, set(), "farm node 'n1' has weight -1: expected an integer 0 or more"),
        ({"n1": 1.5}, set(), "farm node 'n1' has weight 1.5: expected an integer 0 or more"),
        ({"n1": 1}, {"zz"}, "alive node 'zz' is not a node of this farm: expected one of n1"),
        ({"": 1}, set(), "farm node name '' is not usable: expected a non-empty string"),
    ],
)
def test_bad_input_is_a_one_line_user_error(nodes, alive, message):
    with pytest.raises(UserError) as caught:
        bucket_map(nodes, alive, 1)
    assert str(caught.value) == message


def test_maps_of_the_wrong_size_are_refused():
    with pytest.raises(UserError, match="expected 256 each"):
        moves(("a",) * 3, ("a",) * BUCKETS)
