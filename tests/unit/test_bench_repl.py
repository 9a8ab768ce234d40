"""The replication benchmark's pure parts: sizes, workload plans, figures, the netem table."""

from __future__ import annotations

import math

import pytest

from bench import farm
from bench.figures import AtLeastFigure, Figure
from bench.repl_device import OVERHEAD, DeviceError, image_size, mem_available
from bench.repl_setup import BenchSetupError, memory_kib, netem_commands, parse_reply
from bench.replication import (
    GiB,
    MiB,
    Run,
    Sizes,
    block,
    change_names,
    fsync_4k,
    interleaved,
    local_copy,
    netem_table,
    own_device_bytes,
    plan_sizes,
    ratio_figure,
    sequential,
    sequential_plan,
    small_file_names,
    small_files,
)


def test_at_least_figure_lives_in_figures_and_farm_still_uses_it():
    assert farm.AtLeastFigure is AtLeastFigure
    ok = AtLeastFigure("seq", 60.0, "MB/s", 100.0, "unreplicated", 0.5)
    assert ok.ok and "ok: ratio 0.60 >= limit 0.50" in str(ok)
    low = AtLeastFigure("seq", 31.0, "MB/s", 100.0, "unreplicated", 0.5)
    assert not low.ok and "FAIL: ratio 0.31 < limit 0.50" in str(low)
    never = AtLeastFigure("seq", math.inf, "MB/s", 100.0, "unreplicated", 0.5)
    assert not never.ok and "not measured" in never.verdict


def test_a_ceiling_figure_still_reads_as_at_most():
    rss = Figure("rss", 150.0, "MiB", 40.0, "idle", 200.0)
    assert rss.ok and "ok: 150 MiB <= limit 200 MiB" in str(rss)
    assert not Figure("rss", 250.0, "MiB", 40.0, "idle", 200.0).ok


def test_sizes_are_kept_when_the_disk_has_room():
    sizes, note = plan_sizes(100 * GiB)
    assert sizes == Sizes() and note == ""
    assert sizes.resync == 2 * GiB and sizes.files == 10_000


def test_sizes_scale_down_together_with_a_note_when_the_disk_is_short():
    wanted = Sizes()
    sizes, note = plan_sizes(wanted.disk_needed() // 2 + 2 * GiB)
    assert "scaled down to 50%" in note
    assert sizes.sequential < wanted.sequential and sizes.sequential % (16 * MiB) == 0
    assert sizes.resync < wanted.resync and sizes.resync % (256 * MiB) == 0
    assert sizes.files == 5_000
    assert sizes.disk_needed() <= wanted.disk_needed() // 2 + 1


def test_a_nearly_full_disk_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"only 2\.0 GiB free .* it needs"):
        plan_sizes(2 * GiB)


def test_the_sequential_plan_syncs_every_16_mib_and_at_the_end():
    plan = list(sequential_plan(40 * MiB + 100))
    assert len(plan) == 41
    assert [off for off, _, _ in plan] == [n * MiB for n in range(41)]
    assert {size for _, size, _ in plan[:-1]} == {MiB} and plan[-1][1] == 100
    synced = [n for n, (_, _, sync) in enumerate(plan) if sync]
    assert synced == [15, 31, 40]


def test_small_file_names_are_unique_and_spread_over_directories():
    names = list(small_file_names(2500, per_dir=1000))
    assert len(set(names)) == 2500
    assert names[0] == "d000/f00000" and names[-1] == "d002/f02499"
    assert len({n.split("/")[0] for n in names}) == 3


def test_blocks_differ_from_one_number_to_the_next():
    assert len(block(3, 1 << 20)) == 1 << 20 and len(block(3, 4097)) == 4097
    assert block(1, 4096) != block(2, 4096)
    assert block(0, 4096).count(0) < 4096


def test_a_ratio_figure_compares_medians_and_lists_every_run():
    ours = [Run(100, 2.0), Run(100, 1.0), Run(100, 4.0)]  # 50, 100, 25 per s
    theirs = [Run(100, 0.5), Run(100, 1.0), Run(100, 0.25)]  # 200, 100, 400
    fig = ratio_figure("iops", "IOPS", ours, theirs, 0.4, note="scaled")
    assert fig.value == 50 and fig.baseline == 200 and fig.ratio == 0.25
    assert not fig.ok
    assert fig.detail == (
        "runs (replicated/unreplicated IOPS): 50/200, 100/100, 25/400; "
        "median of paired ratios 0.25; scaled"
    )
    seq = ratio_figure("seq", "MB/s", [Run(3e8, 1.0)], [Run(4e8, 1.0)], 0.5, scale=1e6)
    assert seq.value == 300 and seq.ok and "ratio 0.75" in str(seq)


