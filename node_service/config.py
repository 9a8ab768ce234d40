"""The node configuration, ``/etc/rampart/node.yaml``.

The file is parsed with PyYAML's composer rather than ``safe_load`` because
composed nodes keep their position: every refusal names the line, so a typo
in a 10-line file is found without guessing. Unknown keys are refused too: a
misspelt ``hearbeat_port`` silently falling back to the default is exactly
the kind of mistake that shows up at 3 a.m. as a failover that never happens.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from node_service.errors import ConfigError

DEFAULT_PATH = Path("/etc/rampart/node.yaml")
LOG_LEVELS = ("debug", "info", "warning", "error")
_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_LISTEN = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<v4>[0-9.]+)):(?P<port>[0-9]{1,5})$")


class Listen(NamedTuple):
    """A TCP address one of the optional HTTP endpoints binds to."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self}"


@dataclass(frozen=True)
class NodeConfig:
    """What one rampartd needs to know about the node it runs on."""

    node: str
    heartbeat_port: int = 7810
    replication_port: int = 7811
    api_socket: Path = Path("/run/rampart/api.sock")
    state_dir: Path = Path("/var/lib/rampart")
    trust_dir: Path = Path("/etc/rampart/trust")
    site_dir: Path = Path("/etc/rampart/site")
    log_level: str = "info"
    # Not in the original interface table: lets several daemons share one
    # machine (tests, lab) without writing into one journal file.
    log_dir: Path = Path("/var/log/rampart")
    # Optional TCP endpoints, off unless set: Prometheus text and the cloud
    # load balancers' per-module health checks (docs/health-checks.md).
    metrics_listen: Listen | None = None
    health_listen: Listen | None = None
    source: str = field(default="node.yaml", compare=False)

    @property
    def modules_dir(self) -> Path:
        return self.state_dir / "modules"

    @property
    def journal_path(self) -> Path:
        return self.log_dir / "journal.jsonl"


def _port(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535:
        return value
    return None


def _absolute(value: Any) -> Path | None:
    if isinstance(value, str) and value.startswith("/") and "\0" not in value:
        return Path(value)
    return None


def _node_name(value: Any) -> str | None:
    if isinstance(value, str) and _NODE_NAME.match(value):
        return value
    return None


def _level(value: Any) -> str | None:
    if isinstance(value, str) and value.lower() in LOG_LEVELS:
        return value.lower()
    return None


def _listen(value: Any) -> Listen | None:
    # IP literals only, as for module addresses: a node must not need DNS to
    # come up, and "localhost" may resolve to an address family we do not bind.
    match = _LISTEN.match(value) if isinstance(value, str) else None
    if match is None:
        return None
    try:
        host = ipaddress.ip_address(match["v6"] or match["v4"])
    except ValueError:
        return None
    if (host.version == 6) != bool(match["v6"]):
        return None
    port = _port(int(match["port"]))
    return Listen(str(host), port) if port is not None else None


LISTEN_EXPECTED = 'IP:PORT, e.g. "127.0.0.1:9810" or "[::1]:9810" (quoted), or null for off'
# Keys whose value may be null (YAML ``null``, ``~`` or empty): the feature is off.
_NULLABLE = ("metrics_listen", "health_listen")

# key -> (converter returning None when invalid, what is expected)
_FIELDS = {
    "node": (_node_name, "a node name (letters, digits, '.', '_', '-'; at most 63)"),
    "heartbeat_port": (_port, "an integer 1-65535"),
    "replication_port": (_port, "an integer 1-65535"),
    "api_socket": (_absolute, "an absolute path"),
    "state_dir": (_absolute, "an absolute path"),
    "trust_dir": (_absolute, "an absolute path"),
    "site_dir": (_absolute, "an absolute path"),
    "log_level": (_level, "one of " + ", ".join(LOG_LEVELS)),
    "log_dir": (_absolute, "an absolute path"),
    "metrics_listen": (_listen, LISTEN_EXPECTED),
    "health_listen": (_listen, LISTEN_EXPECTED),
}


def parse(text: str, source: str = "node.yaml") -> NodeConfig:
    """Check node.yaml text; raise ConfigError naming ``source:line`` on the first problem."""
    import yaml

    loader = yaml.SafeLoader(text)
    try:
        try:
            root = loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            line = exc.problem_mark.line + 1 if exc.problem_mark else 1
            raise ConfigError(f"{source}:{line}: not valid YAML: {exc.problem}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: not valid YAML: {exc}") from None
        if root is None:
            raise ConfigError(f"{source}: empty; expected a mapping with at least 'node: NAME'")
        if not isinstance(root, yaml.MappingNode):
            raise ConfigError(
                f"{source}:{root.start_mark.line + 1}: expected a mapping of settings "
                "(key: value lines)"
            )
        values: dict[str, Any] = {}
        for key_node, value_node in root.value:
            line = key_node.start_mark.line + 1
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key not in _FIELDS:
                known = ", ".join(_FIELDS)
                raise ConfigError(f"{source}:{line}: unknown key {key!r}; known keys: {known}")
            if key in values:
                raise ConfigError(f"{source}:{line}: {key} is set twice")
            convert, expected = _FIELDS[key]
            raw = (
                loader.construct_object(value_node, deep=True)
                if isinstance(value_node, yaml.ScalarNode)
                else None
            )
            if raw is None and key in _NULLABLE and isinstance(value_node, yaml.ScalarNode):
                values[key] = None
                continue
            converted = convert(raw) if raw is not None else None
            if converted is None:
                shown = raw if raw is not None else value_node.tag.rsplit(":", 1)[-1]
                raise ConfigError(f"{source}:{line}: {key} must be {expected}, got {shown!r}")
            values[key] = converted
    finally:
        loader.dispose()
    if "node" not in values:
        raise ConfigError(f"{source}: missing 'node: NAME' (this node's name, as in modules)")
    return NodeConfig(**values, source=source)


def load(path: str | Path = DEFAULT_PATH) -> NodeConfig:
    """Read and check a node.yaml file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no such file; create it with at least 'node: NAME' (see docs/dev/daemon.md)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    return parse(text, source=path.name)
