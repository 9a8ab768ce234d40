"""The kvm-vm data path: a 4 GiB sparse VM image replicated under random 4 KiB writes.

A 2-node lab runs a mirror module made from the kvm-vm template's layout
(one replicated dir, ``/srv/vm``, sync mode). There is no KVM here, so the
template's virsh scripts and its ``check_vm`` checker are replaced by no-ops:
the figures measure the disk path a VM would use, not a VM. The output says so.

Two parts, each against a baseline measured in the same run on the same disk:

- **throughput**: random 4 KiB writes at 4 KiB-aligned offsets of a 4 GiB
  sparse image, fsync every ``FSYNC_EVERY`` writes (a guest's flushes),
  bounded by count and time; through the replicated mount versus the same
  workload (same offsets) on ``/srv/vm-local`` of the primary, which nothing
  replicates. Local runs before and after the replicated one.
- **reintegration**: the secondary is power-cut, a batch of random writes
  dirties the image while it is away, it is booted, and the time from boot
  to "SECOND, up to date" is measured; bytes resent (the primary's
  ``last_resync``) against bytes modified (distinct 4 KiB blocks written);
  the baseline is a raw local copy (read, write, fsync) of that many bytes.

The workload runs inside the primary host as ``python -m bench.kvm_image
write ...`` (this file's ``main``), so it writes through the host's own view
of ``/srv`` like an application would.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bench.figures import Figure, failed
from node_service.errors import RampartError
from node_service.replication.ops import REGION_SIZE as REGION

if TYPE_CHECKING:
    from node_service.demo import LabDriver

NAME = "kvm image"
LAB = "benchkv"
MODULE = "vm"
DIR = "/srv/vm"
LOCAL_DIR = "/srv/vm-local"
IMAGE = "disk.img"
IMAGE_BYTES = 4 << 30
BLOCK = 4096
MIB = 1 << 20

WRITES = 20_000
WRITE_SECONDS = 60.0
FSYNC_EVERY = 64
AWAY_WRITES = 5_000
AWAY_SECONDS = 60.0
SEED_THROUGHPUT = 8
SEED_AWAY = 9
CREATES = 20  # small files made while the secondary is away (a VM's snapshot files)

# Data actually written is bounded (every run at most WRITES blocks, on both
# nodes); the images are sparse. Wanted: the written data times runs and
# nodes, the copy baseline, and room to spare for the rest of the machine.
SPARE_BYTES = 2 << 30
LAB_DISK = Path("/var/lib")
ROLES_TIMEOUT_S = 120.0
ALONE_TIMEOUT_S = 30.0
REINTEGRATION_TIMEOUT_S = 180.0
POLL_S = 0.5
WORKER_TIMEOUT_S = WRITE_SECONDS + 120.0

REPO = Path(__file__).resolve().parent.parent
NO_OP = (
    "#!/bin/sh\nset -eu\n"
    "# bench: no KVM here; the VM is not started, only its disk is replicated\nexit 0\n"
)
NOTE = (
    "mirror module from the kvm-vm template's layout (replicated /srv/vm, sync); "
    "virsh scripts and check_vm replaced by no-ops (no KVM on this machine)"
)


class BenchError(RampartError):
    """The benchmark's lab did not reach the state a measurement needs."""


# -- the workload: pure parts -------------------------------------------------------


def offsets(seed: int, image_bytes: int, block: int, count: int) -> Iterator[int]:
    """``count`` random block-aligned offsets inside the image, the same for the same seed.

    Seeded so the replicated and the local run write exactly the same blocks.
    """
    if block <= 0 or image_bytes < block:
        raise ValueError(f"image of {image_bytes} bytes holds no block of {block} bytes")
    blocks = image_bytes // block
    rng = random.Random(seed)
    for _ in range(count):
        yield rng.randrange(blocks) * block


def modified_bytes(written: Iterable[int], block: int) -> int:
    """Bytes a resync must at least resend: distinct blocks written, times the block size."""
    return len(set(written)) * block


