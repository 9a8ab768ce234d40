"""Bootstrap a bare server into a site node over SSH ("Add node").

The console carries the node package (a .deb with every wheel inside), so a
node needs no network besides the console's SSH link. The steps, in order:
connect, upload the package over SFTP, install it (``dpkg -i``, offline),
write node.yaml, write the site files (CA certificate, the node's own
certificate and key issued here by the site CA kept beside the site file,
the heartbeat secret), write the trusted module key, start rampartd and
check that ``rampart state --json`` answers as the node.

Everything that can be judged on this machine is judged before the first
connection (package, site CA, trust key, node.yaml): a refusal then names
the problem and says nothing was sent. On the node each file is written to
a temporary name and renamed, so a failing or cancelled step leaves either
the old file or the new one; a step is marked done only after it succeeded,
and after a failure the later steps are skipped, not attempted.

Progress uses the deploy pipeline's types (``StepStatus``), so the console
draws both the same way. Cancelling takes effect between steps and while
waiting for rampartd. The decisions are in ``app.bootstrap_plan``.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from app.bootstrap_plan import (
    LABELS,
    PACKAGE_NAME,
    STEPS,
    BootstrapError,
    BootstrapProgress,
    NodePackage,
    dependency_names,
    dpkg_reason,
    find_package,
    judge_state,
    missing_dependencies,
    node_yaml_text,
    privileged,
    read_package,
    running_modules,
    secrets_dir,
)
from app.credentials import Credentials
from app.deploy import DONE, FAILED, PENDING, RUNNING, SKIPPED
from app.nodes import EXIT_NOT_FOUND
from app.signals import Signal
from app.site import Site
from app.ssh import RunResult, Session
from app.workers import CancelToken, Task, Workers
from node_service.errors import RampartError

__all__ = ["LABELS", "STEPS", "Bootstrap", "BootstrapError", "BootstrapProgress", "add_node"]

ETC = "/etc/rampart"
SITE_DIR = f"{ETC}/site"
TRUST_DIR = f"{ETC}/trust"
NODE_YAML = f"{ETC}/node.yaml"
PID_FILE = "/run/rampart/rampartd.pid"
DAEMON_LOG = "/var/log/rampart/rampartd.log"
REMOTE_TMP = "/tmp/rampart-bootstrap.XXXXXX"
ROOT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SITE_FILES = ("ca.pem", "node.pem", "node.key", "heartbeat.secret")
INSTALL_TIMEOUT_S = 300.0
START_TIMEOUT_S = 60.0
POLL_S = 0.5
STEP_TIMEOUT_S = 60.0


# -- the service ------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What will be sent, all checked on this machine first."""

    package: NodePackage
    secrets: Path
    node_yaml: str
    trust_name: str
    trust_pem: bytes


