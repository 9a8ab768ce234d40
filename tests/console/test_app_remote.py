"""Node service, site monitor and deploy pipeline over real SSH (a throwaway sshd).

The sshd is real; `rampart` on the "node" is a small shell stub first in the
session's PATH (the daemon is tested elsewhere): it answers the commands the
console runs and records them in calls.log. Flag files in its directory
make it fail a step, refuse an action, or behave as a host without rampart.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from app import deploy
from app.credentials import Credentials
from app.designer import DesignerModel
from app.logs import LogModel
from app.nodes import NodeService, SiteModel, allowed
from app.site import Site, SiteNode, SshAccess
from app.ssh import Backoff
from app.workers import Workers
from node_service.module import keys, safe
from tests.console.test_app_ssh import Sshd, free_port, running_sshd
from tests.keyrings import MemoryKeyring, installed_memory_keyring

pytestmark = pytest.mark.node

WAIT_S = 20.0

STUB = r"""#!/bin/sh
D=$(dirname "$0")
echo "$*" >> "$D/calls.log"
if [ -e "$D/absent" ]; then echo "sh: 1: rampart: not found" >&2; exit 127; fi
case "$1 $2" in
  "--version "*) echo "rampart 0.1.0"; exit 0;;
  "module verify")
    if [ -e "$D/fail_verify" ]; then echo "rampart: $3: signed by an untrusted key" >&2; exit 1; fi
    echo "valid $3"; exit 0;;
  "module list") cat "$D/modules.json" 2>/dev/null || echo '{"node": "n", "modules": []}'; exit 0;;
  "module install")
    if [ -e "$D/fail_install" ]; then echo "rampart: install refused: disk full" >&2; exit 3; fi
    cp "$3" "$D/installed.safe"; echo "installed web 2"; exit 0;;
  "state --json") cat "$D/state.json"; exit 0;;
  "watch --json") cat "$D/watch.jsonl"; exit 0;;
  "events --json") cat "$D/events.jsonl" 2>/dev/null; exit 0;;
esac
case "$1" in
  start|stop|restart|stopstart|prim|second|swap|primforce)
    if [ -e "$D/refuse_actions" ]; then
      echo "rampart: user bob is not in rampart-operator or rampart-admin:" \
        "$1 needs operator rights" >&2
      exit 3
    fi
    if [ "$4" = "--json" ]; then sed "s/VERB/$1/g" "$D/action.json"; else
      echo "$3: $1: started (now PRIM)"; fi
    exit 0;;
