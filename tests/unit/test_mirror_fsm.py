"""Example tests for the mirror state machine: one per behaviour of the contract.

Each test asserts the new state, the actions in order and key words of the
reason. Two-node behaviours are checked from both nodes' snapshots, since
both must reach the same answer from symmetric information.
"""

from __future__ import annotations

import pytest

from node_service.errors import CommandRefused, FatalError
from node_service.mirror.fsm import (
    TRANSITIONS,
    Action,
    Command,
    Generation,
    GenerationInfo,
    Handover,
    IllegalTransition,
    Intent,
    Local,
    Origin,
    Peer,
    Snapshot,
    State,
    Substate,
    decide,
    transition,
)

A = Action
START = (A.REPLICATION_SOURCE, A.ADD_VIP, A.RUN_START_PRIM)
G4 = GenerationInfo(Generation(4, "n1", Origin.KEPT))
G5_N1 = GenerationInfo(Generation(5, "n1", Origin.KEPT), (G4.current,))
G5_N2 = GenerationInfo(Generation(5, "n2", Origin.TAKEOVER), (G4.current,))


def snap(
    state: State,
    peer_state: State = State.SECOND,
    *,
    me: str = "n1",
    peer: str = "n2",
    mine: GenerationInfo = G4,
    theirs: GenerationInfo = G4,
    heard: bool = True,
    silent: float = 0.0,
    uptodate: bool = True,
    peer_uptodate: bool = True,
    app_failed: bool = False,
    intent: Intent = Intent.RUN,
    handover: Handover = Handover.NONE,
    peer_handover: Handover = Handover.NONE,
    witness: bool | None = None,
    failback: bool = False,
    preferred: str | None = "n1",
    command: Command | None = None,
    echo: int | None = 0,
) -> Snapshot:
    return Snapshot(
        module="web",
        me=Local(me, state, mine, uptodate, app_failed, intent, handover),
        peer=Peer(peer, heard, silent, peer_state, theirs, peer_uptodate, peer_handover, echo),
        witness=witness,
        failback=failback,
        preferred=preferred,
        command=command,
        timeout_s=3.0,
    )


def lost(state: State, peer_state: State = State.SECOND, **kw) -> Snapshot:
    return snap(state, peer_state, silent=3.0, **kw)


# -- vocabulary ---------------------------------------------------------------


def test_transition_record_prints_old_new_reason():
    record = transition(State.PRIM, State.ALONE, "peer n2 silent")
    assert str(record) == "PRIM -> ALONE (peer n2 silent)"


@pytest.mark.parametrize("old,new", [(State.STOP, State.PRIM), (State.PRIM, State.PRIM)])
def test_illegal_transition_raises_a_fatal_bug_report(old, new):
    with pytest.raises(IllegalTransition, match=f"{old} -> {new}") as info:
        transition(old, new, "because")
    assert isinstance(info.value, FatalError)


def test_transition_table_only_leaves_stop_through_wait():
    assert {new for old, new in TRANSITIONS if old is State.STOP} == {State.WAIT}
    assert all(old is not new for old, new in TRANSITIONS)
    assert len(TRANSITIONS) == 17


def test_actions_name_their_script_and_substate():
    assert A.RUN_START_PRIM.script == "start_prim"
    assert A.ADD_VIP.script is None
    assert A.RUN_POSTSTOP.substate is Substate.STOPPING
    assert A.MARK_STALE.persists_generations


# -- start, WAIT and the election -------------------------------------------


def test_start_command_goes_wait_with_prestart():
    d = decide(snap(State.STOP, intent=Intent.STOP, command=Command.START))
    assert (d.state, d.actions, d.intent) == (State.WAIT, (A.RUN_PRESTART,), Intent.RUN)
    assert [str(t) for t in d.transitions] == [f"STOP -> WAIT ({d.reason})"]
    assert d.substate is Substate.STARTING


def test_stop_state_honours_persisted_intent():
    assert decide(snap(State.STOP, intent=Intent.RUN)).state is State.WAIT
    d = decide(snap(State.STOP, intent=Intent.STOP))
    assert (d.state, d.actions) == (State.STOP, ())
    assert "stopped" in d.reason


