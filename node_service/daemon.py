"""`rampartd`: the node daemon (built in the node engine issue)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("rampartd: not built yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
