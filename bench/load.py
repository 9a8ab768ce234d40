"""No failover under load: both nodes under full CPU and disk load for 60 s.

Heartbeats must keep flowing while the machine is saturated: the daemon
runs on asyncio with replication in its own process, so a busy CPU or a
slow disk must never look like a dead peer. Each node runs ``bench.loadgen``
(a busy loop per CPU plus an fsync-heavy writer) while the client keeps
probing the virtual IP; afterwards the module's journal on both nodes is
read for state transitions in the window (one heartbeat timeout is added
at the end, so a loss noticed late still counts).

The value is the number of failovers (any state transition of the module
on either node); limit 0. The baseline is the load itself, as measured by
the load generator: CPU time it got and MB/s it wrote.
"""

from __future__ import annotations

import json
import time

from bench.figures import Figure
from bench.labs import finish, in_host, mirror_lab
from node_service.demo import DemoError, find_outage

LOAD_S = 60.0
# /srv is private to each lab host: the writer fills that node's own disk directory.
LOADGEN = ["-m", "bench.loadgen", "--dir", "/srv/rampart-bench-load"]
NAME = "failovers with both nodes under full CPU and disk load for 60 s"


def run() -> list[Figure]:
    with mirror_lab("benchld") as setup:
        lab = setup.lab
        prim, _ = lab.roles()
        tail_s = setup.heartbeat_timeout_s + 1.0
        probe = lab.start_probe(LOAD_S + tail_s, until_recovered=False)
        probe.wait_serving(15.0)
        began = time.time()
        loads = {
            node: in_host(lab, node, [*LOADGEN, "--seconds", f"{LOAD_S:g}"]) for node in lab.nodes
        }
        measured = {
            node: json.loads(finish(proc, f"load on {node}", LOAD_S + 90).splitlines()[-1])
            for node, proc in loads.items()
        }
        samples = probe.samples(LOAD_S + tail_s + 30)
        ended = time.time()
        transitions = [
            f"{entry['node']}: {entry['message']}"
            for node in lab.nodes
            for entry in lab.events(node, limit=1000)
            if entry.get("kind") == "transition" and began <= entry.get("ts", 0) <= ended
        ]
        after = lab.roles(timeout=30.0)
    failures = sum(not s.ok for s in samples)
    outage = find_outage(samples)
    cpu = sum(m["cpu_seconds_per_s"] for m in measured.values())
    disk = sum(m["disk_mb_per_s"] for m in measured.values())
    cpus = max(m["cpus"] for m in measured.values())
    load = (
        f"the load: {cpu:.2f} CPU-seconds/s on {cpus} CPU(s) and {disk:.0f} MB/s of fsync'd "
        f"writes, summed over {len(measured)} nodes"
    )
    detail = (
        f"PRIM {prim} before, {after[0]} after; client: {len(samples)} GETs, {failures} failed"
        + (f" ({outage.reason})" if failures else "")
        + "".join(f"\n    {t}" for t in transitions)
    )
    if after[0] != prim and not transitions:
        raise DemoError(f"the primary moved from {prim} to {after[0]} but no transition was seen")
    return [Figure(NAME, len(transitions), "", None, load, 0, detail=detail)]
