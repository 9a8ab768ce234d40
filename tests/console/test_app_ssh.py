"""app.ssh against a real sshd on 127.0.0.1 (throwaway host key, random port).

sshd runs in its own mount namespace with a private /run (its privilege
separation directory), so nothing is left on the machine.
"""

from __future__ import annotations

import shlex
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import paramiko
import pytest

from app import ssh
from app.credentials import Credentials
from app.site import Site, SiteNode, SshAccess
from tests.keyrings import MemoryKeyring, installed_memory_keyring

pytestmark = pytest.mark.node

READY_TIMEOUT_S = 10.0


@pytest.fixture
def memory_keyring() -> Iterator[MemoryKeyring]:
    yield from installed_memory_keyring()


def keygen(path: Path, passphrase: str = "") -> str:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-C", "rt", "-f", str(path)],
        check=True,
        timeout=30,
    )
    return path.with_suffix(".pub").read_text().strip()


def fingerprint_of(pub: Path) -> str:
    out = subprocess.run(
        ["ssh-keygen", "-lf", str(pub)], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    return out.split()[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Sshd:
    dir: Path
    port: int
    host_pub: Path
    client_key: Path
    stub_bin: Path
    process: subprocess.Popen[str]

    def site(self, **ssh_fields: object) -> Site:
        access = SshAccess(host="127.0.0.1", port=self.port, user="root", key=str(self.client_key))
        access = replace(access, **ssh_fields)  # type: ignore[arg-type]
        node = SiteNode("rt-node", ("127.0.0.1",), access)
        return Site("rtsite", (node,), known_hosts=str(self.dir / "known_hosts"))

    def trust(self) -> None:
        line = self.host_pub.read_text().split()
        (self.dir / "known_hosts").write_text(f"[127.0.0.1]:{self.port} {line[0]} {line[1]}\n")


def start_sshd(base: Path) -> Sshd:
    base.mkdir(parents=True, exist_ok=True)
    keygen(base / "host_key")
    public = keygen(base / "client_key")
    (base / "authorized_keys").write_text(public + "\n")
    stub_bin = base / "bin"
    stub_bin.mkdir()
    port = free_port()
    config = base / "sshd_config"
    config.write_text(
        "\n".join(
            [
                "ListenAddress 127.0.0.1",
                f"Port {port}",
                f"HostKey {base / 'host_key'}",
                "PidFile none",
                "PermitRootLogin yes",
                "PubkeyAuthentication yes",
                "PasswordAuthentication yes",
                "KbdInteractiveAuthentication no",
                f"AuthorizedKeysFile {base / 'authorized_keys'}",
                "StrictModes no",
                "UsePAM no",
                "UseDNS no",
                # root's bash may run `pyenv rehash` from .bashrc on this dev box; a lock
                # left by a killed session must not stall every command for a minute.
                f"SetEnv PATH={stub_bin}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin "
                "PYENV_REHASH_TIMEOUT=1",
                "Subsystem sftp internal-sftp",
                "",
            ]
        )
    )
    # A private /run gives sshd its privilege separation dir without touching the machine's.
    script = (
        "mount -t tmpfs rt-sshd-run /run && mkdir -m 0755 /run/sshd && "
        f"exec /usr/sbin/sshd -D -e -f {shlex.quote(str(config))}"
    )
    process = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    ready = threading.Event()
    seen: list[str] = []

    def read_stderr() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            seen.append(line)
            if "Server listening" in line:
                ready.set()

    threading.Thread(target=read_stderr, name="rt-sshd-stderr", daemon=True).start()
    if not ready.wait(READY_TIMEOUT_S):
        process.kill()
        process.wait(5)
        raise AssertionError(f"sshd did not start: {''.join(seen)}")
    return Sshd(base, port, base / "host_key.pub", base / "client_key", stub_bin, process)


def running_sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    """Generator for fixtures: a started sshd, always stopped afterwards."""
    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    try:
        yield server
    finally:
        server.process.terminate()
        try:
            server.process.wait(10)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(10)
        if server.process.stderr is not None:
            server.process.stderr.close()


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    yield from running_sshd(tmp_path_factory)


@pytest.fixture
def fresh_known_hosts(sshd: Sshd) -> Iterator[None]:
    (sshd.dir / "known_hosts").unlink(missing_ok=True)
    yield
    (sshd.dir / "known_hosts").unlink(missing_ok=True)


def connect(site: Site, creds: Credentials | None = None) -> ssh.Session:
    return ssh.Session(site, site.nodes[0], creds or Credentials()).connect(timeout=10)


# -- host keys --------------------------------------------------------------------


def test_unknown_host_key_shows_fingerprint_then_trusting_it_connects(
    sshd: Sshd, fresh_known_hosts: None, memory_keyring: MemoryKeyring
) -> None:
    site = sshd.site()
    with pytest.raises(ssh.UnknownHostKey) as info:
        connect(site)
    assert info.value.fingerprint == fingerprint_of(sshd.host_pub)
    assert info.value.fingerprint in str(info.value)
    assert not (sshd.dir / "known_hosts").exists()  # nothing trusted without asking

    path = ssh.trust_host_key(site, info.value)
    assert path == sshd.dir / "known_hosts"
    assert f"[127.0.0.1]:{sshd.port} ssh-ed25519 " in path.read_text()
    with connect(site) as session:
        result = session.run(["echo", "hello node"])
    assert (result.rc, result.out) == (0, "hello node\n")


def test_changed_host_key_is_refused_with_a_warning(
    sshd: Sshd, fresh_known_hosts: None, tmp_path: Path, memory_keyring: MemoryKeyring
) -> None:
    other = keygen(tmp_path / "other_host").split()
    known = sshd.dir / "known_hosts"
    known.write_text(f"[127.0.0.1]:{sshd.port} {other[0]} {other[1]}\n")
    before = known.read_text()
    with pytest.raises(ssh.HostKeyChanged) as info:
        connect(sshd.site())
    message = str(info.value)
    assert message.startswith("WARNING: node rt-node: host key")
    assert fingerprint_of(sshd.host_pub) in message
    assert fingerprint_of(tmp_path / "other_host.pub") in message
    assert known.read_text() == before


# -- logins -----------------------------------------------------------------------


def test_refused_key_says_which_key(
    sshd: Sshd, tmp_path: Path, memory_keyring: MemoryKeyring
) -> None:
    sshd.trust()
    keygen(tmp_path / "stranger")
    with pytest.raises(ssh.AuthenticationFailed) as info:
        connect(sshd.site(key=str(tmp_path / "stranger")))
    assert f"refused key {tmp_path / 'stranger'}" in str(info.value)
    assert "authorized_keys" in str(info.value)


def test_wrong_password_names_the_keyring_entry(sshd: Sshd, memory_keyring: MemoryKeyring) -> None:
    sshd.trust()
    creds = Credentials()
    creds.set_password("rtsite", "rt-node", "not-the-password")
    with pytest.raises(ssh.AuthenticationFailed) as info:
        connect(sshd.site(key=None), creds)
    assert "refused the password stored in the keyring as rtsite/rt-node/password" in str(
        info.value
    )


def test_no_credentials_asks_for_a_password(sshd: Sshd, memory_keyring: MemoryKeyring) -> None:
    sshd.trust()
    with pytest.raises(ssh.CredentialsNeeded) as info:
        connect(sshd.site(key=None))
    assert info.value.kind == "password"
    assert info.value.account == "rtsite/rt-node/password"


def test_encrypted_key_uses_the_passphrase_from_the_keyring(
    sshd: Sshd, tmp_path: Path, memory_keyring: MemoryKeyring
) -> None:
    sshd.trust()
    key = tmp_path / "locked"
    public = keygen(key, passphrase="s3cret phrase")
    authorized = sshd.dir / "authorized_keys"
    original = authorized.read_text()
    authorized.write_text(original + public + "\n")
    try:
        site = sshd.site(key=str(key))
        with pytest.raises(ssh.CredentialsNeeded) as info:
            connect(site)
        assert info.value.kind == "passphrase"
        Credentials().set_key_passphrase(key, "wrong")
        with pytest.raises(ssh.AuthenticationFailed, match="does not open key"):
            connect(site)
        Credentials().set_key_passphrase(key, "s3cret phrase")
        with connect(site) as session:
            assert session.run(["true"]).rc == 0
    finally:
        authorized.write_text(original)


def test_unreachable_port_is_retryable(tmp_path: Path, memory_keyring: MemoryKeyring) -> None:
    access = SshAccess(host="127.0.0.1", port=free_port(), key=str(tmp_path / "none"))
    site = Site("rtsite", (SiteNode("gone", ("127.0.0.1",), access),))
    with pytest.raises(ssh.Unreachable, match=r"node gone: cannot reach 127\.0\.0\.1:"):
        connect(site)


# -- commands, channels, uploads, proxies -----------------------------------------------


def test_run_returns_exit_status_and_both_streams(
    sshd: Sshd, memory_keyring: MemoryKeyring
) -> None:
    sshd.trust()
    with connect(sshd.site()) as session:
        result = session.run(["sh", "-c", "echo out; echo err >&2; exit 7"])
        missing = session.run(["rampart-definitely-missing"])
    # stderr may start with shell start-up noise of the machine (pyenv); ours comes last
    assert (result.rc, result.out, result.err.splitlines()[-1]) == (7, "out\n", "err")
    assert missing.rc == 127


def test_line_channel_streams_lines(sshd: Sshd, memory_keyring: MemoryKeyring) -> None:
    sshd.trust()
    with connect(sshd.site()) as session:
        channel = session.open_lines(["sh", "-c", "for i in 1 2 3; do echo line$i; done"])
        lines = list(channel.lines())
        channel.close()
    assert lines == ["line1", "line2", "line3"]


def test_sftp_upload_writes_the_file(
    sshd: Sshd, tmp_path: Path, memory_keyring: MemoryKeyring
) -> None:
    sshd.trust()
    local = tmp_path / "web.safe"
    local.write_bytes(b"PK" + bytes(range(256)) * 400)
    remote = tmp_path / "uploaded.safe"
    seen: list[tuple[int, int]] = []
    with connect(sshd.site()) as session:
        size = session.upload(local, str(remote), lambda sent, total: seen.append((sent, total)))
    assert size == local.stat().st_size
    assert remote.read_bytes() == local.read_bytes()
    assert seen[-1] == (size, size)


def test_proxy_command_carries_the_session(sshd: Sshd, memory_keyring: MemoryKeyring) -> None:
    sshd.trust()
    relay = (
        "import socket,sys,threading;"
        "s=socket.create_connection((sys.argv[1],int(sys.argv[2])));"
        "t=threading.Thread(target=lambda:[s.sendall(b) for b in iter("
        "lambda:sys.stdin.buffer.raw.read(65536),b'')],daemon=True);t.start();"
        "[sys.stdout.buffer.write(b) or sys.stdout.flush() for b in iter(lambda:s.recv(65536),b'')]"
    )
    command = f"{sys.executable} -c {shlex.quote(relay)} %h %p"
    with connect(sshd.site(proxy_command=command)) as session:
        assert session.run(["echo", "via proxy"]).out == "via proxy\n"


def test_failing_proxy_command_is_unreachable(sshd: Sshd, memory_keyring: MemoryKeyring) -> None:
    sshd.trust()
    command = "sh -c 'echo relay: cannot reach %h:%p >&2; exit 1'"
    with pytest.raises(ssh.Unreachable, match=r"relay: cannot reach 127\.0\.0\.1"):
        connect(sshd.site(proxy_command=command))


def test_backoff_grows_and_is_capped() -> None:
    backoff = ssh.Backoff(initial=1, factor=2, maximum=10)
    assert [backoff.delay(a) for a in range(6)] == [1, 2, 4, 8, 10, 10]


def test_host_key_check_is_pure(tmp_path: Path) -> None:
    key = paramiko.Ed25519Key.from_private_key_file(str(_make(tmp_path / "k")))
    keys = paramiko.HostKeys()
    with pytest.raises(ssh.UnknownHostKey):
        ssh.check_host_key(keys, "h", key, "n", tmp_path / "kh")
    keys.add("h", key.get_name(), key)
    ssh.check_host_key(keys, "h", key, "n", tmp_path / "kh")
    assert ssh.expand_proxy("relay %h %p %r 100%%", "10.0.0.1", 22, "root") == (
        "relay 10.0.0.1 22 root 100%"
    )


def _make(path: Path) -> Path:
    keygen(path)
    return path
