"""/metrics: the node's numbers in the Prometheus text format.

A custom collector reads the daemon at scrape time (no background task, no
stale gauges for removed modules):

- ``rampart_module_info{module,kind,version} 1``
- ``rampart_module_state{module,state}`` 1 for the current state, 0 for the
  other usual states of its kind
- ``rampart_module_transitions_total{module}`` since the daemon started
- ``rampart_module_<name>{module}`` for each number in ``runner.metrics()``,
  and ``rampart_module_<name>{module,key}`` for a one-level dict of numbers
  (e.g. ``heartbeat_rtt_seconds`` per network address)
- ``rampart_journal_subscribers``
- the labelled families of ``api.node_metrics`` (peers, heartbeat RTT per
  network, replication, farm buckets per node, checker results)

The same text is served on the API socket and, when node.yaml sets
``metrics_listen``, over TCP (``api.http_endpoints``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from node_service import __version__
from node_service.api import node_metrics

if TYPE_CHECKING:
    from node_service.daemon import Daemon

STATES = {"mirror": ("STOP", "WAIT", "ALONE", "PRIM", "SECOND"), "farm": ("STOP", "WAIT", "UP")}


def metric_name(key: str) -> str:
    return "rampart_module_" + re.sub(r"[^a-zA-Z0-9_]", "_", key).strip("_").lower()


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    return None


class DaemonCollector:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[Metric]:
        d = self.daemon
        info = GaugeMetricFamily(
            "rampart_module_info", "installed module", labels=["module", "kind", "version"]
        )
        state = GaugeMetricFamily(
            "rampart_module_state",
            "current state of the module on this node",
            labels=["module", "state"],
        )
        transitions = CounterMetricFamily(
            "rampart_module_transitions",
            "state transitions since rampartd started",
            labels=["module"],
        )
        custom: dict[str, GaugeMetricFamily] = {}
        for name, slot in sorted(d.slots.items()):
            version = str(getattr(slot.runner.module, "version", "")) if slot.runner else ""
            info.add_metric([name, slot.kind, version], 1)
            current = slot.state_name()
            for candidate in sorted(set(STATES.get(slot.kind, ())) | {current}):
                state.add_metric([name, candidate], 1 if candidate == current else 0)
            transitions.add_metric([name], slot.transitions)
            for key, value in d.metrics(name).items():
                _add_custom(custom, name, key, value)
        yield info
        yield state
        yield transitions
        yield from custom.values()
        subscribers = GaugeMetricFamily("rampart_journal_subscribers", "events/watch readers")
        subscribers.add_metric([], d.journal.subscriber_count)
        yield subscribers
        # Labelled families (peers, RTT per network, replication, buckets, checkers).
        yield from node_metrics.families(d.config.node, __version__, node_metrics.views(d))


def _add_custom(families: dict[str, GaugeMetricFamily], module: str, key: str, value: Any) -> None:
    name = metric_name(key)
    if isinstance(value, dict):
        family = families.get(name)
        if family is None:
            family = families[name] = GaugeMetricFamily(name, key, labels=["module", "key"])
        for label, inner in value.items():
            number = _number(inner)
            if number is not None:
                family.add_metric([module, str(label)], number)
        return
    number = _number(value)
    if number is None:
        return
    family = families.get(name)
    if family is None:
        family = families[name] = GaugeMetricFamily(name, key, labels=["module"])
    family.add_metric([module], number)


def render(daemon: Daemon) -> tuple[bytes, str]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(daemon))
    return generate_latest(registry), CONTENT_TYPE_LATEST
