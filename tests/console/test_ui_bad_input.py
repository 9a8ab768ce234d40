"""Bad input in the console's windows: one clear line, nothing half done, the site file intact.

Covered elsewhere at view level: host key mismatch (test_ui_site_access),
unreachable nodes at deploy (test_ui_deploy) and in the main window
(test_ui_main), an invalid .safe refused before any node (test_ui_deploy),
corrupted site files (test_ui_main). Here: a wrong password, a refused key,
a node without rampart, and that neither logging in nor a refused site file
ever rewrites the site file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import paramiko
import pytest

from app.nodes import NodeStatus, SiteModel
from app.site import parse
from tests.console import test_ui_site_access as access
from tests.console.conftest import site_text
from tests.console.test_ui_site_access import MemoryCredentials, SshServer
from ui import main as console_main
from ui.dashboard_view import DashboardView
from ui.site_view import SiteView

pytestmark = pytest.mark.console

NO_RAMPART = "; ".join(
    ("node lab-n1: rampart is not installed (no `rampart` command)", "install the rampart package")
)
server = access.server  # the loopback SSH server fixture (password logins only)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def site_view(qtbot, tmp_path: Path, port: int, workers, ssh_extra: str = ""):
    known_hosts = tmp_path / "known_hosts"
    site_file = tmp_path / "site.yaml"
    site_file.write_text(
        f"site: lab\nnodes:\n  - name: lab-n1\n    addresses: [198.51.100.11]\n"
        f"    ssh: {{host: 127.0.0.1, port: {port}, user: root{ssh_extra}}}\n"
        f"known_hosts: {known_hosts}\n"
    )
    site = parse(site_file.read_text(), path=str(site_file))
    creds = MemoryCredentials()
    model = SiteModel(site, creds, workers)  # type: ignore[arg-type]
    asked: list[str] = []

    def ask(title: str, _question: str) -> bool:
        asked.append(title)
        return True  # trust the loopback server's host key

    def ask_secret(title: str, _prompt: str) -> str | None:
        asked.append(title)
        return "not the password"

    view = SiteView(model, ask=ask, ask_secret=ask_secret)
    qtbot.addWidget(view)
    return view, model, asked, site_file


def one_warning(text: str) -> bool:
    return text.startswith("⚠ ") and "\n" not in text and "Traceback" not in text


def test_wrong_password_is_one_line_naming_the_node_and_the_keyring_entry(
    qtbot,
    tmp_path: Path,
    server: SshServer,
    workers,
):
    view, model, asked, site_file = site_view(qtbot, tmp_path, server.port, workers)
    before = digest(site_file)
    try:
        view.connect_node("lab-n1")
        qtbot.waitUntil(lambda: view.note.text().startswith("⚠"), timeout=15000)
        text = view.note.text()
        assert one_warning(text), text
        assert "node lab-n1" in text and "refused the password" in text
        assert "lab/lab-n1/password" in text  # where the wrong secret lives
        assert asked == ["Unknown host key", "Password"]  # asked once, no retry loop
        assert digest(site_file) == before  # the site file is never written by logging in
    finally:
        model.close()


def test_refused_key_says_which_key_and_what_to_do(
    qtbot,
    tmp_path: Path,
    server: SshServer,
    workers,
):
    key_path = tmp_path / "id_ed25519"
    key = paramiko.ECDSAKey.generate()
    key.write_private_key_file(str(key_path))
    view, model, asked, site_file = site_view(
        qtbot, tmp_path, server.port, workers, ssh_extra=f", key: {key_path}"
    )
    before = digest(site_file)
    try:
        view.connect_node("lab-n1")
        qtbot.waitUntil(lambda: view.note.text().startswith("⚠"), timeout=15000)
        text = view.note.text()
        assert one_warning(text), text
        assert f"key {key_path}" in text and "authorized_keys" in text
        assert asked == ["Unknown host key"]
        assert digest(site_file) == before
    finally:
        model.close()


def test_node_without_rampart_is_reachable_with_the_reason(qtbot, site_model):
    site = SiteView(site_model)
    dashboard = DashboardView(site_model)
    qtbot.addWidget(site)
    qtbot.addWidget(dashboard)
    try:
        site_model.publish(NodeStatus("lab-n1", True, error=NO_RAMPART, checked_at=0.0))
        qtbot.waitUntil(lambda: site.cell_text("lab-n1", "Status") != "", timeout=3000)
        assert site.cell_text("lab-n1", "Reachable") == "reachable"
        assert "rampart is not installed" in site.cell_text("lab-n1", "Status")
        assert "install the rampart package" in site.cell_text("lab-n1", "Status")
        # Nothing to act on there: the dashboard offers no module on that node.
        qtbot.waitUntil(lambda: dashboard.matrix_data.nodes == ("lab-n1", "lab-n2"), timeout=3000)
        assert dashboard.matrix_data.modules == ()
        assert dashboard.empty.isVisibleTo(dashboard)
    finally:
        dashboard.stop()


@pytest.mark.parametrize(
    "content",
    [b"site: lab\nnodes: [\n", b"\xff\xfe garbage", site_text(9).encode()[:40]],
    ids=["bad-yaml", "not-utf8", "truncated"],
)
def test_a_refused_site_file_is_left_exactly_as_it_was(tmp_path: Path, content: bytes, capsys):
    path = tmp_path / "site.yaml"
    path.write_bytes(content)
    shot = tmp_path / "x.png"
    code = console_main.main(["--site", str(path), "--screenshot", str(shot)])
    assert code == console_main.EXIT_BAD_SITE
    assert path.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site.yaml"]  # no temp file, no PNG
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rampart-console: "), err
