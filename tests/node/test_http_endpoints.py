"""The TCP endpoints of a real rampartd: Prometheus metrics and cloud health checks."""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from node_service.module import keys
from tests.node.daemon_fakes import build_safe
from tests.node.http_fakes import EndpointDaemon, free_port

pytestmark = pytest.mark.node


def get(url: str, method: str = "GET") -> tuple[int, str]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def install(daemon: EndpointDaemon, name: str, kind: str) -> None:
    key = daemon.base / "keys" / "signing.key"
    if not key.exists():
        key, pub = keys.generate(daemon.base / "keys")
        daemon.trust_dir.mkdir(exist_ok=True)
        (daemon.trust_dir / "site.pub").write_bytes(pub.read_bytes())
    safe = build_safe(daemon.base, name, daemon.node, key, kind=kind)
    done = daemon.rampart("module", "install", str(safe))
    assert done.returncode == 0, done.stderr


def command(daemon: EndpointDaemon, verb: str, module: str) -> None:
    done = daemon.rampart(verb, "-m", module)
    assert done.returncode == 0, done.stderr


def listening_tcp(pid: int) -> set[tuple[str, int]]:
    """Listening TCP sockets held by one process (its fds against /proc/net/tcp*)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as listing:
            lines = listing.read().splitlines()[1:]
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A = LISTEN
                found.add((table, int(fields[1].rsplit(":", 1)[1], 16)))
    return found


@pytest.fixture
def ports():
    return free_port(), free_port()


@pytest.fixture
def daemon(ports):
    metrics_port, health_port = ports
    d = EndpointDaemon(
        f'metrics_listen: "127.0.0.1:{metrics_port}"\nhealth_listen: 127.0.0.1:{health_port}\n'
    )
    try:
        d.start()
        d.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        d.health_url = f"http://127.0.0.1:{health_port}/health"
        d.health_port = health_port
        install(d, "web", "mirror")
        install(d, "shop", "farm")
        yield d
    finally:
        if d.proc is not None:
            d.release_close("shop")
        d.close()


def test_endpoints_are_off_by_default():
    d = EndpointDaemon("")
    try:
        d.start()
        assert d.proc is not None
        assert listening_tcp(d.proc.pid) == set()
        assert "endpoint listening" not in d.journal_text()
    finally:
        d.close()


def test_each_endpoint_binds_only_its_address_and_paths(daemon, ports):
    metrics_port, health_port = ports
    assert listening_tcp(daemon.proc.pid) == {("tcp", metrics_port), ("tcp", health_port)}
    assert get(daemon.health_url.replace(f":{health_port}", f":{metrics_port}"))[0] == 404
    assert get(daemon.metrics_url.replace(f":{metrics_port}", f":{health_port}"))[0] == 404
    journal = daemon.journal_text()
    assert f"metrics endpoint listening on http://127.0.0.1:{metrics_port}" in journal
    assert f"health endpoint listening on http://127.0.0.1:{health_port}" in journal


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


def value(found, name: str, **labels: str) -> float:
    matching = [v for got, v in found.get(name, []) if got == labels]
    assert len(matching) == 1, (name, labels, found.get(name))
    return matching[0]


def test_metrics_families_and_labels(daemon):
    command(daemon, "start", "web")
    command(daemon, "start", "shop")
    status, text = get(daemon.metrics_url)
    assert status == 200
    found = samples(text)
    assert value(found, "rampart_node_info", node="rt-n1", version="0.1.0") == 1
    assert value(found, "rampart_module_state", module="web", state="ALONE") == 1
    assert value(found, "rampart_module_state", module="shop", state="UP") == 1
    assert value(found, "rampart_module_transitions_total", module="web") == 2
    assert value(found, "rampart_module_serving", module="web", node="rt-n1") == 1
    assert value(found, "rampart_module_serving", module="shop", node="rt-n1") == 1
    assert value(
        found, "rampart_heartbeat_rtt_seconds",
        module="web", node="rt-n1", peer="rt-other", network="198.51.100.12",
    ) == pytest.approx(0.0004)  # fmt: skip
    assert value(found, "rampart_peer_reachable", module="web", node="rt-n1", peer="rt-other") == 0
    assert value(
        found, "rampart_peer_network_up",
        module="web", node="rt-n1", peer="rt-other", network="198.51.100.12",
    ) == 0  # fmt: skip
    for name in ("bytes_per_second", "lag_bytes", "resync_remaining_bytes"):
        assert value(found, f"rampart_replication_{name}", module="web", node="rt-n1") == 0
    assert value(found, "rampart_replication_status", module="web", node="rt-n1", status="off") == 1
    assert "shop" not in {labels["module"] for labels, _ in found["rampart_replication_lag_bytes"]}
    assert value(found, "rampart_farm_buckets", module="shop", node="rt-n1") == 128
    assert value(found, "rampart_farm_buckets", module="shop", node="rt-other") == 128
    ok = value(found, "rampart_checker_ok", module="shop", node="rt-n1", checker="tcp 127.0.0.1:80")
    assert ok == 1

    command(daemon, "restart", "shop")  # the fake loses its buckets, its checker fails
    found = samples(get(daemon.metrics_url)[1])
    assert value(found, "rampart_farm_buckets", module="shop", node="rt-n1") == 0
    assert value(found, "rampart_module_serving", module="shop", node="rt-n1") == 0
    failed = value(
        found, "rampart_checker_ok", module="shop", node="rt-n1", checker="tcp 127.0.0.1:80"
    )
    assert failed == 0


def health(daemon, module: str | None = None, method: str = "GET") -> tuple[int, dict]:
    url = daemon.health_url + (f"/{module}" if module else "")
    status, text = get(url, method)
    return status, (json.loads(text) if text else {})


def test_mirror_health_is_200_only_where_it_serves(daemon):
    status, body = health(daemon, "web")
    assert status == 503
    assert body == {
        "module": "web", "node": "rt-n1", "kind": "mirror", "state": "STOP", "serving": False,
        "reason": "module web on node rt-n1 is STOP: not serving",
    }  # fmt: skip
    command(daemon, "start", "web")
    assert health(daemon, "web")[0] == 200  # ALONE
    assert health(daemon, "web", method="HEAD")[0] == 200
    command(daemon, "swap", "web")
    status, body = health(daemon, "web")
    assert (status, body["state"]) == (503, "SECOND")
    assert body["reason"] == "module web on node rt-n1 is SECOND: the PRIM node serves"
    command(daemon, "swap", "web")
    status, body = health(daemon, "web")
    assert (status, body["state"], body["serving"]) == (200, "PRIM", True)
    command(daemon, "stop", "web")
    assert health(daemon, "web")[0] == 503


def test_farm_health_needs_up_and_buckets(daemon):
    assert health(daemon, "shop")[0] == 503
    command(daemon, "start", "shop")
    status, body = health(daemon, "shop")
    assert (status, body["state"]) == (200, "UP")
    assert body["reason"] == "module shop on node rt-n1 is UP with 128 of the 256 buckets"
    command(daemon, "restart", "shop")
    status, body = health(daemon, "shop")
    assert (status, body["state"]) == (503, "UP")
    assert "owns no bucket" in body["reason"]


def test_unknown_module_is_404_and_liveness_lists_modules(daemon):
    status, body = health(daemon, "nosuch")
    assert status == 404
    assert body["reason"] == "no such module on node rt-n1"
    status, body = health(daemon)
    assert status == 200
    assert (body["status"], body["node"]) == ("ok", "rt-n1")
    assert body["modules"] == {"shop": "STOP", "web": "STOP"}


def test_health_is_503_while_rampartd_shuts_down(daemon):
    command(daemon, "start", "web")
    command(daemon, "start", "shop")
    assert health(daemon, "web")[0] == 200
    daemon.proc.send_signal(15)
    # The fake farm runner holds the shutdown until released: meanwhile the
    # balancer must already see every module as unavailable.
    deadline = time.monotonic() + 10
    status, body = health(daemon)
    for _ in range(500):
        if status == 503 or time.monotonic() > deadline:
            break
        status, body = health(daemon)
    assert (status, body["status"]) == (503, "stopping")
    status, body = health(daemon, "web")
    assert status == 503
    assert body["reason"] == "module web on node rt-n1: rampartd is shutting down"
    daemon.release_close("shop")
    assert daemon.proc.wait(20) == 0
    daemon.proc = None
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", daemon.health_port), 2)


def test_a_busy_address_is_journaled_and_the_rest_still_serves():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        health_port = free_port()
        d = EndpointDaemon(
            f"metrics_listen: 127.0.0.1:{taken}\nhealth_listen: 127.0.0.1:{health_port}\n"
        )
        try:
            d.start()
            assert get(f"http://127.0.0.1:{health_port}/health")[0] == 200
            assert d.rampart("state", "--json").returncode == 0
            journal = d.journal_text()
            assert f"metrics endpoint not started: cannot listen on 127.0.0.1:{taken}" in journal
            assert "check metrics_listen in node.yaml" in journal
        finally:
            d.close()


def test_one_address_for_both_serves_both():
    port = free_port()
    d = EndpointDaemon(f"metrics_listen: 127.0.0.1:{port}\nhealth_listen: 127.0.0.1:{port}\n")
    try:
        d.start()
        status, text = get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200 and "rampart_node_info" in text
        assert get(f"http://127.0.0.1:{port}/health")[0] == 200
        assert f"metrics and health endpoint listening on http://127.0.0.1:{port}" in (
            d.journal_text()
        )
    finally:
        d.close()


def test_ipv6_address():
    port = free_port()
    d = EndpointDaemon(f'health_listen: "[::1]:{port}"\n')
    try:
        d.start()
        status, text = get(f"http://[::1]:{port}/health")
        assert status == 200 and json.loads(text)["node"] == "rt-n1"
        assert f"health endpoint listening on http://[::1]:{port}" in d.journal_text()
    finally:
        d.close()
