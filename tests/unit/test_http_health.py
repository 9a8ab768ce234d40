"""The cloud health rule and the labelled metric families, as pure functions."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from node_service.api.http_endpoints import body, module_verdict
from node_service.api.node_metrics import ModuleView, families


def mirror(state: str, substate: str | None = None, **extra) -> dict:
    return {"module": "db", "kind": "mirror", "state": state, "substate": substate, **extra}


def farm(state: str, buckets: int) -> dict:
    return {"module": "web", "kind": "farm", "state": state, "buckets": buckets}


@pytest.mark.parametrize(
    ("state", "status", "reason"),
    [
        (mirror("PRIM"), 200, "module db on node n1 is PRIM: the application runs here"),
        (mirror("ALONE"), 200, "module db on node n1 is ALONE: the application runs here"),
        (mirror("PRIM", "starting"), 503, "module db on node n1 is PRIM but still starting"),
        (mirror("ALONE", "stopping"), 503, "module db on node n1 is ALONE but still stopping"),
        (mirror("SECOND"), 503, "module db on node n1 is SECOND: the PRIM node serves"),
        (mirror("WAIT"), 503, "module db on node n1 is WAIT: not serving"),
        (mirror("STOP"), 503, "module db on node n1 is STOP: not serving"),
        (farm("UP", 85), 200, "module web on node n1 is UP with 85 of the 256 buckets"),
        (farm("UP", 0), 503, "module web on node n1 is UP but owns no bucket yet"),
        (farm("WAIT", 0), 503, "module web on node n1 is WAIT: not serving"),
        (
            {**farm("unsupported", 0), "error": "no farm runner"},
            503,
            "module web on node n1 cannot run: no farm runner",
        ),
        (None, 404, "no such module on node n1"),
    ],
)
def test_verdicts(state, status, reason):
    verdict = module_verdict(state, "n1")
    assert (verdict.status, verdict.reason) == (status, reason)
    assert verdict.serving is (status == 200)


def test_shutting_down_is_503_even_for_the_primary():
    verdict = module_verdict(mirror("PRIM"), "n1", stopping=True)
    assert (verdict.status, verdict.reason) == (
        503,
        "module db on node n1: rampartd is shutting down",
    )


def test_body_is_small_and_names_everything():
    verdict = module_verdict(mirror("PRIM"), "n1")
    assert body(verdict, mirror("PRIM"), "db", "n1") == {
        "module": "db", "node": "n1", "kind": "mirror", "state": "PRIM", "serving": True,
        "reason": "module db on node n1 is PRIM: the application runs here",
    }  # fmt: skip
    missing = module_verdict(None, "n1")
    assert body(missing, None, "x", "n1")["state"] is None


def scrape(views: list[ModuleView]) -> dict[tuple[str, tuple], float]:
    class Collector:
        def collect(self):
            return families("n1", "9.9", views)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector())
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_families_label_peers_networks_replication_buckets_and_checkers():
    db = ModuleView(
        name="db",
        kind="mirror",
        state=mirror(
            "PRIM",
            since=1700000000.5,
            peers={"n2": {"reachable": True, "networks": {"10.0.0.2": True, "10.1.0.2": False}}},
            replication={
                "status": "resyncing",
                "bytes_per_s": 1000,
                "lag_bytes": 5,
                "resync_remaining_bytes": 4096,
            },
        ),
        metrics={"heartbeat_rtt_seconds": {"10.0.0.2": 0.0003, "10.1.0.2": "n/a"}},
        addresses={"10.0.0.1": "n1", "10.0.0.2": "n2", "10.1.0.2": "n2"},
        node_names=("n1", "n2"),
        checkers={"tcp 127.0.0.1:5432": "ok", "process postgres": "failover"},
    )
    web = ModuleView(
        name="web",
        kind="farm",
        state={**farm("UP", 100), "bucket_map": {"n1": 100, "n2": 156}},
        node_names=("n1", "n2", "n3"),
    )
    got = scrape([db, web])

    def at(name: str, **labels: str) -> float:
        return got[(name, tuple(sorted(labels.items())))]

    me = {"module": "db", "node": "n1"}
    assert at("rampart_node_info", node="n1", version="9.9") == 1
    assert at("rampart_module_serving", **me) == 1
    assert at("rampart_module_state_since_timestamp_seconds", **me) == 1700000000.5
    assert at("rampart_peer_reachable", **me, peer="n2") == 1
    assert at("rampart_peer_network_up", **me, peer="n2", network="10.0.0.2") == 1
    assert at("rampart_peer_network_up", **me, peer="n2", network="10.1.0.2") == 0
    rtt = {k[1]: v for k, v in got.items() if k[0] == "rampart_heartbeat_rtt_seconds"}
    only = tuple(sorted({**me, "peer": "n2", "network": "10.0.0.2"}.items()))
    assert rtt == {only: 0.0003}  # the non-number sample is left out
    assert at("rampart_replication_bytes_per_second", **me) == 1000
    assert at("rampart_replication_lag_bytes", **me) == 5
    assert at("rampart_replication_resync_remaining_bytes", **me) == 4096
    assert at("rampart_replication_status", **me, status="resyncing") == 1
    assert at("rampart_replication_status", **me, status="uptodate") == 0
    assert at("rampart_checker_ok", **me, checker="process postgres") == 0
    assert at("rampart_checker_ok", **me, checker="tcp 127.0.0.1:5432") == 1
    buckets = {k[1]: v for k, v in got.items() if k[0] == "rampart_farm_buckets"}
    assert buckets == {
        (("module", "web"), ("node", "n1")): 100,
        (("module", "web"), ("node", "n2")): 156,
        (("module", "web"), ("node", "n3")): 0,
    }
    web_replication = [
        k for k in got if k[0].startswith("rampart_replication") and ("module", "web") in k[1]
    ]
    assert web_replication == []
