"""Farm modules: crash to every bucket served again, and the filter's cost on new connections.

One 3-node lab (fixed name, so the same bucket map and client ports every run):

1. **Crash → all buckets served**, with the farm template's heartbeat
   settings (250 ms / 2000 ms, read from resources/templates/farm), and as
   information with the model's default (250 ms / 3000 ms, what mirror
   modules keep) and a fast profile (100 ms / 1000 ms). The client
   holds one source port per bucket (256, found by asking the kernel's jhash,
   see ``farmlab.bucket_sources``) and opens one new connection from each,
   all at once, every 50 ms. A node gets a power cut (`rampart lab crash`);
   the figure is the time from the last round fully served before the
   crash to the end of the first round fully served after it (so it can
   only overstate). Five trials, each crashing the next node; the victim
   is booted and every node must be UP with one map before the next.
   Baseline: the heartbeat timeout, the silence after which a peer is
   declared lost. The survivors' journals give the detection part alone.
2. **Connection rate through the filter vs filter off**: new connections
   (8 at a time) to the VIP with the farm UP on 3 nodes, against the same
   with the module's nft tables (ip and the netdev ingress drop) deleted on
   every node and the VIP interface of two nodes down (one node holds the
   VIP, nothing filters). The switch is done by hand (saved tables loaded
   back, once no node holds buckets beyond its own) so the two can
   alternate quickly: 60 short runs of each, interleaved, medians compared
   (the machine is shared and noisy; single runs vary 2-10x). The SYN
   counters prove the filter was on, the ingress counters where the other
   nodes dropped. Judged, in the same cycles: one node owning every bucket
   (its filter as its runner loads it) while the other two drop every
   client packet at ingress, so every node filters every frame but one
   application answers, as with the filter off; the 3-owner figure is
   information (three applications on this machine's 2 CPUs).
"""

from __future__ import annotations

import dataclasses
import math
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bench.farmlab import Farm, FarmLab, RoundResult, Source, farm_lab, wait_until
from bench.figures import AtLeastFigure, Figure, failed, median
from node_service.demo import DemoError
from node_service.errors import RampartError
from node_service.farm import nft
from node_service.farm.buckets import BUCKETS, module_seed
from node_service.module import templates

LAB = "benchfm"
TRIALS = 5
CRASH_LIMIT_S = 3.0
RATE_LIMIT = 0.9
MODEL_DEFAULT_PROFILE = (250, 3000)  # information: what a mirror module keeps
FAST_PROFILE = (100, 1000)
CANDIDATE_PORTS = range(20000, 24000)  # P(some bucket missed) ~ 256 * exp(-4000/256) < 1e-4
PROBE_TIMEOUT_S = 0.3  # below the 1 s SYN retransmit, so a dropped SYN is a failure
PROBE_EVERY_S = 0.05
PROBE_MAX_S = 40.0
ROUNDS_BEFORE_CRASH = 3
RATE_CONNECTIONS = 300  # per run; short runs, many of them, interleaved
RATE_CONCURRENCY = 8
RATE_WARMUP = 30
RATE_CYCLES = 60  # single runs vary 2-10x on this shared machine: medians of 60, not 40
RATE_TIMEOUT_S = 2.0
HELD_TIMEOUT_S = 150.0  # a gracefully closed flow's entry lasts 120 s (TIME_WAIT)
RATE_PORTS = (30000, 62000)  # client ports cycle in this range (reused ports are reset, not closed)

CRASH_NAME = "farm: crash to all 256 buckets served again, {} {} ms / {} ms (median of 5)"
TEMPLATE_SETTINGS = "farm template settings"
OTHER_SETTINGS = "heartbeat"
RATE_NAME = (
    f"farm: new connections/s through the filter, 3 nodes (median of {RATE_CYCLES} runs of "
    f"{RATE_CONNECTIONS:,}, {RATE_CONCURRENCY} at a time)"
)
Part = Callable[[FarmLab], list[Figure]]
ALONE_NAME = (
    "farm: new connections/s, one node owning every bucket, the other two dropping every client "
    f"packet at ingress (the filter's cost; median of {RATE_CYCLES})"
)