def test_wait_pending_peer_keeps_waiting():
    d = decide(snap(State.WAIT, State.WAIT, heard=False, silent=1.0))
    assert (d.state, d.actions) == (State.WAIT, ())
    assert "waiting for peer n2" in d.reason and "1.0 s of 3.0 s" in d.reason


def test_both_wait_same_data_preferred_node_becomes_prim_on_both_sides():
    d1 = decide(snap(State.WAIT, State.WAIT))
    d2 = decide(snap(State.WAIT, State.WAIT, me="n2", peer="n1"))
    assert (d1.state, d1.actions) == (State.PRIM, START)
    assert d2.state is State.SECOND
    assert d2.actions == (A.REPLICATION_TARGET,)
    assert "n1 is the preferred node" in d1.reason == d2.reason


def test_both_wait_without_preference_tie_breaks_by_name():
    d1 = decide(snap(State.WAIT, State.WAIT, me="lab-n2", peer="lab-n1", preferred=None))
    d2 = decide(snap(State.WAIT, State.WAIT, me="lab-n1", peer="lab-n2", preferred=None))
    assert (d1.state, d2.state) == (State.SECOND, State.PRIM)
    assert "lab-n1 wins the tie-break by name" in d1.reason


def test_fresher_node_wins_over_preferred_node():
    d1 = decide(snap(State.WAIT, State.WAIT, mine=G4, theirs=G5_N2))
    d2 = decide(snap(State.WAIT, State.WAIT, me="n2", peer="n1", mine=G5_N2, theirs=G4))
    assert d1.state is State.SECOND
    assert d1.actions == (A.MARK_STALE, A.REPLICATION_TARGET)
    assert d1.generations.stale
    assert d2.state is State.PRIM
    assert "n2 has fresher data" in d1.reason


def test_wait_peer_silent_goes_alone_in_new_generation():
    d = decide(lost(State.WAIT, State.WAIT, heard=False))
    assert d.state is State.ALONE
    assert d.actions == (A.NEW_GENERATION, *START)
    assert d.generations.current == Generation(5, "n1", Origin.STARTED)
    assert d.generations.history == (G4.current,)
    assert "peer n2 silent for 3.0 s on all networks and no witness configured" in d.reason


def test_wait_peer_silent_stale_data_stays_wait():
    d = decide(lost(State.WAIT, mine=GenerationInfo(G4.current, stale=True), heard=False))
    assert (d.state, d.actions) == (State.WAIT, ())
    assert "stale" in d.reason and "primforce" in d.reason


def test_wait_knowing_peer_is_fresher_stays_wait():
    d = decide(lost(State.WAIT, mine=G4, theirs=G5_N2))
    assert d.state is State.WAIT
    assert "peer n2 has fresher data" in d.reason


def test_wait_peer_silent_without_witness_stays_wait():
    d = decide(lost(State.WAIT, witness=False, heard=False))
    assert d.state is State.WAIT
    assert "witness unreachable: staying WAIT" in d.reason


def test_wait_joins_serving_peer_and_preserves_diverged_data():
    d = decide(snap(State.WAIT, State.PRIM, mine=G5_N1, theirs=G5_N2))
    assert d.state is State.SECOND
    assert d.actions == (A.PRESERVE_SPLIT_BRAIN, A.MARK_STALE, A.REPLICATION_TARGET)


def test_wait_with_stopped_peer_goes_alone_without_witness():
    d = decide(snap(State.WAIT, State.STOP, witness=False))
    assert d.state is State.ALONE
    assert "peer n2 is stopped" in d.reason


# -- peer lost, witness -------------------------------------------------------


def test_prim_peer_lost_witness_reachable_continues_alone():
    d = decide(lost(State.PRIM, witness=True))
    assert (d.state, d.actions) == (State.ALONE, (A.NEW_GENERATION,))
    assert d.generations.current == Generation(5, "n1", Origin.KEPT)
    assert "witness reachable: continuing alone" in d.reason


