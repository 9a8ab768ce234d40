"""`rampart module new` and `rampart module validate`, through node_service.cli.main."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from node_service.module import userconfig
from tests.unit.conftest import CliResult
from tests.unit.test_userconfig import MIRROR, edit

Rampart = Callable[..., CliResult]
NODES = (
    "--node",
    "lab-n1=198.51.100.11,203.0.113.11",
    "--node",
    "lab-n2=198.51.100.12,203.0.113.12",
)


def new(rampart: Rampart, out: Path, *extra: str, template: str = "mirror") -> CliResult:
    return rampart("module", "new", "demo", "--template", template, "--out", out, *NODES, *extra)


def test_new_then_validate(rampart: Rampart, tmp_path: Path) -> None:
    out = tmp_path / "demo"
    made = new(rampart, out, "--vip", "198.51.100.210", "--dir", "/srv/demo", "--port", "8081")
    assert made.rc == 0, made.err
    assert made.out.startswith(f"created {out}: demo (mirror, template mirror; name demo;")
    module = userconfig.load_dir(out)
    assert module.node("lab-n2").addresses == ("198.51.100.12", "203.0.113.12")
    assert module.replicated_dirs == ("/srv/demo",)
    assert "HTTP_PORT=8081" in (out / "app.env").read_text()

    checked = rampart("module", "validate", out)
    assert (checked.rc, checked.out, checked.err) == (0, "valid: demo (mirror, 2 nodes)\n", "")


@pytest.mark.parametrize("template", ["docker", "farm", "kvm-vm", "mirror", "nginx", "postgresql"])
def test_new_from_every_template_validates(rampart: Rampart, tmp_path: Path, template: str) -> None:
    assert new(rampart, tmp_path / "m", template=template).rc == 0
    checked = rampart("module", "validate", tmp_path / "m")
    assert checked.rc == 0 and checked.out.startswith("valid: demo (")


def test_new_farm_with_lb_and_ports(rampart: Rampart, tmp_path: Path) -> None:
    made = new(
        rampart,
        tmp_path / "w",
        "--port",
        "80",
        "--port",
        "443",
        "--lb",
        "ip_port",
        template="nginx",
    )
    assert made.rc == 0, made.err
    farm = userconfig.load_dir(tmp_path / "w").farm
    assert farm is not None and farm.rules[0].ports == (80, 443)
    assert farm.rules[0].criterion == "ip_port"


def test_new_refuses_unknown_template(rampart: Rampart, tmp_path: Path) -> None:
    made = new(rampart, tmp_path / "x", template="oracle")
    assert made.rc == 1
    assert made.err == (
        "rampart: unknown template 'oracle'; available templates: "
        "docker, farm, kvm-vm, mirror, nginx, postgresql\n"
    )
    assert not (tmp_path / "x").exists()


def test_new_refuses_non_empty_dir(rampart: Rampart, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    made = new(rampart, tmp_path)
    assert made.rc == 1
    expected = "already exists and is not empty; expected a new or empty directory"
    assert made.err == f"rampart: {tmp_path}: {expected}\n"


def test_new_refuses_invalid_flags_and_leaves_nothing(rampart: Rampart, tmp_path: Path) -> None:
    made = new(rampart, tmp_path / "x", "--vip", "198.51.100.11")
    assert made.rc == 1
    assert made.err.count("\n") == 1
    assert "virtual IP 198.51.100.11 is the address of node 'lab-n1'" in made.err
    assert list(tmp_path.iterdir()) == []


def test_new_refuses_a_bad_module_name(rampart: Rampart, tmp_path: Path) -> None:
    made = rampart("module", "new", "Bad Name", "--out", tmp_path / "x", *NODES)
    assert made.rc == 1 and "module name 'Bad Name' is invalid" in made.err


def test_new_refuses_a_bad_node_flag(rampart: Rampart, tmp_path: Path) -> None:
    made = rampart("module", "new", "a", "--out", tmp_path / "x", "--node", "n1")
    assert made.rc == 1
    assert (
        made.err
        == "rampart: --node 'n1': expected NAME=ADDRESS[,ADDRESS2], e.g. n1=198.51.100.11\n"
    )


def test_new_rejects_a_bad_port(rampart: Rampart, tmp_path: Path) -> None:
    made = new(rampart, tmp_path / "x", "--port", "0")
    assert made.rc == 2 and "'0' is not a port; expected 1 to 65535" in made.err


def write_module(path: Path, xml: bytes, scripts: dict[str, int]) -> Path:
    (path / "bin").mkdir(parents=True)
    (path / "userconfig.xml").write_bytes(xml)
    for name, mode in scripts.items():
        (path / "bin" / name).write_text("#!/bin/sh\nset -eu\n")
        (path / "bin" / name).chmod(mode)
    return path


def test_validate_prints_every_problem(rampart: Rampart, tmp_path: Path) -> None:
    bad = edit(MIRROR, 'port="80"', 'port="0"').replace(b'mode="sync"', b'mode="fast"')
    write_module(tmp_path, bad, {})
    checked = rampart("module", "validate", tmp_path)
    assert checked.rc == 1 and checked.out == ""
    assert checked.err_lines == [
        f"{tmp_path}/userconfig.xml:16: replication mode 'fast' is unknown; expected sync, semi "
        "or async",
        f"{tmp_path}/userconfig.xml:20: tcp checker port 0 is out of range; expected 1 to 65535",
    ]


def test_validate_warns_about_bin(rampart: Rampart, tmp_path: Path) -> None:
    xml = edit(MIRROR, "  </checkers>", '    <script name="check_web"/>\n  </checkers>')
    write_module(
        tmp_path,
        xml,
        {
            "start_prim": 0o755,
            "stop_prim": 0o644,
            "start_both": 0o755,
            "notes.txt": 0o644,
            "check_web": 0o755,
        },
    )
    checked = rampart("module", "validate", tmp_path)
    assert checked.rc == 0 and checked.out == "valid: web (mirror, 2 nodes)\n"
    where = f"{tmp_path}/bin"
    assert checked.err_lines == [
        f"warning: {where}/notes.txt is not a lifecycle script nor a checker script; "
        "nothing will run it",
        f"warning: {where}/start_both is not run by a mirror module; expected prestart, "
        "start_prim, stop_prim, poststop",
        f"warning: {where}/stop_prim is not executable; it will not run (chmod +x it)",
    ]


def test_validate_missing_checker_script_is_a_problem(rampart: Rampart, tmp_path: Path) -> None:
    xml = edit(MIRROR, "  </checkers>", '    <script name="check_web"/>\n  </checkers>')
    write_module(tmp_path, xml, {})
    checked = rampart("module", "validate", tmp_path)
    assert checked.rc == 1
    assert checked.err_lines == [
        f"{tmp_path}/bin: check_web is missing; a <script name='check_web'> checker needs an "
        "executable bin/check_web"
    ]


def test_validate_without_userconfig(rampart: Rampart, tmp_path: Path) -> None:
    checked = rampart("module", "validate", tmp_path)
    assert checked.rc == 1
    assert checked.err == (
        f"rampart: {tmp_path}: no userconfig.xml here; expected a module directory holding "
        "userconfig.xml and bin/\n"
    )


def test_validate_missing_path(rampart: Rampart, tmp_path: Path) -> None:
    checked = rampart("module", "validate", tmp_path / "nope.safe")
    assert checked.rc == 1
    assert checked.err == f"rampart: {tmp_path}/nope.safe: no such module directory or .safe file\n"


def test_validate_dtd_is_refused(rampart: Rampart, tmp_path: Path) -> None:
    write_module(tmp_path, b'<!DOCTYPE m [<!ENTITY a "b">]>\n<module/>', {})
    checked = rampart("module", "validate", tmp_path)
    assert checked.rc == 1 and checked.err.startswith(f"{tmp_path}/userconfig.xml:1: ")
    assert "refused" in checked.err


def test_validate_a_safe_file(rampart: Rampart, tmp_path: Path) -> None:
    from node_service.module import keys, safe

    key, _pub = keys.generate(tmp_path / "keys")
    assert new(rampart, tmp_path / "demo").rc == 0
    safe.build(tmp_path / "demo", key, tmp_path / "demo.safe")
    checked = rampart("module", "validate", tmp_path / "demo.safe")
    assert (checked.rc, checked.out) == (0, "valid: demo (mirror, 2 nodes)\n"), checked.err
    assert os.path.exists(tmp_path / "demo.safe")