def test_netem_delays_each_side_by_half_the_round_trip():
    assert netem_commands("rt-x", "v0", 5) == [
        ["tc", "-n", "rt-x", "qdisc", "replace", "dev", "v0", "root", "netem", "delay", "2.5ms"]
    ]
    assert netem_commands("rt-x", "v0", 0) == [
        ["tc", "-n", "rt-x", "qdisc", "del", "dev", "v0", "root"]
    ]


def test_the_netem_table_has_one_row_per_mode_with_ratios():
    cells = {("sync", 1): 200.0, ("sync", 20): 25.0, ("semi", 1): 300.0, ("async", 1): 900.0}
    table = netem_table(cells, 1000.0, "tc netem").splitlines()
    assert "unreplicated 1000" in table[0] and "tc netem" in table[0]
    assert "RTT 1 ms" in table[1] and "RTT 20 ms" in table[1]
    assert table[2].split() == ["sync", "200", "(0.20)", "25", "(0.03)"]
    assert table[3].split() == ["semi", "300", "(0.30)", "n/a"]
    assert table[4].split()[0] == "async"


def test_memory_lines_and_child_replies_are_read_strictly():
    status = "Name:\tpython\nVmHWM:\t  130000 kB\nVmRSS:\t   40000 kB\n"
    assert memory_kib(status, "VmRSS") == 40000 and memory_kib(status, "VmHWM") == 130000
    with pytest.raises(BenchSetupError, match="no VmSwap line"):
        memory_kib(status, "VmSwap")
    assert parse_reply(b'{"ok": true, "port": 7}\n', "secondary")["port"] == 7
    with pytest.raises(BenchSetupError, match="primary process: resync interrupted"):
        parse_reply(b'{"ok": false, "error": "resync interrupted"}', "primary")
    with pytest.raises(BenchSetupError, match="expected JSON"):
        parse_reply(b"Traceback (most recent", "relay")


def test_workloads_write_what_they_say(tmp_path):
    seq = sequential(tmp_path / "seq", 3 * MiB + 7)
    assert seq.amount == 3 * MiB + 7 and (tmp_path / "seq").stat().st_size == 3 * MiB + 7
    iops = fsync_4k(tmp_path / "log", seconds=30.0, max_ops=20)
    assert iops.amount == 20 and (tmp_path / "log").stat().st_size == 20 * 4096
    files = small_files(tmp_path / "files", 30)
    assert files.amount == 30 and len(list((tmp_path / "files").rglob("f*"))) == 30
    (tmp_path / "src").mkdir()
    for name in ("seq", "log"):
        (tmp_path / name).rename(tmp_path / "src" / name)
    copy = local_copy(str(tmp_path / "src"), str(tmp_path / "copy"))
    assert copy.amount == 3 * MiB + 7 + 20 * 4096
    assert (tmp_path / "copy" / "seq").read_bytes() == (tmp_path / "src" / "seq").read_bytes()


def test_the_resync_changes_are_whole_files_of_256_mib():
    assert change_names(2 * GiB) == [f"change{n:02d}" for n in range(8)]
    assert change_names(100) == ["change00"]  # never nothing to resync


def test_interleaved_runs_alternate_baseline_first():
    order: list[str] = []
    ours, theirs = interleaved(
        2,
        lambda n: order.append(f"repl{n}") or Run(n, 1.0),
        lambda n: order.append(f"base{n}") or Run(n, 2.0),
    )
    assert order == ["base0", "repl0", "base1", "repl1"]
    assert [r.seconds for r in ours] == [1.0, 1.0] and [r.seconds for r in theirs] == [2.0, 2.0]


def test_without_a_limit_a_ratio_figure_is_information_and_never_fails():
    runs = [Run(50e6, 1.0)]
    base = [Run(200e6, 1.0)]
    info = ratio_figure("same disk", "MB/s", runs, base, None, scale=1e6)
    assert not isinstance(info, AtLeastFigure) and info.ok
    assert "information only" in str(info) and "ratio 0.25" in str(info)
    assert "runs (replicated/unreplicated MB/s): 50/200" in str(info)


def test_the_own_device_holds_the_sequential_runs_and_the_logs():
    sizes = Sizes()
    assert own_device_bytes(sizes) == 6 * sizes.sequential + 9 * 64 * MiB


def test_the_own_device_is_made_only_when_memory_and_tmpfs_have_room():
    wanted = 2 * GiB
    assert image_size(wanted, 20 * GiB, 20 * GiB) == wanted + OVERHEAD
    assert image_size(wanted, 2 * GiB, 20 * GiB) == 0  # tmpfs too small
    assert image_size(wanted, 20 * GiB, 5 * GiB) == 0  # would eat the spare memory
    assert mem_available("MemTotal: 100 kB\nMemAvailable:    2048 kB\n") == 2048 * 1024
    with pytest.raises(DeviceError, match="no MemAvailable line"):
        mem_available("MemTotal: 100 kB\n")