esac
echo "rampart: stub does not know: $*" >&2
exit 2
"""


STATE = {"node": "n", "modules": [{"module": "web", "kind": "mirror", "state": "PRIM",
                                   "since": 1700000000}]}  # fmt: skip
WATCH = [
    {"type": "hello", "ts": 1700000001, "node": "n", "modules": ["web"]},
    "garbage line",
    {"type": "state", "ts": 1700000002, "node": "n", "module": "web", "reason": "swapped",
     "state": {"module": "web", "state": "SECOND", "since": 1700000002}},
    {"type": "metrics", "ts": 1700000003, "node": "n", "module": "web", "state": "SECOND",
     "metrics": {"heartbeat_rtt_seconds": {"198.51.100.12": 0.0004}}},
]  # fmt: skip
INSTALLED = {"node": "n", "modules": [{"name": "web", "version": "1", "kind": "mirror",
                                       "state": "PRIM"}]}  # fmt: skip
ACTION = {"module": "web", "command": "VERB", "reason": "VERB done", "state": {"state": "PRIM"}}
STUB_FILES = (
    "rampart", "calls.log", "absent", "fail_verify", "fail_install", "refuse_actions",
    "modules.json", "installed.safe", "state.json", "watch.jsonl", "action.json",
    "events.jsonl",
)  # fmt: skip


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    yield from running_sshd(tmp_path_factory)


@pytest.fixture
def memory_keyring() -> Iterator[MemoryKeyring]:
    yield from installed_memory_keyring()


@pytest.fixture
def node_stub(sshd: Sshd) -> Iterator[Path]:
    stub = sshd.stub_bin / "rampart"
    stub.write_text(STUB)
    stub.chmod(0o755)
    (sshd.stub_bin / "state.json").write_text(json.dumps(STATE))
    (sshd.stub_bin / "action.json").write_text(json.dumps(ACTION))
    watch = [w if isinstance(w, str) else json.dumps(w) for w in WATCH]
    (sshd.stub_bin / "watch.jsonl").write_text("\n".join(watch) + "\n")
    sshd.trust()
    try:
        yield sshd.stub_bin
    finally:
        for name in STUB_FILES:
            (sshd.stub_bin / name).unlink(missing_ok=True)


def calls(stub: Path) -> list[str]:
    try:
        return (stub / "calls.log").read_text().splitlines()
    except FileNotFoundError:
        return []


def two_node_site(sshd: Sshd, trust_pub: Path | None = None) -> Site:
    access = SshAccess(host="127.0.0.1", port=sshd.port, user="root", key=str(sshd.client_key))
    nodes = tuple(SiteNode(name, ("127.0.0.1",), access) for name in ("rt-n1", "rt-n2"))
    return Site(
        "rtsite", nodes, known_hosts=str(sshd.dir / "known_hosts"),
        trust_pub=str(trust_pub) if trust_pub else None,
    )  # fmt: skip


# -- node service ----------------------------------------------------------------------


def test_refresh_reads_version_modules_states_and_role(
    sshd: Sshd, node_stub: Path, memory_keyring: MemoryKeyring
) -> None:
    (node_stub / "modules.json").write_text(json.dumps(INSTALLED))
    site = two_node_site(sshd)
    service = NodeService(site, site.nodes[0], Credentials())
    try:
        status = service.refresh()
    finally:
        service.close()
    assert status.reachable is True and status.error is None
    assert status.version == "0.1.0"
    assert [(m.name, m.version, m.state) for m in status.modules] == [("web", "1", "PRIM")]
    assert status.states["web"]["state"] == "PRIM"
    assert status.role == "admin"  # logged in as root
    assert allowed(status, "primforce") == (True, "user root has rampart-admin: primforce allowed")


def test_refused_action_keeps_the_nodes_reason(
    sshd: Sshd, node_stub: Path, memory_keyring: MemoryKeyring
) -> None:
    site = two_node_site(sshd)
    service = NodeService(site, site.nodes[0], Credentials())
    try:
        ok = service.action("web", "swap")
        (node_stub / "refuse_actions").touch()
        refused = service.action("web", "swap")
    finally:
        service.close()
    assert (ok.ok, ok.reason, ok.state) == (True, "swap done", "PRIM")
    assert not refused.ok
    assert refused.reason == (
        "web on rt-n1: swap refused: user bob is not in rampart-operator or rampart-admin: "
        "swap needs operator rights"
    )


def test_host_without_rampart_is_reported(
    sshd: Sshd, node_stub: Path, memory_keyring: MemoryKeyring
) -> None:
    (node_stub / "absent").touch()
    site = two_node_site(sshd)
    service = NodeService(site, site.nodes[0], Credentials())
    try:
        status = service.refresh()
    finally:
        service.close()
    assert status.reachable is True
    assert status.error is not None and "rampart is not installed" in status.error


def test_site_model_follows_the_feed_and_reconnects(
    sshd: Sshd, node_stub: Path, memory_keyring: MemoryKeyring
) -> None:
    site = two_node_site(sshd)
    workers = Workers("rt-site")
    model = SiteModel(site, Credentials(), workers, Backoff(initial=0.05, maximum=0.2))
    lines: list[tuple[str, dict]] = []
    second_feed = threading.Event()
    lost = threading.Event()

    def on_line(node: str, line: dict) -> None:
        lines.append((node, line))
        if sum(1 for n, ln in lines if n == "rt-n1" and ln["type"] == "hello") >= 2:
            second_feed.set()

    def on_status(node: str, status) -> None:
        if status.reachable is False and "watch feed ended" in (status.error or ""):
            lost.set()

    model.feed_line.connect(on_line)
    model.status_changed.connect(on_status)
    try:
        model.start_monitoring()
        assert lost.wait(WAIT_S), "the end of the watch feed was not shown"
        assert second_feed.wait(WAIT_S), "the monitor did not reconnect"
    finally:
        model.close()
        assert workers.shutdown(10) == []
    kinds = [ln["type"] for n, ln in lines if n == "rt-n1"]
    assert kinds[:3] == ["hello", "state", "metrics"]  # the garbage line was dropped
    assert model.status("rt-n1").states["web"]["state"] in ("PRIM", "SECOND")


# -- deploy ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("pkg")
    key, pub = keys.generate(base / "keys")
    other_key, _ = keys.generate(base / "other")
    model = DesignerModel.from_template("mirror")
    model.set_field(("module", "name"), "web")
    model.set_field(("module", "version"), "2")
    model.set_field(("node", 0, "name"), "rt-n1")
    model.set_field(("node", 1, "name"), "rt-n2")
    assert model.valid, model.problems
    model.build(base / "web", key, base / "web.safe")
    model.build(base / "web", other_key, base / "untrusted.safe")
    return {"safe": base / "web.safe", "untrusted": base / "untrusted.safe", "pub": pub}


def run_deploy(d: deploy.Deployment, workers: Workers) -> None:
    try:
        d.run()
        assert d.wait(WAIT_S), "deploy did not finish"
    finally:
        assert workers.shutdown(10) == []


def test_deploy_runs_every_step_on_every_node_in_parallel(
    sshd: Sshd, node_stub: Path, package: dict[str, Path], memory_keyring: MemoryKeyring
) -> None:
    workers = Workers("rt-deploy")
    d = deploy.Deployment(two_node_site(sshd, package["pub"]), package["safe"],
                          ["rt-n1", "rt-n2"], Credentials(), workers)  # fmt: skip
    assert d.check() == "web 2: valid, signature checked"
    seen: list[tuple[str, str, str]] = []
    d.changed.connect(lambda node, p: seen.extend((node, s.name, s.state) for s in p.steps))
    run_deploy(d, workers)
    for node in ("rt-n1", "rt-n2"):
        progress = d.progress(node)
        assert progress.ok, progress.summary
        assert [s.state for s in progress.steps] == ["done"] * 5
        assert (node, "upload", "running") in seen
    upload = d.progress("rt-n1").step("upload").message
    remote = Path(upload.split(" to ")[1])
    assert not remote.parent.exists()  # the temporary upload is removed
    assert (node_stub / "installed.safe").read_bytes() == package["safe"].read_bytes()
    log = calls(node_stub)
    assert sum(1 for c in log if c.startswith("module install")) == 2
    assert sum(1 for c in log if c == "start -m web") == 2


def test_invalid_or_untrusted_package_never_reaches_a_node(
    sshd: Sshd, node_stub: Path, package: dict[str, Path], tmp_path: Path,
    memory_keyring: MemoryKeyring,
) -> None:  # fmt: skip
    site = two_node_site(sshd, package["pub"])
    with pytest.raises(deploy.DeployError, match="nothing was sent to any node"):
        deploy.Deployment(site, package["untrusted"], ["rt-n1"]).check()
    corrupt = tmp_path / "corrupt.safe"
    corrupt.write_bytes(package["safe"].read_bytes()[:200])
    with pytest.raises(deploy.DeployError, match=r"^corrupt\.safe: "):
        deploy.Deployment(site, corrupt, ["rt-n1"]).check()
    with pytest.raises(deploy.DeployError, match="node rt-n3 is not one of"):
        deploy.Deployment(
            Site("s", (*site.nodes, SiteNode("rt-n3", ("127.0.0.1",), site.nodes[0].ssh))),
            package["safe"], ["rt-n3"],
        ).check()  # fmt: skip
    assert calls(node_stub) == []


def test_failing_step_keeps_its_message_and_nothing_after_it_runs(
    sshd: Sshd, node_stub: Path, package: dict[str, Path], memory_keyring: MemoryKeyring
) -> None:
    (node_stub / "fail_verify").touch()
    workers = Workers("rt-deploy")
    d = deploy.Deployment(two_node_site(sshd, package["pub"]), package["safe"], ["rt-n1"],
                          Credentials(), workers)  # fmt: skip
    run_deploy(d, workers)
    progress = d.progress("rt-n1")
    assert progress.failed_step is not None and progress.failed_step.name == "verify"
    assert "signed by an untrusted key" in progress.failed_step.message
    assert [s.state for s in progress.steps] == ["done", "done", "failed", "skipped", "skipped"]
    assert not any(c.startswith("module install") for c in calls(node_stub))


def test_cancel_between_steps_installs_nothing(
    sshd: Sshd, node_stub: Path, package: dict[str, Path], memory_keyring: MemoryKeyring
) -> None:
    workers = Workers("rt-deploy")
    d = deploy.Deployment(two_node_site(sshd, package["pub"]), package["safe"], ["rt-n1"],
                          Credentials(), workers)  # fmt: skip

    def cancel_after_upload(node: str, progress: deploy.NodeProgress) -> None:
        if progress.step("upload").state == deploy.DONE:
            d.cancel()

    d.changed.connect(cancel_after_upload)
    run_deploy(d, workers)
    states = [s.state for s in d.progress("rt-n1").steps]
    assert states == ["done", "done", "cancelled", "cancelled", "cancelled"]
    assert d.progress("rt-n1").summary == "rt-n1: cancelled"
    assert not any(c.startswith("module install") for c in calls(node_stub))


def test_redeploy_over_a_running_module_keeps_it_running(
    sshd: Sshd, node_stub: Path, package: dict[str, Path], memory_keyring: MemoryKeyring
) -> None:
    (node_stub / "modules.json").write_text(json.dumps(INSTALLED))
    workers = Workers("rt-deploy")
    d = deploy.Deployment(two_node_site(sshd, package["pub"]), package["safe"], ["rt-n1"],
                          Credentials(), workers)  # fmt: skip
    run_deploy(d, workers)
    progress = d.progress("rt-n1")
    assert progress.ok
    assert "upgrades 1 -> 2 (PRIM)" in progress.step("verify").message
    assert "takes effect at its next start" in progress.step("start").message
    assert not any(c.startswith("start") for c in calls(node_stub))


def test_unreachable_node_fails_at_connect(
    package: dict[str, Path], tmp_path: Path, memory_keyring: MemoryKeyring
) -> None:
    access = SshAccess(host="127.0.0.1", port=free_port(), key=str(tmp_path / "k"))
    site = Site("s", (SiteNode("rt-n1", ("127.0.0.1",), access),), trust_pub=str(package["pub"]))
    workers = Workers("rt-deploy")
    d = deploy.Deployment(site, package["safe"], ["rt-n1"], Credentials(), workers)
    run_deploy(d, workers)
    failed = d.progress("rt-n1").failed_step
    assert failed is not None and failed.name == "connect"
    assert "cannot reach 127.0.0.1" in failed.message
    assert safe.inspect(package["safe"])["name"] == "web"


def test_site_model_sends_the_journal_history_before_the_live_feed(
    sshd: Sshd, node_stub: Path, memory_keyring: MemoryKeyring
) -> None:
    history = [
        {"ts": 1699999990, "node": "n", "module": "web", "kind": "transition",
         "severity": "info", "message": "WAIT -> PRIM (peer silent)"},
        "not json",
        {"ts": 1699999995, "node": "n", "module": "web", "kind": "checker",
         "severity": "warning", "message": "tcp 198.51.100.200:80 refused"},
    ]  # fmt: skip
    text = [h if isinstance(h, str) else json.dumps(h) for h in history]
    (node_stub / "events.jsonl").write_text("\n".join(text) + "\n")
    site = two_node_site(sshd)
    workers = Workers("rt-history")
    model = SiteModel(site, Credentials(), workers, Backoff(initial=0.05, maximum=0.2))
    logs = LogModel()
    lines: list[dict] = []
    fed = threading.Event()

    def on_line(node: str, line: dict) -> None:
        if node != "rt-n1":
            return
        lines.append(line)
        logs.add_line(node, line)
        if line["type"] == "hello":
            fed.set()

    model.feed_line.connect(on_line)
    try:
        model.start_monitoring()
        assert fed.wait(WAIT_S), "no live feed"
    finally:
        model.close()
        assert workers.shutdown(10) == []
    assert [ln["type"] for ln in lines[:3]] == ["event", "event", "hello"]
    assert [e.message for e in logs.entries()][:2] == [
        "WAIT -> PRIM (peer silent)", "tcp 198.51.100.200:80 refused",
    ]  # fmt: skip
    assert any("events --json -n 200" in c for c in calls(node_stub))
