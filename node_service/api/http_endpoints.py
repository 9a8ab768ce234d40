"""The optional TCP listeners: Prometheus metrics and cloud health checks.

Both are off unless node.yaml sets ``metrics_listen`` / ``health_listen``
(``IP:PORT``). They serve read-only answers with no authentication, which
is why they are separate from the management API (a unix socket with roles)
and bind only to the configured address: that address and the node's
firewall are the access control.

    GET /metrics            Prometheus text (api.metrics, read at scrape time)
    GET /health             rampartd liveness: 200, or 503 while shutting down
    GET /health/{module}    200 if this node should receive the module's
                            traffic, 503 if not, 404 if not installed here

Where gratuitous ARP cannot move a virtual IP (cloud networks route by
their own tables), a cloud load balancer sends the traffic instead, to the
nodes whose health check answers 200. The rule is a pure function of the
module's state object (``module_verdict``), tested without a daemon:

- mirror: 200 on the node that serves, PRIM or ALONE, once its start
  actions are done (no ``starting``/``stopping`` sub-state); 503 elsewhere,
  so exactly the node holding the application and its data gets traffic;
- farm: 200 when UP and owning at least one bucket (an UP node with no
  bucket would drop every new client the balancer sends it); 503 otherwise;
- 503 for every module while rampartd shuts down, so balancers drain the
  node before its applications stop; 404 for a module not installed here.

HEAD works wherever GET does (some balancers probe with HEAD). When both
keys name the same address, one listener serves both sets of paths.

A listener that cannot bind (address in use, not an address of this node)
is journaled as an error and the daemon keeps running: the node's HA duties
matter more than its dashboards, and a health check that cannot connect
already tells a balancer "no traffic here", the safe answer.

Ownership: this object owns one aiohttp runner per address; aiohttp owns
the request handlers. ``close()`` is called by the daemon after every
module has stopped, so balancers keep seeing 503 (``stopping``) while the
applications shut down, and connection refused only afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from node_service.config import Listen, NodeConfig
    from node_service.daemon import Daemon

METRICS, HEALTH = "metrics", "health"
SERVING_MIRROR = ("PRIM", "ALONE")
OK, UNAVAILABLE, NOT_FOUND = 200, 503, 404


@dataclass(frozen=True)
class Verdict:
    """The HTTP status and the sentence explaining it."""

    status: int
    reason: str

    @property
    def serving(self) -> bool:
        return self.status == OK


def module_verdict(state: dict[str, Any] | None, node: str, *, stopping: bool = False) -> Verdict:
    """The health answer for one module from its state object (None: not installed)."""
    if state is None:
        return Verdict(NOT_FOUND, f"no such module on node {node}")
    name, kind, current = state.get("module", "?"), state.get("kind"), state.get("state")
    where = f"module {name} on node {node}"
    if stopping:
        return Verdict(UNAVAILABLE, f"{where}: rampartd is shutting down")
    if state.get("error"):
        return Verdict(UNAVAILABLE, f"{where} cannot run: {state['error']}")
    if kind == "mirror":
        return _mirror(where, current, state.get("substate"))
    if kind == "farm":
        return _farm(where, current, state.get("buckets"))
    return Verdict(UNAVAILABLE, f"{where} is of kind {kind!r}, which has no health rule")


def _mirror(where: str, current: Any, substate: Any) -> Verdict:
    if current in SERVING_MIRROR:
        if substate:
            return Verdict(UNAVAILABLE, f"{where} is {current} but still {substate}")
        return Verdict(OK, f"{where} is {current}: the application runs here")
    if current == "SECOND":
        return Verdict(UNAVAILABLE, f"{where} is SECOND: the PRIM node serves")
    return Verdict(UNAVAILABLE, f"{where} is {current}: not serving")


def _farm(where: str, current: Any, buckets: Any) -> Verdict:
    if current != "UP":
        return Verdict(UNAVAILABLE, f"{where} is {current}: not serving")
    owned = buckets if isinstance(buckets, int) and not isinstance(buckets, bool) else 0
    if owned <= 0:
        return Verdict(UNAVAILABLE, f"{where} is UP but owns no bucket yet")
    return Verdict(OK, f"{where} is UP with {owned} of the 256 buckets")


def body(verdict: Verdict, state: dict[str, Any] | None, module: str, node: str) -> dict[str, Any]:
    """The small JSON body a balancer ignores and a person reads."""
    return {
        "module": module,
        "node": node,
        "kind": (state or {}).get("kind"),
        "state": (state or {}).get("state"),
        "serving": verdict.serving,
        "reason": verdict.reason,
    }


def plan(config: NodeConfig) -> dict[Listen, tuple[str, ...]]:
    """Which endpoints each configured address serves (empty: nothing to start)."""
    wanted: dict[Listen, tuple[str, ...]] = {}
    for what, address in ((METRICS, config.metrics_listen), (HEALTH, config.health_listen)):
        if address is not None:
            wanted[address] = (*wanted.get(address, ()), what)
    return wanted


class HttpEndpoints:
    """Starts and stops the TCP listeners node.yaml asks for."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self._runners: list[web.AppRunner] = []
        self.serving: dict[str, str] = {}  # endpoint -> URL, for logs and tests

    async def start(self) -> None:
        for address, endpoints in plan(self.daemon.config).items():
            runner = web.AppRunner(self._app(endpoints), access_log=None, shutdown_timeout=1.0)
            await runner.setup()
            what = " and ".join(endpoints)
            try:
                await web.TCPSite(runner, address.host, address.port).start()
            except OSError as exc:
                await runner.cleanup()
                self.daemon.journal.error(
                    f"{what} endpoint not started: cannot listen on {address}: "
                    f"{exc.strerror or exc}; check {', '.join(e + '_listen' for e in endpoints)} "
                    f"in {self.daemon.config.source}"
                )
                continue
            self._runners.append(runner)
            for endpoint in endpoints:
                self.serving[endpoint] = f"{address.url}/{endpoint}"
            self.daemon.journal.record("info", f"{what} endpoint listening on {address.url}")

    async def close(self) -> None:
        runners, self._runners = self._runners, []
        for runner in runners:
            await runner.cleanup()
        self.serving.clear()

    def _app(self, endpoints: tuple[str, ...]) -> web.Application:
        app = web.Application()
        if METRICS in endpoints:
            app.add_routes([web.get("/metrics", self.metrics)])
        if HEALTH in endpoints:
            app.add_routes(
                [web.get("/health", self.liveness), web.get("/health/{module}", self.module)]
            )
        return app

    # -- handlers ------------------------------------------------------------

    async def metrics(self, request: web.Request) -> web.Response:
        from node_service.api.metrics import render

        payload, content_type = render(self.daemon)
        return web.Response(body=payload, headers={"Content-Type": content_type})

    async def liveness(self, request: web.Request) -> web.Response:
        d = self.daemon
        stopping = d.stopping.is_set()
        return web.json_response(
            {
                "status": "stopping" if stopping else "ok",
                "node": d.config.node,
                "modules": {name: slot.state_name() for name, slot in sorted(d.slots.items())},
                "started_at": d.started_at,
            },
            status=UNAVAILABLE if stopping else OK,
        )

    async def module(self, request: web.Request) -> web.Response:
        d = self.daemon
        name = request.match_info["module"]
        state = d.state(name) if name in d.slots else None
        verdict = module_verdict(state, d.config.node, stopping=d.stopping.is_set())
        return web.json_response(body(verdict, state, name, d.config.node), status=verdict.status)
