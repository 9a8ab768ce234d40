"""SSH sessions to nodes (paramiko): host keys, logins, commands, feeds, uploads.

Host keys are checked against the site's known_hosts before any secret is
sent: an unknown key raises ``UnknownHostKey`` carrying its fingerprint so the
console can ask the user (then ``trust_host_key`` records it); a key that
differs from the recorded one is refused with ``HostKeyChanged`` and never
overridden here. Logins use the node's key file (passphrase from the
keyring), the SSH agent, and/or the password stored in the keyring.

Every method blocks: call them from ``app.workers`` threads only.
"""

from __future__ import annotations

import base64
import hashlib
import os
import select
import shlex
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import paramiko

from app.credentials import CredentialError, Credentials, key_account, password_account
from app.site import Site, SiteNode
from node_service.errors import RampartError, RetryableError, UserError

CONNECT_TIMEOUT_S = 10.0
KEEPALIVE_S = 5
CHUNK = 65536
DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"
STDERR_WAIT_S = 3.0


class SshError(RampartError):
    """An SSH operation on a node failed."""


class Unreachable(SshError, RetryableError):
    """The node does not answer (network, sshd down, proxy failed); try again later."""


class AuthenticationFailed(SshError, UserError):
    """The node refused the login (wrong password, key not authorised)."""


class CredentialsNeeded(SshError, UserError):
    """A secret is needed that is not in the keyring; ``account`` says which."""

    def __init__(self, message: str, account: str, kind: str) -> None:
        super().__init__(message)
        self.account = account
        self.kind = kind  # "password" or "passphrase"


class UnknownHostKey(SshError, UserError):
    """The node's host key is not in known_hosts: show the fingerprint, ask."""

    def __init__(self, node: str, host: str, key: paramiko.PKey, known_hosts: Path) -> None:
        self.node, self.host, self.key, self.known_hosts = node, host, key, known_hosts
        self.key_type = key.get_name()
        self.fingerprint = fingerprint(key)
        super().__init__(
            f"node {node}: host key of {host} is unknown ({self.key_type} {self.fingerprint}); "
            f"check it on the node (ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub) before trusting it"
        )


class HostKeyChanged(SshError, UserError):
    """The node presents a different key than known_hosts records: refused."""

    def __init__(self, node: str, host: str, offered: str, recorded: str, known_hosts: Path):
        self.node, self.host = node, host
        self.offered, self.recorded = offered, recorded
        super().__init__(
            f"WARNING: node {node}: host key of {host} CHANGED (offered {offered}, "
            f"{known_hosts} records {recorded}); refusing to connect: this may be an attack. "
            f"If the node was reinstalled, remove its line from {known_hosts}"
        )


@dataclass(frozen=True)
class RunResult:
    rc: int
    out: str
    err: str

    @property
    def first_error_line(self) -> str:
        for text in (self.err, self.out):
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
            if lines:
                return lines[-1]
        return f"exit status {self.rc}"


# -- pure helpers -------------------------------------------------------------------


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH style ``SHA256:...`` of a host key."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def known_hosts_name(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


def expand_proxy(command: str, host: str, port: int, user: str) -> str:
    """ssh_config tokens: %h host, %p port, %r user, %% a percent sign."""
    out, i = [], 0
    while i < len(command):
        ch = command[i]
        if ch == "%" and i + 1 < len(command):
            token = command[i + 1]
            repl = {"h": host, "p": str(port), "r": user, "%": "%"}.get(token)
            if repl is not None:
                out.append(repl)
                i += 2
                continue
        out.append(ch)
        i += 1
    return "".join(out)


@dataclass(frozen=True)
class Backoff:
    """Exponential reconnection delays: initial, x factor each attempt, capped."""

    initial: float = 1.0
    factor: float = 2.0
    maximum: float = 30.0

    def delay(self, attempt: int) -> float:
        return min(self.maximum, self.initial * self.factor ** max(0, attempt))


def known_hosts_path(site: Site) -> Path:
    return site.resolve(site.known_hosts or DEFAULT_KNOWN_HOSTS)


def check_host_key(
    host_keys: paramiko.HostKeys, name: str, key: paramiko.PKey, node: str, path: Path
) -> None:
    """Raise unless ``key`` is the key recorded for ``name``."""
    recorded = host_keys.lookup(name)
    if not recorded:
        raise UnknownHostKey(node, name, key, path)
    same = recorded.get(key.get_name())
    if same is not None and same.asbytes() == key.asbytes():
        return
    other = same or next(iter(recorded.values()))
    raise HostKeyChanged(
        node, name, f"{key.get_name()} {fingerprint(key)}",
        f"{other.get_name()} {fingerprint(other)}", path,
    )  # fmt: skip


