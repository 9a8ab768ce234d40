"""Full CPU and disk load on one host, for a bounded time; prints what it achieved.

Run inside a lab node: ``python -m bench.loadgen --seconds 60 --dir /srv/x``.
One busy-loop process per CPU and one writer that writes 1 MiB blocks and
fsyncs every 8 MiB into a file it rewrites from the start every 128 MiB
(bounded space). At the end it prints one JSON line: loops per second, the
CPU time the load's processes actually got (their own process_time, so
the figure shows how hard a shared machine let it push), and MB/s written.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

BLOCK = 1 << 20
FSYNC_EVERY = 8
WRAP_BLOCKS = 128


def burn(seconds: float, results: multiprocessing.Queue) -> None:
    deadline = time.monotonic() + seconds
    loops = 0
    while time.monotonic() < deadline:
        for _ in range(10_000):
            loops += 1
    results.put(("cpu", loops, time.process_time()))


def write(seconds: float, path: str, results: multiprocessing.Queue) -> None:
    deadline = time.monotonic() + seconds
    block = os.urandom(BLOCK)
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while time.monotonic() < deadline:
            for i in range(WRAP_BLOCKS):
                os.pwrite(fd, block, i * BLOCK)
                written += BLOCK
                if (i + 1) % FSYNC_EVERY == 0:
                    os.fsync(fd)
                    if time.monotonic() >= deadline:
                        break
    finally:
        os.close(fd)
        os.unlink(path)
    results.put(("disk", written, time.process_time()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--dir", required=True, help="where the writer puts its file")
    args = parser.parse_args(argv)
    seconds = max(0.1, min(args.seconds, 600.0))
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    cpus = os.cpu_count() or 1
    results: multiprocessing.Queue = multiprocessing.Queue()
    workers = [
        multiprocessing.Process(target=burn, args=(seconds, results), name=f"load-cpu-{i}")
        for i in range(cpus)
    ]
    path = str(Path(args.dir) / f"load-{os.getpid()}")
    workers.append(
        multiprocessing.Process(target=write, args=(seconds, path, results), name="load-disk")
    )
    start = time.monotonic()
    for worker in workers:
        worker.start()
    totals = {"cpu": 0, "disk": 0}
    cpu_seconds = 0.0
    for _ in workers:
        kind, amount, used = results.get(timeout=seconds + 60)
        totals[kind] += amount
        cpu_seconds += used
    for worker in workers:
        worker.join(30)
    wall = time.monotonic() - start
    print(json.dumps({
        "cpus": cpus, "seconds": wall,
        "loops_per_s": totals["cpu"] / wall,
        "cpu_seconds_per_s": cpu_seconds / wall,
        "disk_mb_per_s": totals["disk"] / wall / 1e6,
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