class Bootstrap:
    """Bootstrap one node of a site; ``run`` works in a worker thread."""

    def __init__(
        self, site: Site, node: str, package: str | os.PathLike[str] | None = None,
        creds: Credentials | None = None, workers: Workers | None = None,
    ) -> None:  # fmt: skip
        self.site = site
        self.node = site.node(node)
        self.package_path = Path(package) if package is not None else None
        self.creds = creds or Credentials()
        self._own_workers = workers is None
        self.workers = workers or Workers("bootstrap", max_workers=1)
        self.plan: Plan | None = None
        self.error: RampartError | None = None  # the failing step's error (UI: host key prompt)
        self._lock = threading.Lock()
        self._progress = BootstrapProgress.fresh(node)
        self._task: Task | None = None
        self._done = threading.Event()
        self._session: Session | None = None
        self._remote_dir: str | None = None
        self.changed = Signal("bootstrap_changed")  # (node, BootstrapProgress)
        self.finished = Signal("bootstrap_finished")  # (BootstrapProgress)

    # -- before any connection
    def check(self) -> str:
        """Judge everything local; BootstrapError says what and that nothing was sent."""
        from node_service.cluster import pki
        from node_service.module import keys

        name = self.node.name
        try:
            package = read_package(self.package_path or find_package())
            secrets = secrets_dir(self.site)
            for f in (pki.CA_CERT, pki.CA_KEY):
                if not (secrets / f).is_file():
                    raise BootstrapError(
                        f"site {self.site.name}: no site CA at {secrets} ({f} missing); "
                        "the console keeps it beside the site file"
                    )
            pki.load_heartbeat_secret(secrets)
            if not self.site.trust_pub:
                raise BootstrapError(
                    f"site {self.site.name} has no trust_pub; set the module signing key's "
                    "public half so the node runs the site's modules"
                )
            trust = self.site.resolve(self.site.trust_pub)
            keys.load_public(trust)
            plan = Plan(package, secrets, node_yaml_text(name), f"{self.site.name}.pub",
                        trust.read_bytes())  # fmt: skip
        except RampartError as exc:
            raise BootstrapError(f"{exc}; nothing was sent to node {name}") from None
        except OSError as exc:
            raise BootstrapError(f"{exc}; nothing was sent to node {name}") from None
        self.plan = plan
        return (
            f"{name}: package {package.name} {package.version} ({package.architecture}, "
            f"{package.size} bytes), site CA {secrets}, trust key {plan.trust_name}"
        )

    def run(self) -> Task:
        """Check locally (raises BootstrapError), then bootstrap in a worker; returns at once."""
        if self.plan is None:
            self.check()
        self._task = self.workers.submit(f"bootstrap-{self.node.name}", self._run)
        return self._task

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        self.cancel()
        if self._own_workers:
            self.workers.shutdown(timeout)

    def progress(self) -> BootstrapProgress:
        with self._lock:
            return self._progress

    # -- the steps
    def _update(self, step: str, **changes: object) -> None:
        with self._lock:
            new = self._progress = self._progress.with_step(step, **changes)
        self.changed.emit(self.node.name, new)

    def _run(self, token: CancelToken) -> BootstrapProgress:
        current = STEPS[0]
        try:
            for current in STEPS:
                if token.cancelled:
                    with self._lock:
                        self._progress = self._progress.cancel_rest()
                    self.changed.emit(self.node.name, self.progress())
                    break
                self._update(current, state=RUNNING, message=f"{LABELS[current]}...")
                message = getattr(self, f"_{current}")(token)
                self._update(current, state=DONE, progress=1.0, message=message)
        except RampartError as exc:
            self.error = exc
            self._fail(current, str(exc))
        except Exception as exc:  # a bug must still end the row, not hang it
            self._fail(current, f"{type(exc).__name__}: {exc}")
        finally:
            self._cleanup()
            self._done.set()
            self.finished.emit(self.progress())
        return self.progress()

    def _fail(self, step: str, message: str) -> None:
        with self._lock:
            progress = self._progress.with_step(step, state=FAILED, message=message)
            steps = tuple(
                replace(s, state=SKIPPED, message=f"not run: {step} failed")
                if s.state == PENDING
                else s
                for s in progress.steps
            )
            new = self._progress = replace(progress, steps=steps)
        self.changed.emit(self.node.name, new)

    def _cleanup(self) -> None:
        session, self._session = self._session, None
        if session is None:
            return
        if self._remote_dir is not None:
            try:
                session.run(["rm", "-rf", "--", self._remote_dir], timeout=30)
            except RampartError:
                pass  # /tmp is cleared at boot; the key there was 0600 in a 0700 dir
        session.close()

    # -- helpers on the node
    @property
    def _s(self) -> Session:
        assert self._session is not None
        return self._session

    def _root(self, argv: list[str], timeout: float = STEP_TIMEOUT_S) -> RunResult:
        return self._s.run(privileged(["env", ROOT_PATH, *argv], self.node.ssh.user), timeout)

    def _sh(self, script: str, *args: str, timeout: float = STEP_TIMEOUT_S) -> RunResult:
        return self._root(["sh", "-ec", script, "sh", *args], timeout)

    def _put(self, name: str, data: bytes) -> str:
        """Upload bytes into the private temporary dir; returns the remote path."""
        assert self._remote_dir is not None
        remote = f"{self._remote_dir}/{name}"
        with tempfile.NamedTemporaryFile(prefix="rampart-bootstrap-") as tmp:
            tmp.write(data)
            tmp.flush()
            os.chmod(tmp.name, 0o600)
            size = self._s.upload(tmp.name, remote)
        if size != len(data):
            raise BootstrapError(f"upload of {name} wrote {size} of {len(data)} bytes")
        return remote

    def _install_files(self, files: list[tuple[str, str, int]], dest_dir: str, mode: int) -> None:
        """Install uploaded files into ``dest_dir``: temporary name, then rename."""
        script = f'install -d -m {mode:o} "$1"; d="$1"; shift\n'
        script += "while [ $# -gt 0 ]; do\n"
        script += '  install -m "$3" -T "$1" "$d/.$2.new"; mv -fT "$d/.$2.new" "$d/$2"\n'
        script += "  shift 3\ndone\n"
        args = [dest_dir]
        for remote, name, file_mode in files:
            args += [remote, name, f"{file_mode:o}"]
        done = self._sh(script, *args)
        if done.rc != 0:
            raise BootstrapError(f"cannot write into {dest_dir}: {done.first_error_line}")

    def _connect(self, token: CancelToken) -> str:
        self._session = Session(self.site, self.node, self.creds).connect()
        state = self._root(["rampart", "state", "--json"])
        if state.rc == 0:
            active = running_modules(state.out)
            if active:
                raise BootstrapError(
                    f"node {self.node.name} already runs modules ({', '.join(active)}); "
                    "bootstrapping restarts rampartd: stop them or upgrade as docs/install.md says"
                )
            return f"connected to {self._s.where}; rampart already there, no module running"
        if state.rc == EXIT_NOT_FOUND:
            return f"connected to {self._s.where}; no rampart installed yet"
        return f"connected to {self._s.where}; rampart installed, rampartd not answering"

    def _upload(self, token: CancelToken) -> str:
        assert self.plan is not None
        package = self.plan.package
        made = self._s.run(["mktemp", "-d", REMOTE_TMP], timeout=30)
        if made.rc != 0 or not made.out.strip():
            raise BootstrapError(f"cannot make a temporary directory: {made.first_error_line}")
        self._remote_dir = made.out.strip()
        remote = f"{self._remote_dir}/{package.path.name}"

        def progress(sent: int, size: int) -> None:
            self._update("upload", progress=sent / size if size else 1.0)

        size = self._s.upload(package.path, remote, progress)
        if size != package.size:
            raise BootstrapError(f"upload wrote {size} of {package.size} bytes to {remote}")
        summed = self._s.run(["sha256sum", "--", remote], timeout=60)
        if summed.rc != 0 or summed.out.split()[:1] != [package.sha256]:
            raise BootstrapError(
                f"{remote} does not match {package.path.name} after upload (sha256); retry"
            )
        return f"uploaded {package.size} bytes to {remote}, sha256 matches"

    def _install(self, token: CancelToken) -> str:
        assert self.plan is not None and self._remote_dir is not None
        package = self.plan.package
        wanted = sorted({n for alts in dependency_names(package.depends) for n in alts})
        query = self._root(["dpkg-query", "-W", "-f=${Package} ${Status}\\n", *wanted])
        missing = missing_dependencies(package.depends, query.out)
        if missing:
            raise BootstrapError(
                f"node {self.node.name} lacks {', '.join(missing)}, which the offline package "
                f"needs; install them from the distribution (apt install ...) and retry"
            )
        deb = f"{self._remote_dir}/{package.path.name}"
        done = self._root(
            ["DEBIAN_FRONTEND=noninteractive", "dpkg", "-i", deb], timeout=INSTALL_TIMEOUT_S
        )
        if done.rc != 0:
            raise BootstrapError(f"dpkg -i {package.path.name} failed: {dpkg_reason(done)}")
        status = self._root(["dpkg-query", "-W", "-f=${Status} ${Version}", PACKAGE_NAME])
        if status.out.strip() != f"install ok installed {package.version}":
            raise BootstrapError(
                f"dpkg reports {PACKAGE_NAME} as {status.out.strip() or 'absent'!r} after install"
            )
        return f"{PACKAGE_NAME} {package.version} installed (offline, dpkg -i)"

    def _node_yaml(self, token: CancelToken) -> str:
        assert self.plan is not None
        remote = self._put("node.yaml", self.plan.node_yaml.encode())
        # The admin's earlier node.yaml (or the package's skeleton) is kept aside.
        done = self._sh(
            'if [ -e "$2" ] && ! cmp -s "$1" "$2"; then cp -p "$2" "$2.old"; fi\n'
            'install -m 0644 -T "$1" "$2.new"; mv -fT "$2.new" "$2"',
            remote, NODE_YAML,
        )  # fmt: skip
        if done.rc != 0:
            raise BootstrapError(f"cannot write {NODE_YAML}: {done.first_error_line}")
        return f"{NODE_YAML} names node {self.node.name} (previous copy kept as node.yaml.old)"

    def _site(self, token: CancelToken) -> str:
        from node_service.cluster import pki

        assert self.plan is not None
        ca = (self.plan.secrets / pki.CA_CERT).read_bytes()
        theirs = self._root(["cat", f"{SITE_DIR}/{pki.CA_CERT}"])
        if theirs.rc == 0 and theirs.out.strip() and theirs.out.encode() != ca:
            raise BootstrapError(
                f"node {self.node.name} already belongs to another site (its {SITE_DIR}/ca.pem "
                "differs); purge it or remove that site's files first"
            )
        with tempfile.TemporaryDirectory(prefix="rampart-issue-") as tmp:
            pki.issue_node(self.plan.secrets, self.node.name, tmp)
            files = []
            for name in SITE_FILES:
                local = Path(tmp) / name
                mode = local.stat().st_mode & 0o777
                files.append((self._put(name, local.read_bytes()), name, mode))
        self._install_files(files, SITE_DIR, 0o700)
        return (
            f"{SITE_DIR}: CA certificate, certificate for {self.node.name} issued by the "
            "site CA, node key and heartbeat secret (secrets 0600)"
        )

    def _trust(self, token: CancelToken) -> str:
        assert self.plan is not None
        remote = self._put(self.plan.trust_name, self.plan.trust_pem)
        self._install_files([(remote, self.plan.trust_name, 0o644)], TRUST_DIR, 0o755)
        return f"{TRUST_DIR}/{self.plan.trust_name}: modules signed by the site's key are trusted"

    def _start(self, token: CancelToken) -> str:
        systemd = self._root(["test", "-d", "/run/systemd/system"]).rc == 0
        if systemd:
            # postinst already started it with the package's node.yaml: restart.
            done = self._root(["systemctl", "enable", "rampartd"])
            if done.rc == 0:
                done = self._root(["systemctl", "restart", "rampartd"], timeout=START_TIMEOUT_S)
            if done.rc != 0:
                raise BootstrapError(f"systemctl could not start rampartd: {done.first_error_line}")
            how = "systemctl restart rampartd (enabled at boot)"
        else:
            how = self._start_direct()
        self._wait_answering(token, systemd)
        return f"rampartd running: {how}"

    def _start_direct(self) -> str:
        """No systemd (a container or a bare test host): run rampartd in its own session."""
        running = self._sh(f'[ -s {PID_FILE} ] && kill -0 "$(cat {PID_FILE})" 2>/dev/null')
        if running.rc == 0:
            # One we started before: stop it, so the new files are read.
            self._sh(
                f'pid=$(cat {PID_FILE}); kill "$pid"; i=0\n'
                'while kill -0 "$pid" 2>/dev/null && [ $i -lt 300 ]; do\n'
                "  sleep 0.1; i=$((i+1))\n"
                "done\n"
            )
        elif self._root(["rampart", "state", "--json"]).rc == 0:
            raise BootstrapError(
                "a rampartd not started by systemd nor by the console runs here; stop it and retry"
            )
        done = self._sh(
            'install -d -m 0755 "$(dirname "$1")"\n'
            f'setsid -f sh -c \'echo $$ > "$1"; exec /usr/bin/rampartd --config {NODE_YAML}\' '
            f'sh "$1" </dev/null >>{DAEMON_LOG} 2>&1',
            PID_FILE,
        )  # fmt: skip
        if done.rc != 0:
            raise BootstrapError(f"cannot start rampartd: {done.first_error_line}")
        return f"no systemd here: started /usr/bin/rampartd directly (log {DAEMON_LOG})"

    def _wait_answering(self, token: CancelToken, systemd: bool) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        last = ""
        while time.monotonic() < deadline:  # bounded: START_TIMEOUT_S
            state = self._root(["rampart", "state", "--json"])
            if state.rc == 0:
                return
            last = state.first_error_line
            if not systemd and self._sh(f'kill -0 "$(cat {PID_FILE})" 2>/dev/null').rc != 0:
                tail = self._root(["tail", "-n", "1", DAEMON_LOG]).out.strip()
                raise BootstrapError(f"rampartd exited at start: {tail or last}")
            if token.wait(POLL_S):
                raise BootstrapError("cancelled while waiting for rampartd to answer")
        raise BootstrapError(
            f"rampartd did not answer within {START_TIMEOUT_S:g}s ({last}); see "
            + ("journalctl -u rampartd" if systemd else DAEMON_LOG)
        )

    def _check(self, token: CancelToken) -> str:
        state = self._root(["rampart", "state", "--json"])
        if state.rc != 0:
            raise BootstrapError(f"`rampart state --json` failed: {state.first_error_line}")
        ok, reason = judge_state(state.out, self.node.name)
        if not ok:
            raise BootstrapError(reason)
        return reason


def add_node(
    site: Site, node: str, package: str | os.PathLike[str] | None = None,
    creds: Credentials | None = None, workers: Workers | None = None,
    on_change: Callable[[str, BootstrapProgress], None] | None = None,
) -> Bootstrap:  # fmt: skip
    """The console's "Add node": check locally (BootstrapError), then start; returns at once.

    ``node`` must already be in ``site`` (the dialog adds it and saves the site first).
    """
    bootstrap = Bootstrap(site, node, package, creds, workers)
    if on_change is not None:
        bootstrap.changed.connect(on_change)
    bootstrap.check()
    bootstrap.run()
    return bootstrap
