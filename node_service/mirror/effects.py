"""The mirror's side effects on this node: scripts, virtual IPs, replication.

The runner decides with pure code and acts only through ``MirrorEffects``,
so unit tests pass a recording fake and the lab tests the real one. Every
call is bounded: scripts by their timeout (``run_script``), netlink calls by
the kernel, announcements by their fixed schedule.

Replication: a module with replicated directories gets a
``replication.control.ProcessReplication`` (its replication process);
``NullReplication`` stands for modules without replicated directories (and
in unit tests): its actions move no data and a SECOND counts as up to date
as soon as it follows a primary.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

from node_service.errors import CommandRefused
from node_service.module.model import VirtualIP
from node_service.scripts import ScriptResult


class NullReplication:
    """Replication of a module without replicated directories: nothing moves."""

    def uptodate(self) -> bool:
        return True

    def describe(self, action: str, module: str, dirs: tuple[str, ...]) -> str:
        what = {
            "replication_source": "has nothing to send",
            "replication_target": "has nothing to receive",
            "replication_off": "has nothing to stop",
            "preserve_split_brain": "has no diverging files to preserve",
        }.get(action, action)
        return f"module {module} has no replicated directories: replication {what}"

    async def perform(
        self, action: str, generation: int = 0, *, peer_lost: bool = False
    ) -> tuple[str, str]:
        return "info", self.describe(action, "", ())

    def fields(self) -> dict[str, Any] | None:
        return None  # the runner's base fields (status "off") stand

    def metrics(self) -> dict[str, Any]:
        return {}

    async def command(self, cmd: str) -> dict[str, Any]:
        raise CommandRefused(f"repl {cmd}: this module has no replicated directories")

    async def clear_dead_leftovers(self) -> str | None:
        return None

    async def close(self) -> None:
        return None


class MirrorEffects:
    """The real side effects; every method may raise a RampartError with a reason."""

    def __init__(self, replication: Any = None) -> None:
        self.replication = replication or NullReplication()

    async def script(
        self,
        module_dir: str,
        name: str,
        env: Mapping[str, str],
        timeout_s: float,
        on_line: Callable[[str], None],
    ) -> ScriptResult:
        from node_service.scripts import run_script

        return await run_script(module_dir, name, env=env, timeout_s=timeout_s, on_line=on_line)

    async def add_vip(self, vip: VirtualIP) -> str:
        from node_service.net import vip as vips

        return await asyncio.to_thread(vips.add_vip, vip.address, vip.prefix, vip.interface)

    async def announce(self, vip: VirtualIP) -> str:
        from node_service.net import vip as vips

        return await vips.announce(vip.address, vip.interface)

    async def remove_vip(self, vip: VirtualIP) -> str:
        from node_service.net import vip as vips

        return await vips.release(vip.address, vip.prefix, vip.interface)
