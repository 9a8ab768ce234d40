"""Deploy a signed module to nodes: connect, upload, verify, install, start.

The package is checked on this machine first (signature against the site's
trusted key, userconfig as a node would check it, every chosen node one of
the module's nodes): an invalid module never reaches a node. Then each node
runs the steps in its own worker thread, in parallel; the node itself
verifies and installs atomically (``rampart module install``), so a failure
or a cancel leaves the node with its previous version, never half of one.

Steps are plain data (``StepStatus``) that the view draws; the failing step
keeps its one-line message. Cancelling takes effect between steps.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from pathlib import Path

from app.credentials import Credentials
from app.nodes import EXIT_NOT_FOUND, parse_module_list
from app.signals import Signal
from app.site import Site
from app.ssh import RunResult, Session
from app.workers import CancelToken, Task, Workers
from node_service.errors import ModuleError, RampartError, UserError

STEPS = ("connect", "upload", "verify", "install", "start")
PENDING, RUNNING, DONE, FAILED, CANCELLED, SKIPPED = (
    "pending", "running", "done", "failed", "cancelled", "skipped",
)  # fmt: skip
NODE_TRUST_DIR = "/etc/rampart/trust"
REMOTE_TMP = "/tmp/rampart-deploy.XXXXXX"
INSTALL_TIMEOUT_S = 120.0
START_TIMEOUT_S = 180.0


class DeployError(ModuleError):
    """The package cannot be deployed (refused before any node was touched)."""


@dataclass(frozen=True)
class StepStatus:
    name: str
    state: str = PENDING
    progress: float = 0.0  # 0..1 (upload reports bytes; others jump to 1)
    message: str = ""


@dataclass(frozen=True)
class NodeProgress:
    node: str
    steps: tuple[StepStatus, ...]

    @classmethod
    def new(cls, node: str, start: bool = True) -> NodeProgress:
        steps = tuple(StepStatus(s) for s in STEPS)
        if not start:
            steps = (*steps[:-1], StepStatus("start", SKIPPED, 1.0, "start not requested"))
        return cls(node, steps)

    def step(self, name: str) -> StepStatus:
        return next(s for s in self.steps if s.name == name)

    def with_step(self, name: str, **changes: object) -> NodeProgress:
        steps = tuple(replace(s, **changes) if s.name == name else s for s in self.steps)  # type: ignore[arg-type]
        return replace(self, steps=steps)

    def cancel_rest(self) -> NodeProgress:
        steps = tuple(
            replace(s, state=CANCELLED, message="cancelled") if s.state == PENDING else s
            for s in self.steps
        )
        return replace(self, steps=steps)

    @property
    def finished(self) -> bool:
        return all(s.state != PENDING and s.state != RUNNING for s in self.steps) or (
            (self.failed_step is not None or any(s.state == CANCELLED for s in self.steps))
            and not any(s.state == RUNNING for s in self.steps)
        )

    @property
    def failed_step(self) -> StepStatus | None:
        return next((s for s in self.steps if s.state == FAILED), None)

    @property
    def ok(self) -> bool:
        return all(s.state in (DONE, SKIPPED) for s in self.steps)

    @property
    def summary(self) -> str:
        failed = self.failed_step
        if failed is not None:
            return f"{self.node}: {failed.name} failed: {failed.message}"
        if self.ok:
            return f"{self.node}: deployed"
        if any(s.state == CANCELLED for s in self.steps):
            return f"{self.node}: cancelled"
        running = next((s for s in self.steps if s.state == RUNNING), None)
        return f"{self.node}: {running.name if running else 'waiting'}"


@dataclass(frozen=True)
class Package:
    path: Path
    name: str
    version: str
    nodes: tuple[str, ...]  # the module's nodes


def check_package(safe_path: str | Path, trust_pub: Path | None) -> Package:
    """Verify a .safe on this machine, exactly as a node's install would."""
    from node_service.module import keys, safe, userconfig

    path = Path(safe_path)
    try:
        if trust_pub is not None:
            verified = safe.verify(path, [keys.load_public(trust_pub)])
            module = verified.module
        else:
            module = userconfig.parse(safe.read_userconfig(path), f"{path.name}:userconfig.xml")
    except RampartError as exc:
        raise DeployError(f"{path.name}: {exc}; nothing was sent to any node") from None
    except OSError as exc:
        raise DeployError(f"{path}: cannot read: {exc.strerror}") from None
    return Package(path, module.name, module.version, module.node_names)


