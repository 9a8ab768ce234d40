"""The labelled metric families: peers, heartbeat RTT, replication, buckets, checkers.

``api.metrics`` exposes every module's state and each number of
``runner.metrics()`` under a generic ``key`` label. This file adds the
families an operator graphs and alerts on, with meaningful labels
(``module``, ``node``, ``peer``, ``network``, ``checker``), built from what
every runner already publishes: its state object (``rampart state --json``),
its ``metrics()`` and the checker entries of the journal.

``families(views)`` is pure (plain data in, metric families out); ``views``
reads the daemon at scrape time, so nothing runs between scrapes.

- ``rampart_node_info{node,version}`` 1
- ``rampart_module_serving{module,node}`` 1 where the health endpoint says 200
- ``rampart_module_state_since_timestamp_seconds{module,node}``
- ``rampart_peer_reachable{module,node,peer}``
- ``rampart_peer_network_up{module,node,peer,network}`` one per heartbeat network
- ``rampart_heartbeat_rtt_seconds{module,node,peer,network}``
- ``rampart_replication_{bytes_per_second,lag_bytes,resync_remaining_bytes}{module,node}``
  and ``rampart_replication_status{module,node,status}`` (mirror)
- ``rampart_farm_buckets{module,node}`` buckets per node as this node sees the map (farm)
- ``rampart_checker_ok{module,node,checker}`` the last verdict each checker
  journaled since rampartd started, while the module runs
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client.core import GaugeMetricFamily, Metric

from node_service.api.http_endpoints import module_verdict

if TYPE_CHECKING:
    from node_service.daemon import Daemon

REPLICATION_STATUSES = ("uptodate", "resyncing", "stale", "off")
REPLICATION_NUMBERS = (
    ("bytes_per_s", "rampart_replication_bytes_per_second", "replication throughput"),
    ("lag_bytes", "rampart_replication_lag_bytes", "bytes written but not yet on the peer"),
    ("resync_remaining_bytes", "rampart_replication_resync_remaining_bytes",
     "bytes left to resync"),
)  # fmt: skip
IDLE = ("STOP", "unsupported", "error")


@dataclass(frozen=True)
class ModuleView:
    """What the families need of one module, read at scrape time."""

    name: str
    kind: str
    state: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    # peer address -> peer node name, from the module's <nodes>
    addresses: dict[str, str] = field(default_factory=dict)
    node_names: tuple[str, ...] = ()
    # checker label -> last verdict ("ok", "failed", "failover", ...)
    checkers: dict[str, str] = field(default_factory=dict)


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    return float(value) if isinstance(value, int | float) else None


def families(node: str, version: str, views: list[ModuleView]) -> Iterator[Metric]:
    info = GaugeMetricFamily("rampart_node_info", "this node", labels=["node", "version"])
    info.add_metric([node, version], 1)
    yield info

    def gauge(name: str, doc: str, *labels: str) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, doc, labels=["module", "node", *labels])

    serving = gauge("rampart_module_serving", "1 where this node should receive the traffic")
    since = gauge("rampart_module_state_since_timestamp_seconds", "when the current state began")
    reachable = gauge("rampart_peer_reachable", "peer heard on at least one network", "peer")
    network_up = gauge("rampart_peer_network_up", "peer heard on this network", "peer", "network")
    rtt = gauge("rampart_heartbeat_rtt_seconds", "heartbeat round trip", "peer", "network")
    repl = {key: gauge(name, doc) for key, name, doc in REPLICATION_NUMBERS}
    repl_status = gauge("rampart_replication_status", "1 for the current status", "status")
    buckets = gauge("rampart_farm_buckets", "buckets each node owns in this node's map")
    checker = gauge("rampart_checker_ok", "last verdict of each checker (1 ok)", "checker")

    for view in views:
        base = [view.name, node]
        state = view.state
        verdict = module_verdict(state, node)
        serving.add_metric(base, 1 if verdict.serving else 0)
        if _number(state.get("since")) is not None:
            since.add_metric(base, float(state["since"]))
        for peer, seen in sorted((state.get("peers") or {}).items()):
            reachable.add_metric([*base, peer], 1 if seen.get("reachable") else 0)
            for address, up in sorted((seen.get("networks") or {}).items()):
                network_up.add_metric([*base, peer, address], 1 if up else 0)
        for address, seconds in sorted((view.metrics.get("heartbeat_rtt_seconds") or {}).items()):
            value = _number(seconds)
            if value is not None:
                rtt.add_metric([*base, view.addresses.get(address, "?"), address], value)
        if view.kind == "mirror":
            replication = state.get("replication") or {}
            for key, family in repl.items():
                value = _number(replication.get(key))
                family.add_metric(base, value if value is not None else 0.0)
            current = replication.get("status", "off")
            for status in sorted({*REPLICATION_STATUSES, str(current)}):
                repl_status.add_metric([*base, status], 1 if status == current else 0)
        if view.kind == "farm":
            shares = state.get("bucket_map") or {}
            for owner in sorted({*view.node_names, *shares}):
                buckets.add_metric([view.name, owner], float(shares.get(owner, 0)))
        for label, last in sorted(view.checkers.items()):
            checker.add_metric([*base, label], 1 if last == "ok" else 0)
    yield from (serving, since, reachable, network_up, rtt, *repl.values(), repl_status)
    yield from (buckets, checker)


def _checkers(daemon: Daemon, name: str) -> dict[str, str]:
    # Checker runners journal only changes; the newest entry per checker since
    # this daemon started is its current verdict.
    last: dict[str, str] = {}
    for entry in daemon.journal.recent(name, limit=2000):
        if entry.get("kind") == "checker" and entry.get("ts", 0) >= daemon.started_at:
            label, verdict = entry.get("checker"), entry.get("verdict")
            if isinstance(label, str) and isinstance(verdict, str):
                last[label] = verdict
    return last


def views(daemon: Daemon) -> list[ModuleView]:
    """Read every module of the daemon once (errors of one module skip only it)."""
    found: list[ModuleView] = []
    for name, slot in sorted(daemon.slots.items()):
        if slot.runner is None:
            continue
        try:
            state = daemon.state(name)
        except Exception:  # a runner bug must not break the scrape of the others
            continue
        module = slot.runner.module
        addresses = {a: n.name for n in module.nodes for a in n.addresses}
        running = slot.state_name() not in IDLE
        found.append(
            ModuleView(
                name=name,
                kind=slot.kind,
                state=state,
                metrics=daemon.metrics(name),
                addresses=addresses,
                node_names=tuple(n.name for n in module.nodes),
                checkers=_checkers(daemon, name) if running else {},
            )
        )
    return found