def trust_host_key(site: Site, error: UnknownHostKey) -> Path:
    """Record a host key the user accepted; atomic append to known_hosts."""
    path = error.known_hosts
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        old = path.read_text()
    except FileNotFoundError:
        old = ""
    if old and not old.endswith("\n"):
        old += "\n"
    line = f"{error.host} {error.key.get_name()} {error.key.get_base64()}\n"
    fd, tmp = tempfile.mkstemp(prefix=".known_hosts.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(old + line)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


class _Proxy(paramiko.ProxyCommand):
    """ProxyCommand that reports the relay's end of file instead of spinning on it,
    and keeps what the relay said on stderr for the error message."""

    def __init__(self, command_line: str) -> None:
        super().__init__(command_line)
        self._stderr: str | None = None
        self._stderr_lock = threading.Lock()  # close() runs in paramiko's thread

    def recv(self, size: int) -> bytes:
        try:
            ready, _, _ = select.select([self.process.stdout], [], [], self.timeout)
            if not ready:
                raise TimeoutError("proxy command: no data")
            return os.read(self.process.stdout.fileno(), size)
        except ValueError:
            # close() from another thread closed the pipe under this read: the
            # link is over, which paramiko understands as end of file.
            return b""

    def close(self) -> None:
        # paramiko closes the proxy from its own thread as soon as the link
        # ends, so the relay's words are read here, before the pipes go.
        if self.process.poll() is None:
            self.process.terminate()
        try:
            self.process.wait(STDERR_WAIT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(STDERR_WAIT_S)
        with self._stderr_lock:
            if self._stderr is None:
                self._stderr = self._read_stderr()
        for pipe in (self.process.stdin, self.process.stdout, self.process.stderr):
            if pipe is not None:
                pipe.close()

    def _read_stderr(self) -> str:
        if self.process.stderr is None or self.process.stderr.closed:
            return ""
        try:
            return self.process.stderr.read(4096).decode("utf-8", "replace").strip()
        except (OSError, ValueError):
            return ""

    def stderr_text(self) -> str:
        """What the relay said before exiting (its stdout EOF may precede its exit a little)."""
        with self._stderr_lock:
            if self._stderr is not None:
                return self._stderr
        try:
            self.process.wait(STDERR_WAIT_S)
        except subprocess.TimeoutExpired:
            return ""  # still running: the failure is not the relay's
        with self._stderr_lock:
            if self._stderr is None:
                self._stderr = self._read_stderr()
            return self._stderr


# -- the session --------------------------------------------------------------------


class Session:
    """One SSH connection to one node of a site."""

    def __init__(self, site: Site, node: SiteNode, creds: Credentials | None = None) -> None:
        self.site, self.node = site, node
        self.creds = creds or Credentials()
        self.transport: paramiko.Transport | None = None
        self._proxy: _Proxy | None = None
        a = node.ssh
        self.where = f"{a.user}@{a.host}:{a.port}"

    # -- connecting
    def connect(self, timeout: float = CONNECT_TIMEOUT_S) -> Session:
        a = self.node.ssh
        sock = self._open_socket(timeout)
        transport = paramiko.Transport(sock)
        self.transport = transport
        try:
            path = known_hosts_path(self.site)
            host_keys = paramiko.HostKeys()
            if path.exists():
                host_keys.load(str(path))
            name = known_hosts_name(a.host, a.port)
            recorded = host_keys.lookup(name)
            if recorded:
                # Ask only for key types we have on record, so a server offering
                # a new type is compared with the key we know, not trusted anew.
                opts = transport.get_security_options()
                wanted = [t for t in opts.key_types if t in recorded]
                if wanted:
                    opts.key_types = wanted
            try:
                transport.start_client(timeout=timeout)
                # A link lost right after the handshake ("No existing session")
                # is the same loss as one during it: retry later, never crash.
                server_key = transport.get_remote_server_key()
            except (paramiko.SSHException, EOFError, OSError) as exc:
                detail = self._proxy.stderr_text() if self._proxy else ""
                raise Unreachable(
                    f"node {self.node.name}: no SSH service at {self.where} "
                    f"({detail or exc or type(exc).__name__})"
                ) from None
            check_host_key(host_keys, name, server_key, self.node.name, path)
            transport.set_keepalive(KEEPALIVE_S)
            self._authenticate(transport, timeout)
        except BaseException:
            self.close()
            raise
        return self

    def _open_socket(self, timeout: float) -> socket.socket | _Proxy:
        a = self.node.ssh
        if a.proxy_command:
            try:
                self._proxy = _Proxy(expand_proxy(a.proxy_command, a.host, a.port, a.user))
            except (OSError, ValueError) as exc:
                raise Unreachable(
                    f"node {self.node.name}: proxy_command cannot run: {exc}"
                ) from None
            self._proxy.settimeout(timeout)
            return self._proxy
        try:
            return socket.create_connection((a.host, a.port), timeout=timeout)
        except TimeoutError:
            raise Unreachable(
                f"node {self.node.name}: {a.host}:{a.port} did not answer within {timeout:g}s"
            ) from None
        except OSError as exc:
            raise Unreachable(
                f"node {self.node.name}: cannot reach {a.host}:{a.port}: {exc.strerror or exc}"
            ) from None

    def _authenticate(self, transport: paramiko.Transport, timeout: float) -> None:
        a = self.node.ssh
        tried: list[str] = []
        if a.key:
            key_path = self.site.resolve(a.key)
            pkey = self._load_key(key_path)
            if self._try(lambda: transport.auth_publickey(a.user, pkey)):
                return
            tried.append(f"key {key_path}")
        if a.agent:
            agent = paramiko.Agent()
            try:
                for agent_key in agent.get_keys():
                    if self._try(lambda k=agent_key: transport.auth_publickey(a.user, k)):
                        return
            finally:
                agent.close()
            tried.append("the SSH agent's keys")
        try:
            password = self.creds.password(self.site.name, self.node.name)
        except CredentialError:
            if not tried:
                raise
            password = None  # the key's refusal is the news, not a missing keyring
        if password is not None:
            if self._try(lambda: transport.auth_password(a.user, password)):
                return
            raise AuthenticationFailed(
                f"node {self.node.name}: {self.where} refused the password stored in the "
                f"keyring as {password_account(self.site.name, self.node.name)} "
                f"(also tried: {', '.join(tried) or 'nothing else'}); enter the right password"
            )
        if not tried:
            raise CredentialsNeeded(
                f"node {self.node.name}: no key, agent or stored password to log in as "
                f"{self.where}; enter the password (kept in the OS keyring)",
                password_account(self.site.name, self.node.name),
                "password",
            )
        raise AuthenticationFailed(
            f"node {self.node.name}: {self.where} refused {' and '.join(tried)}; "
            f"add the public key to {a.user}'s authorized_keys on the node or store a password"
        )

    @staticmethod
    def _try(attempt: Callable[[], object]) -> bool:
        try:
            attempt()
        except paramiko.AuthenticationException:
            return False
        return True

    def _load_key(self, path: Path) -> paramiko.PKey:
        try:
            return paramiko.PKey.from_path(path)
        except (paramiko.PasswordRequiredException, TypeError):
            # cryptography says "password-protected" with a TypeError.
            passphrase = self.creds.key_passphrase(path)
            if passphrase is None:
                raise CredentialsNeeded(
                    f"node {self.node.name}: key {path} is encrypted and its passphrase is not "
                    "in the keyring; enter it",
                    key_account(path),
                    "passphrase",
                ) from None
        except FileNotFoundError:
            raise AuthenticationFailed(
                f"node {self.node.name}: ssh key {path} does not exist (site file ssh.key)"
            ) from None
        except (paramiko.SSHException, OSError, ValueError) as exc:
            raise AuthenticationFailed(
                f"node {self.node.name}: ssh key {path} cannot be read: {exc}"
            ) from None
        try:
            return paramiko.PKey.from_path(path, passphrase.encode("utf-8"))
        except (paramiko.SSHException, ValueError):
            raise AuthenticationFailed(
                f"node {self.node.name}: the passphrase in the keyring does not open key {path}; "
                "enter the right one"
            ) from None

    @property
    def connected(self) -> bool:
        return self.transport is not None and self.transport.is_active()

    def _need(self) -> paramiko.Transport:
        if not self.connected:
            raise Unreachable(f"node {self.node.name}: not connected to {self.where}")
        assert self.transport is not None
        return self.transport

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None
        if self._proxy is not None:
            self._proxy.close()
            self._proxy = None

    def __enter__(self) -> Session:
        return self if self.connected else self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- using it
    def _exec(self, command: list[str], timeout: float) -> paramiko.Channel:
        try:
            channel = self._need().open_session(timeout=timeout)
            channel.exec_command(shlex.join(command))
        except (paramiko.SSHException, EOFError, OSError) as exc:
            self.close()
            raise Unreachable(f"node {self.node.name}: lost {self.where}: {exc}") from None
        return channel

    def run(self, command: list[str], timeout: float = 30.0) -> RunResult:
        """Run a command; (rc, stdout, stderr). Raises Unreachable on a lost link."""
        channel = self._exec(command, timeout)
        out, err = bytearray(), bytearray()
        deadline = time.monotonic() + timeout
        channel.settimeout(0.2)
        try:
            while True:
                try:
                    chunk = channel.recv(CHUNK)
                except TimeoutError:
                    chunk = None
                while channel.recv_stderr_ready():
                    err += channel.recv_stderr(CHUNK)
                if chunk:
                    out += chunk
                elif chunk == b"":
                    if channel.exit_status_ready():
                        break
                    channel.status_event.wait(0.2)  # stdout ended; the status follows
                if time.monotonic() > deadline:
                    raise SshError(
                        f"node {self.node.name}: `{shlex.join(command)}` did not finish "
                        f"within {timeout:g}s"
                    )
                if not self.connected:
                    raise Unreachable(f"node {self.node.name}: lost {self.where}")
            rc = channel.recv_exit_status()
            while channel.recv_stderr_ready():
                err += channel.recv_stderr(CHUNK)
        finally:
            channel.close()
        return RunResult(rc, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"))

    def open_lines(self, command: list[str], idle_timeout: float = 10.0) -> LineChannel:
        """A long-lived command whose stdout is read line by line (``rampart watch``)."""
        return LineChannel(self, self._exec(command, CONNECT_TIMEOUT_S), idle_timeout)

    def upload(
        self, local: str | os.PathLike[str], remote: str,
        progress: Callable[[int, int], None] | None = None,
    ) -> int:  # fmt: skip
        """SFTP put; returns the size written (checked by the SFTP server's stat)."""
        try:
            sftp = paramiko.SFTPClient.from_transport(self._need())
            if sftp is None:
                raise SshError(f"node {self.node.name}: the SFTP subsystem is not available")
            with sftp:
                attrs = sftp.put(str(local), remote, callback=progress, confirm=True)
                return int(attrs.st_size or 0)
        except FileNotFoundError:
            raise SshError(f"node {self.node.name}: cannot upload {local}: no such file") from None
        except OSError as exc:
            raise SshError(
                f"node {self.node.name}: upload of {local} to {remote} failed: {exc}"
            ) from None
        except (paramiko.SSHException, EOFError) as exc:
            self.close()
            raise Unreachable(
                f"node {self.node.name}: lost {self.where} during upload: {exc}"
            ) from None


class LineChannel:
    """Iterate the output lines of a long-lived remote command."""

    def __init__(self, session: Session, channel: paramiko.Channel, idle_timeout: float) -> None:
        self.session = session
        self.channel = channel
        self.idle_timeout = idle_timeout
        self._buffer = b""

    def lines(self, stop: Callable[[], bool] = lambda: False) -> Iterator[str]:
        """Lines until the command ends; Unreachable when silent for idle_timeout."""
        self.channel.settimeout(0.5)
        last = time.monotonic()
        while not stop():
            try:
                chunk = self.channel.recv(CHUNK)
            except TimeoutError:
                if time.monotonic() - last > self.idle_timeout:
                    self._probe()
                    last = time.monotonic()
                continue
            if not chunk:
                if self._buffer:
                    yield self._buffer.decode("utf-8", "replace")
                    self._buffer = b""
                return
            last = time.monotonic()
            self._buffer += chunk
            *complete, self._buffer = self._buffer.split(b"\n")
            for raw in complete:
                yield raw.decode("utf-8", "replace")

    def _probe(self) -> None:
        # A quiet feed is normal (a node with no module sends nothing after
        # hello); a link that cannot run `true` in time is not.
        try:
            self.session.run(["true"], timeout=self.idle_timeout)
        except SshError as exc:
            raise Unreachable(
                f"node {self.session.node.name}: silent for {self.idle_timeout:g}s and not "
                f"answering ({exc})"
            ) from None

    @property
    def exit_status(self) -> int | None:
        return self.channel.recv_exit_status() if self.channel.exit_status_ready() else None

    def close(self) -> None:
        self.channel.close()
