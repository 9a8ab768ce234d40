"""`rampart-console` entry point."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rampart-console")
    parser.add_argument("--site", help="site file (YAML)")
    parser.add_argument("--screenshot", help="grab the main window into this PNG and exit")
    parser.add_argument("--after", type=float, default=2.0, help="seconds before the screenshot")
    parser.parse_args(argv)
    print("rampart-console: the console is not built yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
