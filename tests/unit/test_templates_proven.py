"""Issue 8: the postgresql, nginx, kvm-vm and docker templates, proven end to end by the CLI.

tests/unit/test_templates.py checks each template as shipped and
``templates.create``; test_authoring_cli.py runs ``module new`` + ``validate``.
What is added here is the rest of the path a person takes: the module made by
``rampart module new`` (every flag its kind takes) is signed into a ``.safe``,
verified against the signer's key (and refused against another), inspected,
and extracted into exactly the files that were signed; the filled scripts
(tokens replaced) still pass ``sh -n``.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.unit.conftest import CliResult

Rampart = Callable[..., CliResult]
NODES = (
    "--node",
    "lab-n1=198.51.100.11,203.0.113.11",
    "--node",
    "lab-n2=198.51.100.12,203.0.113.12",
)
# template -> (kind, the flags that kind takes, what inspect must show)
PROVEN = {
    "postgresql": ("mirror", ("--dir", "/srv/pg", "--port", "5433"), {"dirs": ["/srv/pg"]}),
    "kvm-vm": ("mirror", ("--dir", "/srv/vm"), {"dirs": ["/srv/vm"]}),
    "docker": ("mirror", ("--dir", "/srv/compose"), {"dirs": ["/srv/compose"]}),
    "nginx": (
        "farm",
        ("--port", "80", "--port", "443", "--lb", "ip_port"),
        {"farm": [{"ports": [80, 443], "protocol": "tcp", "criterion": "ip_port"}]},
    ),
}


def tree(root: Path) -> dict[str, tuple[bytes, bool]]:
    return {
        str(p.relative_to(root)): (p.read_bytes(), os.access(p, os.X_OK))
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def signer(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    from node_service.module import keys

    root = tmp_path_factory.mktemp("keys")
    key, pub = keys.generate(root / "signer")
    _, other = keys.generate(root / "other")
    return key, pub, other


@pytest.mark.parametrize("template", sorted(PROVEN))
def test_template_is_made_signed_verified_and_extracted(
    template: str, rampart: Rampart, tmp_path: Path, signer: tuple[Path, Path, Path]
) -> None:
    key, pub, other = signer
    kind, flags, shown = PROVEN[template]
    name = f"p-{template}"
    src = tmp_path / name
    made = rampart("module", "new", name, "--template", template, "--out", src, *NODES,
                   "--vip", "198.51.100.210", *flags)  # fmt: skip
    assert made.rc == 0, made.err
    checked = rampart("module", "validate", src)
    assert (checked.rc, checked.out, checked.err) == (0, f"valid: {name} ({kind}, 2 nodes)\n", "")

    scripts = sorted((src / "bin").iterdir())
    assert scripts, f"{template} has no scripts"
    for script in scripts:
        text = script.read_text()
        assert "@" not in text.replace("$@", ""), f"{script}: a token was left unfilled"
        syntax = subprocess.run(["sh", "-n", str(script)], capture_output=True, timeout=10)
        assert syntax.returncode == 0, f"{script}: {syntax.stderr.decode()}"

    safe = tmp_path / f"{name}.safe"
    built = rampart("module", "build", src, "--key", key, "--out", safe)
    assert built.rc == 0 and built.err == "", built.err
    assert built.out.startswith(f"built {safe}: {name} 1, ")

    verified = rampart("module", "verify", safe, "--trust", pub)
    assert verified.rc == 0 and verified.out.startswith(f"valid: {name} 1 signed by "), verified.err
    refused = rampart("module", "verify", safe, "--trust", other)
    assert refused.rc != 0 and refused.out == ""
    assert len(refused.err.strip().splitlines()) == 1  # one clear reason, no traceback

    inspected = rampart("module", "inspect", safe, "--json")
    info = json.loads(inspected.out)
    assert (info["name"], info["kind"]) == (name, kind)
    assert [v["address"] for v in info["vips"]] == ["198.51.100.210"]
    assert {k: info[k] for k in shown} == shown

    dest = tmp_path / "extracted"
    unpacked = rampart("module", "extract", safe, dest, "--trust", pub)
    assert unpacked.rc == 0, unpacked.err
    assert tree(dest) == tree(src)
