"""Property tests of the mirror state machine.

A small two-node world: each step applies one random event (time passes, a
node crashes or boots, the network splits or heals, the witness comes and
goes, an operator command, an application failure, replication catching up
or falling behind), then settles in rounds: nodes that can hear each other
exchange their latest state (in some worlds each heartbeat may also be lost
or late for the first rounds, so states cross in flight), then both run
decide() on their snapshots, until nothing changes. The invariants of
docs/dev/mirror-state-machine.md are checked after every round.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node_service.mirror.fsm import (
    TRANSITIONS,
    Command,
    Decision,
    Freshness,
    Generation,
    GenerationInfo,
    Handover,
    Intent,
    Liveness,
    Local,
    Origin,
    Peer,
    Snapshot,
    State,
    compare,
    decide,
)

NAMES = ("n1", "n2")
TIMEOUT = 3.0
ROUNDS = 24  # a settle that needs more rounds than this is a livelock
JITTER_ROUNDS = 6  # rounds in which each heartbeat may be lost or late


def check_decision(snap: Snapshot, d: Decision) -> None:
    """Totality: a legal (chain of) transition(s), a reason, refusals change nothing."""
    assert d.reason.strip(), snap
    old = snap.me.state
    for step in d.transitions:
        assert (step.old, step.new) in TRANSITIONS
        assert step.old is old
        assert str(step) == f"{step.old} -> {step.new} ({step.reason})"
        old = step.new
    assert old is d.state
    if d.refused:
        assert snap.command is not None
        assert (d.state, d.actions, d.generations) == (snap.me.state, (), snap.me.generations)
    if d.state.serving:
        assert not d.generations.stale
    assert all(w.strip() for w in d.warnings)


@dataclass
class Node:
    name: str
    alive: bool = True
    state: State = State.STOP
    gens: GenerationInfo = field(default_factory=GenerationInfo)
    intent: Intent = Intent.RUN
    handover: Handover = Handover.NONE
    uptodate: bool = True
    app_failed: bool = False
    witness: bool = True
    view: Peer | None = None  # the peer as last heard; None until first heartbeat
    silent: float = 0.0
    epoch: int = 0  # what this node publishes now (see Local.epoch)
    heard_epoch: int | None = None  # the peer's epoch last heard, echoed back
    blind: bool = False  # began serving while not hearing the peer

    def publish(self) -> Peer:
        return Peer(
            self.name,
            True,
            0.0,
            self.state,
            self.gens,
            self.uptodate,
            self.handover,
            echo=self.heard_epoch,
        )


@dataclass
class World:
    witness: bool  # a witness is configured
    failback: bool
    preferred: str | None
    rng: random.Random | None = None  # set: heartbeats get lost and cross in flight
    connected: bool = True
    nodes: dict[str, Node] = field(default_factory=lambda: {n: Node(n) for n in NAMES})
    epochs: int = 0

    def bump(self) -> int:
        self.epochs += 1
        return self.epochs

    def other(self, name: str) -> Node:
        return self.nodes[NAMES[1] if name == NAMES[0] else NAMES[0]]

    def hear_each_other(self) -> bool:
        return self.connected and all(n.alive for n in self.nodes.values())

    def snapshot(self, node: Node, command: Command | None) -> Snapshot:
        other = self.other(node.name).name
        if node.view is None:
            peer = Peer(other, heard=False, silent_s=node.silent)
        else:
            peer = replace(node.view, silent_s=node.silent)
        return Snapshot(
            module="web",
            me=Local(
                node.name,
                node.state,
                node.gens,
                node.uptodate,
                node.app_failed,
                node.intent,
                node.handover,
                node.epoch,
            ),
            peer=peer,
            witness=node.witness if self.witness else None,
            failback=self.failback,
            preferred=self.preferred,
            command=command,
            timeout_s=TIMEOUT,
        )

    # -- events ---------------------------------------------------------------

    def apply(self, event: tuple) -> dict[str, Command]:
        kind, *args = event
        commands: dict[str, Command] = {}
        if kind == "tick":
            for node in self.nodes.values():
                if node.alive and not self.hear_each_other():
                    node.silent += args[0]
                elif args[0] >= TIMEOUT:
                    self.apply(("resync", node.name))  # given time, a resync finishes
        elif kind == "crash":
            self.nodes[args[0]].alive = False
        elif kind == "boot":
            node = self.nodes[args[0]]
            if not node.alive:
                # Only the persisted generations and intent survive a power cut.
                self.nodes[node.name] = Node(
                    node.name,
                    gens=node.gens,
                    intent=node.intent,
                    uptodate=not node.gens.stale,
                    witness=node.witness,
                    epoch=self.bump(),
                )
        elif kind == "partition":
            self.connected = False
            if args:  # and stay apart for a whole heartbeat timeout
                self.apply(("tick", TIMEOUT))
        elif kind == "heal":
            self.connected = True
        elif kind == "witness":
            self.nodes[args[0]].witness = args[1]
        elif kind == "command":
            if self.nodes[args[0]].alive:
                commands[args[0]] = args[1]
        elif kind == "app_fail":
            node = self.nodes[args[0]]
            node.app_failed = node.state.serving
        elif kind == "resync":
            node, other = self.nodes[args[0]], self.other(args[0])
            if node.state is State.SECOND and self.hear_each_other() and other.state.serving:
                node.uptodate = True
        elif kind == "lag":
            node = self.nodes[args[0]]
            if node.state is State.SECOND:
                node.uptodate = False
        return commands

    def exchange(self, jitter: bool) -> None:
        if not self.hear_each_other():
            return
        sent = {n.name: n.publish() for n in self.nodes.values()}
        for node in self.nodes.values():
            if jitter and self.rng is not None and self.rng.random() < 0.5:
                continue  # this heartbeat is lost or still in flight
            other = self.other(node.name)
            node.view, node.heard_epoch, node.silent = sent[other.name], other.epoch, 0.0

    def round(self, commands: dict[str, Command], jitter: bool = False) -> bool:
        """One settle round; returns True when anything changed."""
        self.exchange(jitter)
        alive = [n for n in self.nodes.values() if n.alive]
        snaps = {n.name: self.snapshot(n, commands.get(n.name)) for n in alive}
        decisions = {name: decide(s) for name, s in snaps.items()}
        changed = False
        for node in alive:
            snap, d = snaps[node.name], decisions[node.name]
            check_decision(snap, d)
            check_stale_never_serves(snap, d)
            before = (node.state, node.gens, node.intent, node.handover)
            self.perform(node, d, snap)
            changed |= before != (node.state, node.gens, node.intent, node.handover)
        return changed

    def perform(self, node: Node, d: Decision, snap: Snapshot) -> None:
        was = node.state
        if d.state.serving and not was.serving:
            # Serving that began without hearing the peer may overlap with the
            # peer's until they hear each other again; any other may not.
            node.blind = snap.liveness is not Liveness.UP
        node.state, node.gens, node.intent, node.handover = (
            d.state,
            d.generations,
            d.intent,
            d.handover,
        )
        if d.state.serving:
            node.uptodate = True
        else:
            node.app_failed = False
        if d.state is State.SECOND and was is not State.SECOND and node.handover is Handover.NONE:
            node.uptodate = False  # a joining SECOND needs a resync before it counts
        if d.changes_publication(snap.me):
            node.epoch = self.bump()


def check_stale_never_serves(snap: Snapshot, d: Decision) -> None:
    """Invariant 2: a node that knows its copy is stale never starts serving without primforce."""
    if snap.me.state.serving or not d.state.serving or snap.command is Command.PRIMFORCE:
        return
    assert not snap.me.generations.stale, (snap, d.reason)
    if snap.peer.heard:
        freshness = compare(snap.me.generations, snap.peer.generations)
        assert freshness is not Freshness.PEER_FRESHER, (snap, d.reason)


def check_world(world: World) -> None:
    nodes = list(world.nodes.values())
    serving = [n for n in nodes if n.alive and n.state.serving]
    if len(serving) == 2:
        # Invariant 1: never two primaries while they can hear each other.
        # Heartbeats may be lost or cross in flight, so "hear each other"
        # means: each has heard the other's current state. Two nodes serving
        # at once is only possible when one began serving without hearing its
        # peer (a partition or crash), and only until they hear each other.
        a, b = serving
        where = [(n.name, n.state, n.blind) for n in nodes]
        assert a.blind or b.blind, where
        assert not (a.heard_epoch == b.epoch and b.heard_epoch == a.epoch), where
    # Invariant 4: with a witness, a node serving without its peer reaches the
    # witness, unless the operator forced it (primforce).
    for node in serving:
        if world.witness and node.silent >= TIMEOUT:
            forced = node.gens.current.origin is Origin.FORCED
            assert node.witness or forced, (node.name, node.state)


def settle(world: World, commands: dict[str, Command]) -> None:
    """Rounds until two full exchanges in a row change nothing (echoes need two)."""
    quiet = 0
    for i in range(ROUNDS):
        jitter = world.rng is not None and i < JITTER_ROUNDS
        changed = world.round(commands, jitter)
        commands = {}
        check_world(world)
        quiet = 0 if changed or jitter else quiet + 1
        if quiet == 2:
            return
    raise AssertionError(f"no settled state after {ROUNDS} rounds: {world}")


name = st.sampled_from(NAMES)
# Time passes either a little or a whole heartbeat timeout at once, so that
# short scripts still reach peer-lost decisions.
tick = st.tuples(st.just("tick"), st.sampled_from([1.0, TIMEOUT]))
node_events = st.tuples(
    st.sampled_from(["crash", "boot", "app_fail", "resync", "resync", "lag"]), name
)
events = st.one_of(
    tick,
    tick,
    node_events,
    node_events,
    st.sampled_from([("partition",), ("partition", "long"), ("heal",)]),
    st.tuples(st.just("witness"), name, st.booleans()),
    st.tuples(st.just("witness"), name, st.booleans()),
    st.tuples(st.just("command"), name, st.sampled_from(Command)),
)
worlds = st.builds(
    World,
    witness=st.booleans(),
    failback=st.booleans(),
    preferred=st.sampled_from(["n1", None]),
    rng=st.one_of(st.none(), st.randoms(use_true_random=False)),
)


@settings(max_examples=1000, deadline=None)
@given(worlds, st.lists(events, min_size=5, max_size=60))
def test_two_node_simulation_keeps_the_invariants(world, script):
    settle(world, {})
    assert {n.state for n in world.nodes.values()} <= {State.PRIM, State.SECOND}
    for event in script:
        settle(world, world.apply(event))


def test_full_isolation_with_witness_leaves_exactly_one_side_serving():
    world = World(witness=True, failback=False, preferred="n1")
    settle(world, {})
    settle(world, world.apply(("resync", "n2")))
    assert (world.nodes["n1"].state, world.nodes["n2"].state) == (State.PRIM, State.SECOND)
    world.apply(("partition",))
    world.apply(("witness", "n1", False))
    for _ in range(3):
        settle(world, world.apply(("tick", 1.0)))
    assert (world.nodes["n1"].state, world.nodes["n2"].state) == (State.WAIT, State.ALONE)
    settle(world, world.apply(("heal",)))
    assert (world.nodes["n1"].state, world.nodes["n2"].state) == (State.SECOND, State.PRIM)
    assert world.nodes["n1"].gens.stale  # n1 resyncs the writes n2 took alone


def test_split_then_heal_keeps_the_primary_side():
    world = World(witness=False, failback=False, preferred="n2")
    settle(world, {})
    settle(world, world.apply(("resync", "n1")))
    assert world.nodes["n2"].state is State.PRIM
    world.apply(("partition",))
    for _ in range(3):
        settle(world, world.apply(("tick", 1.0)))
    assert {n.state for n in world.nodes.values()} == {State.ALONE}
    settle(world, world.apply(("heal",)))
    assert (world.nodes["n1"].state, world.nodes["n2"].state) == (State.SECOND, State.PRIM)


@pytest.mark.parametrize("failback", [True, False])
def test_preferred_node_gets_prim_back_only_with_failback(failback):
    world = World(witness=False, failback=failback, preferred="n1")
    settle(world, {})
    settle(world, world.apply(("resync", "n2")))
    settle(world, world.apply(("crash", "n1")))
    settle(world, world.apply(("tick", TIMEOUT)))
    assert world.nodes["n2"].state is State.ALONE
    settle(world, world.apply(("boot", "n1")))
    assert (world.nodes["n1"].state, world.nodes["n2"].state) == (State.SECOND, State.PRIM)
    settle(world, world.apply(("resync", "n1")))
    expected = (State.PRIM, State.SECOND) if failback else (State.SECOND, State.PRIM)
    assert (world.nodes["n1"].state, world.nodes["n2"].state) == expected


# -- totality over arbitrary snapshots ---------------------------------------

POOL = [Generation(n, node, o) for n in range(3) for node in NAMES for o in Origin]
gen_infos = st.builds(
    lambda lineage, stale: GenerationInfo(lineage[0], tuple(lineage[1:]), stale),
    st.lists(st.sampled_from(POOL), min_size=1, max_size=3, unique_by=lambda g: g.number).map(
        lambda gens: sorted(gens, key=lambda g: -g.number)
    ),
    st.booleans(),
)


def reachable(snap: Snapshot) -> bool:
    """Drop snapshots no run can produce: a serving node's copy is never stale."""
    return not (snap.me.state.serving and snap.me.generations.stale)


snapshots = st.builds(
    Snapshot,
    module=st.just("web"),
    me=st.builds(
        Local,
        name=st.just("n1"),
        state=st.sampled_from(State),
        generations=gen_infos,
        uptodate=st.booleans(),
        app_failed=st.booleans(),
        intent=st.sampled_from(Intent),
        handover=st.sampled_from(Handover),
    ),
    peer=st.builds(
        Peer,
        name=st.just("n2"),
        heard=st.booleans(),
        silent_s=st.sampled_from([0.0, 1.5, 3.0, 10.0]),
        state=st.sampled_from(State),
        generations=gen_infos,
        uptodate=st.booleans(),
        handover=st.sampled_from(Handover),
    ),
    witness=st.sampled_from([None, True, False]),
    failback=st.booleans(),
    preferred=st.sampled_from(["n1", "n2", None]),
    command=st.one_of(st.none(), st.sampled_from(Command)),
    timeout_s=st.just(TIMEOUT),
).filter(reachable)


@settings(max_examples=600, deadline=None)
@given(snapshots)
def test_decide_is_total(snap):
    d = decide(snap)
    check_decision(snap, d)
    check_stale_never_serves(snap, d)
