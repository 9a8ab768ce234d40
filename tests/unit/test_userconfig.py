"""userconfig.xml: reading, safety, the reader's strictness and the model helpers."""

from __future__ import annotations

from pathlib import Path

import pytest

from node_service.errors import ModuleError, ValidationError
from node_service.module import userconfig
from node_service.module.model import (
    Failover,
    FarmRule,
    InterfaceChecker,
    Node,
    PingChecker,
    ProcessChecker,
    ScriptChecker,
    TcpChecker,
    VirtualIP,
)

# Line numbers matter: tests assert them. Keep each element on its own line.
MIRROR = """\
<?xml version="1.0" encoding="UTF-8"?>
<module name="web" kind="mirror" version="1">
  <nodes>
    <node name="n1">
      <address>198.51.100.11</address>
      <address>203.0.113.11</address>
    </node>
    <node name="n2">
      <address>198.51.100.12</address>
      <address>203.0.113.12</address>
    </node>
  </nodes>
  <vips>
    <vip address="198.51.100.200" prefix="24"/>
  </vips>
  <replication mode="sync">
    <dir path="/srv/web"/>
  </replication>
  <checkers>
    <tcp address="198.51.100.200" port="80"/>
  </checkers>
  <scripts timeout="60"/>
  <failover failback="false"/>
</module>
"""

FARM = """\
<?xml version="1.0" encoding="UTF-8"?>
<module name="web" kind="farm">
  <nodes>
    <node name="n1" weight="2">
      <address>198.51.100.11</address>
    </node>
    <node name="n2">
      <address>198.51.100.12</address>
    </node>
    <node name="n3">
      <address>198.51.100.13</address>
    </node>
  </nodes>
  <vips>
    <vip address="198.51.100.201"/>
  </vips>
  <farm>
    <rule ports="80,443" protocol="tcp" criterion="ip_port"/>
  </farm>
</module>
"""


def edit(doc: str, old: str, new: str) -> bytes:
    assert doc.count(old) == 1, f"{old!r} must occur once in the base document"
    return doc.replace(old, new).encode()


def problems(data: bytes) -> list[str]:
    with pytest.raises(ValidationError) as info:
        userconfig.parse(data)
    return info.value.lines()


def only_problem(data: bytes) -> str:
    lines = problems(data)
    assert len(lines) == 1, lines
    return lines[0]


def test_mirror_reads_into_the_model() -> None:
    m = userconfig.parse(MIRROR.encode())
    assert (m.name, m.kind, m.version, m.description) == ("web", "mirror", "1", "")
    assert m.nodes == (
        Node("n1", ("198.51.100.11", "203.0.113.11")),
        Node("n2", ("198.51.100.12", "203.0.113.12")),
    )
    assert m.vips == (VirtualIP("198.51.100.200", 24, None),)
    assert m.replication is not None and m.replication.dirs == ("/srv/web",)
    assert m.replication_mode == "sync"
    assert m.farm is None
    assert m.checkers == (TcpChecker(address="198.51.100.200", port=80),)
    assert m.failover == Failover(False, None, 250, 3000)


def test_farm_reads_weights_rules_and_defaults() -> None:
    m = userconfig.parse(FARM.encode())
    assert [n.weight for n in m.nodes] == [2, 1, 1]
    assert m.vips == (VirtualIP("198.51.100.201", 24),)
    assert m.farm is not None and m.farm.rules == (FarmRule((80, 443), "tcp", "ip_port"),)
    assert m.replication is None
    assert m.scripts.timeout == 60


def test_every_checker_kind_reads_with_its_settings() -> None:
    data = edit(
        MIRROR,
        '    <tcp address="198.51.100.200" port="80"/>\n',
        '    <tcp address="198.51.100.200" port="80" interval="1.5" timeout="0.5" failures="2"/>\n'
        '    <ping target="198.51.100.1"/>\n'
        '    <interface name="eth0"/>\n'
        '    <process pattern="nginx: master" restarts="5" window="120"/>\n'
        '    <script name="check_app" interval="10" timeout="9"/>\n',
    )
    checkers = userconfig.parse(data).checkers
    assert checkers == (
        TcpChecker(address="198.51.100.200", port=80, interval=1.5, timeout=0.5, failures=2),
        PingChecker(target="198.51.100.1"),
        InterfaceChecker(interface="eth0"),
        ProcessChecker(pattern="nginx: master", restarts=5, window=120.0),
        ScriptChecker(script="check_app", interval=10.0, timeout=9.0),
    )
    assert [c.label for c in checkers] == [
        "tcp 198.51.100.200:80",
        "ping 198.51.100.1",
        "interface eth0",
        "process nginx: master",
        "script check_app",
    ]


def test_description_whitespace_is_folded() -> None:
    data = edit(
        MIRROR, "  <nodes>\n", "  <description>\n  Web   site\n  </description>\n  <nodes>\n"
    )
    assert userconfig.parse(data).description == "Web site"


