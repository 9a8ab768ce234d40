"""The journal: entry shape, rotation, the ring, and subscribers that never block it."""

from __future__ import annotations

import asyncio
import json

import pytest

from node_service.journal import Journal, format_entry, make_entry


def test_entry_has_the_structured_fields():
    entry = make_entry(
        "n1", "transition", "SECOND -> PRIM (peer lost)", "web", ts=10.0, old="SECOND"
    )
    assert entry == {
        "ts": 10.0, "node": "n1", "module": "web", "kind": "transition", "severity": "info",
        "message": "SECOND -> PRIM (peer lost)", "old": "SECOND",
    }  # fmt: skip
    assert "web transition: SECOND -> PRIM (peer lost)" in format_entry(entry)
    with pytest.raises(ValueError, match="journal kind"):
        make_entry("n1", "gossip", "x")


def test_transition_format_and_persistence(tmp_path):
    path = tmp_path / "log" / "journal.jsonl"
    journal = Journal("n1", path)
    journal.transition("web", "WAIT", "ALONE", "peer n2 not seen for 3.0 s")
    journal.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry["message"] == "WAIT -> ALONE (peer n2 not seen for 3.0 s)"
    assert (entry["old"], entry["new"], entry["module"]) == ("WAIT", "ALONE", "web")
    # A restarted daemon sees its history again.
    again = Journal("n1", path)
    assert again.recent()[-1]["message"] == entry["message"]
    again.close()


def test_file_rotates_at_the_size_cap(tmp_path):
    path = tmp_path / "journal.jsonl"
    journal = Journal("n1", path, max_bytes=2000, backups=2)
    for i in range(200):
        journal.record("info", f"entry number {i:04d} with some padding to fill the file")
    journal.close()
    assert path.stat().st_size <= 2000
    assert (tmp_path / "journal.jsonl.1").exists()
    assert (tmp_path / "journal.jsonl.2").exists()
    assert not (tmp_path / "journal.jsonl.3").exists()
    assert json.loads(path.read_text().splitlines()[-1])["message"].startswith("entry number 0199")


def test_ring_keeps_the_newest_and_filters_by_module():
    journal = Journal("n1", None, ring_size=10)
    for i in range(25):
        journal.record("info", f"m{i}", "web" if i % 2 else "db")
    journal.record("warning", "node-wide", severity="warning")
    recent = journal.recent(limit=100)
    assert len(recent) == 10
    assert recent[-1]["message"] == "node-wide"
    web = journal.recent("web", limit=3)
    assert [e["message"] for e in web] == ["m21", "m23", "node-wide"]


def test_slow_subscriber_loses_oldest_with_a_marker_and_never_blocks():
    async def scenario():
        journal = Journal("n1", None)
        slow = journal.subscribe(maxsize=5)
        web_only = journal.subscribe(module="web", maxsize=100)
        for i in range(50):  # never awaits: the writer cannot be held up
            journal.record("info", f"e{i}", "db")
        journal.record("info", "for web", "web")
        first = await slow.get(timeout=1)
        assert first["kind"] == "lost" and first["lost"] == 46
        rest = [(await slow.get(timeout=1))["message"] for _ in range(5)]
        assert rest == ["e46", "e47", "e48", "e49", "for web"]
        assert await slow.get(timeout=0.05) is None
        assert (await web_only.get(timeout=1))["message"] == "for web"
        slow.close()
        web_only.close()
        assert journal.subscriber_count == 0

    asyncio.run(asyncio.wait_for(scenario(), 10))
