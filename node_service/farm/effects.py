"""The farm's side effects on one node, behind one object a unit test replaces.

Every method is a thin async wrapper: blocking work (nft, netlink,
/proc/sys) runs in a worker thread so the daemon's event loop never waits
on it. The decisions are made in ``runner.py`` and the pure modules.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from node_service.errors import RampartError
from node_service.farm import conntrack, flows, held, macvlan, nft


class FarmEffects:
    """The farm's side effects on this node; a unit test passes a fake.

    ``nft`` is the nft command (tests point it at a missing or failing one).
    """

    def __init__(self, nft_command: tuple[str, ...] = nft.NFT) -> None:
        self.nft = nft_command

    async def restore_left_over(self, memo: Path) -> str | None:
        return await asyncio.to_thread(conntrack.restore_left_over, memo)

    async def lan_interface(self, address: str) -> str:
        from node_service.net import vip

        found = vip.find(await asyncio.to_thread(vip.list_addresses), address)
        if not found:
            raise RampartError(
                f"no interface on this node holds its LAN address {address}: expected the "
                "node's first <address> in userconfig.xml to be configured here"
            )
        return found[0].interface

    async def apply(self, ruleset: nft.Ruleset) -> None:
        await asyncio.to_thread(functools.partial(nft.apply, ruleset, nft=self.nft))

    async def remove(self, module: str) -> None:
        await asyncio.to_thread(functools.partial(nft.remove, module, nft=self.nft))

    async def counters(self, module: str) -> dict[str, int]:
        return await asyncio.to_thread(functools.partial(nft.counters, module, nft=self.nft))

    async def held(self, vips: Sequence[str], rules: Sequence[nft.FilterRule]) -> frozenset[int]:
        return await asyncio.to_thread(held.read_held, vips, rules)

    async def flows(self, vips: Sequence[str], ports: Sequence[int]) -> frozenset[flows.Flow]:
        return await asyncio.to_thread(flows.read_flows, vips, ports)

    async def mac_setup(self, spec: macvlan.SharedMac) -> str:
        return await asyncio.to_thread(functools.partial(macvlan.setup, spec, nft=self.nft))

    async def mac_teardown(self, spec: macvlan.SharedMac) -> str:
        return await asyncio.to_thread(functools.partial(macvlan.teardown, spec, nft=self.nft))

    async def announce(self, address: str, interface: str) -> str:
        from node_service.net import garp

        return await garp.announce(address, interface)

    async def script(self, module_dir: str, name: str, env: Mapping[str, str], timeout: float,
                     on_line: Any) -> Any:  # fmt: skip
        from node_service.scripts import run_script

        return await run_script(module_dir, name, env=env, timeout_s=timeout, on_line=on_line)
