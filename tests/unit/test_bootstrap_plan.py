"""The bootstrap's decisions and local checks, without a node.

The end-to-end run on a bare host is tests/console/test_bootstrap.py.
"""

from __future__ import annotations

import io
import socket
import tarfile
from pathlib import Path

import pytest
import yaml

from app import bootstrap
from app import bootstrap_plan as plan
from app.bootstrap_plan import BootstrapError, BootstrapProgress
from app.deploy import CANCELLED, DONE, FAILED, PENDING, RUNNING, SKIPPED
from app.site import load
from app.ssh import RunResult
from app.workers import CancelToken
from node_service import config
from node_service.cluster import pki
from node_service.module import keys

CONTROL = (
    "Package: rampart\nVersion: 0.1.0-1\nArchitecture: amd64\n"
    "Depends: python3-venv, fuse3, python3 (>= 3.11), iputils-ping | inetutils-ping\n"
    "Description: Rampart node\n more text\n"
)


def fake_deb(path: Path, control: str = CONTROL) -> Path:
    """A minimal .deb: ar archive with debian-binary, control.tar.gz, data.tar.gz."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tar:
        info = tarfile.TarInfo("./control")
        info.size = len(control.encode())
        tar.addfile(info, io.BytesIO(control.encode()))
    members = [("debian-binary", b"2.0\n"), ("control.tar.gz", raw.getvalue()),
               ("data.tar.gz", b"\x1f\x8b not really")]  # fmt: skip
    out = bytearray(b"!<arch>\n")
    for name, data in members:
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
        out += data + (b"\n" if len(data) % 2 else b"")
    path.write_bytes(bytes(out))
    return path


def test_read_package_gives_the_control_fields(tmp_path):
    package = plan.read_package(fake_deb(tmp_path / "rampart_0.1.0-1_amd64.deb"))
    assert (package.name, package.version, package.architecture) == ("rampart", "0.1.0-1", "amd64")
    assert package.size == (tmp_path / "rampart_0.1.0-1_amd64.deb").stat().st_size
    assert len(package.sha256) == 64


def test_read_package_refuses_other_packages_and_non_debs(tmp_path):
    other = fake_deb(tmp_path / "x.deb", CONTROL.replace("Package: rampart", "Package: nginx"))
    with pytest.raises(BootstrapError, match="is package 'nginx', not 'rampart'"):
        plan.read_package(other)
    (tmp_path / "text.deb").write_text("hello")
    with pytest.raises(BootstrapError, match="not a Debian package"):
        plan.read_package(tmp_path / "text.deb")
    with pytest.raises(BootstrapError, match="does not exist; build it with `make deb`"):
        plan.read_package(tmp_path / "missing.deb")


def test_dependencies_missing_on_the_node_are_named():
    depends = "python3-venv, fuse3, python3 (>= 3.11), iputils-ping | inetutils-ping"
    assert plan.dependency_names(depends) == (
        ("python3-venv",), ("fuse3",), ("python3",), ("iputils-ping", "inetutils-ping"),
    )  # fmt: skip
    query = (
        "python3-venv install ok installed\n"
        "fuse3 deinstall ok config-files\n"
        "python3 install ok installed\n"
        "inetutils-ping install ok installed\n"
    )
    assert plan.missing_dependencies(depends, query) == ["fuse3"]
    assert plan.missing_dependencies(depends, "") == [
        "python3-venv", "fuse3", "python3", "iputils-ping | inetutils-ping",
    ]  # fmt: skip


def test_node_yaml_is_what_the_node_accepts():
    text = plan.node_yaml_text("db-1")
    parsed = config.parse(text)
    assert parsed.node == "db-1"
    assert parsed == config.NodeConfig(node="db-1")  # every other key at its default


def test_dpkg_reason_is_the_line_that_says_why():
    result = RunResult(
        1, "",
        "Selecting previously unselected package rampart.\n"
        "dpkg: error processing archive /tmp/r.deb (--install):\n"
        " cannot copy extracted data: unexpected end of file or stream\n"
        "Errors were encountered while processing:\n /tmp/r.deb\n",
    )  # fmt: skip
    assert plan.dpkg_reason(result) == (
        "dpkg: error processing archive /tmp/r.deb (--install): "
        "cannot copy extracted data: unexpected end of file or stream"
    )
    assert plan.dpkg_reason(RunResult(2, "", "")) == "exit status 2"


def test_running_modules_and_state_judgement():
    doc = '{"node": "n1", "modules": [{"module": "web", "state": "PRIM"}, {"module": "db", "state": "STOP"}]}'  # noqa: E501
    assert plan.running_modules(doc) == ["web PRIM"]
    assert plan.running_modules("not json") == []
    assert plan.judge_state('{"node": "n1", "modules": []}', "n1") == (
        True, "rampartd answers as n1 (0 modules)",
    )  # fmt: skip
    ok, reason = plan.judge_state('{"node": "other", "modules": []}', "n1")
    assert not ok and reason == "rampartd answers as 'other', not 'n1'; check node.yaml"
    ok, reason = plan.judge_state("rampart: no daemon", "n1")
    assert not ok and "printed no JSON" in reason


def test_root_commands_go_through_sudo_for_other_users():
    assert plan.privileged(["dpkg", "-i", "x"], "root") == ["dpkg", "-i", "x"]
    assert plan.privileged(["dpkg", "-i", "x"], "admin") == [
        "sudo", "-n", "--", "dpkg", "-i", "x",
    ]  # fmt: skip


def test_find_package_order(tmp_path, monkeypatch):
    monkeypatch.delenv("RAMPART_NODE_PACKAGE", raising=False)
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    (second / "rampart_0.1.0-1_amd64.deb").write_bytes(b"x")
    assert plan.find_package((first, second)) == second / "rampart_0.1.0-1_amd64.deb"
    with pytest.raises(BootstrapError, match="no node package found"):
        plan.find_package((first,))
    monkeypatch.setenv("RAMPART_NODE_PACKAGE", "/x/rampart_9.deb")
    assert plan.find_package((first,)) == Path("/x/rampart_9.deb")


def test_progress_summary_names_the_failing_step():
    progress = BootstrapProgress.fresh("n1")
    assert [s.name for s in progress.steps] == list(bootstrap.STEPS)
    running = progress.with_step("upload", state=RUNNING)
    assert running.summary == "n1: upload the node package"
    failed = progress.with_step("install", state=FAILED, message="dpkg said no")
    assert failed.summary == "n1: install the package (dpkg -i, offline) failed: dpkg said no"
    done = BootstrapProgress("n1", tuple(s.__class__(s.name, DONE) for s in progress.steps))
    assert done.ok and done.summary == "n1: bootstrapped, rampartd running"


# -- the service's local checks ------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_site(tmp_path: Path, secrets: bool = True, trust: bool = True) -> Path:
    if secrets:
        pki.create_site(tmp_path / "site")
    doc: dict = {
        "site": "unit",
        "nodes": [{"name": "n1", "addresses": ["127.0.0.1"],
                   "ssh": {"host": "127.0.0.1", "port": closed_port(), "user": "root",
                           "key": str(tmp_path / "nokey")}}],
        "known_hosts": str(tmp_path / "known_hosts"),
    }  # fmt: skip
    if trust:
        _, pub = keys.generate(tmp_path / "keys")
        doc["trust_pub"] = str(pub)
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_check_accepts_a_complete_site(tmp_path):
    site = load(make_site(tmp_path))
    assert plan.secrets_dir(site) == (tmp_path / "site").resolve()
    job = bootstrap.Bootstrap(site, "n1", fake_deb(tmp_path / "rampart_0.1.0-1_amd64.deb"))
    try:
        message = job.check()
    finally:
        job.close()
    assert message.startswith("n1: package rampart 0.1.0-1 (amd64, ")
    assert job.plan is not None and job.plan.trust_name == "unit.pub"
    assert config.parse(job.plan.node_yaml).node == "n1"


@pytest.mark.parametrize(
    ("secrets", "trust", "expected"),
    [(False, True, "no site CA at"), (True, False, "has no trust_pub")],
)
def test_check_refuses_a_site_without_ca_or_trust_key(tmp_path, secrets, trust, expected):
    site = load(make_site(tmp_path, secrets=secrets, trust=trust))
    job = bootstrap.Bootstrap(site, "n1", fake_deb(tmp_path / "rampart_0.1.0-1_amd64.deb"))
    try:
        with pytest.raises(BootstrapError) as refused:
            job.check()
    finally:
        job.close()
    assert expected in str(refused.value)
    assert str(refused.value).endswith("nothing was sent to node n1")


def test_an_unknown_node_is_refused(tmp_path):
    with pytest.raises(Exception, match="no node named 'n9'"):
        bootstrap.Bootstrap(load(make_site(tmp_path)), "n9")


def test_cancel_before_the_first_step_touches_nothing(tmp_path):
    job = bootstrap.Bootstrap(
        load(make_site(tmp_path)), "n1", fake_deb(tmp_path / "rampart_0.1.0-1_amd64.deb")
    )
    ended = []
    job.finished.connect(ended.append)
    token = CancelToken()
    token.cancel()
    try:
        progress = job._run(token)
    finally:
        job.close()
    assert [s.state for s in progress.steps] == [CANCELLED] * len(bootstrap.STEPS)
    assert ended == [progress] and progress.summary == "n1: cancelled"


def test_an_unreachable_node_fails_at_connect_and_skips_the_rest(tmp_path):
    job = bootstrap.Bootstrap(
        load(make_site(tmp_path)), "n1", fake_deb(tmp_path / "rampart_0.1.0-1_amd64.deb")
    )
    try:
        job.run()
        assert job.wait(30)
    finally:
        job.close()
    progress = job.progress()
    assert progress.failed_step is not None and progress.failed_step.name == "connect"
    assert "cannot reach 127.0.0.1" in progress.failed_step.message
    assert {s.state for s in progress.steps[1:]} == {SKIPPED}
    assert job.error is not None and PENDING not in {s.state for s in progress.steps}


def test_with_node_adds_a_node_the_site_file_accepts(tmp_path):
    from app.site import save

    site = load(make_site(tmp_path))
    bigger = plan.with_node(site, "n2", " 127.0.0.2 ", user="admin", port=2222, key="k")
    assert bigger.node_names == ("n1", "n2")
    node = bigger.node("n2")
    assert (node.addresses, node.ssh.host, node.ssh.port, node.ssh.user, node.ssh.key) == (
        ("127.0.0.2",), "127.0.0.2", 2222, "admin", "k",
    )  # fmt: skip
    save(bigger, tmp_path / "site.yaml")
    assert load(tmp_path / "site.yaml") == bigger
    with pytest.raises(BootstrapError, match="already has a node named n1"):
        plan.with_node(site, "n1", "127.0.0.3")
    with pytest.raises(BootstrapError, match="'db 1' is not valid"):
        plan.with_node(site, "db 1", "127.0.0.3")
    with pytest.raises(BootstrapError, match=r"'10\.0\.0' is not an IP address"):
        plan.with_node(site, "n3", "10.0.0")
