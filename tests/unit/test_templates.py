"""Module templates: each is valid, fills from flags, and the demo scripts really serve."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from node_service.errors import ModuleError, UserError
from node_service.module import moduledir, templates, userconfig
from node_service.module.model import FarmRule, Node, TcpChecker, VirtualIP

EXPECTED = ["docker", "farm", "kvm-vm", "mirror", "nginx", "postgresql"]
NODES = (Node("a", ("198.51.100.11", "203.0.113.11")), Node("b", ("198.51.100.12", "203.0.113.12")))


def test_all_templates_are_shipped() -> None:
    assert templates.available() == EXPECTED


@pytest.mark.parametrize("name", EXPECTED)
def test_template_is_a_valid_module(name: str) -> None:
    review = moduledir.review(templates.template_path(name))
    assert review.module.name == name
    assert review.warnings == ()


@pytest.mark.parametrize("name", EXPECTED)
def test_template_scripts_are_posix_sh(name: str) -> None:
    root = templates.template_path(name)
    scripts = sorted((root / "bin").iterdir())
    assert scripts
    for script in scripts:
        text = script.read_text()
        assert text.startswith("#!/bin/sh\n"), script
        assert "\nset -eu\n" in text, script
        assert os.access(script, os.X_OK), script
        check = subprocess.run(["sh", "-n", str(script)], capture_output=True, timeout=10)
        assert check.returncode == 0, check.stderr
    assert (root / "README.md").read_text().startswith("# ")


def test_unknown_template_lists_the_available_ones() -> None:
    with pytest.raises(UserError) as info:
        templates.template_path("oracle")
    assert str(info.value) == (
        "unknown template 'oracle'; available templates: " + ", ".join(EXPECTED)
    )


# -- fill: the pure part -----------------------------------------------------------


def test_fill_replaces_name_nodes_and_vip_and_the_checker_follows() -> None:
    module, reason = templates.fill(
        templates.load("mirror"),
        templates.Fill("shop", NODES, vip=VirtualIP("198.51.100.250", 24)),
    )
    assert (module.name, module.nodes) == ("shop", NODES)
    assert module.vips == (VirtualIP("198.51.100.250", 24),)
    assert module.checkers[0] == TcpChecker(
        address="198.51.100.250", port=8080, interval=2, timeout=1, failures=3
    )
    assert reason == "name shop; nodes a, b; vip 198.51.100.250/24"


def test_fill_dirs_and_port_on_a_mirror() -> None:
    module, _ = templates.fill(
        templates.load("postgresql"),
        templates.Fill("db", NODES, dirs=("/data/pg", "/data/wal"), ports=(5433,)),
    )
    assert module.replicated_dirs == ("/data/pg", "/data/wal")
    assert [c.port for c in module.checkers if isinstance(c, TcpChecker)] == [5433]
    assert templates.tokens(module)["@PORT@"] == "5433"
    assert templates.tokens(module)["@DIR@"] == "/data/pg"


def test_fill_ports_and_lb_on_a_farm() -> None:
    module, _ = templates.fill(
        templates.load("nginx"), templates.Fill("web", NODES, ports=(80, 443), lb="ip_port")
    )
    assert module.farm is not None
    assert module.farm.rules == (FarmRule((80, 443), "tcp", "ip_port"),)
    assert module.checkers[0].port == 80


@pytest.mark.parametrize(
    ("template", "choice", "words"),
    [
        ("farm", templates.Fill("x", dirs=("/srv/x",)), "--dir replicates a mirror's"),
        ("mirror", templates.Fill("x", lb="ip"), "--lb chooses how a farm"),
        ("mirror", templates.Fill("x", ports=(80, 81)), "a mirror template takes one"),
    ],
)
def test_fill_refuses_flags_of_the_other_kind(
    template: str, choice: templates.Fill, words: str
) -> None:
    with pytest.raises(UserError, match=words):
        templates.fill(templates.load(template), choice)


def test_parse_node_flag() -> None:
    assert templates.parse_node("n1=198.51.100.11, 203.0.113.11") == Node(
        "n1", ("198.51.100.11", "203.0.113.11")
    )
    with pytest.raises(UserError, match="expected NAME=ADDRESS"):
        templates.parse_node("198.51.100.11")
    with pytest.raises(UserError, match="'nowhere' is not an IP address"):
        templates.parse_node("n1=nowhere")


def test_parse_vip_flag() -> None:
    assert templates.parse_vip("198.51.100.9") == VirtualIP("198.51.100.9", 24)
    assert templates.parse_vip("2001:db8::9/80") == VirtualIP("2001:db8::9", 80)
    with pytest.raises(UserError, match="prefix 'x' is not a number"):
        templates.parse_vip("198.51.100.9/x")


# -- create: the side effects ------------------------------------------------------


@pytest.mark.parametrize("name", EXPECTED)
def test_create_from_each_template_validates(name: str, tmp_path: Path) -> None:
    out = tmp_path / "mod"
    module, _ = templates.create(name, templates.Fill("mod1", NODES), out)
    review = moduledir.review(out)
    assert review.module == module and review.warnings == ()
    assert (out / "userconfig.xml").read_bytes() == userconfig.emit(module)
    for path in out.rglob("*"):
        if path.is_file():
            assert "@MODULE@" not in path.read_text(), path
    assert "mod1" in (out / "README.md").read_text()


def test_create_into_an_existing_empty_dir(tmp_path: Path) -> None:
    templates.create("farm", templates.Fill("w", NODES), tmp_path)
    assert userconfig.load_dir(tmp_path).name == "w"


def test_create_refuses_a_non_empty_dir(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists and is not empty"):
        templates.create("mirror", templates.Fill("w", NODES), tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_create_refuses_an_invalid_result_and_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(ModuleError, match="would be invalid: a mirror module has exactly 2 nodes"):
        templates.create("mirror", templates.Fill("w", NODES[:1]), tmp_path / "w")
    assert list(tmp_path.iterdir()) == []


# -- the demo scripts, for real (loopback only) -------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(module_dir: Path, script: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(module_dir / "bin" / script)],
        env={**os.environ, **env, "RAMPART_ACTION": script},
        capture_output=True,
        text=True,
        timeout=30,
    )


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return reply.read().decode()


@pytest.fixture
def demo_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    run = tmp_path / "run"
    env = {"RAMPART_RUN_DIR": str(run)}
    yield env
    # Whatever the test did, no web server outlives it.
    pidfile = run / "http.pid"
    if pidfile.exists():
        try:
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def test_mirror_demo_scripts_serve_and_stop(tmp_path: Path, demo_env: dict[str, str]) -> None:
    port, data = free_port(), tmp_path / "data"
    out = tmp_path / "demo"
    nodes = (Node("a", ("127.0.0.11",)), Node("b", ("127.0.0.12",)))
    choice = templates.Fill("demo", nodes, VirtualIP("127.0.0.2", 8), (str(data),), (port,))
    templates.create("mirror", choice, out)
    env = {
        **demo_env,
        "RAMPART_MODULE": "demo",
        "RAMPART_MODULE_DIR": str(out),
        "RAMPART_NODE": "a",
        "RAMPART_STATE": "PRIM",
    }
    started = run_script(out, "start_prim", env)
    assert started.returncode == 0, started.stderr
    assert f"serving {data}/www on 127.0.0.2:{port}" in started.stdout
    assert get(f"http://127.0.0.2:{port}/node.txt") == "a\n"
    assert "Rampart module demo" in get(f"http://127.0.0.2:{port}/")
    pid = int((tmp_path / "run" / "http.pid").read_text())

    again = run_script(out, "start_prim", env)
    assert again.returncode == 0 and "already running" in again.stdout

    stopped = run_script(out, "stop_prim", env)
    assert stopped.returncode == 0 and "web server stopped" in stopped.stdout
    assert not Path(f"/proc/{pid}").exists() or "zombie" in _state(pid)
    with pytest.raises(OSError):
        get(f"http://127.0.0.2:{port}/node.txt")

    idle = run_script(out, "stop_prim", env)
    assert idle.returncode == 0 and "not running" in idle.stdout


def test_farm_demo_scripts_serve_and_stop(tmp_path: Path, demo_env: dict[str, str]) -> None:
    port, out = free_port(), tmp_path / "web"
    templates.create("farm", templates.Fill("web", NODES, ports=(port,)), out)
    env = {**demo_env, "RAMPART_MODULE": "web", "RAMPART_MODULE_DIR": str(out)}
    env |= {"RAMPART_NODE": "b", "RAMPART_STATE": "UP"}
    started = run_script(out, "start_both", env)
    assert started.returncode == 0, started.stderr
    assert get(f"http://127.0.0.1:{port}/node.txt") == "b\n"
    stopped = run_script(out, "stop_both", env)
    assert stopped.returncode == 0 and "web server stopped" in stopped.stdout
    with pytest.raises(OSError):
        get(f"http://127.0.0.1:{port}/node.txt")


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return "zombie"
