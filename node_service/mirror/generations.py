"""Data generations: which node holds the freshest copy of a mirror module's data.

Each node persists a GenerationInfo (see docs/dev/mirror-state-machine.md).
A new generation begins whenever a node starts serving without an
up-to-date peer (it goes ALONE), so a node that missed those writes is
recognisably older afterwards. A SECOND whose resync completed adopts the
primary's generation; one that is behind is marked stale until a resync
completes. Comparing two infos says: same data, one is fresher, or they
diverged (both served alone: split brain).

The election between two nodes lives here too because it must be computed
from symmetric information only: both nodes run it on the same pair of
infos and reach the same answer, which is what keeps them from both
becoming primary.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Any

from node_service.errors import ModuleError
from node_service.mirror.states import Handover

# Enough ancestors to recognise any realistic history of failovers between
# two meetings of the nodes; beyond it two lineages look diverged, which is
# the safe mistake (files are preserved, nothing is discarded).
HISTORY_DEPTH = 16


class Origin(enum.Enum):
    """How the node that began a generation came to serve alone.

    Ranks the two sides of a split brain: the higher rank was primary last.
    FORCED ranks first because primforce is the operator's explicit, most
    recent choice of which data counts.
    """

    STARTED = "started"  # WAIT -> ALONE: began serving after waiting (boot, peer stopped)
    TAKEOVER = "takeover"  # SECOND -> ALONE: an up-to-date SECOND replaced a lost primary
    KEPT = "kept"  # PRIM -> ALONE: the primary kept serving when its peer went away
    FORCED = "forced"  # primforce

    @property
    def rank(self) -> int:
        return _RANK[self]

    @property
    def phrase(self) -> str:
        return _PHRASE[self]


_RANK = {Origin.STARTED: 0, Origin.TAKEOVER: 1, Origin.KEPT: 2, Origin.FORCED: 3}
_PHRASE = {
    Origin.STARTED: "started serving after waiting",
    Origin.TAKEOVER: "took over as SECOND",
    Origin.KEPT: "kept serving as PRIM",
    Origin.FORCED: "was forced with primforce",
}


@dataclass(frozen=True)
class Generation:
    """One generation: a number one above every number its node knew, and its author."""

    number: int
    node: str
    origin: Origin = Origin.STARTED

    def __str__(self) -> str:
        return f"{self.number}@{self.node}" if self.node else str(self.number)


# Both nodes of a new module start with the same, empty, generation: the
# first election then picks the preferred node and the other resyncs fully.
INITIAL = Generation(0, "", Origin.STARTED)


@dataclass(frozen=True)
class GenerationInfo:
    """The persisted generation state of one node's copy of the data."""

    current: Generation = INITIAL
    history: tuple[Generation, ...] = ()  # ancestors of current, newest first
    stale: bool = False  # behind the primary until a resync completes

    def lineage(self) -> tuple[Generation, ...]:
        return (self.current, *self.history)

    def highest(self) -> int:
        return max(g.number for g in self.lineage())

    def __str__(self) -> str:
        return f"generation {self.current}" + (" (stale)" if self.stale else "")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form, for the state file and heartbeat payloads."""
        return {
            "current": _gen_to_dict(self.current),
            "history": [_gen_to_dict(g) for g in self.history],
            "stale": self.stale,
        }

    @classmethod
    def from_dict(cls, data: object, where: str = "generations") -> GenerationInfo:
        """Parse to_dict() output; raise ModuleError naming ``where`` on bad input."""
        if not isinstance(data, dict):
            raise ModuleError(f"{where}: expected an object with current, history, stale")
        history = data.get("history", [])
        stale = data.get("stale", False)
        if not isinstance(history, list) or not isinstance(stale, bool):
            raise ModuleError(f"{where}: history must be a list and stale a boolean")
        return cls(
            current=_gen_from_dict(data.get("current"), f"{where}: current"),
            history=tuple(
                _gen_from_dict(g, f"{where}: history[{i}]")
                for i, g in enumerate(history[:HISTORY_DEPTH])
            ),
            stale=stale,
        )


def _gen_to_dict(gen: Generation) -> dict[str, Any]:
    return {"number": gen.number, "node": gen.node, "origin": gen.origin.value}


def _gen_from_dict(data: object, where: str) -> Generation:
    if not isinstance(data, dict):
        raise ModuleError(f"{where}: expected an object with number, node, origin")
    number, node, origin = data.get("number"), data.get("node"), data.get("origin")
    if not isinstance(number, int) or isinstance(number, bool) or number < 0:
        raise ModuleError(f"{where}: number must be an integer >= 0, got {number!r}")
    if not isinstance(node, str):
        raise ModuleError(f"{where}: node must be a node name, got {node!r}")
    try:
        return Generation(number, node, Origin(origin))
    except ValueError:
        choices = ", ".join(o.value for o in Origin)
        raise ModuleError(f"{where}: origin must be one of {choices}, got {origin!r}") from None


class Freshness(enum.Enum):
    """How my copy compares with the peer's."""

    SAME = "same"
    MINE_FRESHER = "mine fresher"
    PEER_FRESHER = "peer fresher"
    DIVERGED = "diverged"


