"""What the console knows about each node, and the `rampart` commands it runs there.

The parsing of each command's output and the role decision are pure
functions (tested without SSH); ``NodeService`` is the thin layer that runs
the commands over one SSH session per node; ``SiteModel`` keeps every
node's ``NodeStatus`` current: one monitor thread per node refreshes it, then
follows ``rampart watch --json``, and when the node is lost shows it as
unreachable and reconnects with exponential backoff.

The user's role on a node is what the node would decide: the login user's
groups (`id`) judged by ``node_service.api.roles.authorize``, so a greyed-out
button and the node's refusal give the same reason.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

from app.credentials import Credentials
from app.feeds import parse_line
from app.signals import Signal
from app.site import Site, SiteNode
from app.ssh import Backoff, RunResult, Session, SshError, Unreachable
from app.workers import Cancelled, CancelToken, Task, Workers
from node_service.api import roles
from node_service.errors import RampartError, UserError

COMMAND_TIMEOUT_S = 60.0
ACTIONS = ("start", "stop", "restart", "stopstart", "prim", "second", "swap", "primforce")
EXIT_REFUSED, EXIT_NO_DAEMON, EXIT_NOT_FOUND = 3, 4, 127


class NodeError(UserError):
    """A node answered, but not as a Rampart node should."""


class NotRampart(NodeError):
    """The host has no `rampart` command."""


@dataclass(frozen=True)
class ModuleInfo:
    name: str
    version: str
    kind: str
    state: str
    error: str | None = None


@dataclass(frozen=True)
class NodeStatus:
    name: str
    reachable: bool | None = None  # None: not checked yet
    version: str | None = None
    modules: tuple[ModuleInfo, ...] = ()
    states: dict[str, dict[str, Any]] = field(default_factory=dict)
    identity: roles.Identity | None = None
    error: str | None = None  # why the node is unreachable or not usable
    checked_at: float = 0.0

    @property
    def role(self) -> str | None:
        role = self.identity.role if self.identity else None
        return roles.ROLE_WORD.get(role) if role else None

    @property
    def summary(self) -> str:
        if self.reachable is None:
            return "not checked yet"
        if not self.reachable:
            return f"unreachable: {self.error}"
        if self.error:
            return f"reachable, {self.error}"
        names = ", ".join(m.name for m in self.modules) or "no modules"
        return f"rampart {self.version}, {names}"


@dataclass(frozen=True)
class ActionResult:
    ok: bool
    reason: str
    state: str | None = None


# -- pure: reading command output --------------------------------------------------------


def parse_version(node: str, out: str) -> str:
    words = out.split()
    if len(words) >= 2 and words[0] == "rampart":
        return words[1]
    raise NodeError(f"node {node}: `rampart --version` printed {out.strip()[:80]!r}")


def _json(node: str, command: str, text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        first = text.strip().splitlines()[0][:80] if text.strip() else "nothing"
        raise NodeError(f"node {node}: `{command}` did not print JSON (got {first!r})") from None


def parse_module_list(node: str, text: str) -> tuple[ModuleInfo, ...]:
    data = _json(node, "rampart module list --json", text)
    try:
        return tuple(
            ModuleInfo(
                str(m["name"]),
                str(m.get("version", "?")),
                str(m.get("kind", "?")),
                str(m.get("state", "?")),
                m.get("error"),
            )
            for m in data["modules"]
        )
    except (KeyError, TypeError):
        raise NodeError(f"node {node}: `rampart module list --json` has no modules list") from None


def parse_states(node: str, text: str) -> dict[str, dict[str, Any]]:
    data = _json(node, "rampart state --json", text)
    try:
        return {str(s["module"]): s for s in data["modules"]}
    except (KeyError, TypeError):
        raise NodeError(f"node {node}: `rampart state --json` has no modules list") from None


def parse_identity(node: str, out: str) -> roles.Identity:
    """``id -u; id -un; id -Gn`` -> the Identity the node's API would see."""
    lines = out.splitlines()
    try:
        return roles.Identity(int(lines[0]), lines[1].strip(), frozenset(lines[2].split()))
    except (IndexError, ValueError):
        raise NodeError(f"node {node}: cannot tell the login user's groups from `id`") from None


def allowed(status: NodeStatus | None, verb: str) -> tuple[bool, str]:
    """Whether the action button is enabled, and the reason shown when greyed out."""
    if status is None or status.reachable is None:
        return False, "node not checked yet"
    if not status.reachable:
        return False, f"node {status.name} is unreachable"
    if status.identity is None:
        return True, "role unknown; the node decides"
    return roles.authorize(status.identity, verb)


