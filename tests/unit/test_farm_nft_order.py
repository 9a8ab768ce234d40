"""The farm filter's layout: a stateless TCP gate, guarded buckets, UDP after conntrack."""

from __future__ import annotations

import json

import pytest

from node_service.errors import UserError
from node_service.farm.buckets import BUCKETS
from node_service.farm.nft import FarmFilter, FilterRule, build, held_update, parse_counters

MATCH = "ip daddr { 198.51.100.201 } tcp dport { 80 }"
SYN = "tcp flags & (fin | syn | rst | ack) == syn"
NOT_SYN = "tcp flags & (fin | syn | rst | ack) != syn"
HASH = "jhash ip saddr . tcp sport mod 256 seed 0x00000abc"
TCP = FilterRule("tcp", (80,), "ip_port")
UDP = FilterRule("udp", (53,), "ip")


def script(owned: frozenset[int], *, device: str | None = "eth0", rules=(TCP,), held=frozenset(),
           flows=frozenset(), guarded=frozenset()) -> str:  # fmt: skip
    farm = FarmFilter("web", ("198.51.100.201",), rules, 0xABC, owned, device, held, flows, guarded)
    return build(farm).text


def chain(text: str, name: str) -> list[str]:
    if f"\tchain {name} {{\n" not in text:
        return []
    lines = text.split(f"\tchain {name} {{\n", 1)[1].split("\n\t}", 1)[0].splitlines()
    return [line.strip() for line in lines[1:]]


def test_the_tcp_gate_runs_at_ingress_held_flows_then_foreign_buckets_then_owned_syns():
    text = script(frozenset(range(0, 100)))
    assert 'type filter hook ingress device "eth0" priority filter; policy accept;' in text
    assert chain(text, "ingress") == [
        f"{MATCH} {NOT_SYN} ip saddr . tcp sport @held_flows counter accept comment "
        '"established tcp 80"',
        f'{MATCH} {HASH} {{ 100-255 }} counter drop comment "dropped ingress tcp 80"',
        f'{MATCH} {SYN} counter accept comment "owned tcp 80"',
    ]


def test_a_stable_tcp_farm_uses_no_conntrack_at_all():
    # No ct expression anywhere: conntrack is not even loaded for it.
    for owned in (frozenset(), frozenset({1, 2}), frozenset(range(BUCKETS))):
        text = script(owned)
        assert " ct " not in text and "notrack" not in text, text
    # The ip table is there (counters and set), but no hook of its own.
    assert "chain" not in script(frozenset({1})).split("table netdev")[0].split("{", 1)[1]


def test_owning_nothing_drops_every_packet_without_hashing_and_owning_all_drops_none():
    assert chain(script(frozenset()), "ingress")[1:] == [
        f'{MATCH} counter drop comment "dropped ingress tcp 80"'
    ]
    everything = chain(script(frozenset(range(BUCKETS))), "ingress")
    assert not any("drop" in line or "jhash" in line for line in everything)


def test_without_a_device_the_gate_runs_in_the_ip_table_at_raw_priority():
    text = script(frozenset(range(0, 100)), device=None)
    assert "hook ingress" not in text
    assert chain(text, "early") == chain(script(frozenset(range(0, 100))), "ingress")
    assert "type filter hook prerouting priority raw; policy accept;" in text


def test_held_flows_are_a_named_set_in_both_tables():
    flows = frozenset({("198.51.100.7", 40001), ("198.51.100.6", 5)})
    text = script(frozenset({1}), flows=flows)
    elements = "elements = { 198.51.100.6 . 5, 198.51.100.7 . 40001 }"
    assert text.count("set held_flows {") == 2 and text.count(elements) == 2


def test_a_change_of_held_flows_alone_updates_the_sets_in_place():
    flows = frozenset({("198.51.100.7", 40001)})
    farm = FarmFilter("web", ("198.51.100.201",), (TCP,), 0xABC, frozenset({1}), "eth0",
                      frozenset(), flows)  # fmt: skip
    assert held_update(farm).text.splitlines() == [
        "flush set ip rampart_farm_web held_flows",
        "add element ip rampart_farm_web held_flows { 198.51.100.7 . 40001 }",
        "flush set netdev rampart_farm_web held_flows",
        "add element netdev rampart_farm_web held_flows { 198.51.100.7 . 40001 }",
    ]
    empty = FarmFilter("web", ("198.51.100.201",), (TCP,), 0xABC, frozenset({1}), "eth0")
    assert "add element" not in held_update(empty).text


