"""One case per validation rule: the exact line and the key words of the message.

Each case edits one spot of a valid base document (tests/unit/test_userconfig.py
MIRROR or FARM) and expects exactly one problem, on the line of the element
that is wrong.
"""

from __future__ import annotations

import pytest

from node_service.errors import Problem
from node_service.module import validate
from node_service.module.model import Module, Node
from tests.unit.test_userconfig import FARM, MIRROR, edit, problems

M, F = MIRROR, FARM
CASES = [
    # module
    ("name", M, 'name="web"', 'name="Web"', 2, ["module name 'Web' is invalid", "lowercase"]),
    ("name-length", M, 'name="web"', f'name="{"a" * 41}"', 2, ["is invalid", "up to 39"]),
    (
        "kind",
        M,
        'kind="mirror"',
        'kind="cluster"',
        2,
        ["kind 'cluster' is unknown", "mirror or farm"],
    ),
    ("version", M, 'version="1"', 'version="1 beta"', 2, ["version '1 beta' is invalid"]),
    # nodes
    (
        "mirror-two-nodes",
        M,
        '    <node name="n2">\n      <address>198.51.100.12</address>\n'
        "      <address>203.0.113.12</address>\n    </node>\n",
        "",
        3,
        ["exactly 2 nodes; found 1"],
    ),
    (
        "farm-two-nodes",
        F,
        '    <node name="n2">\n      <address>198.51.100.12</address>\n    </node>\n'
        '    <node name="n3">\n      <address>198.51.100.13</address>\n    </node>\n',
        "",
        3,
        ["at least 2 nodes; found 1"],
    ),
    ("node-name", M, 'node name="n2"', 'node name="n 2"', 8, ["node name 'n 2' is invalid"]),
    ("node-unique", M, 'node name="n2"', 'node name="n1"', 8, ["'n1' is used twice", "unique"]),
    (
        "node-address-ip",
        M,
        "<address>198.51.100.12</address>",
        "<address>host-b</address>",
        9,
        ["'host-b' is not an IP address", "IPv4 or IPv6"],
    ),
    (
        "node-address-shared",
        M,
        "<address>198.51.100.12</address>",
        "<address>198.51.100.11</address>",
        9,
        ["198.51.100.11 is already an address of node 'n1'"],
    ),
    (
        "node-address-count",
        M,
        "      <address>203.0.113.12</address>\n",
        "",
        3,
        ["different numbers of heartbeat addresses"],
    ),
    (
        "node-no-address",
        F,
        '<node name="n3">\n      <address>198.51.100.13</address>\n    </node>',
        '<node name="n3"/>',
        10,
        ["'n3' has no <address>"],
    ),
    ("weight-range", F, 'weight="2"', 'weight="0"', 4, ["weight 0 is out of range", "1 to 1000"]),
    ("weight-mirror", M, 'node name="n1"', 'node name="n1" weight="2"', 4, ["farm nodes only"]),
    # virtual IPs
    (
        "farm-needs-vip",
        F,
        '  <vips>\n    <vip address="198.51.100.201"/>\n  </vips>\n',
        "",
        2,
        ["farm module needs a <vip>"],
    ),
    (
        "vip-ip",
        M,
        'vip address="198.51.100.200"',
        'vip address="vip1"',
        14,
        ["'vip1' is not an IP"],
    ),
    (
        "vip-is-node-address",
        M,
        'vip address="198.51.100.200"',
        'vip address="203.0.113.12"',
        14,
        ["203.0.113.12 is the address of node 'n2'"],
    ),
    (
        "vip-twice",
        M,
        '    <vip address="198.51.100.200" prefix="24"/>\n',
        '    <vip address="198.51.100.200" prefix="24"/>\n    <vip address="198.51.100.200"/>\n',
        15,
        ["198.51.100.200 is listed twice"],
    ),
    ("vip-prefix", M, 'prefix="24"', 'prefix="33"', 14, ["prefix 33 is out of range", "1 to 32"]),
    (
        "vip-interface",
        M,
        'prefix="24"',
        'prefix="24" interface="eth/0"',
        14,
        ["'eth/0' is not an interface name"],
    ),
    # replication
    (
        "mirror-needs-replication",
        M,
        '  <replication mode="sync">\n    <dir path="/srv/web"/>\n  </replication>\n',
        "",
        2,
        ["mirror module needs <replication>"],
    ),
    (
        "replication-on-farm",
        F,
        "  <farm>\n",
        '  <replication>\n    <dir path="/srv/a"/>\n  </replication>\n  <farm>\n',
        17,
        ["<replication> is for mirror modules only"],
    ),
    (
        "mode",
        M,
        'mode="sync"',
        'mode="fast"',
        16,
        ["mode 'fast' is unknown", "sync, semi or async"],
    ),
    (
        "no-dirs",
        M,
        '  <replication mode="sync">\n    <dir path="/srv/web"/>\n  </replication>\n',
        '  <replication mode="sync"/>\n',
        16,
        ["has no <dir>"],
    ),
    ("dir-relative", M, 'path="/srv/web"', 'path="srv/web"', 17, ["is relative", "absolute"]),
    ("dir-root", M, 'path="/srv/web"', 'path="/"', 17, ["/ cannot be replicated"]),
    ("dir-root-dots", M, 'path="/srv/web"', 'path="/srv/.."', 17, ["/ cannot be replicated"]),
    (
        "dir-normalised",
        M,
        'path="/srv/web"',
        'path="/srv/../srv/web/"',
        17,
        ["is not normalised", "'/srv/web'"],
    ),
    (
        "dir-twice",
        M,
        '    <dir path="/srv/web"/>\n',
        '    <dir path="/srv/web"/>\n    <dir path="/srv/web"/>\n',
        18,
        ["/srv/web is listed twice"],
    ),
    (
        "dir-nested",
        M,
        '    <dir path="/srv/web"/>\n',
        '    <dir path="/srv/web"/>\n    <dir path="/srv/web/logs"/>\n',
        18,
        ["/srv/web/logs is inside /srv/web", "do not nest"],
    ),
    # farm
    (
        "farm-needs-farm",
        F,
        '  <farm>\n    <rule ports="80,443" protocol="tcp" criterion="ip_port"/>\n  </farm>\n',
        "",
        2,
        ["farm module needs <farm>"],
    ),
    (
        "farm-on-mirror",
        M,
        "  <checkers>\n",
        '  <farm>\n    <rule ports="80"/>\n  </farm>\n  <checkers>\n',
        19,
        ["<farm> is for farm modules only"],
    ),
    (
        "farm-no-rules",
        F,
        '  <farm>\n    <rule ports="80,443" protocol="tcp" criterion="ip_port"/>\n  </farm>\n',
        "  <farm/>\n",
        17,
        ["<farm> has no <rule>"],
    ),
    ("protocol", F, 'protocol="tcp"', 'protocol="sctp"', 18, ["'sctp' is unknown", "tcp or udp"]),
    ("criterion", F, 'criterion="ip_port"', 'criterion="port"', 18, ["criterion 'port'"]),
    ("ports-syntax", F, 'ports="80,443"', 'ports="80-90"', 18, ["not a list of ports"]),
    ("ports-empty", F, 'ports="80,443"', 'ports=""', 18, ["rule has no ports"]),
    ("port-range", F, 'ports="80,443"', 'ports="80,70000"', 18, ["port 70000 is out of range"]),
    (
        "port-two-rules",
        F,
        '    <rule ports="80,443" protocol="tcp" criterion="ip_port"/>\n',
        '    <rule ports="80,443" protocol="tcp" criterion="ip_port"/>\n'
        '    <rule ports="443" protocol="tcp"/>\n',
        19,
        ["port tcp/443 is already in the rule on line 18"],
    ),
    # checkers
    ("interval", M, 'port="80"/>', 'port="80" interval="0"/>', 20, ["interval 0 is out of"]),
    (
        "timeout-below-interval",
        M,
        'port="80"/>',
        'port="80" interval="2" timeout="2"/>',
        20,
        ["timeout 2s is not below its interval 2s", "timeout < interval"],
    ),
    ("failures", M, 'port="80"/>', 'port="80" failures="0"/>', 20, ["failures 0 is out of range"]),
    ("tcp-address", M, 'tcp address="198.51.100.200"', 'tcp address="web"', 20, ["'web' is not"]),
    ("tcp-port", M, 'port="80"', 'port="0"', 20, ["tcp checker port 0 is out of range"]),
    ("ping-target", M, "<tcp address", '<ping target="gw"/>\n    <tcp address', 20, ["'gw'"]),
    (
        "interface-name",
        M,
        "<tcp address",
        '<interface name="a b"/>\n    <tcp address',
        20,
        ["'a b'"],
    ),
    (
        "process-pattern",
        M,
        "<tcp address",
        '<process pattern="  "/>\n    <tcp address',
        20,
        ["pattern is empty"],
    ),
    (
        "process-restarts",
        M,
        "<tcp address",
        '<process pattern="x" restarts="-1"/>\n    <tcp address',
        20,
        ["restarts -1 is out of range", "0 to 100"],
    ),
    (
        "process-window",
        M,
        "<tcp address",
        '<process pattern="x" window="0"/>\n    <tcp address',
        20,
        ["window 0"],
    ),
    (
        "script-checker-name",
        M,
        "<tcp address",
        '<script name="../x"/>\n    <tcp address',
        20,
        ["'../x' is not a file name in bin/"],
    ),
    (
        "script-checker-lifecycle",
        M,
        "<tcp address",
        '<script name="start_prim"/>\n    <tcp address',
        20,
        ["'start_prim' is a lifecycle script"],
    ),
    # scripts
    ("scripts-timeout", M, '<scripts timeout="60"/>', '<scripts timeout="-5"/>', 22, ["-5"]),
    (
        "script-not-run",
        M,
        '<scripts timeout="60"/>',
        '<scripts timeout="60">\n    <script name="start_both" timeout="5"/>\n  </scripts>',
        23,
        ["'start_both' is not run by a mirror module", "start_prim"],
    ),
    (
        "script-twice",
        M,
        '<scripts timeout="60"/>',
        '<scripts timeout="60">\n    <script name="stop_prim" timeout="5"/>\n'
        '    <script name="stop_prim" timeout="6"/>\n  </scripts>',
        24,
        ["'stop_prim' has two timeouts"],
    ),
    # failover
    ("witness", M, 'failback="false"', 'witness="router"', 23, ["witness 'router' is not an IP"]),
    (
        "witness-node",
        M,
        'failback="false"',
        'witness="198.51.100.11"',
        23,
        ["witness 198.51.100.11 is a node address", "third party"],
    ),
    (
        "heartbeat-interval",
        M,
        'failback="false"',
        'heartbeat_interval_ms="5"',
        23,
        ["heartbeat_interval_ms 5 is out of range"],
    ),
    (
        "heartbeat-timeout",
        M,
        'failback="false"',
        'heartbeat_interval_ms="1000" heartbeat_timeout_ms="1500"',
        23,
        ["heartbeat_timeout_ms 1500 is less than twice heartbeat_interval_ms 1000", ">= 2 x"],
    ),
]


@pytest.mark.parametrize(
    ("base", "old", "new", "line", "words"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_rule(base: str, old: str, new: str, line: int, words: list[str]) -> None:
    found = problems(edit(base, old, new))
    assert len(found) == 1, found
    assert found[0].startswith(f"userconfig.xml:{line}: "), found[0]
    for word in words:
        assert word in found[0]


def test_check_works_on_a_model_without_lines() -> None:
    m = Module("web", "mirror", nodes=(Node("a", ("10.0.0.1",)),))
    found = validate.check(m)
    assert Problem("userconfig.xml", None, "a mirror module has exactly 2 nodes; found 1") in found
    assert all(p.line is None for p in found)
    assert any("needs <replication>" in p.message for p in found)


def test_unchanged_bases_are_valid() -> None:
    from node_service.module import userconfig

    assert userconfig.parse(MIRROR.encode()).kind == "mirror"
    assert userconfig.parse(FARM.encode()).kind == "farm"