# -- pure: reading the rounds ---------------------------------------------------------


@dataclass(frozen=True)
class Outage:
    """From ``down_from`` (the crash, at the earliest) to every bucket served again."""

    seconds: float | None
    down_from: float
    reason: str


def crash_outage(rounds: Sequence[RoundResult], asked: float) -> Outage:
    """What the client's rounds say about a crash run at ``asked`` (monotonic).

    The crash happened after the last fully served round started (and after
    ``asked``, when `lab crash` was run); service was back at the latest when
    the first fully served round after a failing one ended. Rounds started
    before ``asked`` cannot show the crash and are ignored for the failure.
    """
    first_fail = next(
        (i for i, r in enumerate(rounds) if r.started >= asked and not r.served), None
    )
    if first_fail is None:
        return Outage(None, asked, "no round with a failed connection after the crash")
    before = [r for r in rounds[:first_fail] if r.served]
    down_from = max(asked, before[-1].started) if before else asked
    back = next((r for r in rounds[first_fail:] if r.served), None)
    failures = sum(1 for r in rounds[first_fail:] if not r.served)
    if back is None:
        return Outage(
            None, down_from, f"{failures} round(s) with failures and none fully served since"
        )
    lost = sum(a is None for a in rounds[first_fail].answers)
    return Outage(
        back.ended - down_from,
        down_from,
        f"{lost} of {len(rounds[first_fail].answers)} buckets unserved in the first failing "
        f"round, {failures} round(s) with failures",
    )


def recovered(asked: list[float], probing: threading.Event) -> Callable[[list[RoundResult]], bool]:
    """Stop the rounds once the crash (asked[0], set by the other thread) is over.

    ``probing`` is set once a few rounds were served: the crash may come.
    """

    def done(rounds: list[RoundResult]) -> bool:
        if sum(r.served for r in rounds) >= ROUNDS_BEFORE_CRASH:
            probing.set()
        return bool(asked) and crash_outage(rounds, asked[0]).seconds is not None

    return done


def detection_s(entries: Sequence[dict], victim: str, crashed_at: float) -> float | None:
    """Seconds from ``crashed_at`` (wall clock) to a journal's "bucket map: VICTIM lost"."""
    seen = [
        float(e["ts"]) - crashed_at
        for e in entries
        if f"bucket map: {victim} lost" in str(e.get("message", ""))
        and float(e.get("ts", 0)) >= crashed_at
    ]
    return min(seen) if seen else None


def template_profile() -> tuple[int, int]:
    """The farm template's heartbeat interval and timeout (ms): what a new farm module gets."""
    failover = templates.load("farm").failover
    return failover.heartbeat_interval_ms, failover.heartbeat_timeout_ms


def crash_name(profile: tuple[int, int], template: tuple[int, int]) -> str:
    label = TEMPLATE_SETTINGS if profile == template else OTHER_SETTINGS
    return CRASH_NAME.format(label, *profile)


def crash_detail(notes: Sequence[str], interval_ms: int, timeout_ms: int, judged: bool) -> str:
    """The trials, and what detection alone costs with these heartbeat settings."""
    low, high = (timeout_ms - interval_ms) / 1000, (timeout_ms + interval_ms) / 1000
    detail = "; ".join(notes)
    detail += (
        f"\n    a peer is declared lost once {timeout_ms / 1000:g} s passed since its last "
        f"heartbeat (sent every {interval_ms} ms, silence checked every {interval_ms} ms), so "
        f"detection alone takes {low:g}-{high:g} s after a crash"
    )
    if judged:
        detail += (
            "; these are the farm template's settings (a farm's false failover only moves new "
            "connections of one node's buckets, so it ships a shorter timeout than a mirror)"
        )
    elif (interval_ms, timeout_ms) == MODEL_DEFAULT_PROFILE:
        detail += (
            "; information only: the model's default, kept by mirror modules; with it detection "
            "alone reaches 3 s about half the time, so the 3 s limit could not be met"
        )
    else:
        detail += "; information only (the 3 s limit applies to the farm template's settings)"
    return detail


# -- side effects: crash trials -------------------------------------------------------------


