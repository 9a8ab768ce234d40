"""`make bench`: run every benchmark and print each figure with its baseline.

Benchmarks are modules in this package with a ``run() -> list[Figure]``
function, listed in BENCHMARKS. The machine is shared and noisy, so each
figure is printed with a baseline measured in the same run (see
docs/dev/bench.md). A benchmark that cannot run prints one failed figure
with the reason; the exit code is 1 if any figure misses its limit.
"""

from __future__ import annotations

import importlib
import os
import sys
import time

from bench.figures import Figure, failed
from node_service.errors import RampartError

BENCHMARKS: tuple[str, ...] = (
    "failover",
    "swap",
    "load",
    "farm",
    "replication",
    "console",
    "kvm_image",
)


def run_one(name: str) -> list[Figure]:
    bench = importlib.import_module(f"bench.{name}")
    try:
        return list(bench.run())
    except (RampartError, OSError, ValueError, KeyError) as exc:
        # One line, not a traceback: the lab was taken down by the benchmark's finally.
        return [failed(getattr(bench, "NAME", name), f"{name} could not run: {exc}")]


def main(argv: list[str] | None = None) -> int:
    selected = tuple(argv if argv is not None else sys.argv[1:]) or BENCHMARKS
    unknown = [n for n in selected if n not in BENCHMARKS]
    if unknown:
        print(f"bench: unknown benchmark {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
        return 2
    if os.geteuid() != 0:
        print("bench: the benchmarks run labs (network namespaces) and need root")
        return 1
    figures: list[Figure] = []
    for name in selected:
        began = time.monotonic()
        print(f"bench: {name} ...", flush=True)
        for figure in run_one(name):
            figures.append(figure)
            print(figure, flush=True)
        print(f"bench: {name} took {time.monotonic() - began:.0f} s", flush=True)
    missed = [f.name for f in figures if not f.ok]
    print(f"bench: {len(figures) - len(missed)} of {len(figures)} figure(s) within their limit")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