def test_ipv6_addresses_are_stored_in_normal_form() -> None:
    data = edit(MIRROR, 'address="198.51.100.200" prefix="24"', 'address="2001:DB8:0::200"')
    m = userconfig.parse(data)
    assert m.vips == (VirtualIP("2001:db8::200", 64),)


def test_module_helpers() -> None:
    m = userconfig.parse(
        edit(
            MIRROR,
            '<scripts timeout="60"/>',
            '<scripts timeout="30">\n    <script name="stop_prim" timeout="90"/>\n  </scripts>',
        )
    )
    assert m.node("n2").lan_address == "198.51.100.12"
    assert m.peer_of("n1").name == "n2"
    assert [n.name for n in m.peers_of("n2")] == ["n1"]
    assert m.script_timeout("stop_prim") == 90
    assert m.script_timeout("start_prim") == 30
    assert m.lifecycle_scripts == ("prestart", "start_prim", "stop_prim", "poststop")
    assert m.heartbeat_interval == 0.25 and m.heartbeat_timeout == 3.0
    with pytest.raises(ModuleError, match="no node named 'n9'; its nodes are n1, n2"):
        m.node("n9")


def test_peer_of_is_mirror_only() -> None:
    m = userconfig.parse(FARM.encode())
    with pytest.raises(ModuleError, match="only a mirror has one peer"):
        m.peer_of("n1")
    assert len(m.peers_of("n1")) == 2


# -- safety and malformed documents --------------------------------------------------


def test_dtd_is_refused_not_expanded() -> None:
    data = b'<?xml version="1.0"?>\n<!DOCTYPE module [<!ENTITY x "y">]>\n<module/>'
    line = only_problem(data)
    assert line.startswith("userconfig.xml:2: ")
    assert "DTDs and entity declarations are refused" in line


def test_billion_laughs_is_refused() -> None:
    lol = "".join(
        f'<!ENTITY lol{i} "{f"&lol{i - 1};" * 10}">' if i else '<!ENTITY lol0 "lol">'
        for i in range(10)
    )
    data = f'<?xml version="1.0"?><!DOCTYPE module [{lol}]><module name="&lol9;"/>'.encode()
    line = only_problem(data)
    assert line.startswith("userconfig.xml:1: ") and "refused" in line


def test_external_entity_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("do not read")
    data = (
        f'<?xml version="1.0"?>\n<!DOCTYPE module [<!ENTITY x SYSTEM "file://{secret}">]>\n'
        '<module name="&x;" kind="mirror"/>'
    ).encode()
    line = only_problem(data)
    assert "refused" in line and "do not read" not in line


def test_not_xml() -> None:
    line = only_problem(b"name: web\nkind: mirror\n")
    assert line.startswith("userconfig.xml:1: not well-formed XML (syntax error)")


def test_mismatched_tag_names_its_line() -> None:
    line = only_problem(b'<module name="a" kind="mirror">\n<nodes>\n</module>\n')
    assert line.startswith("userconfig.xml:3: not well-formed XML (mismatched tag)")


@pytest.mark.parametrize("data", [b"", b"   \n\n"])
def test_empty_file(data: bytes) -> None:
    assert only_problem(data) == (
        "userconfig.xml:1: the file is empty; expected a <module> document"
    )


def test_wrong_root() -> None:
    line = only_problem(b'<?xml version="1.0"?>\n\n<config name="a"/>\n')
    assert line == "userconfig.xml:3: the root element is <config>; expected <module>"


def test_oversized_file() -> None:
    line = only_problem(b" " * (userconfig.MAX_BYTES + 1))
    assert "expected at most" in line


def test_filename_is_used_in_problems() -> None:
    with pytest.raises(ValidationError) as info:
        userconfig.parse(b"<x/>", "mod/userconfig.xml")
    assert info.value.lines() == [
        "mod/userconfig.xml:1: the root element is <x>; expected <module>"
    ]


# -- strict reader: unknown or repeated things ------------------------------------------


def test_unknown_element_lists_what_is_allowed() -> None:
    line = only_problem(edit(MIRROR, "  <vips>\n", "  <vip>\n  </vip>\n  <vips>\n"))
    assert line.startswith("userconfig.xml:13: unknown element <vip> in <module>; allowed here:")
    assert "<description>, <nodes>, <vips>, <replication>" in line


def test_unknown_element_in_a_node() -> None:
    lines = problems(
        edit(MIRROR, "      <address>203.0.113.12</address>\n", "      <addr>203.0.113.12</addr>\n")
    )
    assert "userconfig.xml:10: unknown element <addr> in <node>; allowed here: <address>" in lines


def test_unknown_checker_lists_the_checker_kinds() -> None:
    line = only_problem(edit(MIRROR, "<tcp address", "<http address"))
    assert line.startswith("userconfig.xml:20: unknown element <http> in <checkers>")
    assert "<tcp>, <ping>, <interface>, <process>, <script>" in line