def wait_all_served(lab: FarmLab, farm: Farm, sources: Sequence[Source]) -> None:
    """Every bucket's connection answered, by every node between them (bounded)."""

    def whole() -> bool:
        answers = lab.client.connect(farm, sources, PROBE_TIMEOUT_S, len(sources))
        return None not in answers and set(answers) == set(farm.nodes)

    wait_until(whole, 30.0, f"farm {farm.name}: every bucket served by its own node")


def crash_once(
    lab: FarmLab, farm: Farm, sources: Sequence[Source], victim: str
) -> tuple[float, str]:
    """Crash ``victim`` under the client's rounds, boot it back: seconds (inf: n/a), note."""
    wait_all_served(lab, farm, sources)
    asked: list[float] = []
    probing = threading.Event()
    future = lab.client.rounds(
        farm, sources, PROBE_TIMEOUT_S, PROBE_EVERY_S, recovered(asked, probing),
        int(PROBE_MAX_S / PROBE_EVERY_S),
    )  # fmt: skip
    if not probing.wait(10.0):
        future.result(timeout=PROBE_MAX_S + 30)  # raises if the client failed
        raise DemoError(f"farm {farm.name}: the client's rounds were not served before the crash")
    asked.append(time.monotonic())
    lab.driver.rampart("lab", "crash", victim)
    outage = crash_outage(future.result(timeout=PROBE_MAX_S + 30), asked[0])
    crashed_wall = outage.down_from + (time.time() - time.monotonic())
    found = [
        detection_s(lab.events(node, farm), victim, crashed_wall)
        for node in farm.nodes
        if node != victim
    ]
    detected = min((d for d in found if d is not None), default=None)
    lab.driver.rampart("lab", "boot", victim)
    lab.wait_serving(farm)
    if outage.seconds is None:
        return math.inf, f"{victim}: n/a ({outage.reason})"
    lost = "not journaled" if detected is None else f"{detected:.2f} s"
    note = f"{victim}: {outage.seconds:.2f} s (peer lost after {lost}; {outage.reason})"
    return outage.seconds, note


def crash_figure(lab: FarmLab, farm: Farm, template: tuple[int, int]) -> Figure:
    sources = lab.bucket_sources(farm, CANDIDATE_PORTS)
    trials = [
        crash_once(lab, farm, sources, farm.nodes[trial % len(farm.nodes)])
        for trial in range(TRIALS)
    ]
    profile = (farm.heartbeat_interval_ms, farm.heartbeat_timeout_ms)
    judged = profile == template
    return Figure(
        crash_name(profile, template),
        median([seconds for seconds, _ in trials]),
        "s",
        farm.heartbeat_timeout_s,
        "heartbeat timeout",
        CRASH_LIMIT_S if judged else None,
        detail=crash_detail([note for _, note in trials], *profile, judged),
    )


# -- the filter switch (pure: the scripts each node runs) ------------------------------------


