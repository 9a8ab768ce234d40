"""Dashboard matrix, action buttons and node command parsing (pure)."""

from __future__ import annotations

import json

import pytest

from app import dashboard
from app.nodes import (
    ModuleInfo,
    NodeError,
    NodeStatus,
    allowed,
    parse_action,
    parse_identity,
    parse_module_list,
    parse_states,
    parse_version,
)
from node_service.api.roles import Identity

ROOT = Identity(0, "root", frozenset())
OPERATOR = Identity(1000, "op", frozenset({"rampart-operator"}))
MONITOR = Identity(1001, "mon", frozenset({"rampart-monitor"}))


def status(name: str, identity: Identity | None = ROOT, **states: str) -> NodeStatus:
    return NodeStatus(
        name, True, "0.1.0",
        tuple(ModuleInfo(m, "1", "mirror", s) for m, s in states.items()),
        {m: {"module": m, "state": s, "since": 1000.0} for m, s in states.items()},
        identity, None, 1000.0,
    )  # fmt: skip


def test_matrix_has_a_cell_per_installed_module_and_node() -> None:
    statuses = {
        "n1": status("n1", web="PRIM", db="SECOND"),
        "n2": status("n2", web="SECOND"),
        "n3": NodeStatus("n3", False, error="node n3: cannot reach 198.51.100.13:22: timed out"),
    }
    m = dashboard.matrix(statuses)
    assert m.modules == ("db", "web") and m.nodes == ("n1", "n2", "n3")
    web_n1 = m.cell("web", "n1")
    assert web_n1 is not None and web_n1.colour == dashboard.STATE_COLOURS["PRIM"]
    assert web_n1.text(now=1195) == "PRIM for 3m15s"
    assert m.cell("db", "n2") is None  # not installed there
    lost = m.cell("web", "n3")
    assert lost is not None and lost.state == "unreachable" and not lost.reachable
    assert lost.reason.endswith("timed out")


def test_buttons_are_greyed_with_the_reason() -> None:
    assert dashboard.button(status("n1", OPERATOR, web="PRIM"), "web", "swap") == (
        True, "user op has rampart-operator: swap allowed",
    )  # fmt: skip
    assert dashboard.button(status("n1", MONITOR, web="PRIM"), "web", "stop") == (
        False, "user mon is not in rampart-operator or rampart-admin: stop needs operator rights",
    )  # fmt: skip
    assert dashboard.button(status("n1", ROOT, web="PRIM"), "db", "start") == (
        False, "db is not installed on n1",
    )  # fmt: skip
    assert dashboard.button(NodeStatus("n1", False, error="x"), "web", "start") == (
        False, "node n1 is unreachable",
    )  # fmt: skip
    assert allowed(None, "start") == (False, "node not checked yet")
    assert allowed(status("n1", None, web="PRIM"), "swap")[0] is True  # the node decides


def test_disruptive_actions_ask_first() -> None:
    assert dashboard.confirmation("start", "web", "n1") is None
    question = dashboard.confirmation("swap", "web", "n1")
    assert question == (
        "swap module web on n1? The application moves to the other node (short interruption)."
    )
    assert all(
        dashboard.confirmation(v, "web", "n1") for v in ("stop", "restart", "prim", "second")
    )


def test_duration_text() -> None:
    assert [dashboard.duration_text(s) for s in (5, 75, 7300, 90000)] == [
        "5s", "1m15s", "2h01m", "1d01h",
    ]  # fmt: skip


def test_parsers_read_the_node_commands() -> None:
    assert parse_version("n1", "rampart 0.1.0\n") == "0.1.0"
    with pytest.raises(NodeError, match="printed 'bash: hello'"):
        parse_version("n1", "bash: hello")
    web = {"name": "web", "version": "2", "kind": "mirror", "installed_at": 1, "state": "STOP"}
    bad = {"name": "bad", "version": "1", "kind": "farm", "state": "unsupported", "error": "x"}
    listed = json.dumps({"node": "n1", "modules": [web, bad]})
    assert parse_module_list("n1", listed) == (
        ModuleInfo("web", "2", "mirror", "STOP"),
        ModuleInfo("bad", "1", "farm", "unsupported", "x"),
    )
    with pytest.raises(NodeError, match=r"`rampart module list --json` did not print JSON"):
        parse_module_list("n1", "Traceback (most recent call last):")
    with pytest.raises(NodeError, match="has no modules list"):
        parse_states("n1", '{"node": "n1"}')
    assert parse_states("n1", '{"modules": [{"module": "web", "state": "PRIM"}]}') == {
        "web": {"module": "web", "state": "PRIM"}
    }
    assert parse_identity("n1", "1000\nop\nop rampart-operator\n") == OPERATOR.__class__(
        1000, "op", frozenset({"op", "rampart-operator"})
    )
    with pytest.raises(NodeError, match="cannot tell the login user's groups"):
        parse_identity("n1", "")


def test_parse_action_results() -> None:
    ok = parse_action(
        "n1", "web", "swap", 0, '{"reason": "swapped", "state": {"state": "SECOND"}}', ""
    )
    assert (ok.ok, ok.reason, ok.state) == (True, "swapped", "SECOND")
    refused = parse_action("n1", "web", "prim", 3, "", "rampart: web is STOP: start it first\n")
    assert refused.reason == "web on n1: prim refused: web is STOP: start it first"
    missing = parse_action("n1", "web", "start", 127, "", "sh: rampart: not found")
    assert missing.reason == "web on n1: start refused: rampart is not installed on this node"
