"""Shared-MAC naming and the egress rewrite text (pure parts of farm.macvlan)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node_service.errors import UserError
from node_service.farm.macvlan import egress_ruleset, egress_table, link_name, plan, shared_mac


@given(st.text(min_size=1, max_size=40))
def test_shared_mac_is_unicast_locally_administered_and_stable(module):
    mac = shared_mac(module)
    first = int(mac.split(":")[0], 16)
    assert first & 0b01 == 0, "multicast bit must be clear"
    assert first & 0b10 == 0b10, "locally administered bit must be set"
    assert mac == shared_mac(module)
    assert len(link_name(module)) <= 15


def test_modules_get_different_macs_and_links():
    assert shared_mac("web") != shared_mac("shop")
    assert link_name("web") != link_name("shop")
    assert link_name("web").startswith("rf-")


def test_plan_names_everything_from_the_module():
    spec = plan("web", "eth0", [("198.51.100.200", 24)])
    assert spec.mac == shared_mac("web")
    assert spec.link == link_name("web")
    assert spec.vips == (("198.51.100.200", 24),)


@pytest.mark.parametrize(
    ("parent", "vips", "message"),
    [
        ("eth0 x", [("198.51.100.200", 24)], "interface 'eth0 x' is not an interface name"),
        ("a" * 16, [("198.51.100.200", 24)], "is not an interface name"),
        ("eth0", [], "has no virtual IP"),
        ("eth0", [("198.51.100.300", 24)], "VIP 198.51.100.300/24 is not an IPv4 address"),
        ("eth0", [("198.51.100.200", 33)], "VIP 198.51.100.200/33 is not an IPv4 address"),
    ],
)
def test_bad_shared_mac_input_is_a_one_line_user_error(parent, vips, message):
    with pytest.raises(UserError, match=message.replace(".", r"\.")):
        plan("web", parent, vips)


def test_egress_rewrite_replaces_only_the_shared_source_mac():
    spec = plan("web", "eth0", [("198.51.100.200", 24)])
    ruleset = egress_ruleset(spec, "02:00:00:00:00:aa")
    table = egress_table("web")
    assert ruleset.text.startswith(f"table netdev {table}\ndelete table netdev {table}\n")
    assert 'type filter hook egress device "eth0" priority filter; policy accept;' in ruleset.text
    assert f"ether saddr {spec.mac} ether saddr set 02:00:00:00:00:aa counter" in ruleset.text
    with pytest.raises(UserError, match="interface eth0 has MAC 'zz'"):
        egress_ruleset(spec, "zz")