@dataclass(frozen=True)
class FilterSwitch:
    """How to turn a running farm's filter off and back on by hand, node by node.

    ``tables`` are the nodes' ip tables as the runners loaded them and
    ``ingress`` their netdev tables (the drop before IP; "" when a node has
    none), put back as they were, so the runners' idea of what is loaded
    stays true; ``links`` the VIP interfaces of the nodes other than ``keep``.
    """

    table: str
    vip: str
    keep: str
    tables: dict[str, str]
    links: dict[str, str]
    alone: str  # the nft script owning every bucket, for ``keep`` (as the runner would load it)
    ingress: dict[str, str]
    drop_all: dict[str, str]  # nodes but ``keep``: own nothing, drop every client at ingress

    def _replace(self, family: str, text: str) -> str:
        return f"table {family} {self.table}\ndelete table {family} {self.table}\n{text}"

    def off(self) -> dict[str, tuple[str, str]]:
        """No table anywhere (one transaction for both); the VIP interface down but on ``keep``."""
        drop = self._replace("ip", "") + self._replace("netdev", "")
        scripts = {}
        for node in self.tables:
            down = "" if node == self.keep else f"ip link set {self.links[node]} down\n"
            scripts[node] = (f"{down}nft -f -", drop)
        return scripts

    def one_owner(self) -> dict[str, tuple[str, str]]:
        """``keep`` owns every bucket; the others drop every client packet at ingress.

        Every node receives every frame and filters it as in a farm, but one
        application answers: the filter's whole cost without the
        application spread over three nodes. The drop table goes in before
        the link comes up, so no other node answers a client meanwhile.
        """
        scripts = {self.keep: ("nft -f -", self.alone)}
        for node, text in self.drop_all.items():
            scripts[node] = (f"nft -f -\nip link set {self.links[node]} up", text)
        return scripts

    def on(self) -> dict[str, tuple[str, str]]:
        """Each node's own table again, then the VIP interfaces up."""
        scripts = {}
        for node, text in self.tables.items():
            load = self._replace("ip", text) + self._replace("netdev", self.ingress.get(node, ""))
            up = "" if node == self.keep else f"\nip link set {self.links[node]} up"
            scripts[node] = (f"nft -f -{up}", load)
        return scripts

    @staticmethod
    def look() -> str:
        """What ``seen`` reads: the tables, then addresses on interfaces that are up."""
        return "nft list tables\necho ==\nip -4 -o addr show up"

    def seen(self, outputs: dict[str, str]) -> tuple[list[str], list[str], list[str]]:
        """Nodes with the ip table, with the ingress table, with the VIP up, from ``look``."""
        tabled, ingress, holders = [], [], []
        for node, out in sorted(outputs.items()):
            tables, _, addresses = out.partition("==\n")
            if f"table ip {self.table}" in tables.splitlines():
                tabled.append(node)
            if f"table netdev {self.table}" in tables.splitlines():
                ingress.append(node)
            if f" {self.vip}/" in addresses:
                holders.append(node)
        return tabled, ingress, holders

    def with_ingress(self) -> list[str]:
        """Nodes whose saved filter has an ingress table."""
        return sorted(node for node, text in self.ingress.items() if text)


# -- side effects: connection rate -----------------------------------------------------------


class Ports:
    """Client source ports for the rate runs, cycling through RATE_PORTS."""

    def __init__(self) -> None:
        self.next = RATE_PORTS[0]

    def take(self, count: int) -> int:
        if self.next + count > RATE_PORTS[1]:
            self.next = RATE_PORTS[0]
        first, self.next = self.next, self.next + count
        return first


def rate_once(lab: FarmLab, farm: Farm, ports: Ports) -> float:
    """New connections per second (after a warm-up); every one must be answered."""
    address = lab.client_address
    first = ports.take(RATE_WARMUP + RATE_CONNECTIONS)
    warm = [(address, first + i) for i in range(RATE_WARMUP)]
    lab.client.connect(farm, warm, RATE_TIMEOUT_S, RATE_CONCURRENCY)
    sources = [(address, first + RATE_WARMUP + i) for i in range(RATE_CONNECTIONS)]
    seconds, answers = lab.client.timed(farm, sources, RATE_TIMEOUT_S, RATE_CONCURRENCY)
    lost = sum(a is None for a in answers)
    if lost:
        raise DemoError(f"farm {farm.name}: {lost} of {len(sources)} connections unanswered")
    return len(sources) / seconds


def settled(lab: FarmLab, farm: Farm) -> bool:
    """No node keeps flows beyond its own buckets or guards any: the filters are stable.

    A runner reloads its filter when either changes, which would undo the
    switch between runs.
    """
    states = [lab.state(n, farm) for n in farm.nodes]
    return all(s.get("held") == 0 and s.get("guarded", 0) == 0 for s in states)