def test_prim_losing_peer_and_witness_gives_up():
    d = decide(lost(State.PRIM, witness=False))
    assert d.state is State.WAIT
    assert d.actions == (A.RUN_STOP_PRIM, A.REMOVE_VIP, A.REPLICATION_OFF)
    assert "giving up PRIM" in d.reason
    assert d.substate is Substate.STOPPING


def test_alone_losing_witness_gives_up():
    d = decide(lost(State.ALONE, witness=False))
    assert d.state is State.WAIT
    assert "giving up ALONE" in d.reason


def test_second_peer_lost_up_to_date_takes_over():
    d = decide(lost(State.SECOND, State.PRIM, witness=True, me="lab-n2", peer="lab-n1"))
    assert d.state is State.ALONE
    assert d.actions == (A.NEW_GENERATION, *START)
    assert d.reason == (
        "peer lab-n1 silent for 3.0 s on all networks and witness reachable: "
        "taking over in generation 5@lab-n2"
    )
    assert d.generations.current.origin is Origin.TAKEOVER


def test_second_peer_lost_not_up_to_date_goes_wait():
    d = decide(lost(State.SECOND, State.PRIM, uptodate=False))
    assert (d.state, d.actions) == (State.WAIT, (A.REPLICATION_OFF,))
    assert "not up to date" in d.reason


def test_second_peer_lost_witness_unreachable_goes_wait():
    d = decide(lost(State.SECOND, State.PRIM, witness=False))
    assert d.state is State.WAIT
    assert "witness unreachable" in d.reason


# -- peer returns, split brain ----------------------------------------------


def test_alone_peer_returns_becomes_prim_and_peer_resyncs():
    d1 = decide(snap(State.ALONE, State.WAIT, mine=G5_N1, theirs=G4))
    d2 = decide(snap(State.WAIT, State.ALONE, me="n2", peer="n1", mine=G4, theirs=G5_N1))
    assert (d1.state, d1.actions) == (State.PRIM, (A.REPLICATION_SOURCE,))
    assert "n2 resyncs as SECOND" in d1.reason
    assert d2.state is State.SECOND
    assert d2.actions == (A.MARK_STALE, A.REPLICATION_TARGET)


def test_both_alone_the_one_that_was_primary_last_wins():
    d1 = decide(snap(State.ALONE, State.ALONE, mine=G5_N1, theirs=G5_N2, preferred="n2"))
    d2 = decide(snap(State.ALONE, State.ALONE, me="n2", peer="n1", mine=G5_N2, theirs=G5_N1))
    assert (d1.state, d1.actions) == (State.PRIM, (A.REPLICATION_SOURCE,))
    assert d2.state is State.SECOND
    assert d2.actions == (
        A.RUN_STOP_PRIM,
        A.REMOVE_VIP,
        A.PRESERVE_SPLIT_BRAIN,
        A.MARK_STALE,
        A.REPLICATION_TARGET,
    )
    assert "split brain" in d2.reason and "n1 was primary last" in d2.reason


def test_both_alone_equal_origin_tie_breaks_on_preferred_node():
    g1 = GenerationInfo(Generation(5, "n1", Origin.STARTED), (G4.current,))
    g2 = GenerationInfo(Generation(5, "n2", Origin.STARTED), (G4.current,))
    d1 = decide(snap(State.ALONE, State.ALONE, mine=g1, theirs=g2, preferred="n2"))
    d2 = decide(snap(State.ALONE, State.ALONE, me="n2", peer="n1", mine=g2, theirs=g1,
                     preferred="n2"))  # fmt: skip
    assert (d1.state, d2.state) == (State.SECOND, State.PRIM)
    assert "n2 is the preferred node" in d1.reason


# -- SECOND follows its primary -------------------------------------------------


