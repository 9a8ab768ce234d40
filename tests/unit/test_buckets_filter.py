"""Farm packet filter text (pure) and nft failures that need no kernel."""

from __future__ import annotations

import json
import sys

import pytest

from node_service.errors import UserError
from node_service.farm.buckets import bucket_map, owned_by
from node_service.farm.nft import (
    FarmFilter,
    FilterRule,
    PacketFilterError,
    apply,
    build,
    node_filter,
    parse_counters,
    removal,
    table_name,
)


def farm(**changes) -> FarmFilter:
    base = {
        "module": "web",
        "vips": ("198.51.100.200",),
        "rules": (FilterRule("tcp", (443, 80), "ip_port"),),
        "seed": 0xABC,
        "owned": frozenset({0, 1, 2, 3, 7, 9, 10, 255}),
    }
    return FarmFilter(**{**base, **changes})


def test_tcp_ruleset_lets_held_flows_through_drops_foreign_buckets_and_counts_owned_syns():
    text = build(farm(device="eth0")).text
    assert text.startswith("table ip rampart_farm_web\ndelete table ip rampart_farm_web\n")
    match = "ip daddr { 198.51.100.200 } tcp dport { 80, 443 }"
    assert (
        f"{match} jhash ip saddr . tcp sport mod 256 seed 0x00000abc {{ 4-6, 8, 11-254 }}"
        ' counter drop comment "dropped ingress tcp 80,443"'
    ) in text
    assert (
        f"{match} tcp flags & (fin | syn | rst | ack) == syn"
        ' counter accept comment "owned tcp 80,443"'
    ) in text
    assert text.index("established tcp") < text.index("dropped ingress") < text.index("owned tcp")


def test_udp_and_criterion_ip_hash_the_right_fields():
    text = build(farm(rules=(FilterRule("udp", (53,), "ip"),))).text
    assert "udp dport { 53 } jhash ip saddr mod 256 seed 0x00000abc" in text
    assert "tcp flags" not in text
    port_text = build(farm(rules=(FilterRule("udp", (53,), "ip_port"),))).text
    assert "jhash ip saddr . udp sport mod 256" in port_text
    ip_text = build(farm(rules=(FilterRule("tcp", (80,), "ip"),))).text
    assert "tcp dport { 80 } jhash ip saddr mod 256 seed 0x00000abc" in ip_text


def test_a_node_with_no_bucket_only_keeps_its_held_flows():
    text = build(farm(owned=frozenset(), device="eth0")).text
    assert "jhash" not in text
    assert "established tcp 80,443" in text and "dropped ingress tcp 80,443" in text
    assert "owned tcp" not in text


def test_node_filter_takes_the_nodes_buckets_from_the_map():
    owners = bucket_map({"a": 1, "b": 1}, {"a", "b"}, 5)
    mine = node_filter("web", ["198.51.100.200"], [FilterRule("tcp", (80,))], 5, owners, "a")
    assert mine.owned == owned_by(owners, "a")
    assert mine.vips == ("198.51.100.200",)


def test_table_names_are_nft_identifiers_and_never_collide():
    assert table_name("web") == "rampart_farm_web"
    assert table_name("web-1") != table_name("web_1")
    assert table_name("web-1").startswith("rampart_farm_web_1_")
    assert removal("web").text == (
        "table ip rampart_farm_web\ndelete table ip rampart_farm_web\n"
        "table netdev rampart_farm_web\ndelete table netdev rampart_farm_web\n"
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"vips": ()}, "farm module 'web' has no virtual IP: expected at least one IPv4 address"),
        ({"vips": ("2001:db8::1",)}, "farm module 'web': VIP '2001:db8::1' is not an IPv4 address"),
        ({"rules": (FilterRule("sctp", (80,)),)}, "protocol 'sctp' is not one of tcp, udp"),
        ({"rules": (FilterRule("tcp", (80,), "mac"),)}, "criterion 'mac' is not one of ip"),
        ({"rules": (FilterRule("tcp", (0,)),)}, "port 0 is not a port number 1-65535"),
        ({"rules": (FilterRule("tcp", ()),)}, "a tcp rule has no port"),
        ({"rules": ()}, "has no port rule"),
        ({"seed": 2**32}, "seed 4294967296 is not a 32-bit unsigned integer"),
        ({"owned": frozenset({256})}, "bucket 256 is not a bucket number 0-255"),
    ],
)
def test_bad_filter_input_is_a_one_line_user_error(changes, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build(farm(**changes))


def test_missing_nft_is_a_clear_error():
    with pytest.raises(PacketFilterError) as caught:
        apply(build(farm()), nft=["/nonexistent/nft"])
    assert str(caught.value) == (
        "farm module web: '/nonexistent/nft' not found; install nftables (apt install nftables)"
    )


def test_a_hanging_nft_is_cut_off_by_the_timeout():
    hang = [sys.executable, "-c", "import time; time.sleep(30)"]
    with pytest.raises(PacketFilterError, match=r"did not finish within 0\.5s"):
        apply(build(farm()), nft=hang, timeout=0.5)


def test_counters_are_summed_by_rule_kind():
    def rule(comment: str, packets: int) -> dict:
        expr = [{"counter": {"packets": packets, "bytes": 60 * packets}}, {"accept": None}]
        return {"rule": {"comment": comment, "expr": expr}}

    listing = {
        "nftables": [
            {"table": {"name": "rampart_farm_web"}},
            rule("established tcp 80", 7),
            rule("owned tcp 80", 3),
            rule("owned udp 53", 2),
            rule("dropped tcp 80", 11),
            rule("something else", 99),
        ]
    }
    assert parse_counters(json.dumps(listing)) == {"established": 7, "owned": 5, "dropped": 11}
