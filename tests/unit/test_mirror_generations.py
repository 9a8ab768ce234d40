"""Data generations: comparison, new/adopt/stale, persistence and the election."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node_service.errors import ModuleError
from node_service.mirror.fsm import (
    HISTORY_DEPTH,
    INITIAL,
    Candidate,
    Freshness,
    Generation,
    GenerationInfo,
    Handover,
    Origin,
    adopt,
    compare,
    elect,
    fork,
    mark_stale,
    new_generation,
)

G3 = Generation(3, "n2", Origin.STARTED)
G4 = Generation(4, "n1", Origin.TAKEOVER)
BASE = GenerationInfo(G4, (G3,))


def test_initial_generation_is_shared_by_every_new_node():
    assert compare(GenerationInfo(), GenerationInfo()) is Freshness.SAME
    assert GenerationInfo().current == INITIAL
    assert str(GenerationInfo()) == "generation 0"


def test_new_generation_numbers_above_both_sides_and_keeps_history():
    peer = GenerationInfo(Generation(9, "n2", Origin.KEPT))
    info = new_generation(mark_stale(BASE), "n1", Origin.KEPT, peer)
    assert info.current == Generation(10, "n1", Origin.KEPT)
    assert info.history == (G4, G3)
    assert not info.stale
    assert str(info) == "generation 10@n1"


def test_history_is_bounded():
    info = GenerationInfo()
    for _ in range(HISTORY_DEPTH + 5):
        info = new_generation(info, "n1", Origin.KEPT)
    assert len(info.history) == HISTORY_DEPTH
    assert info.current.number == HISTORY_DEPTH + 5


def test_compare_tells_same_fresher_and_diverged():
    after = new_generation(BASE, "n1", Origin.KEPT)
    other = new_generation(BASE, "n2", Origin.TAKEOVER)
    assert compare(BASE, BASE) is Freshness.SAME
    assert compare(after, BASE) is Freshness.MINE_FRESHER
    assert compare(BASE, after) is Freshness.PEER_FRESHER
    assert compare(after, other) is Freshness.DIVERGED
    assert compare(mark_stale(BASE), BASE) is Freshness.PEER_FRESHER
    assert compare(mark_stale(BASE), mark_stale(BASE)) is Freshness.SAME


def test_adopt_takes_the_primary_generation_and_clears_stale():
    primary = new_generation(BASE, "n2", Origin.KEPT)
    assert adopt(primary) == primary
    assert compare(adopt(primary), primary) is Freshness.SAME
    assert not adopt(mark_stale(primary)).stale


def test_fork_is_the_first_generation_after_the_shared_one():
    a = new_generation(new_generation(BASE, "n1", Origin.KEPT), "n1", Origin.STARTED)
    b = new_generation(BASE, "n2", Origin.TAKEOVER)
    assert fork(a, b) == Generation(5, "n1", Origin.KEPT)
    assert fork(b, a) == Generation(5, "n2", Origin.TAKEOVER)
    unrelated = GenerationInfo(Generation(7, "x", Origin.STARTED))
    assert fork(a, unrelated) == G3  # oldest known stands in


def test_round_trip_through_dict():
    info = mark_stale(new_generation(BASE, "lab-n1", Origin.FORCED))
    assert GenerationInfo.from_dict(info.to_dict()) == info


@pytest.mark.parametrize(
    "data,message",
    [
        ([], "expected an object"),
        ({"current": {"number": -1, "node": "n1", "origin": "kept"}}, "number must be"),
        ({"current": {"number": 1, "node": 3, "origin": "kept"}}, "node must be"),
        ({"current": {"number": 1, "node": "n1", "origin": "nope"}}, "origin must be one of"),
        ({"current": {"number": 1, "node": "n1", "origin": "kept"}, "stale": "yes"}, "boolean"),
    ],
)
def test_bad_persisted_generations_give_one_line_error(data, message):
    with pytest.raises(ModuleError, match=message) as info:
        GenerationInfo.from_dict(data, "web/generations.json")
    assert str(info.value).startswith("web/generations.json")
    assert "\n" not in str(info.value)


def test_split_brain_rule_kept_beats_takeover_beats_started():
    kept = Candidate("n2", new_generation(BASE, "n2", Origin.KEPT))
    takeover = Candidate("n1", new_generation(BASE, "n1", Origin.TAKEOVER))
    started = Candidate("n1", new_generation(BASE, "n1", Origin.STARTED))
    result = elect(kept, takeover, "n1")
    assert result.winner == "n2" and result.split_brain
    assert "n2 was primary last" in result.reason
    assert elect(started, Candidate("n2", takeover.generations), None).winner == "n2"


def test_election_refuses_a_stale_winner():
    stale = Candidate("n1", mark_stale(new_generation(BASE, "n1", Origin.KEPT)))
    result = elect(stale, Candidate("n2", BASE), "n1")
    assert result.winner is None
    assert "primforce" in result.reason
    assert elect(stale, Candidate("n2", BASE), "n1", require_usable=False).winner == "n1"


def test_handover_priority_decides_between_equal_copies():
    asking = Candidate("n2", BASE, Handover.ASKING)
    assert elect(Candidate("n1", BASE), asking, "n1").winner == "n2"
    giving = Candidate("n1", BASE, Handover.GIVING)
    assert elect(giving, Candidate("n2", BASE), "n1").winner == "n2"


# -- properties ---------------------------------------------------------------

POOL = [
    Generation(n, node, origin)
    for n in range(4)
    for node in ("n1", "n2")
    for origin in (Origin.KEPT, Origin.TAKEOVER)
]

# Real lineages number their generations strictly downwards (each new one is
# numbered above everything its node knew), so the strategy does too.
infos = st.builds(
    lambda lineage, stale: GenerationInfo(lineage[0], tuple(lineage[1:]), stale),
    st.lists(st.sampled_from(POOL), min_size=1, max_size=4, unique_by=lambda g: g.number).map(
        lambda gens: sorted(gens, key=lambda g: -g.number)
    ),
    st.booleans(),
)
candidates = st.builds(Candidate, st.sampled_from(["n1", "n2"]), infos, st.sampled_from(Handover))


@settings(max_examples=300, deadline=None)
@given(infos, infos)
def test_compare_is_antisymmetric(a, b):
    mirror = {
        Freshness.SAME: Freshness.SAME,
        Freshness.DIVERGED: Freshness.DIVERGED,
        Freshness.MINE_FRESHER: Freshness.PEER_FRESHER,
        Freshness.PEER_FRESHER: Freshness.MINE_FRESHER,
    }
    assert compare(b, a) is mirror[compare(a, b)]


@settings(max_examples=300, deadline=None)
@given(candidates, infos, st.sampled_from(Handover), st.sampled_from(["n1", "n2", None]))
def test_election_is_the_same_on_both_nodes(a, other, handover, preferred):
    b = Candidate("n2" if a.name == "n1" else "n1", other, handover)
    for usable in (True, False):
        one = elect(a, b, preferred, require_usable=usable)
        two = elect(b, a, preferred, require_usable=usable)
        assert one == two
        assert one.reason
        assert one.winner in (a.name, b.name, None)
        if usable and one.winner is not None:
            assert not (a if one.winner == a.name else b).generations.stale
