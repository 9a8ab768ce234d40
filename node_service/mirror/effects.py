"""The mirror's side effects on this node: scripts, virtual IPs, replication.

The runner decides with pure code and acts only through ``MirrorEffects``,
so unit tests pass a recording fake and the lab tests the real one. Every
call is bounded: scripts by their timeout (``run_script``), netlink calls by
the kernel, announcements by their fixed schedule.

Replication is a later issue: its actions are accepted and journaled but move
no data, and this node counts as up to date as soon as it follows a primary
(``uptodate``). That is what lets failover work today on modules without
replicated data; the replication process will replace ``NullReplication``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

from node_service.module.model import VirtualIP
from node_service.scripts import ScriptResult


class NullReplication:
    """Stands in for the replication process until it exists (no data moves)."""

    def uptodate(self) -> bool:
        return True

    def describe(self, action: str, module: str, dirs: tuple[str, ...]) -> str:
        what = {
            "replication_source": "would send writes to the SECOND",
            "replication_target": "would receive the primary's writes",
            "replication_off": "would stop",
        }.get(action, action)
        where = ", ".join(dirs) if dirs else "no replicated directories"
        return (
            f"replication of module {module} ({where}) {what}: not implemented yet, no data moved"
        )


class MirrorEffects:
    """The real side effects; every method may raise a RampartError with a reason."""

    def __init__(self) -> None:
        self.replication = NullReplication()

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
