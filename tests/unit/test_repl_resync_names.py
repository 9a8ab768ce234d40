"""PlannedNames: a pass's planned files followed through renames, links, unlinks (pure)."""

from __future__ import annotations

from node_service.replication import ops
from node_service.replication.resync_names import PlannedNames


def test_a_file_and_its_directory_renamed_keep_their_planned_key():
    names = PlannedNames(["d/f", "d/sub/g", "top"])
    assert names.follow(ops.Rename("d/f", "d/f2"))
    assert names.follow(ops.Rename("d", "e"))
    assert names.names("d/f") == ["e/f2"]
    assert names.names("d/sub/g") == ["e/sub/g"]
    assert names.names("top") == ["top"]
    assert names.touched(["d/f", "d/sub/g", "top"]) == {"d/f", "d/sub/g"}


def test_renames_that_touch_no_planned_file_cost_nothing():
    names = PlannedNames(["d/f"])
    assert not names.follow(ops.Rename("x", "y"))
    assert not names.follow(ops.Rename("dd", "d2"))  # a prefix of the string, not a parent
    assert not names.follow(ops.Unlink("d/other"))
    assert not names.follow(ops.Mkdir("d/f.tmp", 0o755, 0, 0))
    assert names.names("d/f") == ["d/f"] and names.moved == set()


def test_replaced_and_unlinked_names_are_lost_links_are_gained():
    names = PlannedNames(["a", "b", "c"])
    assert names.follow(ops.Rename("x", "a"))  # another file now has a's name
    assert names.names("a") == []
    assert names.follow(ops.Link("b", "b2"))
    assert names.follow(ops.Unlink("b"))
    assert names.names("b") == ["b2"]
    assert names.follow(ops.Rename("c", "b2"))  # c replaces b's last name
    assert names.names("b") == [] and names.names("c") == ["b2"]
    assert not names.follow(ops.Rename("b2", "b2"))  # rename(2) does nothing
    assert names.moved == {"a", "b", "c"}


def test_forgotten_files_are_no_longer_followed():
    names = PlannedNames(["d/f"])
    names.forget("d/f")
    assert not names.follow(ops.Rename("d", "e"))  # nothing planned below d any more
    assert names.names("d/f") == []
