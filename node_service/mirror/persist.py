"""What a mirror module remembers on this node, on disk and in /run.

Two files, for two different questions:

- ``state/mirror.json`` (the module's persistent state dir, survives reboots
  and reinstalls): the data generations, the operator's intent, the
  handover in progress, the last state and the last epoch. Written
  atomically (temp file, fsync, rename) *before* the state it describes is
  announced to the peer, so a node never published a generation it could
  forget.
- ``/run/rampart/mirror/NAME.json`` (runtime marker, gone after a reboot or
  a lab power cut because /run is a tmpfs): "this module ran here in this
  boot, in this state". When rampartd restarts it tells a daemon restart (the
  application still runs: adopt it) from a node restart (nothing runs any
  more: start from scratch).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node_service.errors import ModuleError
from node_service.mirror.generations import GenerationInfo
from node_service.mirror.states import Handover, Intent, State

STATE_FILE = "mirror.json"
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


@dataclass(frozen=True)
class Persisted:
    generations: GenerationInfo = field(default_factory=GenerationInfo)
    intent: Intent = Intent.STOP
    handover: Handover = Handover.NONE
    state: State = State.STOP
    epoch: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "generations": self.generations.to_dict(),
            "intent": self.intent.value,
            "handover": self.handover.value,
            "state": self.state.value,
            "epoch": self.epoch,
        }


def load(path: Path) -> Persisted:
    """The persisted state; defaults when the file does not exist yet."""
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Persisted()
    except OSError as exc:
        raise ModuleError(f"{path}: cannot read the mirror state: {exc.strerror}") from None
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("not an object")
        epoch = data.get("epoch", 0)
        if not isinstance(epoch, int) or isinstance(epoch, bool):
            raise ValueError(f"epoch {epoch!r} is not an integer")
        return Persisted(
            generations=GenerationInfo.from_dict(data.get("generations"), f"{path}: generations"),
            intent=Intent(data.get("intent", Intent.STOP.value)),
            handover=Handover(data.get("handover", Handover.NONE.value)),
            state=State(data.get("state", State.STOP.value)),
            epoch=epoch,
        )
    except (ValueError, TypeError) as exc:
        raise ModuleError(
            f"{path}: mirror state unreadable ({exc}); expected the JSON rampartd writes "
            "(move the file away only if this node's data must be resynced from its peer)"
        ) from None


def save(path: Path, persisted: Persisted) -> None:
    """Write atomically and durably: after a crash the file is the old or the new one."""
    write_json(path, persisted.to_dict(), durable=True)


def write_json(path: Path, data: dict[str, Any], *, durable: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, separators=(",", ":"))
        f.write("\n")
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def next_epoch(previous: int) -> int:
    """A value never published before, even across restarts (the clock, guarded)."""
    return max(previous + 1, time.time_ns())


def boot_id() -> str:
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return ""


def runtime_path(api_socket: Path, module: str) -> Path:
    """The runtime marker lives beside the API socket, in /run."""
    return Path(api_socket).parent / "mirror" / f"{module}.json"


def write_marker(path: Path, state: State) -> None:
    write_json(
        path, {"state": state.value, "boot_id": boot_id(), "pid": os.getpid()}, durable=False
    )


def read_marker(path: Path) -> State | None:
    """The state the module had in this boot, or None (never ran, or the node restarted)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("boot_id") != boot_id():
            return None
        return State(data["state"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def clear_marker(path: Path) -> None:
    path.unlink(missing_ok=True)
