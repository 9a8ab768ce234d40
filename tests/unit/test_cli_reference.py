"""docs/cli-reference.md is generated from the parsers and must match them."""

from __future__ import annotations

from node_service import clidoc
from node_service.cli import build_parser


def test_the_committed_reference_matches_the_parser():
    current = clidoc.REFERENCE.read_text(encoding="utf-8")
    assert current == clidoc.render(), (
        "docs/cli-reference.md is out of date: run .venv/bin/python -m node_service.clidoc"
    )


def test_every_verb_and_action_has_a_section():
    text = clidoc.render()
    for name, _, sub in clidoc._subcommands(build_parser()):
        assert f"## `rampart {name}`" in text
        for action, _, _ in clidoc._subcommands(sub):
            assert f"### `rampart {name} {action}`" in text
    assert "## `rampartd`" in text and "`--config CONFIG`" in text


def test_rendering_does_not_depend_on_the_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")
    narrow = clidoc.render()
    monkeypatch.setenv("COLUMNS", "250")
    assert clidoc.render() == narrow


def test_check_mode_reports_a_stale_file_and_writes_nothing(tmp_path, capsys):
    stale = tmp_path / "cli-reference.md"
    stale.write_text("# old\n")
    assert clidoc.main(["--out", str(stale), "--check"]) == 1
    assert stale.read_text() == "# old\n"
    assert "out of date; run python -m node_service.clidoc" in capsys.readouterr().err
    assert clidoc.main(["--out", str(stale)]) == 0
    assert clidoc.main(["--out", str(stale), "--check"]) == 0
    assert stale.read_text() == clidoc.render()
