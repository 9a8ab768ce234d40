"""Performing a mirror decision's actions on this node (the runner's side-effect half).

``ActionsMixin`` is part of MirrorRunner, kept apart so the runner reads as
the loop and the decision while this file reads as what each Action does:
scripts with their timeouts and output in the journal, VIPs taken (then
announced by gratuitous ARP in an owned background task, so the
application starts without waiting for the last ARP round) and released,
generations persisted, and replication's actions handed to the module's
replication process (replication/control.py).

A failing step is journaled and never stops the sequence: a start_prim that
fails or a VIP that cannot be taken marks the application failed, so the
next decision hands PRIM to the SECOND if there is one.
"""

from __future__ import annotations

import asyncio
from typing import Any

from node_service.errors import RampartError
from node_service.mirror.fsm import Action, Decision, State


class ActionsMixin:
    """Mixed into MirrorRunner: uses its module, journal, effects and flags."""

    module: Any
    node: Any
    journal: Any
    effects: Any
    files_dir: Any
    _app_failed: bool
    _garp: dict[str, asyncio.Task[Any]]

    def _save(self, d: Decision) -> None:
        raise NotImplementedError

    async def _do(self, action: Action, d: Decision, cause: str) -> None:
        name = self.module.name
        if action.script:
            await self._script(action.script, d.state, cause)
        elif action is Action.ADD_VIP:
            for vip in self.module.vips:
                try:
                    self.journal.record("info", await self.effects.add_vip(vip), name)
                except RampartError as exc:
                    self._app_failed = True
                    self.journal.error(f"taking virtual IP {vip.address}: {exc}", name)
                    continue
                self._spawn_garp(vip)
        elif action is Action.REMOVE_VIP:
            await self._cancel_garp()
            for vip in self.module.vips:
                try:
                    self.journal.record("info", await self.effects.remove_vip(vip), name)
                except RampartError as exc:
                    self.journal.error(f"releasing virtual IP {vip.address}: {exc}", name)
        elif action.persists_generations:
            self._save(d)
            self.journal.record("info", f"{action}: {d.generations} recorded", name)
        else:  # replication_source / _target / _off, preserve_split_brain
            await self._replicate(action, d)

    async def _replicate(self, action: Action, d: Decision) -> None:
        name = self.module.name
        try:
            # ALONE: the peer is lost or stopped, so the source must not wait on it
            severity, text = await self.effects.replication.perform(
                action.value, d.generations.current.number, peer_lost=d.state is State.ALONE
            )
        except RampartError as exc:
            self.journal.error(f"{action.value}: {exc}", name)
            if action is Action.REPLICATION_SOURCE:
                # Serving without the replicating mount would write untracked
                # data: let decide() hand over (or warn, when ALONE).
                self._app_failed = True
            return
        if severity == "warning":
            self.journal.warning(text, name)
        else:
            self.journal.record("info", text, name)

    async def _script(self, script: str, state: State, cause: str) -> bool:
        from node_service.scripts import script_env

        name = self.module.name
        env = script_env(name, str(self.files_dir), self.node.node, state.value, cause)

        def on_line(line: str) -> None:
            self.journal.record("script", f"{script}: {line}", name, script=script)

        try:
            result = await self.effects.script(
                str(self.files_dir), script, env, self.module.script_timeout(script), on_line
            )
        except RampartError as exc:
            ok, reason = False, f"bin/{script} could not run: {exc}"
        else:
            ok, reason = result.ok, result.reason
        if ok:
            self.journal.record("script", reason, name, script=script)
            return True
        self.journal.error(reason, name, script=script)
        if script == "start_prim":
            # Serving without the application is not serving: let decide()
            # hand over to the SECOND on the next tick.
            self._app_failed = True
        return False

    def _spawn_garp(self, vip: Any) -> None:
        old = self._garp.pop(vip.address, None)
        if old is not None:
            old.cancel()
        self._garp[vip.address] = asyncio.get_running_loop().create_task(
            self._announce(vip), name=f"mirror-garp:{self.module.name}:{vip.address}"
        )

    async def _announce(self, vip: Any) -> None:
        try:
            await self.effects.announce(vip)
        except RampartError as exc:  # clients learn the VIP at their next ARP anyway
            self.journal.warning(f"gratuitous ARP for {vip.address}: {exc}", self.module.name)

    async def _cancel_garp(self) -> None:
        tasks = list(self._garp.values())
        self._garp.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
