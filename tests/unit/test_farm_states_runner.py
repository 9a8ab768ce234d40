"""FarmRunner with small fakes for heartbeats and side effects (nft, macvlan, scripts).

The checker used where a test needs one is real: a tcp checker against a
listener on loopback, which the test closes to make it fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

from node_service.config import NodeConfig
from node_service.errors import CommandRefused
from node_service.farm import buckets, guard
from node_service.farm.flows import FlowsReadError
from node_service.farm.held import HeldFlowsError
from node_service.farm.nft import PacketFilterError
from node_service.farm.runner import FarmRunner
from node_service.journal import Journal
from node_service.module.model import (
    FARM,
    Farm,
    FarmRule,
    Module,
    Node,
    TcpChecker,
    VirtualIP,
)

NODES = ("n1", "n2", "n3")


def farm_module(name="web", weights=(1, 1, 1), checkers=(), port=8080, vip="198.51.100.201",
                protocol="tcp"):  # fmt: skip
    nodes = tuple(
        Node(n, (f"198.51.100.1{i}", f"203.0.113.1{i}"), w)
        for i, (n, w) in enumerate(zip(NODES, weights, strict=True), start=1)
    )
    return Module(
        name=name,
        kind=FARM,
        nodes=nodes,
        vips=(VirtualIP(vip, 24),),
        farm=Farm((FarmRule((port,), protocol, "ip_port"),)),
        checkers=tuple(checkers),
    )


class FakeHeartbeats:
    """What FarmRunner uses of HeartbeatService, driven by the test."""

    def __init__(self) -> None:
        self.payload_fns: dict[str, Callable] = {}
        self.peers: dict[str, dict] = {}
        self.sent = 0
        self.changed = asyncio.Event()

    def add_module(self, name, peers, interval, timeout, payload_fn):
        assert name not in self.payload_fns
        self.payload_fns[name] = payload_fn
        for peer in peers:
            self.peers.setdefault(peer, {"status": "unknown", "reachable": False, "payload": None})

    async def remove_module(self, name):
        self.payload_fns.pop(name, None)

    def _check(self, module):
        if module not in self.payload_fns:
            raise KeyError(module)

    def view(self, module):
        self._check(module)
        peers = [SimpleNamespace(name=n, status=p["status"]) for n, p in self.peers.items()]
        return SimpleNamespace(peers=peers)

    def peer_reachable(self, module, peer):
        self._check(module)
        return self.peers[peer]["reachable"]

    def peer_payload(self, module, peer):
        self._check(module)
        return self.peers[peer]["payload"]

    def networks(self, module, peer):
        return {}

    def send_now(self, module):
        self._check(module)
        self.sent += 1

    async def wait_changed(self, module, timeout=None):
        self._check(module)
        try:
            async with asyncio.timeout(timeout):  # not wait_for: it can swallow a cancel (3.11)
                await self.changed.wait()
        except TimeoutError:
            return False
        self.changed.clear()
        return True

    def set_peer(self, name, state="UP", reachable=True, held=0, alive=None):
        payload = {"state": state, "eligible": state == "UP", "held": held, "alive": alive}
        payload = payload if reachable else None
        old = self.peers.get(name, {}).get("payload")
        self.peers[name] = {
            "status": "up" if reachable else "down",
            "reachable": reachable,
            "payload": payload if reachable else old,
        }
        self.changed.set()

    def payload(self, module):
        return self.payload_fns[module]()


class FakeEffects:
    def __init__(self) -> None:
        self.applied: list[str] = []  # ruleset texts that nft "loaded"
        self.fail_apply: str | None = None
        self.calls: list[str] = []
        self.script_ok = True
        self.held_buckets: frozenset[int] = frozenset()  # what conntrack "says"
        self.held_error: str | None = None
        self.held_flows: frozenset[tuple[str, int]] = frozenset()  # what the sockets "say"
        self.flows_error: str | None = None
        self.flow_reads: list[frozenset[tuple[str, int]]] = []  # the next readings, then held_flows

    async def lan_interface(self, address):
        self.calls.append(f"lan {address}")
        return "eth0"

    async def apply(self, ruleset):
        if self.fail_apply:
            raise PacketFilterError(self.fail_apply)
        self.applied.append(ruleset.text)

    async def remove(self, module):
        self.calls.append(f"remove {module}")

    async def counters(self, module):
        return {"established": 5, "owned": 3, "dropped": 7}

    async def held(self, vips, rules):
        self.calls.append("held")
        if self.held_error:
            raise HeldFlowsError(self.held_error)
        return self.held_buckets

    async def flows(self, vips, ports):
        self.calls.append("flows")
        if self.flows_error:
            raise FlowsReadError(self.flows_error)
        return self.flow_reads.pop(0) if self.flow_reads else self.held_flows

    async def restore_left_over(self, memo):
        self.calls.append(f"restore_left_over {memo.name}")
        return None

    async def mac_setup(self, spec):
        self.calls.append(f"mac_setup {spec.link} {spec.parent}")
        return f"VIP on {spec.link}"

    async def mac_teardown(self, spec):
        self.calls.append(f"mac_teardown {spec.link}")
        return f"{spec.link} removed"

    async def announce(self, address, interface):
        self.calls.append(f"announce {address} {interface}")
        return "announced"

    async def script(self, module_dir, name, env, timeout, on_line):
        self.calls.append(f"script {name} {env['RAMPART_ACTION']}")
        on_line(f"{name} says hello")
        ok = self.script_ok or name != "start_both"
        code = 0 if ok else 1
        return SimpleNamespace(ok=ok, reason=f"bin/{name} exited {code}")

    def owned_in_last_ruleset(self, protocol: str = "tcp") -> int:
        """Count owned buckets in the last loaded nft text (0 when it owns none)."""
        if protocol == "udp":
            return len(self.buckets_in_last_ruleset('"owned udp', "ip"))
        if not self.buckets_in_last_ruleset('"owned tcp', "netdev"):
            return 0
        # The TCP gate counts owned SYNs after dropping every foreign bucket.
        return 256 - len(self.buckets_in_last_ruleset('"dropped ingress tcp', "netdev"))

    def last(self, family: str) -> str:
        """The last script that defines the table of ``family`` (ip, netdev).

        A change of UDP held buckets alone replaces only the netdev table, a
        change of held flows neither (set elements only).
        """
        return next(t for t in reversed(self.applied) if f"table {family} " in t)

    def buckets_in_last_ruleset(self, comment: str, family: str = "netdev") -> set[int]:
        """The bucket set of the rule whose comment starts so, in the last script for its table."""
        text = self.last(family)
        line = next((ln for ln in text.splitlines() if comment in ln), None)
        if line is None:
            return set()
        if "mod 256 seed " not in line:
            return set(range(buckets.BUCKETS))  # a rule with no hash: every bucket
        inside = line.split("mod 256 seed ")[1].split("{ ", 1)[1].split(" }")[0]
        found = set()
        for part in inside.split(", "):
            lo, _, hi = part.partition("-")
            found |= set(range(int(lo), int(hi or lo) + 1))
        return found


def make_runner(tmp_path: Path, module: Module, node="n1", hb=None, effects=None) -> FarmRunner:
    journal = Journal(node, None)
    config = NodeConfig(node=node, state_dir=tmp_path)
    return FarmRunner(
        module, tmp_path / module.name, config, journal, hb, effects=effects or FakeEffects()
    )


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


def messages(runner: FarmRunner) -> list[str]:
    return [e["message"] for e in runner.journal.recent(limit=1000)]


@pytest.fixture(autouse=True)
def no_leftover_registry():
    FarmRunner.active.clear()
    yield
    FarmRunner.active.clear()


def run(coro):
    return asyncio.run(coro)


def test_start_goes_up_and_loads_its_share_then_takes_a_lost_peers_buckets(tmp_path):
    async def scenario():
        hb, fx = FakeHeartbeats(), FakeEffects()
        runner = make_runner(tmp_path, farm_module(), hb=hb, effects=fx)
        hb.set_peer("n2")
        hb.set_peer("n3")
        try:
            reason = await runner.start()
            assert "VIP on rf-" in reason
            await until(lambda: runner.current_state == "UP")
            full = buckets.bucket_map({"n1": 1, "n2": 1, "n3": 1}, NODES, runner.seed)
            mine = len(buckets.owned_by(full, "n1"))
            await until(lambda: fx.owned_in_last_ruleset() == mine)
            assert hb.payload("web") == {
                "state": "UP", "eligible": True, "buckets": mine, "held": 0,
                "alive": guard.alive_digest(NODES),
            }  # fmt: skip
            state = runner.state()
            assert (state["kind"], state["state"], state["buckets"]) == ("farm", "UP", mine)
            assert state["alive"] == list(NODES)
            # The LAN interface first (the filter's ingress drop is on it), then
            # an earlier version's conntrack setting put back, before the VIP.
            # (and this node's sockets, read before each load that loses buckets)
            assert [c for c in fx.calls if c != "flows"][:4] == [
                "lan 198.51.100.11",
                "restore_left_over conntrack_tcp_loose",
                f"mac_setup {runner._shared.link} eth0",
                f"announce 198.51.100.201 {runner._shared.link}",
            ]
            # The first filter loaded owns nothing: no client before the map exists.
            assert '"owned ' not in fx.applied[0]

            hb.set_peer("n3", reachable=False)
            expected = len(buckets.owned_by(buckets.bucket_map(runner.weights, ("n1", "n2"),
                                                               runner.seed), "n1"))  # fmt: skip
            await until(lambda: fx.owned_in_last_ruleset() == expected)
            lost = [m for m in messages(runner) if m.startswith("bucket map: n3 lost")]
            assert lost and "n3 -> n1" in lost[0] and "n3 -> n2" in lost[0]
            await until(lambda: runner.metrics()["connections_accepted"] == 3)
        finally:
            await runner.stop("test over")
        assert runner.current_state == "STOP"
        assert "mac_teardown " + runner._shared.link in fx.calls and "remove web" in fx.calls
        assert "web" not in hb.payload_fns and runner._tasks == []
        assert [m for m in messages(runner) if m.startswith("STOP -> WAIT")]

    run(scenario())


def test_tcp_flows_of_buckets_moving_away_stay_let_through_until_they_end(tmp_path):
    async def scenario():
        hb, fx = FakeHeartbeats(), FakeEffects()
        runner = make_runner(tmp_path, farm_module(), hb=hb, effects=fx)
        hb.set_peer("n2")
        hb.set_peer("n3", reachable=False)
        try:
            await runner.start()
            two = buckets.bucket_map(runner.weights, ("n1", "n2"), runner.seed)
            big = set(buckets.owned_by(two, "n1"))
            await until(lambda: fx.owned_in_last_ruleset() == len(big))
            assert runner.state()["held"] == 0 and "elements" not in fx.last("netdev")

            # n3 comes back and takes its buckets; n1 still has connections.
            three = buckets.bucket_map(runner.weights, NODES, runner.seed)
            small = set(buckets.owned_by(three, "n1"))
            flow, late = ("198.51.100.50", 40000), ("198.51.100.51", 40001)
            # The reading before the load, then the one right after it.
            fx.flow_reads = [frozenset({flow}), frozenset({flow, late})]
            fx.held_flows = frozenset({flow, late})
            hb.set_peer("n3")
            await until(lambda: fx.owned_in_last_ruleset() == len(small))
            # Same transaction: no longer owned, its connection let through by address and port.
            assert "elements = { 198.51.100.50 . 40000 }" in fx.last("netdev")
            # A connection set up meanwhile is added by the reading right after the load...
            await until(lambda: runner.state()["held_flows"] == 2)
            assert fx.applied[-1].startswith("flush set ip rampart_farm_web held_flows")
            assert not fx.flow_reads
            # ...and each is let go when its socket is gone; new sockets are not added.
            fx.held_flows = frozenset({late, ("198.51.100.52", 5)})
            await until(lambda: runner.state()["held_flows"] == 1)
            fx.held_flows = frozenset()
            await until(lambda: runner.state()["held"] == 0)
            assert "add element" not in fx.applied[-1]
            assert hb.payload("web")["held"] == 0
            assert any("no flow of this node left" in m for m in messages(runner))
        finally:
            await runner.stop("test over")

    run(scenario())


def test_gained_buckets_are_guarded_until_every_peer_applied_the_map_and_holds_nothing(tmp_path):
    async def scenario():
        hb, fx = FakeHeartbeats(), FakeEffects()
        runner = make_runner(tmp_path, farm_module(), hb=hb, effects=fx)
        hb.set_peer("n2")
        hb.set_peer("n3")
        full = buckets.bucket_map(runner.weights, NODES, runner.seed)
        mine = set(buckets.owned_by(full, "n1"))
        digest = guard.alive_digest(NODES)
        try:
            await runner.start()
            await until(lambda: fx.owned_in_last_ruleset() == len(mine))
            # Everything it gained is guarded: conntrack there, nowhere else.
            assert fx.buckets_in_last_ruleset('"dropped guarded', "ip") == mine
            assert runner.state()["guarded"] == len(mine)
            # A peer that has not applied the same membership, or still holds flows: kept.
            hb.set_peer("n2", alive=digest, held=3)
            hb.set_peer("n3", alive="0badc0de")
            await asyncio.sleep(0.05)
            assert runner.state()["guarded"] == len(mine)
            hb.set_peer("n3", alive=digest)
            await asyncio.sleep(0.05)
            assert runner.state()["guarded"] == len(mine)
            hb.set_peer("n2", alive=digest, held=0)
            await until(lambda: runner.state()["guarded"] == 0, timeout=5)
            assert " ct " not in fx.last("ip") and "notrack" not in fx.last("ip")
            assert any("guard lifted" in m for m in messages(runner))

            # n3 lost: what it had comes here, guarded again until n2 says it holds nothing
            # (n3 is gone: its flows are too).
            hb.set_peer("n2", alive=digest, held=1)
            hb.set_peer("n3", reachable=False)
            await until(lambda: runner.state()["guarded"] > 0)
            assert fx.buckets_in_last_ruleset('"dropped guarded', "ip") <= mine | set(range(256))
            hb.set_peer("n2", alive=guard.alive_digest(("n1", "n2")), held=0)
            await until(lambda: runner.state()["guarded"] == 0, timeout=5)
        finally:
            await runner.stop("test over")

    run(scenario())


def test_udp_buckets_moving_away_stay_let_through_at_ingress_until_their_flows_end(tmp_path):
    async def scenario():
        hb, fx = FakeHeartbeats(), FakeEffects()
        runner = make_runner(tmp_path, farm_module(protocol="udp"), hb=hb, effects=fx)
        hb.set_peer("n2")
        hb.set_peer("n3", reachable=False)
        ingress = '"dropped ingress '
        try:
            await runner.start()
            # Until conntrack was read every bucket passes: no ingress drop at all.
            assert 'hook ingress device "eth0"' not in fx.applied[0]
            two = buckets.bucket_map(runner.weights, ("n1", "n2"), runner.seed)
            big = set(buckets.owned_by(two, "n1"))
            await until(lambda: fx.buckets_in_last_ruleset(ingress) == set(range(256)) - big)
            assert 'hook ingress device "eth0"' in fx.applied[-1]

            # n3 comes back and takes its buckets; n1 still holds a flow in one of them.
            three = buckets.bucket_map(runner.weights, NODES, runner.seed)
            small = set(buckets.owned_by(three, "n1"))
            lost = big - small
            kept = min(lost)
            fx.held_buckets = frozenset({kept})
            hb.set_peer("n3")
            await until(lambda: fx.owned_in_last_ruleset("udp") == len(small))
            # Same transaction: no longer owned, still let through at ingress.
            assert fx.buckets_in_last_ruleset(ingress) == set(range(256)) - big
            # After conntrack is read only the bucket with a live flow stays.
            await until(
                lambda: fx.buckets_in_last_ruleset(ingress) == set(range(256)) - small - {kept}
            )
            # Only the netdev table was replaced: the ip table keeps its counters.
            assert "table ip " not in fx.applied[-1]
            fx.held_buckets = frozenset()
            await until(lambda: fx.buckets_in_last_ruleset(ingress) == set(range(256)) - small)
            assert any("no flow of this node left" in m for m in messages(runner))
            assert "flows" not in fx.calls  # no TCP rule: no socket reading
        finally:
            await runner.stop("test over")

    run(scenario())


def test_unreadable_conntrack_keeps_every_udp_bucket_let_through_and_says_so_once(tmp_path):
    async def scenario():
        hb, fx = FakeHeartbeats(), FakeEffects()
        fx.held_error = "cannot read conntrack entries: [Errno 93] Protocol not supported"
        runner = make_runner(tmp_path, farm_module(protocol="udp"), hb=hb, effects=fx)
        hb.set_peer("n2")
        hb.set_peer("n3")
        try:
            await runner.start()
            await until(lambda: fx.calls.count("held") >= 3)
            # Nothing known: no ingress drop, never a flow cut; one journal line.
            assert all("hook ingress" not in text for text in fx.applied)
            said = [m for m in messages(runner) if m.startswith("held flows not read")]
            assert len(said) == 1 and "Protocol not supported" in said[0]
            assert runner.state()["held"] == 256 - runner.state()["buckets"]
            fx.held_error = None
            await until(lambda: any("hook ingress" in text for text in fx.applied))
            assert runner.state()["held"] == 0
        finally:
            await runner.stop("test over")

    run(scenario())


def test_unreadable_sockets_are_said_once_and_the_filter_still_loads(tmp_path):
    async def scenario():
        hb, fx = FakeHeartbeats(), FakeEffects()
        fx.flows_error = "cannot read this node's TCP sockets: [Errno 93] Protocol not supported"
        runner = make_runner(tmp_path, farm_module(), hb=hb, effects=fx)
        hb.set_peer("n2")
        hb.set_peer("n3")
        try:
            await runner.start()
            await until(lambda: runner.current_state == "UP" and fx.owned_in_last_ruleset() > 0)
            hb.set_peer("n3", reachable=False)
            await until(lambda: fx.calls.count("flows") >= 2)
            said = [m for m in messages(runner) if m.startswith("held flows not read")]
            assert len(said) == 1 and "Protocol not supported" in said[0]
        finally:
            await runner.stop("test over")

    run(scenario())


def test_checker_failure_gives_up_buckets_and_recovery_takes_them_back(tmp_path):
    async def scenario():
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        check = TcpChecker(address="127.0.0.1", port=port, interval=0.05, timeout=0.5, failures=2)
        hb, fx = FakeHeartbeats(), FakeEffects()
        runner = make_runner(tmp_path, farm_module(checkers=[check]), hb=hb, effects=fx)
        hb.set_peer("n2")
        hb.set_peer("n3")
        try:
            await runner.start()
            await until(lambda: runner.current_state == "UP")
            await until(lambda: fx.owned_in_last_ruleset() > 0)
            # Its connections stay with it while it waits: read from its sockets.
            fx.held_flows = frozenset({("198.51.100.50", 40000)})
            listener.close()
            await until(lambda: runner.current_state == "WAIT")
            await until(lambda: fx.owned_in_last_ruleset() == 0)
            assert hb.payload("web")["eligible"] is False
            assert "elements = { 198.51.100.50 . 40000 }" in fx.last("netdev")
            # ...and the peers see it holds one, so their guards stay on.
            await until(lambda: hb.payload("web")["held"] == 1)
            wait = [m for m in messages(runner) if m.startswith("UP -> WAIT")]
            assert wait and "giving up its buckets" in wait[0]
            listener = socket.create_server(("127.0.0.1", port))
            await until(lambda: runner.current_state == "UP")
            await until(lambda: fx.owned_in_last_ruleset() > 0)
        finally:
            listener.close()
            await runner.stop("test over")

    run(scenario())


def test_nft_failure_keeps_previous_rules_and_says_so_once(tmp_path):
    async def scenario():
        hb, fx = FakeHeartbeats(), FakeEffects()
        runner = make_runner(tmp_path, farm_module(), hb=hb, effects=fx)
        hb.set_peer("n2")
        hb.set_peer("n3")
        try:
            await runner.start()
            await until(lambda: fx.owned_in_last_ruleset() > 0)
            before = fx.applied[-1]
            fx.fail_apply = (
                "farm module web: nft exited 1: Error: boom; previous rules left in place"
            )
            hb.set_peer("n2", reachable=False)
            await until(lambda: any("packet filter not updated" in m for m in messages(runner)))
            assert fx.applied[-1] == before
            # The state reports the share still loaded, not the one wanted.
            assert runner.state()["buckets"] == fx.owned_in_last_ruleset()
            await runner.evaluate()
            errors = [m for m in messages(runner) if "packet filter not updated" in m]
            assert len(errors) == 1 and "previous rules left in place" in errors[0]
            fx.fail_apply = None
            await runner.evaluate()
            assert fx.applied[-1] != before
            assert any(m.startswith("packet filter loaded again") for m in messages(runner))
        finally:
            await runner.stop("test over")

    run(scenario())


def test_second_farm_on_same_vip_and_port_is_refused_naming_the_first(tmp_path):
    async def scenario():
        first = make_runner(tmp_path, farm_module("web"))
        second = make_runner(tmp_path, farm_module("api"))
        await first.start()
        try:
            with pytest.raises(CommandRefused, match="farm module web already filters tcp 8080"):
                await second.start()
            assert second.current_state == "STOP"
            third = make_runner(tmp_path, farm_module("dns", port=53))
            await third.start()
            await third.stop("done")
        finally:
            await first.stop("done")
        await second.start()  # the VIP and port are free again
        await second.stop("done")

    run(scenario())


def test_every_weight_zero_is_journaled_and_the_node_stays_wait(tmp_path):
    async def scenario():
        hb = FakeHeartbeats()
        fx = FakeEffects()
        runner = make_runner(tmp_path, farm_module(weights=(0, 0, 0)), hb=hb, effects=fx)
        hb.set_peer("n2")
        hb.set_peer("n3")
        await runner.start()
        try:
            await runner.evaluate()
            assert runner.current_state == "WAIT"
            assert runner.state()["problem"].startswith("every node of the farm")
            errors = [m for m in messages(runner) if m.startswith("every node of the farm")]
            assert len(errors) == 1
            assert fx.owned_in_last_ruleset() == 0
        finally:
            await runner.stop("done")

    run(scenario())


def test_start_both_failure_holds_wait_and_the_reason_says_how_to_fix(tmp_path):
    async def scenario():
        fx = FakeEffects()
        fx.script_ok = False
        runner = make_runner(tmp_path, farm_module(), effects=fx)
        reason = await runner.start()
        try:
            assert "bin/start_both exited 1" in reason
            await runner.evaluate()
            assert runner.current_state == "WAIT"
            assert "rampart stopstart -m web" in runner.state()["problem"]
        finally:
            await runner.stop("done")

    run(scenario())


def test_node_waits_to_hear_its_peers_before_taking_buckets(tmp_path):
    async def scenario():
        hb, fx = FakeHeartbeats(), FakeEffects()
        runner = make_runner(tmp_path, farm_module(), hb=hb, effects=fx)
        await runner.start()
        try:
            await runner.evaluate()
            assert runner.current_state == "WAIT"
            assert "waiting to hear from n2, n3" in runner.snapshot().problem
            hb.set_peer("n2")
            hb.set_peer("n3", reachable=False)  # lost counts as heard
            await until(lambda: runner.current_state == "UP")
        finally:
            await runner.stop("done")

    run(scenario())


def test_mirror_commands_refused_and_restart_reruns_the_scripts(tmp_path):
    async def scenario():
        fx = FakeEffects()
        runner = make_runner(tmp_path, farm_module(), effects=fx)
        for verb in ("swap", "prim", "second", "primforce"):
            with pytest.raises(CommandRefused, match=f"{verb} is a mirror command"):
                await runner.command(verb)
        with pytest.raises(CommandRefused, match="is stopped"):
            await runner.command("restart")
        await runner.start()
        try:
            with pytest.raises(CommandRefused, match="already"):
                await runner.start()
            reason = await runner.command("restart")
            assert "bin/stop_both exited 0" in reason and "bin/start_both exited 0" in reason
            assert fx.calls[-2:] == ["script stop_both restart", "script start_both restart"]
        finally:
            await runner.stop("done")
        assert await runner.stop("again") == "module web is already stopped on node n1"

    run(scenario())


def test_resume_after_crash_starts_again_from_stop(tmp_path):
    async def scenario():
        runner = make_runner(tmp_path, farm_module())
        runner.restore_state("UP", 1.0)
        await runner.resume()
        try:
            assert runner.current_state in ("WAIT", "UP")
            assert any(m.startswith("STOP -> WAIT") for m in messages(runner))
        finally:
            with contextlib.suppress(Exception):
                await runner.stop("done")

    run(scenario())


def test_missing_nft_is_a_clear_error_and_the_vip_is_not_taken(tmp_path):
    from node_service.farm.runner import FarmEffects

    class MissingNft(FakeEffects):
        async def apply(self, ruleset):
            await FarmEffects(("/nonexistent/rt-nft",)).apply(ruleset)

    async def scenario():
        fx = MissingNft()
        runner = make_runner(tmp_path, farm_module(), effects=fx)
        reason = await runner.start()
        try:
            assert "packet filter not loaded" in reason
            await runner.evaluate()
            assert runner.current_state == "WAIT"
            problem = runner.state()["problem"]
            assert "'/nonexistent/rt-nft' not found; install nftables" in problem
            assert not any(c.startswith("mac_setup") for c in fx.calls)
            assert runner.state()["buckets"] == 0
        finally:
            await runner.stop("done")
        assert runner.current_state == "STOP"

    run(scenario())


def test_a_left_over_conntrack_setting_that_cannot_be_put_back_is_a_warning(tmp_path):
    from node_service.farm.conntrack import PickupError

    class NoConntrack(FakeEffects):
        async def restore_left_over(self, memo):
            raise PickupError("cannot set net.netfilter.nf_conntrack_tcp_loose=1: Read-only")

    async def scenario():
        fx = NoConntrack()
        runner = make_runner(tmp_path, farm_module(), effects=fx)
        try:
            reason = await runner.start()
            assert "VIP on rf-" in reason
            assert "problem" not in runner.state()
            said = [m for m in messages(runner) if m.startswith("conntrack setting not put back")]
            assert said == [
                "conntrack setting not put back: cannot set "
                "net.netfilter.nf_conntrack_tcp_loose=1: Read-only"
            ]
        finally:
            await runner.stop("done")
        assert runner.current_state == "STOP"

    run(scenario())