def compare(mine: GenerationInfo, peer: GenerationInfo) -> Freshness:
    """Compare two copies. Swapping the arguments swaps MINE/PEER_FRESHER."""
    if mine.current == peer.current:
        if mine.stale == peer.stale:
            return Freshness.SAME
        return Freshness.PEER_FRESHER if mine.stale else Freshness.MINE_FRESHER
    if peer.current in mine.history:
        return Freshness.MINE_FRESHER
    if mine.current in peer.history:
        return Freshness.PEER_FRESHER
    return Freshness.DIVERGED


def new_generation(
    info: GenerationInfo, node: str, origin: Origin, peer: GenerationInfo | None = None
) -> GenerationInfo:
    """Begin a generation on ``node``: numbered above everything either side knew."""
    top = max(info.highest(), peer.highest() if peer else 0)
    history = (info.current, *info.history)[:HISTORY_DEPTH]
    return GenerationInfo(Generation(top + 1, node, origin), history, stale=False)


def adopt(peer: GenerationInfo) -> GenerationInfo:
    """A resync from ``peer`` completed: this copy now is the peer's generation."""
    return replace(peer, stale=False)


def mark_stale(info: GenerationInfo) -> GenerationInfo:
    return replace(info, stale=True)


def fork(mine: GenerationInfo, theirs: GenerationInfo) -> Generation:
    """The first generation of my branch after the newest generation we share.

    With no shared generation within the history, my oldest known one stands
    in for it (the documented, conservative approximation).
    """
    shared = set(theirs.lineage())
    lineage = mine.lineage()
    for i, gen in enumerate(lineage):
        if gen in shared:
            return lineage[max(i - 1, 0)]
    return lineage[-1]


@dataclass(frozen=True)
class Candidate:
    """One side of an election: everything both nodes know about it."""

    name: str
    generations: GenerationInfo
    handover: Handover = Handover.NONE


@dataclass(frozen=True)
class Election:
    """The outcome of elect(): the node to be primary (None: neither may) and why."""

    winner: str | None
    reason: str
    split_brain: bool = False


def elect(
    a: Candidate, b: Candidate, preferred: str | None, *, require_usable: bool = True
) -> Election:
    """Pick which of two nodes should be primary; elect(a, b) == elect(b, a).

    Order: fresher data; for diverged data the split-brain rule; for the same
    data the handover priority, then the preferred node, then the name that
    sorts first. With ``require_usable`` a stale winner means nobody may be
    primary without primforce.
    """
    a, b = sorted((a, b), key=lambda c: c.name)  # symmetry: same order on both nodes
    freshness = compare(a.generations, b.generations)
    split = freshness is Freshness.DIVERGED
    if freshness in (Freshness.MINE_FRESHER, Freshness.PEER_FRESHER):
        winner, loser = (a, b) if freshness is Freshness.MINE_FRESHER else (b, a)
        why = (
            f"{winner.name} has fresher data ({winner.generations} vs "
            f"{loser.generations} on {loser.name})"
        )
    elif split:
        winner, why = _split_brain(a, b, preferred)
    else:
        winner, why = _same_data(a, b, preferred)
    if require_usable and winner.generations.stale:
        return Election(
            None,
            f"{why}, but its data is stale (a resync did not finish): neither node may be "
            f"primary; use primforce on the node whose data must be kept",
            split,
        )
    return Election(winner.name, why, split)


def _split_brain(a: Candidate, b: Candidate, preferred: str | None) -> tuple[Candidate, str]:
    fork_a = fork(a.generations, b.generations)
    fork_b = fork(b.generations, a.generations)
    head = (
        f"split brain: {a.name} (generation {fork_a}, {fork_a.origin.phrase}) and "
        f"{b.name} (generation {fork_b}, {fork_b.origin.phrase}) both served alone"
    )
    if fork_a.origin.rank != fork_b.origin.rank:
        winner = a if fork_a.origin.rank > fork_b.origin.rank else b
        return winner, f"{head}; {winner.name} was primary last"
    winner, tie = _tie_break(a, b, preferred)
    return winner, f"{head}; {tie}"


def _same_data(a: Candidate, b: Candidate, preferred: str | None) -> tuple[Candidate, str]:
    head = f"same data ({a.generations})"
    pa, pb = a.handover.priority, b.handover.priority
    if pa != pb:
        winner, loser = (a, b) if pa > pb else (b, a)
        if winner.handover is Handover.ASKING:
            return winner, f"{head} and {winner.name} asked for PRIM"
        return winner, f"{head} and {loser.name} is handing PRIM over"
    winner, tie = _tie_break(a, b, preferred)
    return winner, f"{head} and {tie}"


def _tie_break(a: Candidate, b: Candidate, preferred: str | None) -> tuple[Candidate, str]:
    if preferred in (a.name, b.name):
        winner = a if preferred == a.name else b
        return winner, f"{winner.name} is the preferred node"
    # a sorts first: callers ordered the pair by name.
    return a, f"no preference applies: {a.name} wins the tie-break by name"
