"""What an earlier farm version left in nf_conntrack_tcp_loose is put back, nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest

from node_service.farm.conntrack import PickupError, plan_restore, restore_left_over


def test_nothing_left_over_means_nothing_done_and_nothing_said():
    assert plan_restore("0", None) is None
    assert plan_restore("1", None) is None


def test_a_strict_value_left_by_a_dead_daemon_gets_the_saved_value_back():
    change = plan_restore("0", "1")
    assert change is not None and change.write == "1"
    assert change.reason.startswith("net.netfilter.nf_conntrack_tcp_loose 0 -> 1")


def test_a_value_changed_since_is_left_alone():
    change = plan_restore("2", "1")
    assert change is not None and change.write is None and "changed since" in change.reason


def test_restore_writes_back_removes_the_memo_and_runs_once(tmp_path: Path):
    loose, memo = tmp_path / "loose", tmp_path / "state" / "conntrack_tcp_loose"
    memo.parent.mkdir()
    loose.write_text("0\n")
    memo.write_text("1\n")
    said = restore_left_over(memo, loose)
    assert said is not None and "0 -> 1" in said
    assert loose.read_text() == "1\n" and not memo.exists()
    assert restore_left_over(memo, loose) is None
    assert loose.read_text() == "1\n"


class Unwritable:
    """The /proc file as ``restore_left_over`` uses it, refusing the write."""

    def read_text(self) -> str:
        return "0\n"

    def write_text(self, text: str) -> None:
        raise PermissionError(13, "Permission denied")


def test_a_setting_that_cannot_be_written_is_a_one_line_error(tmp_path: Path):
    memo = tmp_path / "memo"
    memo.write_text("1\n")
    with pytest.raises(PickupError) as caught:
        restore_left_over(memo, Unwritable())  # type: ignore[arg-type]
    assert str(caught.value) == (
        "cannot set net.netfilter.nf_conntrack_tcp_loose=1: Permission denied"
    )
    # Unreadable setting: nothing written, and it says so.
    said = restore_left_over(memo, tmp_path / "no" / "such" / "file")
    assert said is not None and "unreadable" in said
