"""Replication: what a replicated directory costs against the same disk unreplicated.

A primary process (FUSE layer + TLS sender, as in production) in one network
namespace replicates to a secondary process (receiver + applier under the
read-only view) in another; the workloads run in the bench process, writing
into the FUSE mount like an application (bench/repl_setup.py). Baselines are
the same workloads on a plain directory of the same filesystem, measured in
the same run, interleaved with the replicated runs (median of each):

1. 1 MiB sequential writes, fsync every 16 MiB, sync mode: ratio >= 0.5;
2. 4 KiB write + fsync, IOPS, sync mode: ratio >= 0.4;

   both measured twice: with the secondary on a device of its own (two
   machines; bench/repl_device.py says what that device models), which
   carries the limits, and with the secondary on the primary's disk
   (information: its writes compete with the primary's);
3. create/write/close of 10,000 small files: ratio >= 0.3;
4. resync of 2 GiB of changes (written while the secondary was away) vs a
   raw local copy of 2 GiB (copy + fsync): ratio >= 0.7;
5. peak RSS of the primary process under all of that: <= 200 MiB;
6. information: 4 KiB write + fsync per mode (sync, semi, async) with the
   link delayed to 1, 5 and 20 ms round trip, so a user can choose a mode
   for a distant site.
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from bench.figures import AtLeastFigure, Figure, failed

NAME = "replication"
MiB = 1024 * 1024
GiB = 1024 * MiB
CHUNK = MiB
FSYNC_EVERY = 16 * MiB
SMALL_FILE = 4096
FILES_PER_DIR = 1000
IOPS_SECONDS = 1.0
IOPS_MAX_OPS = 200_000
NETEM_SECONDS = 2.0
# Many short interleaved runs: the shared disk's unreplicated 4 KiB fsync rate
# was seen to swing 10x between adjacent 3 s runs, so few long runs let one
# lucky or unlucky baseline decide the ratio.
ROUNDS = 6
IOPS_ROUNDS = 9
FILES_ROUNDS = 1  # a replicated round of 10,000 files takes about a minute here
MODES = ("sync", "semi", "async")
RTTS_MS = (1, 5, 20)
SEQ_LIMIT, IOPS_LIMIT, FILES_LIMIT, RESYNC_LIMIT = 0.5, 0.4, 0.3, 0.7
RSS_LIMIT_MIB = 200.0
RESYNC_FILE = 256 * MiB
FILES_TIMEOUT_S = 900.0  # one worker command at most (10,000 replicated files, 2 GiB)
SPARE = 2 * GiB
OWN = "secondary on its own device"
SAME = "secondary on the same disk (information)"
OWN_LOG_BYTES = 64 * MiB  # room per 4 KiB fsync run on the own device (about 16,000 ops)
FUSE_ONLY_NAMES = {
    "MB/s": "1 MiB sequential writes + fsync every 16 MiB",
    "IOPS": "4 KiB write + fsync",
    "files/s": "create/write/close of small files",
}  # left free for everyone else on the disk


# -- pure: sizes, plans, figures ---------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """How much each workload writes; scaled down together when the disk is short."""

    sequential: int = 256 * MiB  # per run; ROUNDS runs each side
    files: int = 10_000
    resync: int = 2 * GiB

    def disk_needed(self) -> int:
        # sequential: every run's file is kept until the end (primary, secondary, baseline);
        # resync: primary + secondary + baseline source + its copy
        return 3 * ROUNDS * self.sequential + 4 * self.resync + 3 * ROUNDS * self.files * 8192


def plan_sizes(free: int, wanted: Sizes = Sizes()) -> tuple[Sizes, str]:
    """The sizes that fit in ``free`` bytes (keeping SPARE), and a note if scaled down."""
    room = free - SPARE
    need = wanted.disk_needed()
    if need <= room:
        return wanted, ""
    factor = max(room, 0) / need
    if factor < 1 / 64:
        raise ValueError(
            f"only {free / GiB:.1f} GiB free for the replication benchmark; "
            f"it needs {(need + SPARE) / GiB:.1f} GiB (at least 1/64 of it to run scaled down)"
        )
    sizes = Sizes(
        sequential=max(FSYNC_EVERY, int(wanted.sequential * factor) // FSYNC_EVERY * FSYNC_EVERY),
        files=max(100, int(wanted.files * factor)),
        resync=max(RESYNC_FILE, int(wanted.resync * factor) // RESYNC_FILE * RESYNC_FILE),
    )
    note = (
        f"scaled down to {factor:.0%}: {free / GiB:.1f} GiB free, "
        f"{(need + SPARE) / GiB:.1f} GiB wanted"
    )
    return sizes, note


def sequential_plan(total: int, chunk: int = CHUNK, fsync_every: int = FSYNC_EVERY):
    """(offset, size, fsync after this write) for each write of a sequential run; ends synced."""
    written = 0
    while written < total:
        size = min(chunk, total - written)
        written += size
        yield written - size, size, written % fsync_every == 0 or written == total


def small_file_names(count: int, per_dir: int = FILES_PER_DIR) -> Iterator[str]:
    """``dNNN/fNNNNN``: at most ``per_dir`` files per directory, like a mail or cache tree."""
    for n in range(count):
        yield f"d{n // per_dir:03d}/f{n:05d}"


def block(n: int, size: int) -> bytes:
    """``size`` bytes that differ from one block number to the next (never all zeroes)."""
    stamp = n.to_bytes(8, "little")
    return (stamp + b"rampart-bench-replication-data!!" * 2)[:40] * (size // 40) + bytes(size % 40)


@dataclass(frozen=True)
class Run:
    """One workload run: ``amount`` (bytes or operations) in ``seconds``."""

    amount: float
    seconds: float

    @property
    def rate(self) -> float:
        return self.amount / self.seconds if self.seconds > 0 else 0.0


def ratio_figure(
    name: str,
    unit: str,
    replicated: Sequence[Run],
    baseline: Sequence[Run],
    limit: float | None,
    scale: float = 1.0,
    note: str = "",
) -> Figure:
    """Median rate replicated against median rate unreplicated; every run in the detail.

    ``limit`` None: information only (a plain Figure, never a failure).
    """
    value = statistics.median(r.rate for r in replicated) / scale
    base = statistics.median(r.rate for r in baseline) / scale
    runs = ", ".join(
        f"{r.rate / scale:.0f}/{b.rate / scale:.0f}"
        for r, b in zip(replicated, baseline, strict=True)
    )
    paired = statistics.median(
        r.rate / b.rate if b.rate > 0 else 0.0 for r, b in zip(replicated, baseline, strict=True)
    )
    detail = f"runs (replicated/unreplicated {unit}): {runs}; median of paired ratios {paired:.2f}"
    detail += f"; {note}" if note else ""
    if limit is None:
        return Figure(name, value, unit, base, "unreplicated", None, detail=detail)
    return AtLeastFigure(name, value, unit, base, "unreplicated", limit, detail=detail)


def netem_table(cells: dict[tuple[str, int], float], baseline: float, how: str) -> str:
    """Mode x RTT -> IOPS (ratio to the unreplicated baseline), one row per mode."""
    rtts = sorted({rtt for _, rtt in cells})
    head = "    mode  " + "".join(f"{f'RTT {rtt} ms':>18}" for rtt in rtts)
    rows = [f"4 KiB write+fsync IOPS by mode and round trip ({how}); unreplicated {baseline:.0f}"]
    rows.append(head)
    for mode in MODES:
        cols = ""
        for rtt in rtts:
            iops = cells.get((mode, rtt))
            text = "n/a" if iops is None else f"{iops:.0f} ({iops / baseline:.2f})"
            cols += f"{text:>18}"
        rows.append(f"    {mode:<6}" + cols)
    return "\n".join(rows)


# -- workloads: plain file I/O, run in the worker process (it sees the primary's mount) --

WORKLOADS = ("sequential", "fsync_4k", "small_files", "write_files", "local_copy")


def sequential(path: str | Path, total: int) -> Run:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    began = time.monotonic()
    try:
        for n, (offset, size, sync) in enumerate(sequential_plan(total)):
            os.pwrite(fd, block(n, size), offset)
            if sync:
                os.fsync(fd)
    finally:
        os.close(fd)
    return Run(total, time.monotonic() - began)


def fsync_4k(path: str | Path, seconds: float, max_ops: int = IOPS_MAX_OPS) -> Run:
    """Append 4 KiB and fsync, as a database log does, for ``seconds`` (at most max_ops)."""
    data = block(0, 4096)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    began = time.monotonic()
    ops = 0
    try:
        while ops < max_ops and time.monotonic() - began < seconds:
            os.pwrite(fd, data, ops * 4096)
            os.fsync(fd)
            ops += 1
    finally:
        os.close(fd)
    return Run(ops, time.monotonic() - began)


def small_files(root: str | Path, count: int) -> Run:
    data = block(1, SMALL_FILE)
    began = time.monotonic()
    made = None
    for name in small_file_names(count):
        path = Path(root) / name
        if path.parent != made:
            path.parent.mkdir(parents=True, exist_ok=True)
            made = path.parent
        with open(path, "wb") as f:
            f.write(data)
    return Run(count, time.monotonic() - began)


def change_names(total: int) -> list[str]:
    """The resync's changes: ``total`` bytes as RESYNC_FILE-sized files."""
    return [f"change{n:02d}" for n in range(max(1, total // RESYNC_FILE))]


def write_files(root: str | Path, total: int) -> Run:
    Path(root).mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    for name in change_names(total):
        sequential(Path(root) / name, RESYNC_FILE)
    return Run(len(change_names(total)) * RESYNC_FILE, time.monotonic() - began)


def local_copy(source: str | Path, dest: str | Path) -> Run:
    """The raw local copy a resync is compared with: every file of ``source``, then fsync."""
    Path(dest).mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    total = 0
    for src in sorted(Path(source).iterdir()):
        target = Path(dest) / src.name
        shutil.copyfile(src, target)
        fd = os.open(target, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        total += src.stat().st_size
    return Run(total, time.monotonic() - began)


def interleaved(
    rounds: int, replicated: Callable[[int], Run], baseline: Callable[[int], Run]
) -> tuple[list[Run], list[Run]]:
    """Alternate the two so the machine's other load hits both alike."""
    ours: list[Run] = []
    theirs: list[Run] = []
    for n in range(rounds):
        theirs.append(baseline(n))
        ours.append(replicated(n))
    return ours, theirs


def on_secondary(path: Path, size: int) -> None:
    """Proof a replicated run reached the secondary: the file is there, whole."""
    found = path.stat().st_size if path.exists() else -1
    if found != size:
        raise ValueError(f"{path}: {found} bytes on the secondary, {size} written on the primary")


# -- the benchmark -----------------------------------------------------------------------


def say(text: str) -> None:
    print(f"bench: replication: {text}", flush=True)


def own_device_bytes(sizes: Sizes) -> int:
    """What the own-device pass writes on the secondary: the sequential runs and 4 KiB logs."""
    return ROUNDS * sizes.sequential + IOPS_ROUNDS * OWN_LOG_BYTES


def run() -> list[Figure]:
    from bench.repl_device import room_for
    from bench.repl_setup import replicated_pair

    scratch = "/var/tmp"
    sizes, note = plan_sizes(shutil.disk_usage(scratch).free)
    if note:
        say(note)
    size = room_for(own_device_bytes(sizes))
    if not size:
        own = [failed(f"replication, {OWN}", "not enough free memory for the secondary's device")]
    else:
        say(f"{OWN}: an ext4 of {size // MiB} MiB on a RAM-backed loop device")
        with replicated_pair(scratch=scratch, own_device=size) as pair:
            own, _ = _headline(pair, sizes, note, OWN, limits=True)
    say(f"{SAME}: every directory on {scratch}")
    with replicated_pair(scratch=scratch) as pair:
        return own + _measure(pair, sizes, note)


def _headline(
    pair, sizes: Sizes, note: str, where: str, *, limits: bool
) -> tuple[list[Figure], dict[str, list[Run]]]:
    """Sequential and 4 KiB fsync, sync mode, against the baseline disk; and the baseline runs."""
    if pair.primary is None:
        pair.start_primary("sync")
    mnt, sec, base = pair.primary_dir, pair.secondary_dir, pair.baseline_dir
    say(f"{where}: sequential writes, {ROUNDS} x {sizes.sequential // MiB} MiB each side")

    def seq_repl(n: int) -> Run:
        done = pair.work("sequential", path=mnt / f"seq{n}", total=sizes.sequential)
        on_secondary(sec / f"seq{n}", sizes.sequential)
        return done

    def seq_base(n: int) -> Run:
        return pair.work("sequential", path=base / f"seq{n}", total=sizes.sequential)

    ours, theirs = interleaved(ROUNDS, seq_repl, seq_base)
    seq = ratio_figure(
        f"replication: 1 MiB sequential writes + fsync every 16 MiB, sync, {where} "
        f"({sizes.sequential // MiB} MiB, median of {ROUNDS})",
        "MB/s",
        ours,
        theirs,
        SEQ_LIMIT if limits else None,
        scale=1e6,
        note=note,
    )

    say(f"{where}: 4 KiB write + fsync, {IOPS_ROUNDS} x {IOPS_SECONDS:g} s each side")

    def iops_repl(n: int) -> Run:
        done = pair.work("fsync_4k", path=mnt / f"log{n}", seconds=IOPS_SECONDS)
        on_secondary(sec / f"log{n}", int(done.amount) * 4096)
        return done

    def iops_base(n: int) -> Run:
        return pair.work("fsync_4k", path=base / f"log{n}", seconds=IOPS_SECONDS)

    ours, iops = interleaved(IOPS_ROUNDS, iops_repl, iops_base)
    fsyncs = ratio_figure(
        f"replication: 4 KiB write + fsync, sync, {where} "
        f"({IOPS_SECONDS:g} s, median of {IOPS_ROUNDS})",
        "IOPS",
        ours,
        iops,
        IOPS_LIMIT if limits else None,
    )
    return [seq, fsyncs], {"MB/s": theirs, "IOPS": iops}


def _measure(pair, sizes: Sizes, note: str) -> list[Figure]:
    primary = pair.start_primary("sync")
    idle_kib = primary.memory_kib("VmRSS")
    mnt, sec, base = pair.primary_dir, pair.secondary_dir, pair.baseline_dir
    figures, base_runs = _headline(pair, sizes, note, SAME, limits=False)
    iops_baseline = statistics.median(r.rate for r in base_runs["IOPS"])

    say(f"small files, {FILES_ROUNDS} x {sizes.files:,} each side")
    last = list(small_file_names(sizes.files))[-1]

    def files_repl(n: int) -> Run:
        done = pair.work("small_files", FILES_TIMEOUT_S, root=mnt / f"files{n}", count=sizes.files)
        on_secondary(sec / f"files{n}" / last, SMALL_FILE)
        return done

    def files_base(n: int) -> Run:
        return pair.work("small_files", root=base / f"files{n}", count=sizes.files)

    ours, theirs = interleaved(FILES_ROUNDS, files_repl, files_base)
    base_runs["files/s"] = theirs
    figures.append(
        ratio_figure(
            f"replication: create/write/close of {sizes.files:,} files of 4 KiB, sync",
            "files/s",
            ours,
            theirs,
            FILES_LIMIT,
        )
    )

    figures.append(_resync(pair, sizes))
    peak_kib = primary.memory_kib("VmHWM")
    figures.append(
        Figure(
            "replication: peak RSS of the primary's replication process (FUSE + sender) "
            "under the loads above",
            peak_kib / 1024,
            "MiB",
            idle_kib / 1024,
            "idle after connect",
            RSS_LIMIT_MIB,
        )
    )
    return figures + _fuse_only(pair, sizes, base_runs) + _netem(pair, iops_baseline)


def _fuse_only(pair, sizes: Sizes, base_runs: dict[str, list[Run]]) -> list[Figure]:
    """Information: the same workloads through the FUSE layer with replication off."""
    from bench.repl_setup import FUSE_ONLY

    say("the same workloads through the FUSE layer alone (replication off), once each")
    pair.start_primary(FUSE_ONLY)
    mnt = pair.primary_dir / "fuse-only"
    pair.work("small_files", root=mnt, count=1)  # makes the directory
    runs = {
        "MB/s": pair.work("sequential", path=mnt / "seq", total=sizes.sequential),
        "IOPS": pair.work("fsync_4k", path=mnt / "log", seconds=IOPS_SECONDS),
        "files/s": pair.work("small_files", FILES_TIMEOUT_S, root=mnt / "files", count=sizes.files),
    }
    pair.stop_primary()
    figures = []
    for unit, done in runs.items():
        scale = 1e6 if unit == "MB/s" else 1.0
        base = statistics.median(r.rate for r in base_runs[unit]) / scale
        name = f"replication off, FUSE layer alone: {FUSE_ONLY_NAMES[unit]}"
        figures.append(Figure(name, done.rate / scale, unit, base, "unreplicated", None))
    return figures


def _resync(pair, sizes: Sizes) -> Figure:
    name = f"replication: resync of {sizes.resync / GiB:g} GiB of changes vs a raw local copy"
    say(f"resync: {sizes.resync / GiB:g} GiB written while the secondary is away, then resynced")
    pair.primary.ask("absent")
    pair.work("write_files", FILES_TIMEOUT_S, root=pair.primary_dir / "changes", total=sizes.resync)
    pair.work(
        "write_files", FILES_TIMEOUT_S, root=pair.baseline_dir / "changes", total=sizes.resync
    )
    copy = pair.work(
        "local_copy",
        FILES_TIMEOUT_S,
        source=pair.baseline_dir / "changes",
        dest=pair.baseline_dir / "copy",
    )
    reply = pair.primary.ask("resync", FILES_TIMEOUT_S)
    flushed = pair.secondary.ask("syncfs", FILES_TIMEOUT_S)["seconds"]
    if not reply["drained"]:
        return failed(name, f"the resync did not drain: {reply['reason']}")
    for change in change_names(sizes.resync):
        on_secondary(pair.secondary_dir / "changes" / change, RESYNC_FILE)
    seconds = reply["seconds"] + flushed
    return AtLeastFigure(
        name,
        sizes.resync / seconds / 1e6,
        "MB/s",
        copy.rate / 1e6,
        "copy + fsync",
        RESYNC_LIMIT,
        detail=(
            f"resync {reply['seconds']:.1f} s + secondary syncfs {flushed:.1f} s; "
            f"{reply['reason']}; copy {copy.seconds:.1f} s"
        ),
    )


def _netem(pair, baseline: float) -> list[Figure]:
    cells: dict[tuple[str, int], float] = {}
    figures: list[Figure] = []
    how = ""
    say(f"4 KiB write + fsync per mode with the link delayed to {RTTS_MS} ms round trip")
    for mode in MODES:
        pair.start_primary(mode, delayed=True)
        for rtt in RTTS_MS:
            how = pair.set_rtt(rtt)
            path = pair.primary_dir / f"log-{mode}-{rtt}"
            rate = pair.work("fsync_4k", path=path, seconds=NETEM_SECONDS).rate
            cells[(mode, rtt)] = rate
            name = f"replication: 4 KiB write + fsync, {mode}, RTT {rtt} ms"
            figures.append(Figure(name, rate, "IOPS", baseline, "unreplicated", None))
        pair.set_rtt(0)
    pair.stop_primary()
    last = figures[-1]
    figures[-1] = replace(last, detail=netem_table(cells, baseline, how))
    return figures