def parse_action(node: str, module: str, verb: str, rc: int, out: str, err: str) -> ActionResult:
    if rc == 0:
        data = _json(node, f"rampart {verb} -m {module} --json", out)
        state = (data.get("state") or {}).get("state") if isinstance(data, dict) else None
        return ActionResult(True, str(data.get("reason", "done")), state)
    line = next((ln for ln in reversed(err.splitlines()) if ln.strip()), f"exit status {rc}")
    line = line.removeprefix("rampart: ").strip()
    if rc == EXIT_NOT_FOUND:
        line = "rampart is not installed on this node"
    return ActionResult(False, f"{module} on {node}: {verb} refused: {line}")


# -- side effects: one node ----------------------------------------------------------------


class NodeService:
    """The `rampart` commands of one node, over one (re)used SSH session."""

    def __init__(self, site: Site, node: SiteNode, creds: Credentials | None = None) -> None:
        self.site, self.node = site, node
        self.creds = creds or Credentials()
        self._session: Session | None = None
        self._lock = threading.Lock()  # one command at a time per session setup

    def session(self) -> Session:
        with self._lock:
            if self._session is None or not self._session.connected:
                if self._session is not None:
                    self._session.close()
                self._session = Session(self.site, self.node, self.creds).connect()
            return self._session

    def close(self) -> None:
        with self._lock:
            if self._session is not None:
                self._session.close()
                self._session = None

    def run(self, *args: str, timeout: float = COMMAND_TIMEOUT_S) -> RunResult:
        return self.session().run(list(args), timeout)

    def refresh(self) -> NodeStatus:
        """Connect and read version, modules, states and the login's role."""
        name = self.node.name
        try:
            version_run = self.run("rampart", "--version")
            if version_run.rc == EXIT_NOT_FOUND:
                raise NotRampart(
                    f"node {name}: rampart is not installed (no `rampart` command); "
                    "install the rampart package on it"
                )
            version = parse_version(name, version_run.out or version_run.err)
            identity = parse_identity(name, self.run("sh", "-c", "id -u; id -un; id -Gn").out)
            listed = self.run("rampart", "module", "list", "--json")
            if listed.rc != 0:
                return NodeStatus(
                    name, True, version, identity=identity, checked_at=time.time(),
                    error=f"rampartd does not answer: {listed.first_error_line}",
                )  # fmt: skip
            modules = parse_module_list(name, listed.out)
            states_run = self.run("rampart", "state", "--json")
            states = parse_states(name, states_run.out) if states_run.rc == 0 else {}
        except Unreachable as exc:
            self.close()
            return NodeStatus(name, False, error=str(exc), checked_at=time.time())
        except NotRampart as exc:
            return NodeStatus(name, True, error=str(exc), checked_at=time.time())
        return NodeStatus(name, True, version, modules, states, identity, None, time.time())

    def action(self, module: str, verb: str) -> ActionResult:
        if verb not in ACTIONS:
            raise UserError(f"unknown action {verb!r}; expected one of {', '.join(ACTIONS)}")
        result = self.run("rampart", verb, "-m", module, "--json")
        return parse_action(self.node.name, module, verb, result.rc, result.out, result.err)


# -- the site model --------------------------------------------------------------------------


# How many past journal entries a node sends when the console connects.
HISTORY_LIMIT = 200


