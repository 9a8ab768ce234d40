"""The farm benchmark's pure parts: reading the client's rounds, the filter switch, figures."""

from __future__ import annotations

import math
import threading

import pytest

from bench.farm import (
    AtLeastFigure,
    FilterSwitch,
    Ports,
    crash_detail,
    crash_name,
    crash_outage,
    detection_s,
    recovered,
    template_profile,
)
from bench.farmlab import RoundResult, one_source_per_bucket, oracle_ruleset, parse_marks
from node_service.demo import DemoError
from node_service.farm.buckets import BUCKETS, module_seed

OK = ("n1", "n2", "n3")
HURT = ("n1", None, "n3")


def rounds(*spec: tuple[float, tuple[str | None, ...]], length: float = 0.02) -> list[RoundResult]:
    return [RoundResult(t, t + length, answers) for t, answers in spec]


def test_outage_runs_from_the_last_served_round_to_the_end_of_the_first_served_again():
    seen = rounds((10.0, OK), (10.05, OK), (10.1, HURT), (10.45, HURT), (13.3, OK), (13.35, OK))
    outage = crash_outage(seen, asked=10.02)
    assert outage.down_from == 10.05
    assert outage.seconds == pytest.approx(13.32 - 10.05)
    assert outage.reason == (
        "1 of 3 buckets unserved in the first failing round, 2 round(s) with failures"
    )


def test_outage_never_starts_before_the_crash_was_asked():
    seen = rounds((10.0, OK), (10.3, HURT), (11.0, OK))
    assert crash_outage(seen, asked=10.2).down_from == 10.2


def test_failures_before_the_crash_are_not_the_crash():
    seen = rounds((9.0, HURT), (9.5, OK), (10.5, OK))
    outage = crash_outage(seen, asked=10.0)
    assert outage.seconds is None
    assert outage.reason == "no round with a failed connection after the crash"


def test_no_served_round_after_the_failures_is_not_measured():
    seen = rounds((10.0, OK), (10.5, HURT), (11.0, HURT))
    outage = crash_outage(seen, asked=10.2)
    assert outage.seconds is None
    assert outage.reason == "2 round(s) with failures and none fully served since"


def test_rounds_stop_only_after_the_crash_was_asked_and_is_over():
    probing = threading.Event()
    done = recovered(asked := [], probing)
    assert done(rounds((9.0, OK), (9.05, OK))) is False
    assert not probing.is_set()  # too few served rounds to crash yet
    seen = rounds((9.9, OK), (10.0, OK), (10.1, OK), (10.5, HURT), (11.0, OK))
    assert done(seen) is False  # the crash was not asked yet: keep probing
    assert probing.is_set()
    asked.append(10.2)
    assert done(seen) is True
    assert done(seen[:4]) is False


def test_detection_is_the_first_journal_entry_saying_the_victim_was_lost():
    entries = [
        {"ts": 99.0, "message": "bucket map: n2 lost; buckets over n1, n3"},  # an older crash
        {"ts": 103.1, "message": "bucket map: n2 lost; buckets over n1, n3"},
        {"ts": 102.9, "message": "bucket map: n3 lost; buckets over n1, n2"},
        {"ts": 103.0, "message": "n1 UP -> WAIT (checker failed)"},
    ]
    assert detection_s(entries, "n2", crashed_at=100.0) == pytest.approx(3.1)
    assert detection_s(entries, "n1", crashed_at=100.0) is None


def test_crash_detail_says_what_detection_alone_costs():
    template = crash_detail(["n1: 2.40 s"], 250, 2000, judged=True)
    assert "detection alone takes 1.75-2.25 s after a crash" in template
    assert "these are the farm template's settings" in template
    default = crash_detail(["n1: 3.30 s"], 250, 3000, judged=False)
    assert "2.75-3.25 s after a crash" in default
    assert "information only: the model's default, kept by mirror modules" in default
    fast = crash_detail(["n1: 1.30 s"], 100, 1000, judged=False)
    assert "0.9-1.1 s after a crash" in fast and "information only" in fast


def test_the_judged_crash_run_uses_the_farm_templates_settings():
    assert template_profile() == (250, 2000)
    assert crash_name((250, 2000), (250, 2000)) == (
        "farm: crash to all 256 buckets served again, farm template settings 250 ms / 2000 ms "
        "(median of 5)"
    )
    assert "heartbeat 250 ms / 3000 ms" in crash_name((250, 3000), (250, 2000))


def test_at_least_figure_passes_at_or_above_its_floor_and_prints_the_ratio():
    ok = AtLeastFigure("rate", 1800.0, "conn/s", 2000.0, "filter off", 0.9)
    assert ok.ok is True
    assert str(ok).startswith("rate: 1800 conn/s vs filter off 2000 conn/s (ratio 0.90)")
    assert "ok: ratio 0.90 >= limit 0.90" in str(ok)
    low = AtLeastFigure("rate", 1700.0, "conn/s", 2000.0, "filter off", 0.9)
    assert low.ok is False and "FAIL: ratio 0.85 < limit 0.90" in str(low)
    never = AtLeastFigure("rate", math.inf, "conn/s", 2000.0, "filter off", 0.9)
    assert never.ok is False and "not measured" in never.verdict


