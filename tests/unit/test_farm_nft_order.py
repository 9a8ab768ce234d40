"""The farm filter's cheap paths: foreign SYNs before conntrack, invalid packets first."""

from __future__ import annotations

from node_service.farm.buckets import BUCKETS
from node_service.farm.nft import FarmFilter, FilterRule, build, parse_counters

MATCH = "ip daddr { 198.51.100.201 } tcp dport { 80 }"
SYN = "tcp flags & (fin | syn | rst | ack) == syn"


def script(owned: frozenset[int], protocol: str = "tcp") -> str:
    rule = FilterRule(protocol, (80,), "ip_port")
    return build(FarmFilter("web", ("198.51.100.201",), (rule,), 0xABC, owned)).text


def chain(text: str, name: str) -> list[str]:
    lines = text.split(f"\tchain {name} {{\n", 1)[1].split("\n\t}", 1)[0].splitlines()
    return [line.strip() for line in lines[1:]]


def test_foreign_syns_are_dropped_at_raw_priority_by_their_bucket():
    text = script(frozenset(range(0, 100)))
    assert "type filter hook prerouting priority raw; policy accept;" in text
    assert chain(text, "early") == [
        f"{MATCH} {SYN} jhash ip saddr . tcp sport mod 256 seed 0x00000abc {{ 100-255 }} "
        'counter drop comment "dropped syn tcp 80"'
    ]


def test_owning_nothing_drops_every_syn_early_and_owning_all_drops_none():
    assert chain(script(frozenset()), "early") == [
        f'{MATCH} {SYN} counter drop comment "dropped syn tcp 80"'
    ]
    assert chain(script(frozenset(range(BUCKETS))), "early") == []


def test_udp_is_never_dropped_before_conntrack():
    # A UDP packet of another bucket may be a flow this node holds.
    assert chain(script(frozenset({1}), "udp"), "early") == []


def test_invalid_packets_are_dropped_first_then_established_then_owned():
    rules = chain(script(frozenset({1})), "prerouting")
    comments = [line.rsplit('comment "', 1)[1].rstrip('"') for line in rules]
    assert comments == ["dropped invalid tcp 80", "established tcp 80", "owned tcp 80",
                        "dropped tcp 80"]  # fmt: skip
    assert rules[0] == f'{MATCH} ct state invalid counter drop comment "dropped invalid tcp 80"'


def test_every_drop_rule_counts_as_dropped():
    listing = {"nftables": [
        {"rule": {"comment": c, "expr": [{"counter": {"packets": n, "bytes": 0}}]}}
        for c, n in (("dropped syn tcp 80", 2), ("dropped invalid tcp 80", 3),
                     ("dropped tcp 80", 4), ("established tcp 80", 5), ("owned tcp 80", 1))
    ]}  # fmt: skip
    import json

    assert parse_counters(json.dumps(listing)) == {"established": 5, "owned": 1, "dropped": 9}
