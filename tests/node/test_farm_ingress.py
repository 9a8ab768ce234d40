"""The farm filter's ingress gate on real nftables, with flows held across a move-back.

Same topology as test_farm_filter (its ``site`` fixture: three nodes with
one MAC and one VIP behind a flooding bridge, a client, per-node servers
answering with the kernel bucket of each connection). Here every node's
filter has the ``netdev`` table on ``eth0``; the flows a node keeps through
a move-back are read from its own sockets with ``flows.read_flows`` inside
its namespace, as the runner does, and the node taking the buckets back
guards them.
"""

from __future__ import annotations

import json
import re
import threading

import pytest

from node_service.farm import flows
from node_service.farm.buckets import BucketMap, bucket_map, owned_by
from node_service.farm.nft import FilterRule, apply, build, counters, listing, node_filter
from node_service.net import netns
from tests.node.test_farm_filter import (
    CLIENT,
    MODULE,
    NODES,
    PORT,
    SEED,
    STEP_TIMEOUT_S,
    VIP,
    WEIGHTS,
    Site,
    answers,
    check_owners,
    connect,
    echo_held,
    sh,
    site,  # noqa: F401  (the fixture)
)
from tests.node.test_farm_filter import load as load_with_probe

pytestmark = pytest.mark.node

RULE = FilterRule("tcp", (PORT,), "ip_port")


Flows = frozenset[tuple[str, int]]


def load(where: Site, owners: BucketMap, kept: dict[str, Flows] | None = None,
         guarded: dict[str, frozenset[int]] | None = None, nodes=NODES) -> None:  # fmt: skip
    """The bucket probe (kernel bucket in each answer), then the filter with its ingress gate."""
    load_with_probe(where, owners, "ip_port", nodes)
    for node in nodes:
        farm = node_filter(
            MODULE, [VIP], [RULE], SEED, owners, node, "eth0",
            held_flows=(kept or {}).get(node, frozenset()),
            guarded=(guarded or {}).get(node, frozenset()),
        )  # fmt: skip
        apply(build(farm), nft=where.nft(node))


def read_flows(where: Site, node: str) -> Flows:
    """``flows.read_flows`` run in ``node``'s namespace (a thread: setns moves only it)."""
    found: list[Flows] = []
    errors: list[BaseException] = []

    def inside() -> None:
        try:
            with netns.enter(where.ns(node)):
                found.append(flows.read_flows([VIP], [PORT]))
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    thread = threading.Thread(target=inside, name=f"rt-farm-flows-{node}")
    thread.start()
    thread.join(timeout=STEP_TIMEOUT_S)
    assert not thread.is_alive() and not errors, errors
    return found[0]


def drops(where: Site, node: str, kind: str = "ingress", family: str = "netdev") -> int:
    text = listing(MODULE, nft=where.nft(node), family=family)
    return sum(int(n) for n in re.findall(rf"counter packets (\d+) .*dropped {kind}", text))


def test_foreign_buckets_are_dropped_at_ingress_and_held_flows_survive_a_move_back(site):  # noqa: F811  (the fixture)
    full = bucket_map(WEIGHTS, set(NODES), SEED)
    without_n3 = bucket_map(WEIGHTS, {"n1", "n2"}, SEED)
    load(site, full)
    ruleset = sh("ip", "netns", "exec", site.ns("n1"), "nft", "list", "ruleset")
    assert 'type filter hook ingress device "eth0" priority filter; policy accept;' in ruleset
    # A stable farm runs no conntrack rule at all.
    assert " ct " not in ruleset and "notrack" not in ruleset
    before = {node: drops(site, node) for node in NODES}
    result = answers(site, [(CLIENT, port) for port in site.ports(90)])
    per_node = check_owners(result, full)
    assert set(per_node) == set(NODES)
    # Each node dropped the other nodes' clients before IP, and counts them as dropped.
    assert all(drops(site, node) > before[node] for node in NODES)
    assert all(
        counters(MODULE, nft=site.nft(node))["dropped"] >= drops(site, node) for node in NODES
    )

    sh("ip", "-n", site.ns("n3"), "link", "set", "eth0", "down")
    try:
        # n3 lost: n1 and n2 gain buckets, lose none, hold nothing.
        load(site, without_n3, nodes=("n1", "n2"))
        short = answers(site, [(CLIENT, port) for port in site.ports(60)])
        check_owners(short, without_n3)
        sources = [(CLIENT, port) for port in site.ports(60)]
        proc, lines = connect(site, sources, hold=True)
        kept = json.loads(lines.next())
        check_owners(kept, without_n3)
        moving = {
            (answer[0], source) for source, answer in zip(sources, kept, strict=True)
            if full[int(answer[1])] == "n3"
        }  # fmt: skip
        assert moving, "no held connection sits in a bucket that returns to n3"
    finally:
        sh("ip", "-n", site.ns("n3"), "link", "set", "eth0", "up")

    # n3 back: n1/n2 read their connections from their sockets and keep them
    # in the same transaction that gives n3 its buckets; n3 guards them.
    held = {node: read_flows(site, node) for node in ("n1", "n2")}
    for node in ("n1", "n2"):
        assert {source for owner, source in moving if owner == node} <= held[node], node
    assert not read_flows(site, "n3")
    load(site, full, held, {"n3": owned_by(full, "n3")})

    echoes = echo_held(proc, lines)
    # Every held connection still answers from its node; n3 never reset one:
    # it dropped their packets silently in its guarded buckets.
    assert echoes == [[answer[0], "ping"] for answer in kept]
    assert drops(site, "n3", "guarded", "ip") > 0
    after = answers(site, [(CLIENT, port) for port in site.ports(60)])
    assert "n3" in check_owners(after, full)
