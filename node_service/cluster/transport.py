"""Heartbeat transport: UDP sockets and timers around the pure membership code.

One UDP endpoint per local address of this node, bound to that address and
the daemon's heartbeat port. Per module, one named sender task sends a
heartbeat to every address of every peer, each from the local address the
kernel would route it from, then ticks membership so silence is noticed.
Received datagrams are decoded, checked and fed to that module's membership
view. Runners ``await service.wait_changed(module)`` instead of polling.

Incarnation: ``next_incarnation(path)`` persists a counter and returns
``max(previous + 1, time.time_ns())``: it rises at every daemon start even if
the clock steps back (the file) or the state directory is lost (the clock).
Sequence numbers belong to the service, not to one registration: a module
removed and added again under the same incarnation goes on from its last seq,
because its peers would drop a restarted count as replays.

Waits use ``asyncio.timeout`` rather than ``asyncio.wait_for``: on Python 3.11
``wait_for`` returns the result when a cancellation arrives in the same loop
iteration as the wake-up, and a loop around it would then never end. The
send loop also stops on its registration's ``stopping`` flag.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node_service.cluster import membership
from node_service.cluster.heartbeat import (
    Heartbeat,
    HeartbeatError,
    decode,
    encode,
    read_module,
)
from node_service.errors import ConfigError, RetryableError

log = logging.getLogger("rampart.heartbeat")

# Linux: bind to an address that is not (yet) configured, so a daemon that
# starts before its second network is up still listens there once it is.
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
# The same drop from the same address is journaled at most this often.
DROP_LOG_EVERY = 10.0
DROP_LOG_MEMORY = 1024

Journal = Callable[[str, str], None]  # (severity, line)


def next_incarnation(path: str | os.PathLike[str]) -> int:
    """This daemon start's incarnation, persisted in ``path``."""
    p = Path(path)
    previous = 0
    try:
        previous = int(p.read_text().strip() or 0)
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:
        log.warning("incarnation file %s unreadable (%s); using the clock", p, exc)
    value = max(previous + 1, time.time_ns())
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(f"{value}\n")
    os.replace(tmp, p)
    return value


@dataclass
class _ModuleRun:
    spec: membership.ModuleSpec
    key: bytes
    payload_fn: Callable[[], Mapping[str, Any]]
    view: membership.View
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    seqs: dict[str, int] = field(default_factory=dict)  # shared with the service's memory
    last_payload: Mapping[str, Any] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None
    stopping: bool = False


class _Endpoint(asyncio.DatagramProtocol):
    def __init__(self, service: HeartbeatService, local: str):
        self.service = service
        self.local = local
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.service._on_datagram(data, addr[0])

    def error_received(self, exc: Exception) -> None:
        # ICMP unreachable on a dead network: membership notices the silence.
        log.debug("heartbeat socket %s: %s", self.local, exc)


