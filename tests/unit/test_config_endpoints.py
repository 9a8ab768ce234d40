"""node.yaml's optional TCP endpoints: metrics_listen and health_listen."""

from __future__ import annotations

import pytest

from node_service.api.http_endpoints import plan
from node_service.config import Listen, parse
from node_service.errors import ConfigError


def test_both_are_off_by_default():
    config = parse("node: n1\n")
    assert config.metrics_listen is None and config.health_listen is None
    assert plan(config) == {}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9810", Listen("127.0.0.1", 9810)),
        ('"0.0.0.0:9811"', Listen("0.0.0.0", 9811)),
        ('"[::1]:9810"', Listen("::1", 9810)),
        ("'[2001:DB8::1]:80'", Listen("2001:db8::1", 80)),
    ],
)
def test_ip_and_port_are_accepted_in_normal_form(text, expected):
    config = parse(f"node: n1\nmetrics_listen: {text}\n")
    assert config.metrics_listen == expected


def test_null_means_off():
    config = parse("node: n1\nmetrics_listen: null\nhealth_listen:\n")
    assert config.metrics_listen is None and config.health_listen is None


def test_listen_renders_as_written_and_as_a_url():
    assert str(Listen("::1", 9810)) == "[::1]:9810"
    assert Listen("127.0.0.1", 9811).url == "http://127.0.0.1:9811"


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("localhost:9810", "'localhost:9810'"),
        ("127.0.0.1", "'127.0.0.1'"),
        ("127.0.0.1:0", "'127.0.0.1:0'"),
        ("127.0.0.1:70000", "'127.0.0.1:70000'"),
        ("300.1.1.1:80", "'300.1.1.1:80'"),
        ('"::1:9810"', "'::1:9810'"),
        ('"[127.0.0.1]:80"', "'[127.0.0.1]:80'"),
        ("9810", "9810"),
        ("[127.0.0.1, 9810]", "'seq'"),
    ],
)
def test_bad_addresses_name_the_line_and_what_is_expected(value, shown):
    with pytest.raises(ConfigError) as info:
        parse(f"node: n1\n# metrics\nhealth_listen: {value}\n")
    message = str(info.value)
    assert message.startswith("node.yaml:3: health_listen must be IP:PORT, e.g. ")
    assert '"[::1]:9810" (quoted), or null for off' in message
    assert message.endswith(f", got {shown}")


def test_set_twice_is_refused():
    with pytest.raises(ConfigError, match=r"node.yaml:3: metrics_listen is set twice"):
        parse("node: n1\nmetrics_listen: 127.0.0.1:1\nmetrics_listen: 127.0.0.1:2\n")


def test_plan_groups_endpoints_by_address():
    same = parse("node: n1\nmetrics_listen: 127.0.0.1:9810\nhealth_listen: 127.0.0.1:9810\n")
    assert plan(same) == {Listen("127.0.0.1", 9810): ("metrics", "health")}
    apart = parse("node: n1\nmetrics_listen: 127.0.0.1:9810\nhealth_listen: 0.0.0.0:9811\n")
    assert plan(apart) == {
        Listen("127.0.0.1", 9810): ("metrics",),
        Listen("0.0.0.0", 9811): ("health",),
    }