def test_second_behind_is_marked_stale_then_adopts_after_resync():
    behind = decide(snap(State.SECOND, State.PRIM, mine=G4, theirs=G5_N2, uptodate=False))
    assert behind.actions == (A.MARK_STALE,)
    assert "resyncing from n2" in behind.reason
    done = decide(snap(State.SECOND, State.PRIM, mine=behind.generations, theirs=G5_N2))
    assert done.actions == (A.ADOPT_GENERATION,)
    assert done.generations == G5_N2
    assert "resync from n2 complete" in done.reason


# -- commands -----------------------------------------------------------------


def test_swap_hands_over_then_peer_takes_prim_then_giver_follows():
    giver = decide(snap(State.PRIM, State.SECOND, command=Command.SWAP))
    assert giver.state is State.SECOND and giver.handover is Handover.GIVING
    assert giver.actions == (A.RUN_STOP_PRIM, A.REMOVE_VIP, A.REPLICATION_OFF)
    taker = decide(snap(State.SECOND, State.SECOND, me="n2", peer="n1",
                        peer_handover=Handover.GIVING))  # fmt: skip
    assert (taker.state, taker.actions) == (State.PRIM, START)
    assert "n1 is handing PRIM over" in taker.reason
    waiting = decide(snap(State.SECOND, State.SECOND, handover=Handover.GIVING))
    assert (waiting.state, waiting.handover) == (State.SECOND, Handover.GIVING)
    done = decide(snap(State.SECOND, State.PRIM, handover=Handover.GIVING))
    assert done.handover is Handover.NONE
    assert done.actions == (A.REPLICATION_TARGET,)


def test_swap_on_alone_is_refused_with_reason():
    d = decide(lost(State.ALONE, command=Command.SWAP))
    assert d.refused and d.state is State.ALONE and d.actions == ()
    assert d.reason == "swap refused: module web is ALONE, there is no SECOND to hand over to"
    with pytest.raises(CommandRefused, match="no SECOND"):
        d.raise_if_refused()


def test_swap_refused_while_second_resyncs():
    d = decide(snap(State.PRIM, State.SECOND, peer_uptodate=False, command=Command.SWAP))
    assert d.refused
    assert "not up to date" in d.reason


def test_prim_on_second_asks_and_primary_hands_over():
    ask = decide(snap(State.SECOND, State.PRIM, me="n2", peer="n1", command=Command.PRIM))
    assert (ask.state, ask.handover, ask.actions) == (State.SECOND, Handover.ASKING, ())
    give = decide(snap(State.PRIM, State.SECOND, peer_handover=Handover.ASKING))
    assert give.state is State.SECOND and give.handover is Handover.GIVING
    assert "n2 asked for PRIM" in give.reason


def test_second_on_prim_swaps_and_prim_on_prim_is_refused():
    assert decide(snap(State.PRIM, command=Command.SECOND)).handover is Handover.GIVING
    d = decide(snap(State.PRIM, command=Command.PRIM))
    assert d.refused and "already primary" in d.reason


@pytest.mark.parametrize(
    "state,actions",
    [
        (State.PRIM, (A.RUN_STOP_PRIM, A.REMOVE_VIP, A.REPLICATION_OFF, A.RUN_POSTSTOP)),
        (State.ALONE, (A.RUN_STOP_PRIM, A.REMOVE_VIP, A.REPLICATION_OFF, A.RUN_POSTSTOP)),
        (State.SECOND, (A.REPLICATION_OFF, A.RUN_POSTSTOP)),
        (State.WAIT, (A.RUN_POSTSTOP,)),
    ],
)
def test_stop_runs_the_stop_scripts_of_the_state(state, actions):
    d = decide(snap(state, command=Command.STOP))
    assert (d.state, d.actions, d.intent) == (State.STOP, actions, Intent.STOP)
    assert "operator stopped module web on n1" in d.reason


def test_stop_when_stopped_is_refused():
    d = decide(snap(State.STOP, intent=Intent.STOP, command=Command.STOP))
    assert d.refused and "already" in d.reason


