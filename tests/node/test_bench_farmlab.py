"""The farm benchmark's lab tools on a real 3-node lab.

The client ports chosen per bucket (the kernel's jhash read back through
conntrack) must land exactly where the bucket map says, and the by-hand
filter switch must turn the filter off and put each node's table back.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bench.farm import prepare_switch, switch
from bench.farmlab import Farm, FarmLab, farm_lab
from node_service.farm.buckets import BUCKETS, bucket_map, module_seed
from tests.node.conftest import unique_lab_name

pytestmark = pytest.mark.node


@pytest.fixture(scope="module")
def lab() -> Iterator[FarmLab]:
    with farm_lab(unique_lab_name()) as running:
        yield running


@pytest.fixture(scope="module")
def web(lab: FarmLab) -> Farm:
    return lab.deploy("web", lab.status["vip_pool"][0], 8080, 100, 1000)


def test_one_port_per_bucket_lands_on_the_owner_the_bucket_map_names(lab, web):
    sources = lab.bucket_sources(web, range(20000, 24000))

    assert len(sources) == BUCKETS and len({port for _, port in sources}) == BUCKETS
    owners = bucket_map(dict.fromkeys(web.nodes, 1), web.nodes, module_seed(web.name))
    answers = lab.client.connect(web, sources, timeout=2.0, concurrency=64)
    assert list(answers) == list(owners)
    # The oracle's scratch table is gone from the client.
    client = lab.driver.client
    assert "rampart_bench_buckets" not in lab.shell_all({client: ("nft list tables", "")})[client]


def test_filter_switch_turns_the_filter_off_and_puts_every_table_back(lab, web):
    keep = web.nodes[0]
    nodes = sorted(web.nodes)
    me = lab.client_address
    sources = [(me, 45000 + i) for i in range(120)]
    change = prepare_switch(lab, web, keep)
    before = {n: lab.counters(n, web) for n in web.nodes}

    # Every node drops the others' clients before IP (the runners' ingress tables).
    assert change.with_ingress() == nodes
    switch(lab, change, change.off(), [], [], [keep])
    try:
        off = lab.client.connect(web, sources, timeout=2.0, concurrency=8)
        # The owner's gate is at its interface too, as its runner loads it.
        switch(lab, change, change.one_owner(), nodes, nodes, nodes)
        alone = lab.client.connect(web, [(me, 46000 + i) for i in range(120)], 2.0, 8)
    finally:
        switch(lab, change, change.on(), nodes, nodes, nodes)

    assert set(off) == {keep} and set(alone) == {keep}
    on = lab.client.connect(web, sources, timeout=2.0, concurrency=8)
    assert None not in on and set(on) == set(web.nodes)
    after = {n: lab.counters(n, web) for n in web.nodes}
    # The tables came back with the rules the runners loaded; only the last round counted.
    assert sum(after[n]["owned"] - before[n]["owned"] for n in web.nodes) == len(sources)
    # The other nodes dropped those clients at ingress, before IP.
    assert all(after[n]["ingress"] > before[n]["ingress"] for n in web.nodes)
    assert lab.serving(web)
