"""The farm filter's ingress drop on real nftables, with flows held across a move-back.

Same topology as test_farm_filter (its ``site`` fixture: three nodes with
one MAC and one VIP behind a flooding bridge, a client, per-node servers
answering with the kernel bucket of each connection). Here every node's
filter also has the ``netdev`` table on ``eth0``, and the buckets it lets
through besides its own are read back from conntrack with ``held.read_held``
inside the node's namespace, as the runner does.
"""

from __future__ import annotations

import json
import re
import threading

import pytest

from node_service.farm import held
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
    sh,
    site,  # noqa: F401  (the fixture)
)
from tests.node.test_farm_filter import load as load_with_probe

pytestmark = pytest.mark.node

RULE = FilterRule("tcp", (PORT,), "ip_port")


def load(where: Site, owners: BucketMap, holds: dict[str, frozenset[int]], nodes=NODES) -> None:
    """The bucket probe (kernel bucket in each answer), then the filter with its ingress drop."""
    load_with_probe(where, owners, "ip_port", nodes)
    for node in nodes:
        farm = node_filter(MODULE, [VIP], [RULE], SEED, owners, node, "eth0", holds[node])
        apply(build(farm), nft=where.nft(node))


def read_held(where: Site, node: str) -> frozenset[int]:
    """``held.read_held`` run in ``node``'s namespace (a thread: setns moves only it)."""
    found: list[frozenset[int]] = []
    errors: list[BaseException] = []

    def inside() -> None:
        try:
            with netns.enter(where.ns(node)):
                found.append(held.read_held([VIP], [RULE]))
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    thread = threading.Thread(target=inside, name=f"rt-farm-held-{node}")
    thread.start()
    thread.join(timeout=STEP_TIMEOUT_S)
    assert not thread.is_alive() and not errors, errors
    return found[0]


def ingress_drops(where: Site, node: str) -> int:
    text = listing(MODULE, nft=where.nft(node), family="netdev")
    return sum(int(n) for n in re.findall(r"counter packets (\d+) .*dropped ingress", text))


def test_foreign_buckets_are_dropped_at_ingress_and_held_flows_survive_a_move_back(site):  # noqa: F811  (the fixture)
    full = bucket_map(WEIGHTS, set(NODES), SEED)
    without_n3 = bucket_map(WEIGHTS, {"n1", "n2"}, SEED)
    nothing = dict.fromkeys(NODES, frozenset())
    load(site, full, nothing)
    ruleset = sh("ip", "netns", "exec", site.ns("n1"), "nft", "list", "ruleset")
    assert 'type filter hook ingress device "eth0" priority filter; policy accept;' in ruleset
    before = {node: ingress_drops(site, node) for node in NODES}
    result = answers(site, [(CLIENT, port) for port in site.ports(90)])
    per_node = check_owners(result, full)
    assert set(per_node) == set(NODES)
    # Each node dropped the other nodes' clients before IP, and counts them as dropped.
    assert all(ingress_drops(site, node) > before[node] for node in NODES)
    assert all(
        counters(MODULE, nft=site.nft(node))["dropped"] >= ingress_drops(site, node)
        for node in NODES
    )

    sh("ip", "-n", site.ns("n3"), "link", "set", "eth0", "down")
    try:
        # n3 lost: n1 and n2 gain buckets, lose none, hold nothing extra.
        load(site, without_n3, nothing, nodes=("n1", "n2"))
        short = answers(site, [(CLIENT, port) for port in site.ports(60)])
        check_owners(short, without_n3)
        proc, lines = connect(site, [(CLIENT, port) for port in site.ports(60)], hold=True)
        kept = json.loads(lines.next())
        check_owners(kept, without_n3)
        moving = {(a[0], int(a[1])) for a in kept if full[int(a[1])] == "n3"}
        assert moving, "no held connection sits in a bucket that returns to n3"
    finally:
        sh("ip", "-n", site.ns("n3"), "link", "set", "eth0", "up")

    # n3 back: what n1/n2 lose is held at once, in the same transaction.
    holds = {n: owned_by(without_n3, n) - owned_by(full, n) for n in ("n1", "n2")}
    holds["n3"] = frozenset()
    load(site, full, holds)
    # Then conntrack says where this node's flows are (marks written by the filter).
    answered = {node: {int(a[1]) for a in (*result, *short, *kept) if a[0] == node}
                for node in NODES}  # fmt: skip
    for node in ("n1", "n2"):
        found = read_held(site, node) - owned_by(full, node)
        assert {b for n, b in moving if n == node} <= found, node
        assert found <= answered[node] - owned_by(full, node), node
        holds[node] = found
    load(site, full, holds)

    assert proc.stdin is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()
    echoes = json.loads(lines.next())
    proc.wait(timeout=STEP_TIMEOUT_S)
    assert echoes == [[answer[0], "ping"] for answer in kept]
    after = answers(site, [(CLIENT, port) for port in site.ports(60)])
    assert "n3" in check_owners(after, full)