def test_restart_keeps_role_and_restarts_application():
    d = decide(snap(State.PRIM, command=Command.RESTART))
    assert (d.state, d.actions, d.transitions) == (
        State.PRIM,
        (A.RUN_STOP_PRIM, A.RUN_START_PRIM),
        (),
    )
    refused = decide(snap(State.SECOND, State.PRIM, command=Command.RESTART))
    assert refused.refused and "runs only on the primary" in refused.reason


def test_stopstart_goes_through_stop_to_wait():
    d = decide(snap(State.PRIM, command=Command.STOPSTART))
    assert d.state is State.WAIT
    assert d.actions == (
        A.RUN_STOP_PRIM,
        A.REMOVE_VIP,
        A.REPLICATION_OFF,
        A.RUN_POSTSTOP,
        A.RUN_PRESTART,
    )
    assert [(t.old, t.new) for t in d.transitions] == [
        (State.PRIM, State.STOP),
        (State.STOP, State.WAIT),
    ]


def test_primforce_on_stale_node_serves_with_warning():
    stale = GenerationInfo(G4.current, stale=True)
    d = decide(lost(State.WAIT, mine=stale, theirs=G5_N2, command=Command.PRIMFORCE))
    assert d.state is State.ALONE and not d.refused
    assert d.actions == (A.NEW_GENERATION, *START)
    assert d.generations.current == Generation(6, "n1", Origin.FORCED)
    assert not d.generations.stale
    assert len(d.warnings) == 1
    assert "marked stale" in d.warnings[0] and "fresher data" in d.warnings[0]


def test_primforce_refused_while_peer_serves():
    d = decide(snap(State.SECOND, State.PRIM, command=Command.PRIMFORCE))
    assert d.refused and "two primaries" in d.reason


# -- application failure and failback ---------------------------------------


def test_application_failure_hands_over_to_up_to_date_second():
    d = decide(snap(State.PRIM, State.SECOND, app_failed=True))
    assert d.state is State.SECOND and d.handover is Handover.GIVING
    assert d.actions == (A.RUN_STOP_PRIM, A.REMOVE_VIP, A.REPLICATION_OFF)
    assert "application failed on n1" in d.reason


def test_application_failure_without_up_to_date_second_stays_and_says_why():
    d = decide(snap(State.PRIM, State.SECOND, app_failed=True, peer_uptodate=False))
    assert (d.state, d.actions) == (State.PRIM, ())
    assert "not up to date" in d.reason and d.warnings


def test_failback_returns_prim_to_preferred_node_when_enabled():
    kw = dict(me="n2", peer="n1", preferred="n1")
    d = decide(snap(State.PRIM, State.SECOND, failback=True, **kw))
    assert d.state is State.SECOND and d.handover is Handover.GIVING
    assert "failback: preferred node n1" in d.reason
    stay = decide(snap(State.PRIM, State.SECOND, failback=False, **kw))
    assert (stay.state, stay.actions) == (State.PRIM, ())
    resyncing = decide(snap(State.PRIM, State.SECOND, failback=True, peer_uptodate=False, **kw))
    assert resyncing.state is State.PRIM


# -- heartbeats crossing in flight ------------------------------------------


def test_election_winner_waits_until_peer_has_heard_its_current_state():
    d = decide(snap(State.WAIT, State.WAIT, echo=None))
    assert (d.state, d.actions) == (State.WAIT, ())
    assert "waiting for n2 to acknowledge n1 as WAIT" in d.reason
    loser = decide(snap(State.WAIT, State.WAIT, me="n2", peer="n1", echo=None))
    assert loser.state is State.SECOND  # stepping aside never waits


def test_stopped_peer_must_acknowledge_before_taking_over():
    d = decide(snap(State.WAIT, State.STOP, echo=7))
    assert d.state is State.WAIT
    assert "peer n2 is stopped: waiting for it to acknowledge n1" in d.reason


def test_forced_alone_keeps_serving_when_witness_is_unreachable():
    forced = GenerationInfo(Generation(6, "n1", Origin.FORCED), (G4.current,))
    d = decide(lost(State.ALONE, mine=forced, witness=False))
    assert (d.state, d.actions) == (State.ALONE, ())
    assert "serving alone" in d.reason
