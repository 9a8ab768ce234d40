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


def ingress_script(owned: frozenset[int], held: frozenset[int], device: str | None = "eth0") -> str:
    rules = (FilterRule("tcp", (80,), "ip_port"), FilterRule("udp", (53,), "ip"))
    return build(FarmFilter("web", ("198.51.100.201",), rules, 0xABC, owned, device, held)).text


def test_ingress_drops_buckets_neither_owned_nor_held_before_ip():
    text = ingress_script(frozenset(range(0, 100)), frozenset({200}))
    # Both tables in one script: one nft transaction replaces both.
    assert text.index("table ip rampart_farm_web {") < text.index("table netdev rampart_farm_web {")
    assert 'type filter hook ingress device "eth0" priority filter; policy accept;' in text
    assert chain(text, "ingress") == [
        f"{MATCH} jhash ip saddr . tcp sport mod 256 seed 0x00000abc {{ 100-199, 201-255 }} "
        'counter drop comment "dropped ingress tcp 80"',
        "ip daddr { 198.51.100.201 } udp dport { 53 } jhash ip saddr mod 256 seed 0x00000abc "
        '{ 100-199, 201-255 } counter drop comment "dropped ingress udp 53"',
    ]


def test_ingress_with_nothing_owned_or_held_drops_every_farm_packet_without_hashing():
    assert chain(ingress_script(frozenset(), frozenset()), "ingress")[0] == (
        f'{MATCH} counter drop comment "dropped ingress tcp 80"'
    )


def test_no_ingress_table_without_a_device_or_with_every_bucket_let_through():
    for text in (
        ingress_script(frozenset({1}), frozenset(), device=None),
        ingress_script(frozenset({1}), frozenset(range(BUCKETS)) - {1}),
        script(frozenset({1})),  # held defaults to every bucket: nothing known yet
    ):
        # The netdev table is still deleted in the same transaction, so none is left over.
        netdev = "table netdev rampart_farm_web\ndelete table netdev rampart_farm_web\n"
        assert text.endswith(netdev)
        assert "hook ingress" not in text


def test_accepted_flows_carry_their_bucket_in_the_conntrack_mark():
    owned = next(ln for ln in chain(script(frozenset({1})), "prerouting") if "owned" in ln)
    assert "ct mark set jhash ip saddr . tcp sport mod 256 seed 0x00000abc offset 0x72660000" in (
        owned
    )


def test_a_bad_device_name_is_a_one_line_user_error():
    import pytest

    from node_service.errors import UserError

    with pytest.raises(UserError, match="interface 'eth 0' is not an interface name"):
        ingress_script(frozenset(), frozenset(), device="eth 0")


def test_counters_of_a_family_listing_count_only_the_modules_table():
    import json

    def rule(family: str, table: str, comment: str, packets: int) -> dict:
        expr = [{"counter": {"packets": packets, "bytes": 0}}]
        return {"rule": {"family": family, "table": table, "comment": comment, "expr": expr}}

    listing = {"nftables": [
        rule("netdev", "rampart_farm_web", "dropped ingress tcp 80", 6),
        rule("ip", "rampart_farm_web", "owned tcp 80", 2),
        rule("netdev", "rampart_farm_other", "dropped ingress tcp 81", 100),
        rule("inet", "rampart_farm_web", "dropped by somebody else", 7),
        rule("netdev", "rampart_mac_1234", "keep the shared MAC unknown to switches", 50),
    ]}  # fmt: skip
    counted = parse_counters(json.dumps(listing), "rampart_farm_web")
    assert counted == {"established": 0, "owned": 2, "dropped": 6}


def test_a_change_of_held_buckets_alone_replaces_only_the_ingress_table():
    rules = (FilterRule("tcp", (80,), "ip_port"),)
    farm = FarmFilter("web", ("198.51.100.201",), rules, 0xABC, frozenset({1}), "eth0", frozenset())
    text = build(farm, ingress_only=True).text
    assert "table ip" not in text
    assert text.startswith("table netdev rampart_farm_web\ndelete table netdev rampart_farm_web\n")
    assert chain(text, "ingress") == chain(build(farm).text, "ingress")