def prepare_switch(lab: FarmLab, farm: Farm, keep: str) -> FilterSwitch:
    # Buckets moved by the crash trials stay let through on their old owner
    # until its flows' conntrack entries expire (reset ones: 10 s).
    wait_until(lambda: settled(lab, farm), HELD_TIMEOUT_S,
               f"farm {farm.name}: no node holding buckets beyond its own")  # fmt: skip
    tables = {n: nft.listing(farm.name, nft=lab.nft_command(n)) for n in farm.nodes}
    ingress = {
        n: nft.listing(farm.name, nft=lab.nft_command(n), family="netdev") for n in farm.nodes
    }
    missing = [n for n, text in tables.items() if not text]
    if missing:
        raise DemoError(f"farm {farm.name}: no filter table on {', '.join(missing)}")
    rule = nft.FilterRule("tcp", (farm.port,), "ip_port")
    whole = nft.FarmFilter(farm.name, (farm.vip,), (rule,), module_seed(farm.name),
                           frozenset(range(BUCKETS)))  # fmt: skip
    links = {n: lab.vip_device(n, farm) for n in farm.nodes if n != keep}
    devices = {}
    for node in farm.nodes:
        found = re.search(r'device "([^"]+)"', ingress[node])
        if not found:
            raise DemoError(f"farm {farm.name}: no ingress table on {node}")
        devices[node] = found[1]
    drop_all = {}
    for node in links:
        none = dataclasses.replace(whole, owned=frozenset(), device=devices[node], held=frozenset())
        drop_all[node] = nft.build(none).text
    # The owner's gate at its interface, as its runner loads it once the map is
    # stable: no conntrack, and with every bucket owned nothing to hash.
    alone = nft.build(dataclasses.replace(whole, device=devices[keep], held=frozenset())).text
    return FilterSwitch(lab.table(farm), farm.vip, keep, tables, links, alone, ingress, drop_all)


def switch(lab: FarmLab, change: FilterSwitch, scripts: dict[str, tuple[str, str]],
           tabled: list[str], ingress: list[str], holders: list[str]) -> None:  # fmt: skip
    """Run ``scripts``, then check who has the tables and who holds the VIP."""
    lab.shell_all(scripts)
    seen = change.seen(lab.shell_all({n: (change.look(), "") for n in change.tables}))
    if seen != (tabled, ingress, holders):
        raise DemoError(
            f"filter switch: table on {seen[0] or 'no node'}, ingress table on "
            f"{seen[1] or 'no node'} and VIP up on {seen[2] or 'no node'}; expected table on "
            f"{tabled or 'no node'}, ingress table on {ingress or 'no node'}, VIP up on {holders}"
        )


def counted(lab: FarmLab, farm: Farm, ports: Ports) -> tuple[float, dict[str, int], int, int]:
    """Rate through the filter, SYNs accepted per node, packets dropped (of them at ingress)."""
    before = {n: lab.counters(n, farm) for n in farm.nodes}
    rate = rate_once(lab, farm, ports)
    after = {n: lab.counters(n, farm) for n in farm.nodes}
    owned = {n: after[n]["owned"] - before[n]["owned"] for n in farm.nodes}
    dropped = sum(after[n]["dropped"] - before[n]["dropped"] for n in farm.nodes)
    ingress = sum(after[n]["ingress"] - before[n]["ingress"] for n in farm.nodes)
    total = RATE_CONNECTIONS + RATE_WARMUP
    if sum(owned.values()) != total:
        raise DemoError(
            f"farm {farm.name}: the filters accepted {sum(owned.values())} SYNs for {total} "
            "connections: expected each SYN accepted by exactly one node"
        )
    return rate, owned, dropped, ingress


