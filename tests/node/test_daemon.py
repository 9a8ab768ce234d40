"""rampartd as a real process: readiness, install/list/remove, commands, resume, shutdown."""

from __future__ import annotations

import json
import secrets
import subprocess

import pytest

from node_service.module import keys
from tests.node.daemon_fakes import VENV_BIN, Rampartd, build_safe

pytestmark = pytest.mark.node


@pytest.fixture
def daemon():
    d = Rampartd()
    try:
        d.trust_dir.mkdir()
        d.start()
        yield d
    finally:
        d.close()


@pytest.fixture
def signed(daemon):
    """A trusted key (in the daemon's trust dir) and an untrusted one."""
    trusted_key, trusted_pub = keys.generate(daemon.base / "trusted")
    (daemon.trust_dir / "site.pub").write_bytes(trusted_pub.read_bytes())
    other_key, _ = keys.generate(daemon.base / "other")
    return trusted_key, other_key


def snapshot(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def test_ready_then_stopping_on_sigterm_exits_0(daemon):
    health = daemon.rampart("state", "--json")
    assert health.returncode == 0, health.stderr
    assert json.loads(health.stdout) == {"node": "rt-n1", "modules": []}
    assert daemon.stop() == 0
    assert [m.split("\n")[0] for m in daemon.messages] == ["READY=1", "STOPPING=1"]
    assert not daemon.socket.exists()
    assert "rampartd stopped on node rt-n1" in (daemon.log_dir / "journal.jsonl").read_text()


def test_install_refuses_untrusted_and_installs_trusted(daemon, signed):
    trusted_key, other_key = signed
    untrusted = build_safe(daemon.base, "web", "rt-n1", other_key)
    before = snapshot(daemon.state_dir)
    refused = daemon.rampart("module", "install", str(untrusted))
    assert refused.returncode != 0
    assert refused.stderr.startswith("rampart: ") and len(refused.stderr.splitlines()) == 1
    assert "trust" in refused.stderr.lower()
    assert snapshot(daemon.state_dir) == before

    elsewhere = build_safe(daemon.base, "db", "rt-n9", trusted_key)
    refused = daemon.rampart("module", "install", str(elsewhere))
    assert refused.returncode == 3
    assert "does not run on node rt-n1" in refused.stderr
    assert snapshot(daemon.state_dir) == before

    good = build_safe(daemon.base, "web", "rt-n1", trusted_key)
    done = daemon.rampart("module", "install", str(good), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["module"]["name"] == "web"
    listed = json.loads(daemon.rampart("module", "list", "--json").stdout)
    assert [(m["name"], m["kind"], m["state"]) for m in listed["modules"]] == [
        ("web", "mirror", "STOP")
    ]
    assert (daemon.state_dir / "modules" / "web" / "module" / "userconfig.xml").exists()
    human = daemon.rampart("module", "list")
    assert human.stdout.split()[:2] == ["web", "mirror"]


def test_commands_state_unknown_module_and_remove(daemon, signed):
    trusted_key, _ = signed
    daemon_safe = build_safe(daemon.base, "web", "rt-n1", trusted_key)
    assert daemon.rampart("module", "install", str(daemon_safe)).returncode == 0

    started = daemon.rampart("start", "-m", "web", "--json")
    assert started.returncode == 0, started.stderr
    result = json.loads(started.stdout)
    assert result["reason"] == "started alone"
    assert result["state"]["state"] == "ALONE"

    state = json.loads(daemon.rampart("state", "-m", "web", "--json").stdout)
    for key in ("module", "kind", "node", "state", "since", "peers", "replication"):
        assert key in state
    assert (state["module"], state["kind"], state["node"]) == ("web", "mirror", "rt-n1")
    assert state["peers"] == {
        "rt-other": {"state": None, "reachable": False, "networks": {"198.51.100.12": False}}
    }
    assert state["replication"]["mode"] == "sync"
    assert state["replication"]["status"] == "off"
    table = daemon.rampart("state").stdout.splitlines()
    assert table[0].split()[:4] == ["MODULE", "KIND", "NODE", "STATE"]
    assert table[1].split()[:4] == ["web", "mirror", "rt-n1", "ALONE"]

    refused = daemon.rampart("prim", "-m", "nosuch")
    assert refused.returncode == 3
    assert refused.stderr.strip() == (
        "rampart: module nosuch is not installed on node rt-n1 (installed: web)"
    )
    again = daemon.rampart("start", "-m", "web")
    assert again.returncode == 3 and "already ALONE" in again.stderr

    busy = daemon.rampart("module", "remove", "web")
    assert busy.returncode == 3
    assert "stop it first (rampart stop -m web)" in busy.stderr

    assert daemon.rampart("stop", "-m", "web").returncode == 0
    removed = daemon.rampart("module", "remove", "web")
    assert removed.returncode == 0, removed.stderr
    assert not (daemon.state_dir / "modules" / "web").exists()

    events = daemon.rampart("events", "-m", "web", "--json", "-n", "200").stdout.splitlines()
    messages = [json.loads(line)["message"] for line in events]
    assert "STOP -> WAIT (start command)" in messages
    assert "ALONE -> STOP (stop command from root)" in messages


def test_restart_resumes_without_disturbing_the_application(daemon, signed):
    trusted_key, _ = signed
    assert (
        daemon.rampart(
            "module", "install", str(build_safe(daemon.base, "web", "rt-n1", trusted_key))
        ).returncode
        == 0
    )
    assert daemon.rampart("start", "-m", "web").returncode == 0
    assert daemon.rampart("swap", "-m", "web").returncode == 0  # ALONE -> SECOND
    starts = daemon.state_dir / "modules" / "web" / "state" / "fake-app-starts"
    assert starts.read_text() == "1"

    assert daemon.stop() == 0
    assert daemon.messages[-1].startswith("STOPPING=1")
    daemon.start()
    state = json.loads(daemon.rampart("state", "-m", "web", "--json").stdout)
    assert state["state"] == "SECOND"
    assert state["intent"] == "started"
    assert starts.read_text() == "1"  # resumed, not started again
    events = daemon.rampart("events", "-m", "web", "-n", "500").stdout
    assert "resumed after rampartd restart: adopted in SECOND" in events


def test_reinstall_keeps_state_and_refuses_kind_change_while_running(daemon, signed):
    trusted_key, _ = signed
    first = build_safe(daemon.base, "web", "rt-n1", trusted_key)
    assert daemon.rampart("module", "install", str(first)).returncode == 0
    assert daemon.rampart("start", "-m", "web").returncode == 0
    module_dir = daemon.state_dir / "modules" / "web"
    farm = build_safe(daemon.base, "web", "rt-n1", trusted_key, kind="farm")
    before = snapshot(module_dir)
    refused = daemon.rampart("module", "install", str(farm))
    assert refused.returncode == 3
    assert "running as a mirror module" in refused.stderr
    assert snapshot(module_dir) == before

    upgrade = daemon.rampart("module", "install", str(first))
    assert upgrade.returncode == 0, upgrade.stderr
    assert "keeps its old files until it is stopped" in upgrade.stdout
    assert (module_dir / "state" / "fake-app-starts").read_text() == "1"
    assert len(list(module_dir.glob("module-*"))) == 1


def test_unsupported_kind_and_damaged_module_do_not_stop_the_daemon(daemon, signed):
    trusted_key, _ = signed
    farm = build_safe(daemon.base, "lb", "rt-n1", trusted_key, kind="farm")
    assert daemon.rampart("module", "install", str(farm)).returncode == 0
    web = build_safe(daemon.base, "web", "rt-n1", trusted_key)
    assert daemon.rampart("module", "install", str(web)).returncode == 0
    listed = json.loads(daemon.rampart("module", "list", "--json").stdout)["modules"]
    lb = next(m for m in listed if m["name"] == "lb")
    assert lb["state"] == "unsupported" and "farm runner" in lb["error"]
    refused = daemon.rampart("start", "-m", "lb")
    assert refused.returncode == 3 and "module lb: cannot start: the farm runner" in refused.stderr

    assert daemon.stop() == 0
    (daemon.state_dir / "modules" / "web" / "module" / "userconfig.xml").write_text("<broken")
    daemon.start()
    states = {
        s["module"]: s for s in json.loads(daemon.rampart("state", "--json").stdout)["modules"]
    }
    assert states["web"]["state"] == "error"
    assert "userconfig.xml" in states["web"]["error"]
    assert states["lb"]["state"] == "unsupported"
    errors = daemon.rampart("events", "-m", "web", "--json").stdout.splitlines()
    assert any(json.loads(e)["severity"] == "error" for e in errors)


def test_bad_config_is_one_line_and_no_daemon(tmp_path):
    config = tmp_path / "node.yaml"
    config.write_text("node: n1\nheartbeat_port: abc\n")
    run = subprocess.run([str(VENV_BIN / "rampartd"), "--config", str(config)],
                         capture_output=True, text=True, timeout=30)  # fmt: skip
    assert run.returncode == 1
    assert run.stderr == (
        "rampartd: node.yaml:2: heartbeat_port must be an integer 1-65535, got 'abc'\n"
    )


def test_cli_without_daemon_says_so(tmp_path):
    run = subprocess.run([str(VENV_BIN / "rampart"), "state", "--socket", str(tmp_path / "x.sock")],
                         capture_output=True, text=True, timeout=30)  # fmt: skip
    assert run.returncode == 4
    assert run.stderr.strip() == (
        f"rampart: cannot reach rampartd at {tmp_path / 'x.sock'}: is it running? "
        "(systemctl status rampartd)"
    )


def test_second_daemon_on_the_same_socket_refuses_and_leaves_the_first(daemon):
    config = daemon.base / "second.yaml"
    config.write_text(
        daemon.config.read_text()
        .replace(str(daemon.state_dir), str(daemon.base / "state2"))
        .replace(str(daemon.log_dir), str(daemon.base / "log2"))
    )
    run = subprocess.run([str(VENV_BIN / "rampartd"), "--config", str(config)],
                         capture_output=True, text=True, timeout=30)  # fmt: skip
    assert run.returncode == 2
    assert (
        f"another rampartd is already serving {daemon.socket}"
        in (daemon.base / "log2" / "journal.jsonl").read_text()
    )
    assert daemon.socket.exists()
    assert daemon.rampart("state").returncode == 0


def test_daemon_owns_one_heartbeat_service_for_its_modules():
    from node_service.cluster import pki

    port = 20000 + secrets.randbelow(30000)
    d = Rampartd(heartbeat_port=port)
    try:
        d.trust_dir.mkdir()
        pki.create_site(d.base / "site")
        d.start()
        key, pub = keys.generate(d.base / "keys")
        (d.trust_dir / "site.pub").write_bytes(pub.read_bytes())
        module = build_safe(d.base, "web", "rt-n1", key, address="127.0.0.1")
        assert d.rampart("module", "install", str(module)).returncode == 0
        state = json.loads(d.rampart("state", "-m", "web", "--json").stdout)
        assert state["heartbeats_on"] == ["127.0.0.1"]
        assert d.stop() == 0
        incarnation = (d.state_dir / "heartbeat.incarnation").read_text()
        d.start()  # at startup, from the installed modules
        state = json.loads(d.rampart("state", "-m", "web", "--json").stdout)
        assert state["heartbeats_on"] == ["127.0.0.1"]
        assert int((d.state_dir / "heartbeat.incarnation").read_text()) > int(incarnation)
    finally:
        d.close()


def test_runner_bug_is_survived_and_fatal_error_stops_cleanly(daemon, signed):
    trusted_key, _ = signed
    module = build_safe(daemon.base, "web", "rt-n1", trusted_key)
    assert daemon.rampart("module", "install", str(module)).returncode == 0
    assert daemon.rampart("start", "-m", "web").returncode == 0
    buggy = daemon.rampart("second", "-m", "web")
    assert buggy.returncode == 1
    assert buggy.stderr == "rampart: module web: second failed: fake bug in the runner\n"
    assert daemon.rampart("state", "-m", "web").returncode == 0  # still serving

    fatal = daemon.rampart("restart", "-m", "web")
    assert fatal.returncode == 2
    assert fatal.stderr == "rampart: fake: the state disk is gone\n"
    assert daemon.proc is not None
    assert daemon.proc.wait(20) == 2
    assert daemon.next_notify(5).startswith("STOPPING=1")
    daemon.proc = None