class HeartbeatService:
    """Heartbeats of every module on this node; owns its sockets and tasks."""

    def __init__(
        self,
        node_name: str,
        local_addresses: Sequence[str],
        port: int,
        key_for: Callable[[str], bytes],
        *,
        incarnation: int,
        clock: Callable[[], float] = time.monotonic,
        journal: Journal | None = None,
        on_event: Callable[[membership.Event], None] | None = None,
    ):
        if not local_addresses:
            raise ConfigError(f"node {node_name}: no heartbeat address to listen on")
        for address in local_addresses:
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise ConfigError(
                    f"node {node_name}: heartbeat address {address!r} is not an IP address"
                ) from None
        self.node = node_name
        self.local_addresses = tuple(dict.fromkeys(local_addresses))
        self.port = port
        self.key_for = key_for
        self.incarnation = incarnation
        self.clock = clock
        self.journal = journal or _log_journal
        self.on_event = on_event
        self.drops: Counter[str] = Counter()
        self.recent_drops: deque[str] = deque(maxlen=20)
        self._drop_logged: dict[tuple[str, str], float] = {}
        self._said: dict[str, float] = {}
        self._endpoints: dict[str, _Endpoint] = {}
        self._modules: dict[str, _ModuleRun] = {}
        # Last seq sent per module and peer address, kept across remove/add
        # for as long as this incarnation lives.
        self._seqs: dict[str, dict[str, int]] = {}
        self._started = False

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            for address in self.local_addresses:
                sock = _bound_socket(address, self.port)
                _, proto = await loop.create_datagram_endpoint(
                    lambda a=address: _Endpoint(self, a), sock=sock
                )
                self._endpoints[address] = proto
        except BaseException:
            await self.close()
            raise
        self._started = True
        for run in self._modules.values():
            self._spawn(run)

    async def close(self) -> None:
        self._started = False
        for run in self._modules.values():
            run.stopping = True
        tasks = [run.task for run in self._modules.values() if run.task]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for run in self._modules.values():
            run.task = None
        for endpoint in self._endpoints.values():
            if endpoint.transport is not None:
                endpoint.transport.close()
        self._endpoints.clear()

    def add_module(
        self,
        module_name: str,
        peers: Mapping[str, Sequence[str]],
        interval: float = 0.25,
        timeout: float = 3.0,
        payload_fn: Callable[[], Mapping[str, Any]] = dict,
    ) -> None:
        """Start heartbeating ``module_name`` with ``peers`` ({node: [addresses]})."""
        if module_name in self._modules:
            raise ConfigError(f"module {module_name}: heartbeats already running")
        spec = membership.ModuleSpec.build(module_name, self.node, peers, interval, timeout)
        view = membership.new_view(spec, self.clock())
        run = _ModuleRun(spec, self.key_for(module_name), payload_fn, view)
        run.seqs = self._seqs.setdefault(module_name, {})
        self._modules[module_name] = run
        if self._started:
            self._spawn(run)

    async def remove_module(self, module_name: str) -> None:
        run = self._modules.pop(module_name, None)
        if run is not None and run.task is not None:
            run.stopping = True
            run.task.cancel()
            # wait(), not ``await task`` under suppress(CancelledError): the
            # caller's own cancellation must still reach the caller.
            await asyncio.wait({run.task})

    def send_now(self, module_name: str) -> None:
        """Send the next round at once (e.g. right after a state change)."""
        self._run(module_name).wake.set()

    async def wait_changed(self, module_name: str, timeout: float | None = None) -> bool:
        """Wait until a peer's reachability or payload changes; False on timeout."""
        run = self._run(module_name)
        try:
            async with asyncio.timeout(timeout):
                await run.changed.wait()
        except TimeoutError:
            return False
        run.changed.clear()
        return True

    def view(self, module_name: str) -> membership.View:
        return self._run(module_name).view

    def peer_reachable(self, module_name: str, peer: str) -> bool:
        return membership.peer_reachable(self._run(module_name).view, peer, self.clock())

    def networks(self, module_name: str, peer: str) -> dict[str, bool]:
        return membership.networks(self._run(module_name).view, peer, self.clock())

    def peer_payload(self, module_name: str, peer: str) -> Mapping[str, Any] | None:
        return membership.peer_payload(self._run(module_name).view, peer)

    def status(self, module_name: str) -> dict[str, Any]:
        run = self._run(module_name)
        return {
            "module": module_name,
            "node": self.node,
            "incarnation": self.incarnation,
            "peers": membership.status(run.view, self.clock()),
            "dropped": dict(self.drops),
            "recent_drops": list(self.recent_drops),
        }

    # -- inside -------------------------------------------------------------

    def _run(self, module_name: str) -> _ModuleRun:
        run = self._modules.get(module_name)
        if run is None:
            raise KeyError(f"module {module_name}: no heartbeats on this node")
        return run

    def _spawn(self, run: _ModuleRun) -> None:
        run.stopping = False
        run.task = asyncio.create_task(
            self._send_loop(run), name=f"heartbeat-send:{run.spec.module}"
        )

    async def _send_loop(self, run: _ModuleRun) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while not run.stopping:
            now = self.clock()
            try:
                self._send_round(run, now)
                tick = membership.tick(run.view, now)
                run.view = tick.view
                self._publish(run, tick.events, False)
            except Exception:
                # A bug here must not silence this node: peers would fail over.
                log.exception("module %s: heartbeat round failed", run.spec.module)
            next_at = max(next_at + run.spec.interval, loop.time())
            run.wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(next_at):
                    await run.wake.wait()

    def _send_round(self, run: _ModuleRun, now: float) -> None:
        try:
            run.last_payload = dict(run.payload_fn())
        except Exception as exc:  # the runner's bug must not stop heartbeats
            self._say_once("warning", f"module {run.spec.module}: heartbeat payload failed: {exc}")
        for peer in run.spec.peers:
            for address in peer.addresses:
                local = self._local_for(address)
                endpoint = self._endpoints.get(local)
                if endpoint is None or endpoint.transport is None:
                    continue
                seq = run.seqs.get(address, 0) + 1
                run.seqs[address] = seq
                packet = Heartbeat(
                    node=self.node,
                    module=run.spec.module,
                    incarnation=self.incarnation,
                    seq=seq,
                    source=local,
                    sent_ns=int(now * 1e9),
                    payload=run.last_payload,
                    echo=membership.echo_for(run.view, peer.name, address, now),
                )
                try:
                    data = encode(packet, run.key)
                except HeartbeatError as exc:
                    self._say_once("error", f"module {run.spec.module}: {exc}")
                    continue
                endpoint.transport.sendto(data, (address, self.port))

    def _local_for(self, peer_address: str) -> str:
        """The local address to reach ``peer_address`` from: its own network's."""
        if len(self.local_addresses) == 1:
            return self.local_addresses[0]
        family = socket.AF_INET6 if ":" in peer_address else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                probe.connect((peer_address, self.port))  # a route lookup; sends nothing
                chosen = probe.getsockname()[0]
            if chosen in self._endpoints:
                return chosen
        except OSError:
            pass  # no route now (link down): keep using the network it belongs to
        return max(self.local_addresses, key=lambda local: _common_bits(local, peer_address))

    def _on_datagram(self, data: bytes, source: str) -> None:
        now = self.clock()
        try:
            module = read_module(data)
        except HeartbeatError as exc:
            self._dropped(source, exc.kind, str(exc), now)
            return
        run = self._modules.get(module)
        if run is None:
            self._dropped(
                source, "unknown_module", f"heartbeat for module {module!r}, not run here", now
            )
            return
        try:
            packet = decode(data, run.key)
        except HeartbeatError as exc:
            self._dropped(source, exc.kind, str(exc), now)
            return
        verdict = membership.receive(run.view, packet, source, now)
        run.view = verdict.view
        if not verdict.accepted:
            self._dropped(source, verdict.drop, verdict.reason, now)
            return
        self._publish(run, verdict.events, verdict.payload_changed)

    def _publish(
        self, run: _ModuleRun, events: Sequence[membership.Event], payload_changed: bool
    ) -> None:
        for event in events:
            self.journal(event.severity, f"module {event.module}: {event.reason}")
            if self.on_event is not None:
                try:
                    self.on_event(event)
                except Exception:
                    log.exception("heartbeat event callback failed")
        if events or payload_changed:
            run.changed.set()

    def _dropped(self, source: str, kind: str, reason: str, now: float) -> None:
        self.drops[kind] += 1
        line = f"dropped heartbeat from {source}: {reason}"
        self.recent_drops.append(line)
        last = self._drop_logged.get((source, kind))
        if last is None or now - last >= DROP_LOG_EVERY:
            if len(self._drop_logged) >= DROP_LOG_MEMORY:
                # Spoofed sources must not grow this without bound.
                self._drop_logged = {
                    k: t for k, t in self._drop_logged.items() if now - t < DROP_LOG_EVERY
                }
            self._drop_logged[(source, kind)] = now
            self.journal("warning", line)

    def _say_once(self, severity: str, line: str) -> None:
        # Local faults (a payload function's bug) repeat every interval.
        now = self.clock()
        last = self._said.get(line)
        if last is None or now - last >= DROP_LOG_EVERY:
            if len(self._said) >= DROP_LOG_MEMORY:
                self._said.clear()
            self._said[line] = now
            self.journal(severity, line)


def _bound_socket(address: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
        sock.bind((address, port))
    except OSError as exc:
        sock.close()
        raise RetryableError(
            f"cannot listen for heartbeats on {address} port {port}: {exc.strerror}"
        ) from None
    return sock


def _common_bits(a: str, b: str) -> int:
    try:
        x, y = ipaddress.ip_address(a), ipaddress.ip_address(b)
    except ValueError:
        return -1
    if x.version != y.version:
        return -1
    width = x.max_prefixlen
    return width - (int(x) ^ int(y)).bit_length()


def _log_journal(severity: str, line: str) -> None:
    level = {"info": logging.INFO, "warning": logging.WARNING}.get(severity, logging.ERROR)
    log.log(level, "%s", line)