def plan_nodes(package: Package, site: Site, chosen: list[str]) -> list[str]:
    """The nodes to deploy to, or DeployError naming the one that cannot take it."""
    if not chosen:
        raise DeployError("no node chosen; choose at least one node to deploy to")
    for name in chosen:
        site.node(name)
        if name not in package.nodes:
            raise DeployError(
                f"node {name} is not one of module {package.name}'s nodes "
                f"({', '.join(package.nodes)}); nothing was sent to any node"
            )
    return list(dict.fromkeys(chosen))


class Deployment:
    """One deploy of one package to several nodes, in parallel."""

    def __init__(
        self, site: Site, safe_path: str | Path, nodes: list[str],
        creds: Credentials | None = None, workers: Workers | None = None,
        start: bool = True, restart_running: bool = False,
    ) -> None:  # fmt: skip
        self.site = site
        self.safe_path = Path(safe_path)
        self.creds = creds or Credentials()
        self.workers = workers or Workers("deploy", max_workers=max(1, len(nodes)))
        self.start = start
        self.restart_running = restart_running
        self.requested = list(nodes)
        self.package: Package | None = None
        self._lock = threading.Lock()
        self._progress = {n: NodeProgress.new(n, start) for n in nodes}
        self._tasks: dict[str, Task] = {}
        self._was_running: dict[str, bool] = {}  # node -> module was running before install
        self._remaining = 0
        self._all_done = threading.Event()
        self.changed = Signal("deploy_changed")  # (node, NodeProgress)
        self.finished = Signal("deploy_finished")  # ()

    def check(self) -> str:
        trust = self.site.resolve(self.site.trust_pub) if self.site.trust_pub else None
        self.package = check_package(self.safe_path, trust)
        plan_nodes(self.package, self.site, self.requested)
        signed = "signature checked" if trust else "signature NOT checked (no trust_pub in site)"
        return f"{self.package.name} {self.package.version}: valid, {signed}"

    def run(self) -> None:
        """Check locally (raises DeployError), then start one worker per node."""
        if self.package is None:
            self.check()
        with self._lock:
            self._remaining = len(self._progress)
        for node in list(self._progress):
            self._tasks[node] = self.workers.submit(f"deploy-{node}", self._deploy, node)

    def cancel(self) -> None:
        for task in self._tasks.values():
            task.cancel()

    def wait(self, timeout: float | None = None) -> bool:
        return self._all_done.wait(timeout)

    def progress(self, node: str) -> NodeProgress:
        with self._lock:
            return self._progress[node]

    def all_progress(self) -> dict[str, NodeProgress]:
        with self._lock:
            return dict(self._progress)

    # -- one node
    def _update(self, node: str, step: str, **changes: object) -> None:
        with self._lock:
            new = self._progress[node] = self._progress[node].with_step(step, **changes)
        self.changed.emit(node, new)

    def _deploy(self, token: CancelToken, node: str) -> NodeProgress:
        session: Session | None = None
        remote_dir: str | None = None
        current = "connect"
        try:
            for current in STEPS:
                if self.progress(node).step(current).state == SKIPPED:
                    continue
                if token.cancelled:
                    with self._lock:
                        self._progress[node] = self._progress[node].cancel_rest()
                    self.changed.emit(node, self.progress(node))
                    break
                self._update(node, current, state=RUNNING, message=f"{current}...")
                if current == "connect":
                    session = Session(self.site, self.site.node(node), self.creds).connect()
                    message = f"connected to {session.where}"
                elif current == "upload":
                    assert session is not None
                    remote_dir, message = self._upload(session, node)
                else:
                    assert session is not None and remote_dir is not None
                    message = getattr(self, f"_{current}")(session, node, remote_dir)
                self._update(node, current, state=DONE, progress=1.0, message=message)
        except RampartError as exc:
            self._fail(node, current, str(exc))
        except Exception as exc:  # a bug must still end the node's row, not hang it
            self._fail(node, current, f"{type(exc).__name__}: {exc}")
        finally:
            if session is not None:
                if remote_dir is not None:
                    try:
                        session.run(["rm", "-rf", "--", remote_dir], timeout=30)
                    except RampartError:
                        pass  # the node's /tmp is cleaned at boot anyway
                session.close()
            self._node_done()
        return self.progress(node)

    def _fail(self, node: str, step: str, message: str) -> None:
        with self._lock:
            progress = self._progress[node].with_step(step, state=FAILED, message=message)
            steps = tuple(
                replace(s, state=SKIPPED, message=f"not run: {step} failed")
                if s.state == PENDING
                else s
                for s in progress.steps
            )
            new = self._progress[node] = replace(progress, steps=steps)
        self.changed.emit(node, new)

    def _node_done(self) -> None:
        with self._lock:
            self._remaining -= 1
            last = self._remaining <= 0
        if last:
            self._all_done.set()
            self.finished.emit()

    def _check(self, node: str, what: str, result: RunResult) -> RunResult:
        if result.rc == EXIT_NOT_FOUND:
            raise UserError(f"rampart is not installed on node {node} (no `rampart` command)")
        if result.rc != 0:
            raise UserError(result.first_error_line.removeprefix("rampart: "))
        return result

    def _upload(self, session: Session, node: str) -> tuple[str, str]:
        assert self.package is not None
        made = session.run(["mktemp", "-d", REMOTE_TMP], timeout=30)
        if made.rc != 0 or not made.out.strip():
            raise UserError(f"cannot make a temporary directory on {node}: {made.first_error_line}")
        remote_dir = made.out.strip()
        remote = f"{remote_dir}/{self.package.name}.safe"
        total = self.safe_path.stat().st_size

        def progress(sent: int, size: int) -> None:
            self._update(node, "upload", progress=sent / size if size else 1.0)

        size = session.upload(self.safe_path, remote, progress)
        if size != total:
            raise UserError(f"upload to {node} wrote {size} of {total} bytes")
        return remote_dir, f"uploaded {total} bytes to {remote}"

    def _remote(self, remote_dir: str) -> str:
        assert self.package is not None
        return f"{remote_dir}/{self.package.name}.safe"

    def _verify(self, session: Session, node: str, remote_dir: str) -> str:
        assert self.package is not None
        remote = self._remote(remote_dir)
        verified = session.run(
            ["rampart", "module", "verify", remote, "--trust", NODE_TRUST_DIR], timeout=60
        )
        self._check(node, "verify", verified)
        listed = session.run(["rampart", "module", "list", "--json"], timeout=60)
        before = ""
        if listed.rc == 0:
            for info in parse_module_list(node, listed.out):
                if info.name == self.package.name:
                    with self._lock:
                        self._was_running[node] = info.state not in ("STOP", "?")
                    before = f"; upgrades {info.version} -> {self.package.version} ({info.state})"
        return f"signed by a key {node} trusts{before}"

    def _install(self, session: Session, node: str, remote_dir: str) -> str:
        done = session.run(
            ["rampart", "module", "install", self._remote(remote_dir)], timeout=INSTALL_TIMEOUT_S
        )
        lines = self._check(node, "install", done).out.strip().splitlines()
        return lines[-1] if lines else f"{self._remote(remote_dir)} installed"

    def _start(self, session: Session, node: str, remote_dir: str) -> str:
        assert self.package is not None
        name = self.package.name
        with self._lock:
            running = self._was_running.get(node, False)
        if running and not self.restart_running:
            return f"{name} keeps running; the new version takes effect at its next start"
        verb = "stopstart" if running else "start"
        done = session.run(["rampart", verb, "-m", name], timeout=START_TIMEOUT_S)
        lines = self._check(node, verb, done).out.strip().splitlines()
        return lines[-1] if lines else f"{verb} {name}: done"
