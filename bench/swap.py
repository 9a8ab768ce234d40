"""Clean swap: the outage a client sees when `rampart swap` moves the PRIM.

Three swaps (back and forth), median, two figures from the same swaps:

- the client-visible outage (first failed GET of the VIP to the first
  success again, the new primary answering): the limit (2 s) applies here;
- the time from issuing `rampart swap` (CLI included) to the first answer
  of the new primary: what an operator waits for; information only.

Baseline, measured in the same lab: the application's own scripts run by
hand, `stop_prim` on one node then `start_prim` on the other (copies of
the module's scripts on a scratch port and directory, timed inside each
host so the CLI is not counted). The ratio is what Rampart adds on top of
the application's own stop and start.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

from bench.figures import Figure, median
from bench.labs import finish, in_host, mirror_lab
from node_service.demo import DemoError, LabDriver, find_outage

SWAPS = 3
LIMIT_S = 2.0
BASELINE_PORT = 8080
NAME = "clean swap: client-visible outage (median of 3)"
NAME_COMMAND = "clean swap: `rampart swap` to the new primary answering (median of 3)"
BASELINE = "stop_prim + start_prim by hand"

# Runs one script inside a host and prints how long it took (monotonic clock).
TIMER = """
import json, os, subprocess, sys, time
start = time.monotonic()
done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
print(json.dumps({"seconds": time.monotonic() - start, "exit": done.returncode,
                  "stderr": done.stderr[-300:]}))
"""


def run() -> list[Figure]:
    times: list[float] = []
    outages: list[float] = []
    with mirror_lab("benchsw") as setup:
        lab = setup.lab
        prim, second = lab.roles()
        baselines = [script_baseline(lab, setup.src, setup.work, prim, second) for _ in range(3)]
        for _ in range(SWAPS):
            probe = lab.start_probe(30.0)
            try:
                probe.wait_serving(15.0)
                asked = time.monotonic()
                lab.on(prim, "swap", "-m", "web")
                outage = find_outage(probe.samples(40.0), since=asked)
            finally:
                probe.stop()
            served = outage.recovered if outage.after == second else None
            times.append(math.inf if served is None else served - asked)
            outages.append(math.inf if outage.seconds is None else outage.seconds)
            prim, second = lab.roles()
    detail = (
        f"outages: {', '.join(f'{o:.2f}' for o in outages)} s; command to new primary: "
        f"{', '.join(f'{t:.2f}' for t in times)} s; scripts by hand: "
        f"{', '.join(f'{b:.2f}' for b in baselines)} s"
    )
    baseline = median(baselines)
    return [
        Figure(NAME, median(outages), "s", baseline, BASELINE, LIMIT_S, detail=detail),
        Figure(NAME_COMMAND, median(times), "s", baseline, BASELINE, None),
    ]


def script_baseline(lab: LabDriver, src: Path, work: Path, prim: str, second: str) -> float:
    """`stop_prim` on ``prim`` then `start_prim` on ``second``, timed inside each host."""
    copies = {node: _script_copy(lab, src, work, node) for node in (prim, second)}
    _script(lab, copies, prim, "start_prim")
    try:
        seconds = _script(lab, copies, prim, "stop_prim") + _script(
            lab, copies, second, "start_prim"
        )
    finally:
        _script(lab, copies, second, "stop_prim")
        _script(lab, copies, prim, "stop_prim")
    return seconds


def _script_copy(lab: LabDriver, src: Path, work: Path, node: str) -> Path:
    """The module's scripts with a scratch port, data and run dir (the module keeps serving)."""
    copy = work / f"baseline-{node}"
    if not copy.exists():
        shutil.copytree(src, copy)
        address = next(n["addresses"][0] for n in lab.status["nodes"] if n["name"] == node)
        (copy / "app.env").write_text(
            f"HTTP_ADDRESS={address}\nHTTP_PORT={BASELINE_PORT}\n"
            f"DATA_DIR={copy / 'data'}\nRUN_DIR={copy / 'run'}\n"
        )
    return copy


def _script(lab: LabDriver, copies: dict[str, Path], node: str, script: str) -> float:
    env = [
        "env", "RAMPART_MODULE=web-baseline", f"RAMPART_MODULE_DIR={copies[node]}",
        f"RAMPART_NODE={node}", "RAMPART_STATE=PRIM", f"RAMPART_ACTION={script}",
    ]  # fmt: skip
    argv = ["-c", TIMER, *env, str(copies[node] / "bin" / script)]
    proc = in_host(lab, node, argv)
    result = json.loads(finish(proc, f"{script} on {node}", 60.0).splitlines()[-1])
    if result["exit"] != 0:
        raise DemoError(f"{script} on {node} failed: {result['stderr'].strip()}")
    return float(result["seconds"])