def test_unknown_attribute_lists_what_is_allowed() -> None:
    line = only_problem(edit(MIRROR, 'prefix="24"', 'prefix="24" netmask="255.255.255.0"'))
    assert line == (
        "userconfig.xml:14: <vip> has unknown attribute 'netmask'; allowed: address, prefix, "
        "interface"
    )


def test_missing_required_attribute() -> None:
    line = only_problem(
        edit(MIRROR, '<tcp address="198.51.100.200" port="80"/>', '<tcp address="198.51.100.200"/>')
    )
    assert line == "userconfig.xml:20: <tcp> lacks the attribute 'port'; it is required"


def test_attribute_that_is_not_a_number() -> None:
    line = only_problem(edit(MIRROR, 'port="80"', 'port="http"'))
    assert line.startswith("userconfig.xml:20: <tcp> port='http' is not a whole number")


def test_seconds_that_are_not_a_number() -> None:
    line = only_problem(edit(MIRROR, '<scripts timeout="60"/>', '<scripts timeout="1m"/>'))
    assert line.startswith("userconfig.xml:22: <scripts> timeout='1m' is not a number of seconds")


def test_boolean_must_be_true_or_false() -> None:
    line = only_problem(edit(MIRROR, 'failback="false"', 'failback="yes"'))
    assert line == (
        "userconfig.xml:23: <failover> failback='yes' is not a boolean; expected true or false"
    )


def test_section_twice() -> None:
    line = only_problem(
        edit(
            MIRROR,
            '  <scripts timeout="60"/>\n',
            '  <scripts timeout="60"/>\n  <scripts timeout="30"/>\n',
        )
    )
    assert line == "userconfig.xml:23: <scripts> appears twice in <module>; expected once"


def test_stray_text() -> None:
    line = only_problem(edit(MIRROR, "  <vips>\n", "  <vips>oops\n"))
    assert line == "userconfig.xml:13: unexpected text in <vips>; expected only elements"


def test_missing_nodes_section() -> None:
    data = b'<module name="a" kind="farm">\n  <farm>\n    <rule ports="80"/>\n  </farm>\n</module>'
    lines = problems(data)
    assert "userconfig.xml:1: <module> has no <nodes>" in lines[0]
    assert any("at least 2 nodes; found 0" in line for line in lines)
    assert any("needs a <vip>" in line for line in lines)


def test_all_problems_are_collected_in_line_order() -> None:
    data = edit(MIRROR, 'kind="mirror"', 'kind="mirror" colour="red"')
    data = data.replace(b'port="80"', b'port="0"').replace(b'<dir path="/srv/web"/>', b"<dir/>")
    lines = problems(data)
    assert [line.split(":")[1] for line in lines] == ["2", "17", "20"]


def test_validation_error_str_is_the_first_problem() -> None:
    with pytest.raises(ValidationError) as info:
        userconfig.parse(edit(MIRROR, 'port="80"', 'port="99999"'))
    assert str(info.value) == (
        "userconfig.xml:20: tcp checker port 99999 is out of range; expected 1 to 65535"
    )


# -- load_dir -------------------------------------------------------------------------


def test_load_dir_reads_userconfig(tmp_path: Path) -> None:
    (tmp_path / "userconfig.xml").write_text(MIRROR)
    assert userconfig.load_dir(tmp_path).name == "web"


def test_load_dir_without_userconfig(tmp_path: Path) -> None:
    with pytest.raises(ModuleError, match=r"no userconfig\.xml here; expected a module directory"):
        userconfig.load_dir(tmp_path)


def test_load_dir_names_the_file_in_problems(tmp_path: Path) -> None:
    (tmp_path / "userconfig.xml").write_bytes(edit(MIRROR, 'port="80"', 'port="0"'))
    with pytest.raises(ValidationError) as info:
        userconfig.load_dir(tmp_path)
    assert info.value.lines()[0].startswith(f"{tmp_path}/userconfig.xml:20: ")


def test_documented_examples_are_valid_and_canonical() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "userconfig.md").read_text()
    examples = [block.split("```", 1)[0] for block in doc.split("```xml\n")[1:]]
    assert len(examples) == 2
    kinds = []
    for text in examples:
        module = userconfig.parse(text.encode())
        assert userconfig.emit(module).decode() == text
        kinds.append(module.kind)
    assert kinds == ["mirror", "farm"]


def test_unknown_encoding_is_a_problem_not_a_traceback():
    from node_service.errors import ValidationError
    from node_service.module import userconfig

    data = b'<?xml version="1.0" encoding="bogus"?>\n<module/>\n'
    try:
        userconfig.parse(data)
    except ValidationError as exc:
        assert exc.lines() == [
            'userconfig.xml:1: unknown encoding: bogus; expected encoding="UTF-8" or no encoding'
        ]
    else:
        raise AssertionError("an unknown encoding must be refused")
