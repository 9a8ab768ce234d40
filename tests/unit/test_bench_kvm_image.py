"""The kvm image benchmark's pure parts: the offsets, the batch arithmetic, the figures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench import kvm_image
from bench.kvm_image import Batch, Reintegration, modified_bytes, offsets, region_bytes


def test_offsets_are_block_aligned_inside_the_image_and_repeatable() -> None:
    first = list(offsets(8, 4 << 30, 4096, 5000))
    assert len(first) == 5000
    assert all(o % 4096 == 0 and 0 <= o <= (4 << 30) - 4096 for o in first)
    assert list(offsets(8, 4 << 30, 4096, 5000)) == first
    assert list(offsets(9, 4 << 30, 4096, 5000)) != first
    # spread over the whole image, not bunched at its start
    assert max(first) > (3 << 30) and min(first) < (1 << 30)


def test_offsets_of_a_one_block_image_and_a_bad_size() -> None:
    assert list(offsets(1, 4096, 4096, 3)) == [0, 0, 0]
    with pytest.raises(ValueError, match="holds no block of 4096 bytes"):
        list(offsets(1, 100, 4096, 1))


def test_modified_bytes_counts_each_block_once() -> None:
    assert modified_bytes([0, 4096, 0, 8192, 4096], 4096) == 3 * 4096
    assert modified_bytes([], 4096) == 0


def test_region_bytes_counts_the_dirty_logs_64k_regions_touched() -> None:
    kib = 1024
    # two blocks in one region, one in the next region, one straddling two regions
    written = [0, 4 * kib, 64 * kib, 190 * kib]
    assert region_bytes(written, 4 * kib, 64 * kib) == 4 * 64 * kib
    assert region_bytes([], 4 * kib, 64 * kib) == 0
    assert 64 * kib == kvm_image.REGION  # what the replication's dirty log uses


def test_batch_rates_and_json() -> None:
    batch = Batch(writes=2560, seconds=2.0, modified=2000 * 4096, regions=2000 << 16)
    assert batch.iops == 1280
    assert batch.mib_per_s == 5.0  # 2560 x 4 KiB = 10 MiB in 2 s
    assert batch.describe() == "2560 writes in 2.0 s (1280 IOPS, 5.00 MiB/s)"
    doc = {"writes": 2560, "seconds": 2.0, "modified": 2000 * 4096, "regions": 2000 << 16}
    line = json.dumps(doc)
    assert Batch.from_json(f"noise\n{line}\n") == batch
    assert math.isinf(Batch(0, 0.0, 0).iops)


def test_throughput_figures_compare_with_the_mean_of_the_local_runs() -> None:
    replicated = Batch(1000, 2.0, 0)  # 500 IOPS
    local = (Batch(4000, 2.0, 0), Batch(6000, 2.0, 0))  # 2000 and 3000 IOPS
    mib, iops = kvm_image.throughput_figures(replicated, local)
    assert iops.value == 500 and iops.baseline == 2500 and iops.ratio == pytest.approx(0.2)
    assert mib.ratio == pytest.approx(0.2) and mib.unit == "MiB/s"
    assert mib.ok and "information only" in str(mib)
    assert "fsync every 64 writes" in mib.detail


def test_reintegration_figures() -> None:
    away = Batch(5000, 10.0, 4000 * 4096, regions=512 * 65536)  # 32 MiB of regions
    r = Reintegration(12.0, 2.0, 32 << 20, away, copy_bytes=32 << 20, copy_seconds=0.5)
    took, resent, rate = kvm_image.reintegration_figures(r)
    assert (took.value, took.baseline, took.unit) == (12.0, 0.5, "s")
    assert "modified 15.6 MiB" in took.detail and took.baseline_name.endswith("of 32.0 MiB")
    assert resent.value == 32 and resent.baseline == pytest.approx(15.625)
    assert resent.limit == 33 and resent.ok  # the dirty regions, plus 1 MiB of metadata
    assert rate.value == 16 and rate.baseline == 64


def test_resending_clean_regions_fails_the_bytes_resent_figure() -> None:
    away = Batch(10, 1.0, 10 * 4096, regions=10 * 65536)
    r = Reintegration(5.0, 1.0, 4 << 30, away, copy_bytes=4 << 30, copy_seconds=4.0)
    resent = kvm_image.reintegration_figures(r)[1]
    assert not resent.ok and "FAIL" in str(resent)


def test_reintegration_never_seen_is_a_failure() -> None:
    r = Reintegration(math.inf, 0.0, 0, Batch(10, 1.0, 40960), 40960, 0.1)
    took = kvm_image.reintegration_figures(r)[0]
    assert not took.ok and "not measured" in str(took)


def test_space_problem() -> None:
    assert kvm_image.space_problem(10 << 30, 3 << 30) is None
    why = kvm_image.space_problem(1 << 30, 3 << 30)
    assert why == "1024 MiB free under /var/lib, 3072 MiB wanted"


def test_write_batch_and_copy_on_a_real_file(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    batch = kvm_image.write_batch(str(image), seed=3, count=200, seconds=30, fsync_every=16)
    assert batch.writes == 200
    assert image.stat().st_size == 4 << 30  # sparse: the size of the image, not of the data
    assert image.stat().st_blocks * 512 < 64 << 20
    assert batch.modified == modified_bytes(offsets(3, 4 << 30, 4096, 200), 4096)
    assert batch.regions == region_bytes(offsets(3, 4 << 30, 4096, 200), 4096, 65536)
    assert kvm_image.copy_timed(str(tmp_path), 3 << 20) > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk.img"]


def test_the_benchmark_is_listed() -> None:
    from bench.__main__ import BENCHMARKS

    assert "kvm_image" in BENCHMARKS


def test_creates_figure_shows_the_worst_creation_against_unreplicated() -> None:
    away = Batch(10, 1.0, 40960, 655360)
    r = Reintegration(5.0, 1.0, 655360, away, 655360, 0.1, (0.002, 2.5, 0.004), (0.001, 0.003))
    creates = kvm_image.reintegration_figures(r)[-1]
    assert (creates.value, creates.baseline, creates.unit) == (2500, 3, "ms")
    assert creates.detail == "3 creations in the replicated dir, median 4.0 ms"


def test_create_latencies_makes_the_files(tmp_path: Path) -> None:
    took = kvm_image.create_latencies(str(tmp_path / "snapshots"), 5)
    assert len(took) == 5 and all(t >= 0 for t in took)
    assert sorted(p.name for p in (tmp_path / "snapshots").iterdir()) == [
        f"snap-{i}" for i in range(5)
    ]
