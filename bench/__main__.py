"""`make bench`: run every benchmark and print each ratio with its baseline.

Benchmarks are modules in this package with a ``run() -> list[Figure]``
function, listed in BENCHMARKS. The machine is shared and noisy, so a figure
is never an absolute time: it is a ratio against a baseline measured in the
same run, printed with both numbers.
"""

from __future__ import annotations

import importlib
import sys

BENCHMARKS: tuple[str, ...] = ()


def main() -> int:
    if not BENCHMARKS:
        print("bench: no benchmarks yet")
        return 0
    failed = 0
    for name in BENCHMARKS:
        bench = importlib.import_module(f"bench.{name}")
        for figure in bench.run():
            print(figure)
            failed += not figure.ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