def test_guarded_buckets_get_conntrack_and_everything_else_stays_untracked():
    text = script(frozenset(range(0, 100)), guarded=frozenset(range(50, 60)))
    assert chain(text, "early") == [f"{MATCH} {HASH} {{ 0-49, 60-255 }} notrack"]
    # Replies are hashed on the client's side of the flow: the same bucket.
    assert chain(text, "replies") == [
        "ip saddr { 198.51.100.201 } tcp sport { 80 } jhash ip daddr . tcp dport mod 256 "
        "seed 0x00000abc { 0-49, 60-255 } notrack"
    ]
    guarded = f"{MATCH} {HASH} {{ 50-59 }}"
    assert chain(text, "prerouting") == [
        f"{guarded} ct state established,related accept",
        f"{guarded} ip saddr . tcp sport @held_flows accept",
        f"{guarded} {SYN} accept",
        f'{guarded} counter drop comment "dropped guarded tcp 80"',
    ]
    assert "type filter hook output priority raw; policy accept;" in text


def test_udp_keeps_conntrack_invalid_first_then_established_then_owned_marked():
    text = script(frozenset({1}), rules=(UDP,), held=frozenset({7}))
    rules = chain(text, "prerouting")
    comments = [line.rsplit('comment "', 1)[1].rstrip('"') for line in rules]
    assert comments == ["dropped invalid udp 53", "established udp 53", "owned udp 53",
                        "dropped udp 53"]  # fmt: skip
    assert "ct mark set jhash ip saddr mod 256 seed 0x00000abc offset 0x72660000" in rules[2]
    assert chain(text, "ingress") == [
        "ip daddr { 198.51.100.201 } udp dport { 53 } jhash ip saddr mod 256 seed 0x00000abc "
        '{ 0, 2-6, 8-255 } counter drop comment "dropped ingress udp 53"'
    ]
    assert "held_flows" not in text


def test_udp_with_every_bucket_held_has_no_ingress_table():
    text = script(frozenset({1}), rules=(UDP,), held=frozenset(range(BUCKETS)))
    assert text.endswith("table netdev rampart_farm_web\ndelete table netdev rampart_farm_web\n")


def test_every_drop_rule_counts_as_dropped():
    listing = {"nftables": [
        {"rule": {"comment": c, "expr": [{"counter": {"packets": n, "bytes": 0}}]}}
        for c, n in (("dropped guarded tcp 80", 2), ("dropped invalid udp 53", 3),
                     ("dropped ingress tcp 80", 4), ("established tcp 80", 5), ("owned tcp 80", 1))
    ]}  # fmt: skip
    assert parse_counters(json.dumps(listing)) == {"established": 5, "owned": 1, "dropped": 9}


def test_bad_device_and_bad_held_flow_are_one_line_user_errors():
    with pytest.raises(UserError, match="interface 'eth 0' is not an interface name"):
        script(frozenset(), device="eth 0")
    with pytest.raises(UserError, match=r"held flow \('198.51.100.300', 5\) is not"):
        script(frozenset(), flows=frozenset({("198.51.100.300", 5)}))
    with pytest.raises(UserError, match=r"held flow \('198.51.100.3', 0\) is not"):
        script(frozenset(), flows=frozenset({("198.51.100.3", 0)}))


def test_counters_of_a_family_listing_count_only_the_modules_table():
    def rule(family: str, table: str, comment: str, packets: int) -> dict:
        expr = [{"counter": {"packets": packets, "bytes": 0}}]
        return {"rule": {"family": family, "table": table, "comment": comment, "expr": expr}}

    listing = {"nftables": [
        rule("netdev", "rampart_farm_web", "dropped ingress tcp 80", 6),
        rule("netdev", "rampart_farm_web", "owned tcp 80", 2),
        rule("netdev", "rampart_farm_other", "dropped ingress tcp 81", 100),
        rule("inet", "rampart_farm_web", "dropped by somebody else", 7),
        rule("netdev", "rampart_mac_1234", "keep the shared MAC unknown to switches", 50),
    ]}  # fmt: skip
    counted = parse_counters(json.dumps(listing), "rampart_farm_web")
    assert counted == {"established": 0, "owned": 2, "dropped": 6}


def test_a_change_of_udp_held_buckets_alone_replaces_only_the_ingress_table():
    farm = FarmFilter("web", ("198.51.100.201",), (UDP,), 0xABC, frozenset({1}), "eth0",
                      frozenset())  # fmt: skip
    text = build(farm, ingress_only=True).text
    assert "table ip" not in text
    assert text.startswith("table netdev rampart_farm_web\ndelete table netdev rampart_farm_web\n")
    assert chain(text, "ingress") == chain(build(farm).text, "ingress")
