"""The mirror runner's checkers: the application's (where it runs) and the witness.

Application checkers run only on the node that serves (PRIM/ALONE): a tcp
check of the VIP or a process check on the SECOND would only report that the
application is, rightly, not there. A process checker restarts the
application locally (stop_prim + start_prim, under the runner's step lock) up
to N times in its window; then, like every other checker's failover verdict,
it marks the application failed and the next decision hands PRIM over.

The witness (``failover.witness``, a ping target) runs whenever the module
runs: its last result feeds every snapshot, and a node that has not heard it
yet counts it as unreachable (the safe reading).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from node_service.checkers.decide import FAILOVER, STOP_MODULE

if TYPE_CHECKING:
    from node_service.checkers.runner import CheckerEvent, CheckerRunner
    from node_service.mirror.runner import MirrorRunner

WITNESS_INTERVAL_S = 1.0
WITNESS_TIMEOUT_S = 1.0


class MirrorChecks:
    def __init__(self, runner: MirrorRunner) -> None:
        self.runner = runner
        self.app: CheckerRunner | None = None
        self.witness_runner: CheckerRunner | None = None
        self._witness_ok: bool | None = None

    @property
    def target(self) -> str | None:
        return self.runner.module.failover.witness

    # -- application checkers ---------------------------------------------------

    def start_app_checkers(self) -> None:
        if self.app is not None or not self.runner.module.checkers:
            return
        from node_service.checkers.runner import CheckerRunner, from_model
        from node_service.scripts import script_env

        r = self.runner
        env = script_env(r.module.name, str(r.files_dir), r.node.node, r.current_state, "check")
        checks = [
            from_model(c, module_dir=str(r.files_dir), env=env, restart=r.restart_app)
            for c in r.module.checkers
        ]
        self.app = CheckerRunner(checks, self._on_app, name=f"mirror-checkers:{r.module.name}")
        self.app.start()

    async def stop_app_checkers(self) -> None:
        app, self.app = self.app, None
        if app is not None:
            await app.stop()

    def _on_app(self, event: CheckerEvent) -> None:
        r = self.runner
        failed = event.verdict in (FAILOVER, STOP_MODULE)
        severity = "info" if event.ok else ("error" if failed else "warning")
        r.journal.record(
            "checker", f"{event.checker}: {event.reason}", r.module.name, severity=severity,
            checker=event.checker, verdict=event.verdict, restarted=event.restarted,
        )  # fmt: skip
        if failed:
            r.app_failed(event.reason)

    # -- witness -------------------------------------------------------------------

    def start_witness(self) -> None:
        target = self.target
        self._witness_ok = None
        if target is None or self.witness_runner is not None:
            return
        from node_service.checkers.probes import WitnessCheck
        from node_service.checkers.runner import CheckerRunner

        check = WitnessCheck(target, interval_s=WITNESS_INTERVAL_S, timeout_s=WITNESS_TIMEOUT_S)
        self.witness_runner = CheckerRunner(
            [check], self._on_witness, name=f"mirror-witness:{self.runner.module.name}"
        )
        self.witness_runner.start()

    def _on_witness(self, event: CheckerEvent) -> None:
        # The checker runner emits every failure; the journal wants each change once.
        if event.ok != self._witness_ok:
            r = self.runner
            severity = "info" if event.ok else "warning"
            r.journal.record("checker", event.reason, r.module.name, severity=severity,
                             checker=event.checker, verdict=event.verdict)  # fmt: skip
            self._witness_ok = event.ok
            r.wake_up()

    def witness(self) -> bool | None:
        """For the snapshot: None without a witness, else reachable at the last check."""
        if self.target is None:
            return None
        return bool(self._witness_ok)

    def witness_state(self) -> dict[str, Any] | None:
        if self.target is None:
            return None
        return {"target": self.target, "reachable": self._witness_ok}

    async def stop_all(self) -> None:
        await self.stop_app_checkers()
        witness, self.witness_runner = self.witness_runner, None
        if witness is not None:
            await witness.stop()
        self._witness_ok = None
