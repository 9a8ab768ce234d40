"""node.yaml: defaults, every bad field named with its line, unknown keys, missing file."""

from __future__ import annotations

from pathlib import Path

import pytest

from node_service.config import NodeConfig, load, parse
from node_service.errors import ConfigError

GOOD = """\
node: lab-n1
heartbeat_port: 7810
replication_port: 7811
api_socket: /run/rampart/api.sock
state_dir: /var/lib/rampart
trust_dir: /etc/rampart/trust
site_dir: /etc/rampart/site
log_level: info
"""


def test_full_file_parses_to_the_documented_values():
    config = parse(GOOD)
    assert config == NodeConfig(node="lab-n1")
    assert config.modules_dir == Path("/var/lib/rampart/modules")
    assert config.journal_path == Path("/var/log/rampart/journal.jsonl")


def test_only_node_is_required_and_everything_else_defaults():
    config = parse("node: n2\nlog_level: DEBUG\nlog_dir: /tmp/x\n")
    assert config.node == "n2"
    assert config.heartbeat_port == 7810
    assert config.log_level == "debug"
    assert config.journal_path == Path("/tmp/x/journal.jsonl")


def test_the_brief_example_is_exact():
    with pytest.raises(ConfigError) as info:
        parse("# rampart node\nnode: n1\nheartbeat_port: abc\n")
    assert str(info.value) == "node.yaml:3: heartbeat_port must be an integer 1-65535, got 'abc'"


@pytest.mark.parametrize(
    ("line", "text", "expected"),
    [
        (
            3,
            "heartbeat_port: abc",
            "node.yaml:3: heartbeat_port must be an integer 1-65535, got 'abc'",
        ),
        (3, "heartbeat_port: 70000", "heartbeat_port must be an integer 1-65535, got 70000"),
        (3, "replication_port: true", "replication_port must be an integer 1-65535, got True"),
        (3, "api_socket: run/api.sock", "api_socket must be an absolute path"),
        (3, "state_dir: [a, b]", "state_dir must be an absolute path, got 'seq'"),
        (3, "log_level: loud", "log_level must be one of debug, info, warning, error"),
        (3, "hearbeat_port: 7810", "unknown key 'hearbeat_port'; known keys: node,"),
        (3, "node: again", "node is set twice"),
    ],
)
def test_each_bad_field_is_refused_with_its_line(line, text, expected):
    source = f"# rampart node\nnode: n1\n{text}\n"
    with pytest.raises(ConfigError) as info:
        parse(source)
    message = str(info.value)
    assert message.startswith(f"node.yaml:{line}: ")
    assert expected in message
    assert "\n" not in message


def test_bad_node_name_is_refused():
    with pytest.raises(ConfigError, match=r"node.yaml:1: node must be a node name"):
        parse("node: 'has space'\n")


def test_missing_node_empty_file_and_not_a_mapping():
    with pytest.raises(ConfigError, match="missing 'node: NAME'"):
        parse("heartbeat_port: 7000\n")
    with pytest.raises(ConfigError, match="empty"):
        parse("# nothing\n")
    with pytest.raises(ConfigError, match=r"node.yaml:1: expected a mapping"):
        parse("- node: n1\n")


def test_broken_yaml_names_the_line():
    with pytest.raises(ConfigError, match=r"node.yaml:2: not valid YAML"):
        parse("node: n1\nheartbeat_port: 7810: x\n")


def test_load_reads_a_file_and_names_it(tmp_path):
    path = tmp_path / "custom.yaml"
    path.write_text("node: n1\nstate_dir: relative\n")
    with pytest.raises(ConfigError, match=r"^custom.yaml:2: state_dir must be an absolute path"):
        load(path)
    path.write_text("node: n1\nstate_dir: /srv/state\n")
    assert load(path).state_dir == Path("/srv/state")


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"node.yaml: no such file; create it"):
        load(tmp_path / "node.yaml")
