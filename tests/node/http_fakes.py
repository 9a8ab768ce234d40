"""Test-only helpers for the TCP metrics/health endpoint tests.

``FakeFarmRunner`` stands in for the farm runner inside a real rampartd (via
RAMPART_TEST_RUNNERS, like ``daemon_fakes.FakeRunner`` for mirrors): start
makes it UP owning half of the 256 buckets and journals one checker result;
``restart`` makes it lose its buckets (UP, owning nothing). Its ``close``
waits for a release file, so a test can look at the node while rampartd is
shutting down.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

from node_service.errors import CommandRefused
from node_service.runner import ModuleRunner
from tests.node.daemon_fakes import Rampartd

CHECKER = "tcp 127.0.0.1:80"
RELEASE_FILE = "release-close"


class FakeFarmRunner(ModuleRunner):
    kind = "farm"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.owned = 0

    async def start(self) -> str:
        if self.current_state != "STOP":
            raise CommandRefused(f"module {self.module.name} is already {self.current_state}")
        self.set_state("WAIT", "start command")
        self.owned = 128
        self.journal.record("checker", f"{CHECKER}: answers", self.module.name,
                            checker=CHECKER, verdict="ok")  # fmt: skip
        self.set_state("UP", "fake: checkers pass")
        return "up with 128 buckets"

    async def stop(self, reason: str) -> str:
        self.owned = 0
        self.set_state("STOP", reason)
        return "stopped"

    async def command(self, name: str) -> str:
        if name == "restart" and self.current_state == "UP":
            self.owned = 0
            self.journal.record("checker", f"{CHECKER}: refused", self.module.name,
                                checker=CHECKER, verdict="failed")  # fmt: skip
            return "lost every bucket"
        raise CommandRefused(f"module {self.module.name}: {name} not possible")

    async def close(self) -> None:
        # Bounded: a test that forgets the release file still ends.
        release = self.module_state_dir / RELEASE_FILE
        deadline = time.monotonic() + 15
        while not release.exists() and time.monotonic() < deadline:
            await _tick()
        await self.stop("rampartd is shutting down")

    def state(self) -> dict[str, Any]:
        mine = self.node.node
        shares = {mine: self.owned, "rt-other": 256 - self.owned} if self.owned else {}
        return {**super().state(), "buckets": self.owned, "bucket_map": shares}

    def metrics(self) -> dict[str, Any]:
        return {"owned_buckets": self.owned}


async def _tick() -> None:
    import asyncio

    await asyncio.sleep(0.05)  # polling a file the test creates; there is no event to wait on


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class EndpointDaemon(Rampartd):
    """A real rampartd with extra node.yaml lines and the fake farm runner."""

    def __init__(self, extra: str, node: str = "rt-n1") -> None:
        super().__init__(node=node, heartbeat_port=free_port())
        with self.config.open("a") as out:
            out.write(extra)

    def env(self) -> dict[str, str]:
        env = super().env()
        env["RAMPART_TEST_RUNNERS"] = (
            "mirror=tests.node.daemon_fakes:FakeRunner,farm=tests.node.http_fakes:FakeFarmRunner"
        )
        return env

    def journal_text(self) -> str:
        path = self.log_dir / "journal.jsonl"
        return path.read_text() if path.exists() else ""

    def release_close(self, module: str) -> Path:
        path = self.state_dir / "modules" / module / "state" / RELEASE_FILE
        path.write_text("go")
        return path