def switch() -> FilterSwitch:
    return FilterSwitch(
        table="rampart_farm_web",
        vip="198.51.100.200",
        keep="n1",
        tables={"n1": "table ip rampart_farm_web { }\n", "n2": "T2\n", "n3": "T3\n"},
        links={"n2": "rf2", "n3": "rf3"},
        alone="ALL BUCKETS\n",
        ingress={"n1": "", "n2": "I2\n", "n3": "I3\n"},
        drop_all={"n2": "D2\n", "n3": "D3\n"},
    )


DROP_BOTH = (
    "table ip rampart_farm_web\ndelete table ip rampart_farm_web\n"
    "table netdev rampart_farm_web\ndelete table netdev rampart_farm_web\n"
)


def test_filter_off_drops_every_table_and_the_other_nodes_vip_links():
    off = switch().off()
    # Both tables (the ip one and the ingress drop) go in one transaction.
    assert off["n1"] == ("nft -f -", DROP_BOTH)
    assert off["n2"] == ("ip link set rf2 down\nnft -f -", DROP_BOTH)
    assert set(off) == {"n1", "n2", "n3"}
    # One owner: the others' drop table first, then their VIP link up.
    assert switch().one_owner() == {
        "n1": ("nft -f -", "ALL BUCKETS\n"),
        "n2": ("nft -f -\nip link set rf2 up", "D2\n"),
        "n3": ("nft -f -\nip link set rf3 up", "D3\n"),
    }


def test_filter_on_loads_each_saved_table_in_one_transaction_then_raises_the_links():
    on = switch().on()
    assert on["n1"] == (
        "nft -f -",
        "table ip rampart_farm_web\ndelete table ip rampart_farm_web\n"
        "table ip rampart_farm_web { }\n"
        "table netdev rampart_farm_web\ndelete table netdev rampart_farm_web\n",
    )
    assert on["n3"][0] == "nft -f -\nip link set rf3 up"
    assert on["n3"][1].endswith("T3\ntable netdev rampart_farm_web\n"
                                "delete table netdev rampart_farm_web\nI3\n")  # fmt: skip
    assert switch().with_ingress() == ["n2", "n3"]


def test_seen_reads_tables_and_vip_holders_from_the_look_output():
    outputs = {
        "n1": "table ip rampart_farm_web\n==\n5: rf1    inet 198.51.100.200/24 scope global rf1\n",
        "n2": "table ip other\ntable netdev rampart_farm_web\n==\n"
        "2: eth0    inet 198.51.100.12/24 brd x scope global eth0\n",
        "n3": "==\n",
    }
    assert switch().seen(outputs) == (["n1"], ["n2"], ["n1"])


def test_client_ports_cycle_within_their_range():
    ports = Ports()
    first = ports.take(1000)
    assert ports.take(10) == first + 1000
    for _ in range(40):
        start = ports.take(3000)
        assert start >= 30000 and start + 3000 <= 62000


def test_conntrack_marks_give_one_port_per_bucket():
    lines = [
        f"ipv4 2 tcp 6 9 CLOSE src=198.51.100.100 dst=198.51.100.200 sport={20000 + i} "
        f"dport=8080 src=198.51.100.200 dst=198.51.100.100 sport=8080 dport={20000 + i} "
        f"[ASSURED] mark={(i * 7) % BUCKETS} zone=0 use=2"
        for i in range(2 * BUCKETS)
    ]
    lines.append("ipv4 2 tcp 6 9 CLOSE src=1.2.3.4 dst=198.51.100.201 sport=1 dport=8080 mark=3")
    marks = parse_marks("\n".join(lines), "198.51.100.200", 8080)
    assert len(marks) == 2 * BUCKETS and marks[20001] == 7
    sources = one_source_per_bucket("198.51.100.100", marks)
    assert len(sources) == BUCKETS
    assert all(marks[port] == bucket for bucket, (_, port) in enumerate(sources))
    assert sources[0] == ("198.51.100.100", 20000)  # the lowest port of bucket 0


def test_a_bucket_without_a_port_is_an_error_not_a_gap():
    marks = {20000 + b: b for b in range(BUCKETS - 1)}
    with pytest.raises(DemoError, match="reached only 255 of 256 buckets"):
        one_source_per_bucket("198.51.100.100", marks)


def test_the_oracle_stamps_the_farm_filters_own_hash_into_conntrack():
    from bench.farmlab import Farm

    farm = Farm("web", "198.51.100.200", 8080, ("n1",), 250, 3000)
    text = oracle_ruleset(farm)
    seed = module_seed("web")
    assert (
        f"ip daddr 198.51.100.200 tcp dport 8080 ct mark set jhash ip saddr . tcp sport "
        f"mod 256 seed 0x{seed:08x}" in text
    )
