"""What a mirror node publishes in its heartbeats, and how the peer reads it. Pure.

The payload carries exactly what ``decide()`` needs about the other node:
its state, data generations, replication's up-to-date flag, a handover in
progress, the epoch of what it publishes and the echo of our epoch. A
heartbeat datagram holds at most 1200 bytes, so generations travel as
compact ``[number, node, origin]`` triples rather than ``to_dict()`` objects.

A payload that does not parse (a peer running another version, a bug) is
treated as "not heard": the node waits or, after the timeout, acts as if the
peer were silent, which is the safe reading of a peer it cannot understand.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from node_service.mirror.generations import HISTORY_DEPTH, Generation, GenerationInfo, Origin
from node_service.mirror.snapshot import Local, Peer
from node_service.mirror.states import Handover, State

PAYLOAD_VERSION = 1


def payload(me: Local, echo: int | None) -> dict[str, Any]:
    """The heartbeat payload of ``me``; ``echo`` is the peer's epoch we last heard."""
    gens = me.generations
    return {
        "v": PAYLOAD_VERSION,
        "state": me.state.value,
        "gen": [_triple(g) for g in gens.lineage()[: HISTORY_DEPTH + 1]],
        "stale": gens.stale,
        "uptodate": me.uptodate,
        "handover": me.handover.value,
        "epoch": me.epoch,
        "echo": echo,
    }


def _triple(gen: Generation) -> list[Any]:
    return [gen.number, gen.node, gen.origin.value]


def epoch_of(data: Mapping[str, Any] | None) -> int | None:
    """The peer's epoch in its payload (what our heartbeats echo back)."""
    if not data:
        return None
    value = data.get("epoch")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def peer_from_payload(
    name: str, data: Mapping[str, Any] | None, silent_s: float
) -> tuple[Peer, str | None]:
    """The Peer for ``decide()``, and a one-line problem when the payload is unreadable."""
    if data is None:
        return Peer(name, heard=False, silent_s=silent_s), None
    try:
        peer = Peer(
            name,
            heard=True,
            silent_s=silent_s,
            state=State(data["state"]),
            generations=_generations(data.get("gen"), data.get("stale")),
            uptodate=_bool(data.get("uptodate"), "uptodate"),
            handover=Handover(data.get("handover", Handover.NONE.value)),
            echo=_optional_int(data.get("echo"), "echo"),
        )
    except (KeyError, ValueError, TypeError) as exc:
        problem = (
            f"heartbeat payload of peer {name} not understood ({exc}): "
            f"expected a mirror payload version {PAYLOAD_VERSION}; treating {name} as not heard"
        )
        return Peer(name, heard=False, silent_s=silent_s), problem
    return peer, None


def _generations(triples: object, stale: object) -> GenerationInfo:
    if not isinstance(triples, list) or not triples:
        raise ValueError("gen must be a non-empty list")
    lineage = []
    for item in triples[: HISTORY_DEPTH + 1]:
        if not (isinstance(item, list) and len(item) == 3):
            raise ValueError(f"generation {item!r} is not [number, node, origin]")
        number, node, origin = item
        if not isinstance(number, int) or isinstance(number, bool) or number < 0:
            raise ValueError(f"generation number {number!r}")
        if not isinstance(node, str):
            raise ValueError(f"generation node {node!r}")
        lineage.append(Generation(number, node, Origin(origin)))
    return GenerationInfo(lineage[0], tuple(lineage[1:]), _bool(stale, "stale"))


def _bool(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{what} must be true or false, got {value!r}")
    return value


def _optional_int(value: object, what: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    return value
