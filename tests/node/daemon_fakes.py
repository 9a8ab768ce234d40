"""Test-only helpers for the daemon/API tests: a small runner and a real rampartd.

``FakeRunner`` is registered in a daemon subprocess through the test-only
environment variable RAMPART_TEST_RUNNERS (see node_service/runner.py). Its
"application" is a counter file in the module's state dir: each real start
increments it, so a test can tell a resume from a restart.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from node_service.errors import CommandRefused, FatalError
from node_service.runner import ModuleRunner

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = ROOT / ".venv" / "bin"


class FakeRunner(ModuleRunner):
    kind = "mirror"

    def _app_file(self) -> Path:
        return self.module_state_dir / "fake-app-starts"

    async def start(self) -> str:
        if self.current_state != "STOP":
            raise CommandRefused(f"module {self.module.name} is already {self.current_state}")
        starts = int(self._app_file().read_text()) if self._app_file().exists() else 0
        self._app_file().write_text(str(starts + 1))
        self.set_state("WAIT", "start command")
        self.set_state("ALONE", "fake: no peer in tests")
        return "started alone"

    async def stop(self, reason: str) -> str:
        self.set_state("STOP", reason)
        return "stopped"

    async def command(self, name: str) -> str:
        if name == "restart":
            raise FatalError("fake: the state disk is gone")
        if name == "second":
            raise RuntimeError("fake bug in the runner")
        flips = {"swap": {"ALONE": "SECOND", "SECOND": "PRIM", "PRIM": "SECOND"}}
        if name == "swap" and self.current_state in flips["swap"]:
            self.set_state(flips["swap"][self.current_state], "swap command")
            return "swapped"
        if name in ("prim", "primforce") and self.current_state != "STOP":
            self.set_state("PRIM", f"{name} command")
            return "now primary"
        raise CommandRefused(
            f"module {self.module.name}: {name} not possible in {self.current_state}"
        )

    async def resume(self) -> str:
        # Adopt the "application": no new start is counted.
        self.journal.record("info", f"fake: adopted running application in {self.current_state}",
                            self.module.name)  # fmt: skip
        return f"adopted in {self.current_state}"

    async def close(self) -> None:
        # Policy of this fake: leave the application running across a daemon
        # restart (what the mirror runner does for a planned daemon restart).
        return None

    def state(self) -> dict[str, Any]:
        listening = self.heartbeats.local_addresses if self.heartbeats is not None else []
        return {**super().state(), "heartbeats_on": list(listening)}

    def metrics(self) -> dict[str, Any]:
        return {"heartbeat_rtt_seconds": {"198.51.100.12": 0.0004}, "bytes_per_s": 0}


def make_module_dir(
    dest: Path, name: str, node: str, kind: str = "mirror", address: str = "198.51.100.11"
) -> Path:
    from node_service.module import userconfig
    from node_service.module.model import Farm, FarmRule, Module, Node, Replication, VirtualIP

    nodes = (Node(node, (address,)), Node("rt-other", ("198.51.100.12",)))
    module = Module(
        name=name,
        kind=kind,
        nodes=nodes,
        vips=(VirtualIP("198.51.100.200", 24),),
        replication=Replication(("/srv/" + name,)) if kind == "mirror" else None,
        farm=Farm((FarmRule((80,)),)) if kind == "farm" else None,
    )
    (dest / "bin").mkdir(parents=True)
    (dest / "userconfig.xml").write_bytes(userconfig.emit(module))
    return dest


def build_safe(
    workdir: Path, name: str, node: str, key: Path, kind: str = "mirror", address: str = ""
) -> Path:
    from node_service.module import safe

    src = workdir / f"src-{name}-{secrets.token_hex(3)}"
    make_module_dir(src, name, node, kind, address or "198.51.100.11")
    out = workdir / f"{name}-{kind}.safe"
    safe.build(src, key, out)
    out.chmod(0o644)
    return out


class Rampartd:
    """A real rampartd subprocess with its own temp dirs, socket and NOTIFY_SOCKET."""

    def __init__(self, node: str = "rt-n1", heartbeat_port: int = 7810) -> None:
        # Not under pytest's tmp_path: that is 0700, and the role tests run
        # the CLI as unprivileged users who must reach the socket.
        self.base = Path(tempfile.mkdtemp(prefix="rt-daemon-"))
        self.base.chmod(0o755)
        self.node = node
        self.socket = self.base / "run" / "api.sock"
        self.state_dir = self.base / "state"
        self.trust_dir = self.base / "trust"
        self.log_dir = self.base / "log"
        self.config = self.base / "node.yaml"
        self.config.write_text(
            f"node: {node}\napi_socket: {self.socket}\nstate_dir: {self.state_dir}\n"
            f"trust_dir: {self.trust_dir}\nsite_dir: {self.base / 'site'}\n"
            f"log_dir: {self.log_dir}\nlog_level: debug\nheartbeat_port: {heartbeat_port}\n"
        )
        self.notify_path = self.base / "notify.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        self.proc: subprocess.Popen[bytes] | None = None
        self.messages: list[str] = []
        self.stderr_path = self.base / "rampartd.stderr"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            # The farm entry points at a runner that does not exist, so the daemon's
            # handling of a kind it cannot run is tested whatever this build ships.
            RAMPART_TEST_RUNNERS=(
                "mirror=tests.node.daemon_fakes:FakeRunner,"
                "farm=tests.node.daemon_fakes:NoSuchFarmRunner"
            ),
            PYTHONPATH=str(ROOT),
            NOTIFY_SOCKET=str(self.notify_path),
            RAMPART_SOCKET=str(self.socket),
        )
        return env

    def start(self, timeout: float = 20.0) -> None:
        with self.stderr_path.open("ab") as err:
            self.proc = subprocess.Popen(
                [str(VENV_BIN / "rampartd"), "--config", str(self.config)],
                env=self.env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err,
            )  # fmt: skip
        message = self.next_notify(timeout)
        assert message.startswith("READY=1"), message

    def next_notify(self, timeout: float) -> str:
        self.notify.settimeout(timeout)
        try:
            message = self.notify.recv(4096).decode()
            self.messages.append(message)
            return message
        except TimeoutError:
            raise AssertionError(
                f"rampartd sent no notification in {timeout}s: {self.log()}"
            ) from None

    def stop(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self.proc = None
        # Keep what it told systemd on the way out (tests assert STOPPING=1).
        self.notify.setblocking(False)
        try:
            while True:
                self.messages.append(self.notify.recv(4096).decode())
        except BlockingIOError:
            pass
        return code

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-3000:]

    def rampart(self, *argv: str, user: str | None = None, timeout: float = 30.0
                ) -> subprocess.CompletedProcess[str]:  # fmt: skip
        if user is None:
            cmd = [str(VENV_BIN / "rampart"), *argv]
        else:
            # The project venv's interpreter lives under /root (0700); the CLI
            # needs only the standard library, so users run the system python.
            cmd = ["setpriv", "--reuid", user, "--regid", user, "--init-groups",
                   "/usr/bin/python3", "-m", "node_service.cli", *argv]  # fmt: skip
        return subprocess.run(cmd, env=self.env(), cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip

    def close(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait(10)
            self.proc = None
        self.notify.close()
        shutil.rmtree(self.base, ignore_errors=True)
