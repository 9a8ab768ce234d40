"""Client-visible outage after a crash of the primary, with default settings.

Five times: the client probes the virtual IP every 50 ms, the PRIM host
gets a power cut (`rampart lab crash`), the SECOND takes over; the outage
is the client's first failure to its first success again. The crashed
node is booted and must come back as an up-to-date SECOND before the next
run, so each run starts from the same PRIM/SECOND pair (roles alternate).

Baseline: the module's configured heartbeat timeout (3 s by default), the
silence after which a peer is declared lost; the ratio shows what the
takeover costs on top of noticing the loss.
"""

from __future__ import annotations

import math
import time

from bench.figures import Figure, median
from bench.labs import mirror_lab
from node_service.demo import DemoError, LabDriver, find_outage

RUNS = 5
LIMIT_S = 5.0
PROBE_MAX_S = 60.0
NAME = "client-visible outage after a crash of the primary (median of 5)"


def run() -> list[Figure]:
    outages: list[float] = []
    stopped = ""
    with mirror_lab("benchfo") as setup:
        lab = setup.lab
        try:
            prim, second = lab.roles()
            for _ in range(RUNS):
                outages.append(crash_once(lab, prim, second))
                lab.rampart("lab", "boot", prim)
                prim, second = lab.roles()
        except DemoError as exc:
            # Keep the runs measured so far; the missing ones count as failures.
            stopped = f"; stopped after {len(outages)} run(s): {exc}"
    outages += [math.inf] * (RUNS - len(outages))
    runs = ", ".join("n/a" if math.isinf(o) else f"{o:.2f}" for o in outages)
    detail = (
        f"runs: {runs} s (client GET every 50 ms; a widely used peer defaults to 30 s plus "
        f"the application's start){stopped}"
    )
    baseline = setup.heartbeat_timeout_s
    return [Figure(NAME, median(outages), "s", baseline, "heartbeat timeout", LIMIT_S, detail)]


def crash_once(lab: LabDriver, prim: str, second: str) -> float:
    """Power-cut the PRIM with the probe running; the outage in seconds (inf: none seen)."""
    probe = lab.start_probe(PROBE_MAX_S)
    try:
        probe.wait_serving(15.0)
        crashed_at = time.monotonic()
        lab.rampart("lab", "crash", prim)
        lab.serving(nodes=[second])
        outage = find_outage(probe.samples(PROBE_MAX_S + 10), since=crashed_at)
    finally:
        probe.stop()
    return math.inf if outage.seconds is None else outage.seconds
