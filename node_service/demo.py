"""`make demo`: the product end to end, one step after another, printed.

Each step runs the same `rampart` verbs a person would type, so the demo
proves the commands, not internals. The output directory is ./out/demo
(kept afterwards so the .safe file and keys can be looked at).
"""

from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path

from node_service.cli import main as rampart

OUT = Path("out/demo")


def step(title: str, *argv: str) -> None:
    print(f"\n== {title}\n$ rampart {shlex.join(argv)}", flush=True)
    code = rampart(list(argv))
    sys.stdout.flush()
    if code != 0:
        raise SystemExit(f"demo: step failed (exit {code}): rampart {shlex.join(argv)}")


def module_demo(out: Path) -> Path:
    """Create a key, write the sample mirror module, build, sign and verify it."""
    keys, src, safe = out / "keys", out / "web", out / "web.safe"
    step("Create a signing key", "keygen", "--out", str(keys))
    step(
        "Write a mirror module from the template",
        "module", "new", "web", "--template", "mirror", "--out", str(src),
        "--node", "lab-n1=198.51.100.11,203.0.113.11",
        "--node", "lab-n2=198.51.100.12,203.0.113.12",
        "--vip", "198.51.100.200", "--dir", "/srv/web", "--port", "80",
    )  # fmt: skip
    step("Validate it", "module", "validate", str(src))
    step("Build and sign it", "module", "build", str(src), "--key", str(keys / "signing.key"),
         "--out", str(safe))  # fmt: skip
    step("Verify it against the trusted key", "module", "verify", str(safe),
         "--trust", str(keys / "signing.pub"))  # fmt: skip
    step("Inspect it", "module", "inspect", str(safe))
    return safe


def main() -> int:
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    safe = module_demo(OUT)
    print(f"\ndemo: signed module at {safe}; keys under {OUT / 'keys'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
