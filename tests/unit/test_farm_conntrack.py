"""Strict TCP pickup while farm modules run: the pure plans and the shared setter."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from node_service.farm.conntrack import PickupError, TcpPickup, plan_start, plan_stop


def test_first_farm_saves_the_node_value_and_sets_strict():
    change = plan_start(frozenset(), "1", None, None)
    assert (change.write, change.saved) == ("0", "1")
    assert change.reason.startswith("net.netfilter.nf_conntrack_tcp_loose 1 -> 0")


def test_a_second_farm_keeps_the_value_saved_by_the_first():
    change = plan_start(frozenset({"web"}), "0", "1", None)
    assert (change.write, change.saved) == (None, "1")


def test_a_value_left_by_a_dead_daemon_wins_over_its_own_zero():
    change = plan_start(frozenset(), "0", None, "1")
    assert (change.write, change.saved) == (None, "1")


def test_only_the_last_farm_restores():
    kept = plan_stop(frozenset({"api"}), "0", "1")
    assert (kept.write, kept.saved) == (None, "1") and "farm api still running" in kept.reason
    last = plan_stop(frozenset(), "0", "1")
    assert (last.write, last.saved) == ("1", None)
    assert last.reason == "net.netfilter.nf_conntrack_tcp_loose 0 -> 1 (its value before the farm)"


def test_a_value_changed_by_someone_else_is_left_alone():
    change = plan_stop(frozenset(), "2", "1")
    assert change.write is None and "changed by someone else" in change.reason


def test_pickup_sets_and_restores_a_file_and_keeps_a_memo(tmp_path: Path):
    setting = tmp_path / "nf_conntrack_tcp_loose"
    setting.write_text("1\n")
    web, api = tmp_path / "web" / "memo", tmp_path / "api" / "memo"

    async def scenario() -> None:
        pickup = TcpPickup(setting)
        await pickup.start("web", web)
        await pickup.start("api", api)
        assert setting.read_text() == "0\n" and web.read_text() == "1\n"
        await pickup.stop("web", web)
        assert setting.read_text() == "0\n" and not web.exists()
        assert "not changed by farm web" in await pickup.stop("web", web)
        await pickup.stop("api", api)
        assert setting.read_text() == "1\n" and not api.exists()

    asyncio.run(scenario())


def test_a_restarted_daemon_restores_the_value_from_the_memo(tmp_path: Path):
    setting = tmp_path / "nf_conntrack_tcp_loose"
    setting.write_text("0\n")  # left by a daemon that died while the farm ran
    memo = tmp_path / "web" / "memo"
    memo.parent.mkdir()
    memo.write_text("1\n")

    async def scenario() -> None:
        pickup = TcpPickup(setting)
        await pickup.start("web", memo)
        await pickup.stop("web", memo)

    asyncio.run(scenario())
    assert setting.read_text() == "1\n"


def test_a_missing_setting_is_a_one_line_error(tmp_path: Path):
    pickup = TcpPickup(tmp_path / "absent")
    with pytest.raises(PickupError) as info:
        asyncio.run(pickup.start("web", tmp_path / "memo"))
    assert "cannot read" in str(info.value) and "\n" not in str(info.value)
