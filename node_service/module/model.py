"""The module model: what a userconfig.xml says, as plain frozen data.

Everything is a frozen dataclass holding tuples, so two models compare with
``==`` and can be shared between threads and tasks without copying. The
model carries no validation of its own: ``validate.check(module)`` says what
is wrong with one, and ``userconfig.parse`` refuses to return an invalid one.
Defaults here are the defaults of the XML schema (docs/userconfig.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from node_service.errors import ModuleError

MIRROR = "mirror"
FARM = "farm"
KINDS = (MIRROR, FARM)

# The six lifecycle scripts, in the order the engine runs them.
SCRIPT_NAMES = ("prestart", "start_prim", "stop_prim", "start_both", "stop_both", "poststop")
# Which of them each kind runs: a mirror starts its application on the PRIM
# only, a farm on every UP node.
KIND_SCRIPTS = {
    MIRROR: ("prestart", "start_prim", "stop_prim", "poststop"),
    FARM: ("prestart", "start_both", "stop_both", "poststop"),
}

REPLICATION_MODES = ("sync", "semi", "async")
PROTOCOLS = ("tcp", "udp")
CRITERIA = ("ip", "ip_port")

DEFAULT_VERSION = "1"
DEFAULT_SCRIPT_TIMEOUT = 60.0
DEFAULT_HEARTBEAT_INTERVAL_MS = 250
DEFAULT_HEARTBEAT_TIMEOUT_MS = 3000
DEFAULT_CHECK_INTERVAL = 5.0
DEFAULT_CHECK_TIMEOUT = 2.0
DEFAULT_CHECK_FAILURES = 3
DEFAULT_PROCESS_RESTARTS = 3
DEFAULT_PROCESS_WINDOW = 300.0


@dataclass(frozen=True)
class Node:
    """A server of the module; every address is one heartbeat network."""

    name: str
    addresses: tuple[str, ...]
    weight: int = 1  # farm only: share of buckets relative to the other nodes

    @property
    def lan_address(self) -> str:
        """The first address: the LAN the virtual IP lives on."""
        return self.addresses[0]


@dataclass(frozen=True)
class VirtualIP:
    address: str
    prefix: int
    interface: str | None = None  # None: the interface holding the LAN address


@dataclass(frozen=True)
class Replication:
    """Mirror only: directories replicated from the PRIM to the SECOND."""

    dirs: tuple[str, ...]
    mode: str = "sync"


@dataclass(frozen=True)
class FarmRule:
    """Farm only: which client traffic to the VIP is shared out by bucket."""

    ports: tuple[int, ...]
    protocol: str = "tcp"
    criterion: str = "ip"  # ip: a client stays on one node; ip_port: per connection


@dataclass(frozen=True)
class Farm:
    rules: tuple[FarmRule, ...]


@dataclass(frozen=True, kw_only=True)
class Checker:
    """Common settings of every checker: how often, how long, how patient.

    A checker acts after ``failures`` consecutive failed checks, so one lost
    packet never moves an application.
    """

    kind: ClassVar[str] = ""
    interval: float = DEFAULT_CHECK_INTERVAL
    timeout: float = DEFAULT_CHECK_TIMEOUT
    failures: int = DEFAULT_CHECK_FAILURES

    @property
    def label(self) -> str:
        """A short name for journals and the console, e.g. ``tcp 10.0.0.1:80``."""
        return self.kind


@dataclass(frozen=True, kw_only=True)
class TcpChecker(Checker):
    kind: ClassVar[str] = "tcp"
    address: str
    port: int

    @property
    def label(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"tcp {host}:{self.port}"


@dataclass(frozen=True, kw_only=True)
class PingChecker(Checker):
    kind: ClassVar[str] = "ping"
    target: str

    @property
    def label(self) -> str:
        return f"ping {self.target}"


@dataclass(frozen=True, kw_only=True)
class InterfaceChecker(Checker):
    kind: ClassVar[str] = "interface"
    interface: str

    @property
    def label(self) -> str:
        return f"interface {self.interface}"


@dataclass(frozen=True, kw_only=True)
class ProcessChecker(Checker):
    """Restart the application up to ``restarts`` times in ``window`` seconds,
    then fail over."""

    kind: ClassVar[str] = "process"
    pattern: str
    restarts: int = DEFAULT_PROCESS_RESTARTS
    window: float = DEFAULT_PROCESS_WINDOW

    @property
    def label(self) -> str:
        return f"process {self.pattern}"


@dataclass(frozen=True, kw_only=True)
class ScriptChecker(Checker):
    """Runs ``bin/<script>`` of the module; exit status 0 means healthy."""

    kind: ClassVar[str] = "script"
    script: str

    @property
    def label(self) -> str:
        return f"script {self.script}"


CHECKER_TYPES: dict[str, type[Checker]] = {
    c.kind: c for c in (TcpChecker, PingChecker, InterfaceChecker, ProcessChecker, ScriptChecker)
}


@dataclass(frozen=True)
class ScriptTimeout:
    script: str
    timeout: float


@dataclass(frozen=True)
class Scripts:
    """Timeouts of the lifecycle scripts: one default and per-script overrides."""

    timeout: float = DEFAULT_SCRIPT_TIMEOUT
    overrides: tuple[ScriptTimeout, ...] = ()

    def timeout_for(self, script: str) -> float:
        for override in self.overrides:
            if override.script == script:
                return override.timeout
        return self.timeout


@dataclass(frozen=True)
class Failover:
    failback: bool = False
    witness: str | None = None  # must answer ping before a node goes ALONE
    heartbeat_interval_ms: int = DEFAULT_HEARTBEAT_INTERVAL_MS
    heartbeat_timeout_ms: int = DEFAULT_HEARTBEAT_TIMEOUT_MS


@dataclass(frozen=True)
class Module:
    name: str
    kind: str
    version: str = DEFAULT_VERSION
    description: str = ""
    nodes: tuple[Node, ...] = ()
    vips: tuple[VirtualIP, ...] = ()
    replication: Replication | None = None
    farm: Farm | None = None
    checkers: tuple[Checker, ...] = ()
    scripts: Scripts = field(default_factory=Scripts)
    failover: Failover = field(default_factory=Failover)

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        known = ", ".join(n.name for n in self.nodes) or "none"
        raise ModuleError(f"module {self.name}: no node named {name!r}; its nodes are {known}")

    @property
    def node_names(self) -> tuple[str, ...]:
        return tuple(n.name for n in self.nodes)

    def peer_of(self, name: str) -> Node:
        """Mirror: the other node of the pair."""
        self.node(name)
        if self.kind != MIRROR:
            raise ModuleError(f"module {self.name} is a {self.kind}: only a mirror has one peer")
        return next(n for n in self.nodes if n.name != name)

    def peers_of(self, name: str) -> tuple[Node, ...]:
        """Every other node of the module (mirror or farm)."""
        self.node(name)
        return tuple(n for n in self.nodes if n.name != name)

    def script_timeout(self, script: str) -> float:
        return self.scripts.timeout_for(script)

    @property
    def lifecycle_scripts(self) -> tuple[str, ...]:
        """The scripts this kind of module runs (others in bin/ are ignored)."""
        return KIND_SCRIPTS.get(self.kind, ())

    @property
    def replicated_dirs(self) -> tuple[str, ...]:
        return self.replication.dirs if self.replication else ()

    @property
    def replication_mode(self) -> str | None:
        return self.replication.mode if self.replication else None

    @property
    def checker_scripts(self) -> tuple[str, ...]:
        return tuple(c.script for c in self.checkers if isinstance(c, ScriptChecker))

    @property
    def heartbeat_interval(self) -> float:
        return self.failover.heartbeat_interval_ms / 1000

    @property
    def heartbeat_timeout(self) -> float:
        return self.failover.heartbeat_timeout_ms / 1000