class SiteModel:
    """Every node's status, kept current by one monitor thread per node."""

    def __init__(
        self, site: Site, creds: Credentials | None = None, workers: Workers | None = None,
        backoff: Backoff | None = None, idle_timeout: float = 10.0,
    ) -> None:  # fmt: skip
        self.site = site
        self.creds = creds or Credentials()
        self.workers = workers or Workers("site")
        self.backoff = backoff or Backoff()
        self.idle_timeout = idle_timeout  # a silent feed is probed after this long
        self.services = {n.name: NodeService(site, n, self.creds) for n in site.nodes}
        self._lock = threading.Lock()
        self._statuses = {n.name: NodeStatus(n.name) for n in site.nodes}
        self._monitors: dict[str, Task] = {}
        self.status_changed = Signal("status_changed")  # (node, NodeStatus)
        self.feed_line = Signal("feed_line")  # (node, watch line dict)

    def statuses(self) -> dict[str, NodeStatus]:
        with self._lock:
            return dict(self._statuses)

    def status(self, node: str) -> NodeStatus:
        with self._lock:
            return self._statuses[node]

    def publish(self, status: NodeStatus) -> None:
        """Show ``status`` as the node's latest (a bootstrap's result, a test's fixture)."""
        self._publish(status)

    def _publish(self, status: NodeStatus) -> None:
        with self._lock:
            self._statuses[status.name] = status
        self.status_changed.emit(status.name, status)

    def refresh(self, node: str) -> Task:
        return self.workers.submit(f"refresh-{node}", lambda _t: self._refresh(node))

    def _refresh(self, node: str) -> NodeStatus:
        status = self.services[node].refresh()
        self._publish(status)
        return status

    def run_action(self, node: str, module: str, verb: str) -> Task:
        def act(_token: CancelToken) -> ActionResult:
            try:
                result = self.services[node].action(module, verb)
            except RampartError as exc:
                result = ActionResult(False, str(exc))
            self._refresh(node)
            return result

        return self.workers.submit(f"{verb}-{module}-{node}", act)

    def start_monitoring(self) -> None:
        for node in self.site.node_names:
            if node not in self._monitors or self._monitors[node].done:
                self._monitors[node] = self.workers.spawn(f"monitor-{node}", self._monitor, node)

    def stop_monitoring(self, timeout: float = 10.0) -> None:
        for task in self._monitors.values():
            task.cancel()
        for service in self.services.values():
            service.close()  # wakes a monitor blocked on its channel
        for task in self._monitors.values():
            task.wait(timeout)
        self._monitors.clear()

    def _monitor(self, token: CancelToken, node: str) -> None:
        attempt = 0
        service = self.services[node]
        while not token.cancelled:
            try:
                status = self._refresh(node)
                if status.reachable and status.error is None:
                    attempt = 0
                    self._history(node, service)
                    self._follow(token, node, service)
                    if token.cancelled:
                        return
                    self._publish(replace(self.status(node), reachable=False,
                                          error="the watch feed ended; reconnecting"))  # fmt: skip
            except Cancelled:
                return
            except (RampartError, SshError, OSError, EOFError) as exc:
                # Host key or login problems also land here: shown, and retried
                # slowly, so fixing them in the console brings the node back. A
                # link lost inside paramiko at an unlucky moment is the same loss.
                service.close()
                why = (
                    str(exc) if isinstance(exc, RampartError) else f"node {node}: link lost: {exc}"
                )
                self._publish(NodeStatus(node, False, error=why, checked_at=time.time()))
            if token.wait(self.backoff.delay(attempt)):
                return
            attempt += 1

    def _history(self, node: str, service: NodeService) -> None:
        """The node's recent journal, sent as event lines before the live feed,
        so Logs and the timeline show what happened before the console looked.

        Best effort: a node that cannot say (an old rampart, a refused role)
        still gets its live feed. Entries seen again after a reconnect are
        dropped by the models that keep them (LogModel keeps one of each)."""
        try:
            result = service.run("rampart", "events", "--json", "-n", str(HISTORY_LIMIT))
        except (RampartError, SshError, OSError, EOFError):
            return
        if result.rc != 0:
            return
        for text in result.out.splitlines():
            try:
                entry = json.loads(text)
            except ValueError:
                continue
            if not isinstance(entry, dict):
                continue
            event = {"type": "event", "node": node, "ts": entry.get("ts"), "entry": entry}
            line = parse_line(event)
            if line is not None:
                self.feed_line.emit(node, line)

    def _follow(self, token: CancelToken, node: str, service: NodeService) -> None:
        channel = service.session().open_lines(["rampart", "watch", "--json"], self.idle_timeout)
        try:
            for raw in channel.lines(stop=lambda: token.cancelled):
                line = parse_line(raw)
                if line is None:
                    continue
                if line["type"] == "state" and isinstance(line.get("state"), dict):
                    self._note_state(node, line["module"], line["state"])
                self.feed_line.emit(node, line)
        except (SshError, OSError, EOFError) as exc:
            if not token.cancelled:
                raise Unreachable(f"node {node}: lost the watch feed: {exc}") from None
        finally:
            channel.close()

    def _note_state(self, node: str, module: str, state: dict[str, Any]) -> None:
        with self._lock:
            old = self._statuses[node]
            states = {**old.states, module: state}
            new = replace(old, states=states, reachable=True, checked_at=time.time())
            self._statuses[node] = new
        self.status_changed.emit(node, new)

    def close(self) -> None:
        self.stop_monitoring()
        for service in self.services.values():
            service.close()