def rate_figures(lab: FarmLab, farm: Farm) -> list[Figure]:
    keep = farm.nodes[0]
    nodes = sorted(farm.nodes)
    change = prepare_switch(lab, farm, keep)
    ports = Ports()
    ons: list[float] = []
    offs: list[float] = []
    alones: list[float] = []
    owned: dict[str, int] = dict.fromkeys(farm.nodes, 0)
    dropped = at_ingress = 0
    for _ in range(RATE_CYCLES):
        rate, accepted, lost, early = counted(lab, farm, ports)
        ons.append(rate)
        owned = {n: owned[n] + accepted[n] for n in owned}
        dropped += lost
        at_ingress += early
        switch(lab, change, change.off(), [], [], [keep])
        try:
            offs.append(rate_once(lab, farm, ports))
            switch(lab, change, change.one_owner(), nodes, nodes, nodes)
            alones.append(rate_once(lab, farm, ports))
        finally:
            switch(lab, change, change.on(), nodes, change.with_ingress(), nodes)
    wait_until(lambda: lab.serving(farm), 30.0, f"farm {farm.name} unchanged after the runs")

    def runs(rates: list[float]) -> str:
        return ", ".join(f"{r:.0f}" for r in rates)

    shares = ", ".join(f"{n} {c}" for n, c in owned.items())
    detail = (
        f"runs (conn/s), interleaved: filter on {runs(ons)}; filter off {runs(offs)}; "
        f"one node owning all buckets, the others dropping at ingress {runs(alones)}"
        f"\n    filter on: SYNs accepted per node {shares} (sum {sum(owned.values())} = "
        f"connections made, warm-ups included); {dropped} packets dropped by the other nodes' "
        f"filters, {at_ingress} of them at ingress (before IP and conntrack)"
        f"\n    filter off: no {change.table} table on any node, VIP interface up on {keep} only"
        "\n    every packet reaches all three nodes (one LAN, shared MAC) and the lab's nodes "
        "share this machine's CPUs, so the other nodes' drops are paid here too"
    )
    paired = median([on / off for on, off in zip(ons, offs, strict=True)])
    detail += f"\n    median of the {len(ons)} adjacent on/off ratios: {paired:.2f}"
    base = median(offs)
    # The judged figure holds the number of answering applications constant:
    # filter on with one owner (the other two nodes receiving and dropping every
    # frame, as in the farm) against filter off (one node, no table). The 3-node
    # figure also moves the application onto three nodes that share this
    # machine's 2 CPUs with each other and the client, which measures the lab,
    # not the filter (docs/dev/bench.md "Farm"); it is printed as information.
    alone = AtLeastFigure(
        ALONE_NAME, median(alones), "conn/s", base, "filter off (one node holds the VIP)",
        RATE_LIMIT, detail=detail,
    )  # fmt: skip
    on = Figure(
        RATE_NAME, median(ons), "conn/s", base, "filter off", None,
        detail="information only: three applications answer, on three lab nodes that share "
        "this machine's 2 CPUs; on separate machines they add CPUs instead",
    )  # fmt: skip
    return [alone, on]


# -- the benchmark ------------------------------------------------------------------------------


def run() -> list[Figure]:
    figures: list[Figure] = []
    template = template_profile()
    with farm_lab(LAB) as lab:
        vips = lab.status["vip_pool"]
        farms: dict[str, Farm] = {}

        def template_crash(lab: FarmLab) -> list[Figure]:
            farms["farm"] = lab.deploy("farm", vips[0], 8080, *template)
            return [crash_figure(lab, farms["farm"], template)]

        def rate(lab: FarmLab) -> list[Figure]:
            return rate_figures(lab, farms["farm"])

        def other_crash(name: str, vip: str, port: int, profile: tuple[int, int]) -> Part:
            def part(lab: FarmLab) -> list[Figure]:
                # One farm at a time: the lab's 2 CPUs are the figure's noise.
                for running in list(farms):
                    for node in farms[running].nodes:
                        lab.on(node, "stop", "-m", running)
                    del farms[running]
                farms[name] = lab.deploy(name, vip, port, *profile)
                return [crash_figure(lab, farms[name], template)]

            return part

        parts: list[tuple[str, Part]] = [
            (crash_name(template, template), template_crash),
            (ALONE_NAME, rate),
            (crash_name(MODEL_DEFAULT_PROFILE, template),
             other_crash("farmdefault", vips[1], 8081, MODEL_DEFAULT_PROFILE)),
            (crash_name(FAST_PROFILE, template),
             other_crash("farmfast", vips[2], 8082, FAST_PROFILE)),
        ]  # fmt: skip
        for index, (name, part) in enumerate(parts):
            try:
                figures += part(lab)
            except (RampartError, OSError, ValueError, KeyError, TimeoutError) as exc:
                # The later parts need the lab in a known state: report, and stop here.
                figures.append(failed(name, f"could not run: {exc}"))
                figures += [
                    failed(later, "not run: an earlier farm step failed")
                    for later, _ in parts[index + 1 :]
                ]
                break
    return figures
