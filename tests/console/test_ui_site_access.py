"""Site window access flow against a real SSH server on loopback (paramiko, in-process).

Unknown host key: fingerprint shown, asked, recorded in known_hosts; missing
password: asked, stored in the (in-memory) keyring, login succeeds; changed
host key: refused with the warning.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest

from app.nodes import SiteModel
from app.site import parse
from app.ssh import fingerprint
from ui.site_view import SiteView

pytestmark = pytest.mark.console

PASSWORD = "correct horse"


class MemoryCredentials:
    """The keyring, in memory (the OS keyring is not the subject here)."""

    def __init__(self) -> None:
        self.secrets: dict[str, str] = {}

    def password(self, site: str, node: str) -> str | None:
        return self.secrets.get(f"{site}/{node}/password")

    def set_password(self, site: str, node: str, secret: str) -> None:
        self.secrets[f"{site}/{node}/password"] = secret

    def key_passphrase(self, _path: object) -> str | None:
        return None


class _Server(paramiko.ServerInterface):
    def get_allowed_auths(self, username: str) -> str:
        return "password"

    def check_auth_password(self, username: str, password: str) -> int:
        ok = username == "root" and password == PASSWORD
        return paramiko.AUTH_SUCCESSFUL if ok else paramiko.AUTH_FAILED


class SshServer:
    """Accepts SSH logins on 127.0.0.1 until stopped; every thread is joined on stop."""

    def __init__(self, host_key: paramiko.PKey) -> None:
        self.host_key = host_key
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.stopping = threading.Event()
        self.transports: list[paramiko.Transport] = []
        self.thread = threading.Thread(target=self._serve, name="test-sshd", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        for _ in range(10_000):  # bounded: 0.2 s per idle turn, stopped by the fixture
            if self.stopping.is_set():
                return
            try:
                conn, _addr = self.listener.accept()
            except TimeoutError:
                continue
            transport = paramiko.Transport(conn)
            transport.add_server_key(self.host_key)
            self.transports.append(transport)
            try:
                transport.start_server(server=_Server())
            except (paramiko.SSHException, EOFError, OSError):
                transport.close()  # the client hung up (it refused our host key)

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.listener.close()
        for transport in self.transports:
            transport.close()
            transport.join(5)


@pytest.fixture
def server() -> Iterator[SshServer]:
    s = SshServer(paramiko.ECDSAKey.generate())
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def access(qtbot, tmp_path: Path, server: SshServer, workers):
    known_hosts = tmp_path / "known_hosts"
    site = parse(
        f"site: lab\nnodes:\n  - name: lab-n1\n    addresses: [198.51.100.11]\n"
        f"    ssh: {{host: 127.0.0.1, port: {server.port}, user: root}}\n"
        f"known_hosts: {known_hosts}\n",
        path=str(tmp_path / "site.yaml"),
    )
    creds = MemoryCredentials()
    model = SiteModel(site, creds, workers)  # type: ignore[arg-type]
    questions: list[tuple[str, str]] = []
    answers = {"ask": True, "secret": PASSWORD}

    def ask(title: str, question: str) -> bool:
        questions.append((title, question))
        return bool(answers["ask"])

    def ask_secret(title: str, prompt: str) -> str | None:
        questions.append((title, prompt))
        return answers["secret"]  # type: ignore[return-value]

    view = SiteView(model, ask=ask, ask_secret=ask_secret)
    qtbot.addWidget(view)
    try:
        yield view, questions, answers, known_hosts, creds
    finally:
        model.close()


def test_unknown_key_is_asked_then_password_then_logged_in(qtbot, access, server):
    view, questions, _answers, known_hosts, creds = access
    view.connect_node("lab-n1")
    qtbot.waitUntil(lambda: "logged in as root@127.0.0.1" in view.note.text(), timeout=15000)
    titles = [title for title, _q in questions]
    assert titles == ["Unknown host key", "Password"]
    assert fingerprint(server.host_key) in questions[0][1]
    assert server.host_key.get_base64() in known_hosts.read_text()
    assert creds.password("lab", "lab-n1") == PASSWORD


def test_declined_host_key_is_not_recorded(qtbot, access):
    view, questions, answers, known_hosts, _creds = access
    answers["ask"] = False
    view.connect_node("lab-n1")
    qtbot.waitUntil(lambda: "host key not trusted" in view.note.text(), timeout=15000)
    assert not known_hosts.exists()
    assert [title for title, _q in questions] == ["Unknown host key"]


def test_changed_host_key_is_refused_with_the_warning(qtbot, access, server):
    view, questions, _answers, known_hosts, _creds = access
    other = paramiko.ECDSAKey.generate()
    known_hosts.write_text(f"[127.0.0.1]:{server.port} {other.get_name()} {other.get_base64()}\n")
    view.connect_node("lab-n1")
    qtbot.waitUntil(lambda: "CHANGED" in view.note.text(), timeout=15000)
    assert view.note.text().startswith("⚠ WARNING")
    assert questions[0][0] == "Host key changed"  # shown, never "connect anyway"
    assert other.get_base64() in known_hosts.read_text()  # left as it was