def region_bytes(written: Iterable[int], block: int, region: int) -> int:
    """Bytes of the dirty log's regions the writes touched: what a resync is expected to resend.

    The dirty log tracks ``region``-sized pieces (64 KiB), so a random 4 KiB
    write dirties a whole region; on a sparse image nearly every write is alone
    in its region, and the resync resends about region/block times the data.
    """
    touched: set[int] = set()
    for offset in written:
        touched.update(range(offset // region, (offset + block - 1) // region + 1))
    return len(touched) * region


@dataclass(frozen=True)
class Batch:
    """What one bounded batch of random writes did."""

    writes: int
    seconds: float
    modified: int  # distinct blocks written x block size
    regions: int = 0  # the dirty log's regions touched x region size
    block: int = BLOCK

    @property
    def iops(self) -> float:
        return self.writes / self.seconds if self.seconds > 0 else float("inf")

    @property
    def mib_per_s(self) -> float:
        return self.writes * self.block / MIB / self.seconds if self.seconds > 0 else float("inf")

    def describe(self) -> str:
        return (
            f"{self.writes} writes in {self.seconds:.1f} s "
            f"({self.iops:.0f} IOPS, {self.mib_per_s:.2f} MiB/s)"
        )

    @classmethod
    def from_json(cls, text: str) -> Batch:
        doc = json.loads(text.strip().splitlines()[-1])
        return cls(
            int(doc["writes"]), float(doc["seconds"]), int(doc["modified"]), int(doc["regions"])
        )


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("inf")


def throughput_figures(replicated: Batch, local: tuple[Batch, ...]) -> list[Figure]:
    """MiB/s and IOPS of the replicated image against the local one (mean of the local runs)."""
    where = "; ".join(f"local {b.describe()}" for b in local)
    detail = f"replicated {replicated.describe()}; {where}; fsync every {FSYNC_EVERY} writes"
    return [
        Figure(
            "kvm image: random 4 KiB writes, sync",
            replicated.mib_per_s,
            "MiB/s",
            mean(b.mib_per_s for b in local),
            "same image unreplicated",
            None,
            detail=detail,
        ),
        Figure(
            "kvm image: random 4 KiB writes, sync (IOPS)",
            replicated.iops,
            "IOPS",
            mean(b.iops for b in local),
            "same image unreplicated",
            None,
        ),
    ]


@dataclass(frozen=True)
class Reintegration:
    """The secondary's return: from boot to up to date, and what the resync did."""

    seconds: float  # lab boot -> SECOND and uptodate (includes the node's boot)
    resync_seconds: float  # the primary's own measure of the resync
    bytes_resent: int
    away: Batch  # the writes made while the secondary was away
    copy_bytes: int  # baseline: a raw local copy of this many bytes (the bytes resent)...
    copy_seconds: float  # ...took this long
    creates_away: tuple[float, ...] = ()  # file creations in the replicated dir while away
    creates_local: tuple[float, ...] = ()  # the same in the unreplicated dir


def reintegration_figures(r: Reintegration) -> list[Figure]:
    modified = r.away.modified
    resync_rate = r.bytes_resent / MIB / r.resync_seconds if r.resync_seconds > 0 else float("inf")
    copy_rate = r.copy_bytes / MIB / r.copy_seconds if r.copy_seconds > 0 else float("inf")
    copied = f"raw local copy of {r.copy_bytes / MIB:.1f} MiB"
    figures = [
        Figure(
            "kvm image: reintegration (boot to up to date)",
            r.seconds,
            "s",
            r.copy_seconds,
            copied,
            None,
            detail=(
                f"{r.away.writes} random writes while away modified {modified / MIB:.1f} MiB; "
                f"resync alone {r.resync_seconds:.2f} s; "
                "boot to up to date includes the node's boot and rampartd's start"
            ),
        ),
        Figure(
            "kvm image: bytes resent",
            r.bytes_resent / MIB,
            "MiB",
            modified / MIB,
            "bytes modified",
            # the resync must send the dirty regions and nothing else (1 MiB for metadata)
            (r.away.regions + MIB) / MIB,
            detail=(
                f"{r.away.regions / MIB:.1f} MiB of {REGION // 1024} KiB dirty-log regions "
                "touched; the limit is those regions, i.e. no clean data resent"
            ),
        ),
        Figure(
            "kvm image: resync throughput",
            resync_rate,
            "MiB/s",
            copy_rate,
            copied,
            None,
        ),
    ]
    if r.creates_away:
        figures.append(creates_figure(list(r.creates_away), list(r.creates_local)))
    return figures


def space_problem(free: int, wanted: int) -> str | None:
    """Why the benchmark must not start on this disk, or None."""
    if free >= wanted:
        return None
    return f"{free / MIB:.0f} MiB free under {LAB_DISK}, {wanted / MIB:.0f} MiB wanted"


def wanted_bytes() -> int:
    written = WRITES * BLOCK * 4 + AWAY_WRITES * BLOCK * 4  # both nodes, local and replicated
    return written + SPARE_BYTES


# -- the workload: inside the primary host ------------------------------------------------


def write_batch(path: str, seed: int, count: int, seconds: float, fsync_every: int) -> Batch:
    """Random 4 KiB writes into ``path`` (made a 4 GiB sparse image if absent), bounded."""
    if not os.path.exists(path):
        with open(path, "wb") as image:
            image.truncate(IMAGE_BYTES)
    data = os.urandom(BLOCK * 256)  # one pool; block contents need not differ for the disk
    written: list[int] = []
    fd = os.open(path, os.O_WRONLY)
    try:
        began = time.monotonic()
        deadline = began + seconds
        for i, offset in enumerate(offsets(seed, IMAGE_BYTES, BLOCK, count)):
            if time.monotonic() > deadline:
                break
            os.pwrite(fd, data[(i % 256) * BLOCK : (i % 256 + 1) * BLOCK], offset)
            written.append(offset)
            if len(written) % fsync_every == 0:
                os.fsync(fd)
        os.fsync(fd)
        took = time.monotonic() - began
    finally:
        os.close(fd)
    return Batch(
        len(written), took, modified_bytes(written, BLOCK), region_bytes(written, BLOCK, REGION)
    )


def copy_timed(folder: str, nbytes: int) -> float:
    """Seconds to copy ``nbytes`` (read, write, fsync) in ``folder``; the source is made first."""
    src, dst = os.path.join(folder, "copy-src"), os.path.join(folder, "copy-dst")
    chunk = os.urandom(MIB)
    with open(src, "wb") as out:
        for done in range(0, nbytes, MIB):
            out.write(chunk[: min(MIB, nbytes - done)])
        out.flush()
        os.fsync(out.fileno())
    began = time.monotonic()
    with open(src, "rb") as inp, open(dst, "wb") as out:
        shutil.copyfileobj(inp, out, MIB)
        out.flush()
        os.fsync(out.fileno())
    took = time.monotonic() - began
    os.unlink(src)
    os.unlink(dst)
    return took


def create_latencies(folder: str, count: int) -> list[float]:
    """Seconds each of ``count`` small file creations took (create, write 4 KiB, close)."""
    os.makedirs(folder, exist_ok=True)
    took = []
    for i in range(count):
        began = time.monotonic()
        with open(os.path.join(folder, f"snap-{i}"), "wb") as out:
            out.write(b"\0" * BLOCK)
        took.append(time.monotonic() - began)
    return took


def creates_figure(away: list[float], local: list[float]) -> Figure:
    """Worst file creation while the secondary is away, against the same unreplicated.

    The resync holds the namespace order while it connects, and while the
    peer is away it tries again every second: a creation can wait for a
    connection attempt to an absent node. This shows how long.
    """
    ms = sorted(t * 1000 for t in away)
    return Figure(
        "kvm image: worst file creation while the secondary is away",
        ms[-1] if ms else float("inf"),
        "ms",
        max(local) * 1000 if local else None,
        "same unreplicated",
        None,
        detail=(
            f"{len(ms)} creations in the replicated dir, median {ms[len(ms) // 2]:.1f} ms"
            if ms
            else "no creation measured"
        ),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kvm_image")
    verbs = parser.add_subparsers(dest="verb", required=True)
    write = verbs.add_parser("write")
    write.add_argument("path")
    write.add_argument("--seed", type=int, required=True)
    write.add_argument("--count", type=int, required=True)
    write.add_argument("--seconds", type=float, required=True)
    write.add_argument("--fsync-every", type=int, default=FSYNC_EVERY)
    copy = verbs.add_parser("copy")
    copy.add_argument("folder")
    copy.add_argument("--bytes", type=int, required=True)
    creates = verbs.add_parser("creates")
    creates.add_argument("folder")
    creates.add_argument("--count", type=int, required=True)
    args = parser.parse_args(argv)
    if args.verb == "creates":
        print(json.dumps({"seconds": create_latencies(args.folder, args.count)}))
    elif args.verb == "write":
        b = write_batch(args.path, args.seed, args.count, args.seconds, args.fsync_every)
        doc = {"writes": b.writes, "seconds": b.seconds, "modified": b.modified}
        print(json.dumps({**doc, "regions": b.regions}))
    else:
        print(json.dumps({"seconds": copy_timed(args.folder, args.bytes)}))
    return 0


# -- the lab -------------------------------------------------------------------------


def module_source(lab: LabDriver, work: Path) -> Path:
    """`rampart module new --template kvm-vm` for the lab, with no-op scripts and no checker."""
    from node_service.module import moduledir

    src = work / MODULE
    nodes = [f"--node={n['name']}={','.join(n['addresses'])}" for n in lab.status["nodes"]]
    lab.rampart("module", "new", MODULE, "--template", "kvm-vm", "--out", str(src),
                *nodes, "--vip", lab.vip(), "--dir", DIR)  # fmt: skip
    xml = src / "userconfig.xml"
    xml.write_text(re.sub(r"\s*<checkers>.*?</checkers>", "", xml.read_text(), flags=re.S))
    for script in (src / "bin").iterdir():
        if script.name == "check_vm":
            script.unlink()
        else:
            script.write_text(NO_OP)
    moduledir.review(src)  # refuses what a node would refuse, before the lab sees it
    return src


class KvmLab:
    """The lab verbs the benchmark uses, bounded; module ``vm`` on 2 nodes."""

    def __init__(self, name: str) -> None:
        from node_service.demo import LabDriver

        self.lab = LabDriver(name)

    def on(self, node: str, *argv: str, timeout: float = 60.0) -> str:
        return self.lab.on(node, *argv, timeout=timeout).stdout

    def py(self, node: str, *argv: str, timeout: float = WORKER_TIMEOUT_S) -> str:
        """`python -m bench.kvm_image ARGV` inside ``node`` (this repository's code)."""
        line = f"cd {REPO} && exec {sys.executable} -m bench.kvm_image " + " ".join(argv)
        cmd = ("lab", "exec", node, "--", "sh", "-c", line)
        return self.lab.rampart(*cmd, timeout=timeout).stdout

    def state(self, node: str) -> dict:
        done = self.lab.on(
            node, "state", "-m", MODULE, "--json", check=False, quiet=True, timeout=30
        )
        return json.loads(done.stdout) if done.returncode == 0 else {"state": "down"}

    def repl_status(self, node: str) -> dict:
        return json.loads(self.on(node, "repl", "status", "-m", MODULE, "--json"))

    def roles(self) -> tuple[str, str]:
        from node_service.demo import up_to_date

        deadline = time.monotonic() + ROLES_TIMEOUT_S
        for _ in range(int(ROLES_TIMEOUT_S / POLL_S) + 1):
            states = {n: self.state(n) for n in self.lab.nodes}
            prim = [n for n, s in states.items() if s.get("state") == "PRIM"]
            second = [n for n, s in states.items() if s.get("state") == "SECOND" and up_to_date(s)]
            if len(prim) == 1 and len(second) == 1:
                return prim[0], second[0]
            if time.monotonic() > deadline:
                break
            time.sleep(POLL_S)
        raise BenchError(
            f"module {MODULE}: no PRIM and up-to-date SECOND after {ROLES_TIMEOUT_S:g} s"
        )

    def until_uptodate(self, second: str, timeout: float) -> float:
        """Poll (bounded) until ``second`` is SECOND and up to date; the monotonic instant seen."""
        from node_service.demo import up_to_date

        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / POLL_S) + 1):
            state = self.state(second)
            if state.get("state") == "SECOND" and up_to_date(state):
                return time.monotonic()
            if time.monotonic() > deadline:
                break
            time.sleep(POLL_S)
        return float("inf")


def _batch(lab: KvmLab, node: str, path: str, seed: int, count: int, seconds: float) -> Batch:
    out = lab.py(node, "write", path, "--seed", str(seed), "--count", str(count),
                 "--seconds", str(seconds), "--fsync-every", str(FSYNC_EVERY))  # fmt: skip
    return Batch.from_json(out)


def run() -> list[Figure]:
    free = shutil.disk_usage(LAB_DISK).free
    problem = space_problem(free, wanted_bytes())
    if problem:
        return [failed(NAME, f"kvm image could not run: {problem}")]
    print(f"bench: {NOTE}", flush=True)
    kv = KvmLab(LAB)
    if kv.lab.is_up():
        print(f"bench: lab {LAB} is up from an earlier run: taking it down first", flush=True)
        kv.lab.down()
    work = Path(tempfile.mkdtemp(prefix="rampart-bench-kvm-"))
    try:
        kv.lab.up()
        src = module_source(kv.lab, work)
        safe = work / f"{MODULE}.safe"
        kv.lab.rampart("module", "build", str(src), "--key", kv.lab.status["signing_key"],
                       "--out", str(safe))  # fmt: skip
        for node in kv.lab.nodes:
            kv.lab.rampart("lab", "exec", node, "--", "mkdir", "-p", DIR, LOCAL_DIR)
            kv.on(node, "module", "install", str(safe))
        for node in kv.lab.nodes:
            kv.on(node, "start", "-m", MODULE)
        prim, second = kv.roles()
        image, local = f"{DIR}/{IMAGE}", f"{LOCAL_DIR}/{IMAGE}"
        # same seed everywhere: the same blocks, so only the path differs
        args = (SEED_THROUGHPUT, WRITES, WRITE_SECONDS)
        before = _batch(kv, prim, local, *args)
        replicated = _batch(kv, prim, image, *args)
        after = _batch(kv, prim, local, *args)
        figures = throughput_figures(replicated, (before, after))
        return figures + reintegration_figures(_reintegrate(kv, prim, second, image))
    finally:
        kv.lab.down()
        shutil.rmtree(work, ignore_errors=True)


def _reintegrate(kv: KvmLab, prim: str, second: str, image: str) -> Reintegration:
    # the module's first full sync is a last_resync too: only a newer one is this return's
    earlier = (kv.repl_status(prim).get("last_resync") or {}).get("at")
    kv.lab.rampart("lab", "crash", second)
    argv = ("wait", "-m", MODULE, "--state", "ALONE", "--timeout", f"{ALONE_TIMEOUT_S:g}")
    waited = kv.lab.on(prim, *argv, check=False, timeout=ALONE_TIMEOUT_S + 30)
    if waited.returncode != 0:
        raise BenchError(
            f"{prim} did not go ALONE within {ALONE_TIMEOUT_S:g} s of {second}'s crash"
        )
    creates = json.loads(kv.py(prim, "creates", f"{DIR}/snapshots", "--count", str(CREATES)))
    local = json.loads(kv.py(prim, "creates", f"{LOCAL_DIR}/snapshots", "--count", str(CREATES)))
    away = _batch(kv, prim, image, SEED_AWAY, AWAY_WRITES, AWAY_SECONDS)
    began = time.monotonic()
    kv.lab.rampart("lab", "boot", second)
    seen = kv.until_uptodate(second, REINTEGRATION_TIMEOUT_S)
    last = kv.repl_status(prim).get("last_resync") or {}
    if last.get("at") == earlier:
        last = {}
    resent = int(last.get("bytes_resent") or 0)
    # the baseline copies what the resync had to move (the dirty regions), same disk
    nbytes = max(resent, away.modified)
    copy = json.loads(kv.py(prim, "copy", LOCAL_DIR, "--bytes", str(nbytes)))
    return Reintegration(
        seconds=seen - began,
        resync_seconds=float(last.get("seconds") or 0.0),
        bytes_resent=resent,
        away=away,
        copy_bytes=nbytes,
        copy_seconds=float(copy["seconds"]),
        creates_away=tuple(creates["seconds"]),
        creates_local=tuple(local["seconds"]),
    )


if __name__ == "__main__":
    sys.exit(main())
