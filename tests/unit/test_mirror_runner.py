"""MirrorRunner on two in-process nodes: real heartbeats on loopback, fake side effects.

Each node is a MirrorRunner with its own HeartbeatService (127.0.0.1 and
127.0.0.2, one port), its own journal and state directories, and a
recording ``FakeEffects`` instead of scripts and netlink. Heartbeats are
fast (50 ms, lost after 0.6 s) so a failover takes well under a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path

import pytest

from node_service.cluster.pki import heartbeat_key
from node_service.cluster.transport import HeartbeatService
from node_service.config import NodeConfig
from node_service.errors import CommandRefused, ModuleError
from node_service.journal import Journal
from node_service.mirror import persist, wire
from node_service.mirror.effects import NullReplication
from node_service.mirror.fsm import GenerationInfo, Handover, Local, State
from node_service.mirror.runner import MirrorRunner
from node_service.module.model import Failover, Module, Node, VirtualIP
from node_service.scripts import ScriptResult

SECRET = b"s" * 32
ADDRS = {"n1": "127.0.0.1", "n2": "127.0.0.2"}
WAIT_S = 5.0


class FakeEffects:
    def __init__(self) -> None:
        self.replication = NullReplication()
        self.calls: list[str] = []
        self.fail_start = False

    async def script(self, module_dir, name, env, timeout_s, on_line):
        self.calls.append(f"{name}:{env['RAMPART_STATE']}")
        failed = name == "start_prim" and self.fail_start
        return ScriptResult(name, 1 if failed else 0, False, 0.0, (), f"bin/{name} exited 0")

    async def add_vip(self, vip):
        self.calls.append(f"add_vip:{vip.address}")
        return f"virtual IP {vip.address}/{vip.prefix} added"

    async def announce(self, vip):
        self.calls.append(f"announce:{vip.address}")
        return "announced"

    async def remove_vip(self, vip):
        self.calls.append(f"remove_vip:{vip.address}")
        return f"virtual IP {vip.address} not present: nothing to do"


def module() -> Module:
    return Module(
        name="web",
        kind="mirror",
        nodes=tuple(Node(n, (a,)) for n, a in ADDRS.items()),
        vips=(VirtualIP("198.51.100.200", 24),),
        failover=Failover(heartbeat_interval_ms=50, heartbeat_timeout_ms=600),
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Site:
    """Two nodes of one module; ``crash(name)`` silences one without any stop."""

    def __init__(self, root: Path, port: int) -> None:
        self.root, self.port = root, port
        self.runners: dict[str, MirrorRunner] = {}
        self.services: dict[str, HeartbeatService] = {}
        self.journals: dict[str, Journal] = {}

    async def boot(self, name: str) -> MirrorRunner:
        svc = HeartbeatService(
            name, [ADDRS[name]], self.port, lambda m: heartbeat_key(SECRET, m), incarnation=1
        )
        await svc.start()
        config = NodeConfig(node=name, api_socket=self.root / name / "run" / "api.sock")
        journal = self.journals.setdefault(name, Journal(name, None))
        runner = MirrorRunner(
            module(), self.root / name / "web", config, journal, svc, effects=FakeEffects()
        )
        self.services[name], self.runners[name] = svc, runner
        return runner

    async def crash(self, name: str) -> None:
        runner = self.runners.pop(name)
        tasks = list(runner._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await runner.checks.stop_all()
        await self.services.pop(name).close()
        for _ in range(5):  # datagram transports close their socket on a later loop turn
            await asyncio.sleep(0)

    async def close(self) -> None:
        for name in list(self.runners):
            with contextlib.suppress(Exception):
                await self.runners[name].stop("test over")
            await self.services.pop(name).close()
        self.runners.clear()

    def transitions(self, name: str) -> list[str]:
        return [e["message"] for e in self.journals[name].recent("web", 500)
                if e["kind"] == "transition"]  # fmt: skip


async def reach(runner: MirrorRunner, *states: str, timeout: float = WAIT_S) -> None:
    ok = await runner.wait_for(lambda: runner.current_state in states, timeout)
    assert ok, f"{runner.node.node} is {runner.current_state} ({runner.state()['reason']})"


def run(tmp_path: Path, scenario) -> None:
    async def main() -> None:
        site = Site(tmp_path, free_port())
        try:
            await scenario(site)
        finally:
            await site.close()

    asyncio.run(main())


async def pair(site: Site) -> tuple[MirrorRunner, MirrorRunner]:
    n1, n2 = await site.boot("n1"), await site.boot("n2")
    await asyncio.gather(n1.start(), n2.start())
    await reach(n1, "PRIM")
    await reach(n2, "SECOND")
    return n1, n2


def test_two_nodes_elect_the_preferred_node_prim_and_the_other_second(tmp_path):
    async def scenario(site: Site) -> None:
        n1, n2 = await pair(site)
        calls = n1.effects.calls
        # The VIP is taken before the application starts (it may bind to it).
        assert calls.index("add_vip:198.51.100.200") < calls.index("start_prim:PRIM")
        assert not any(c.startswith("start_prim") for c in n2.effects.calls)
        assert any("WAIT -> PRIM" in t and "n1 is the preferred node" in t
                   for t in site.transitions("n1"))  # fmt: skip
        state = n1.state()
        assert state["peers"]["n2"]["state"] == "SECOND" and state["peers"]["n2"]["reachable"]
        assert n1.metrics()["state_code"] == 3

    run(tmp_path, scenario)


def test_crash_of_prim_makes_second_alone_in_a_new_generation(tmp_path):
    async def scenario(site: Site) -> None:
        _, n2 = await pair(site)
        await site.crash("n1")
        await reach(n2, "ALONE")
        assert "start_prim:ALONE" in n2.effects.calls
        saved = persist.load(n2.state_path)
        assert saved.state is State.ALONE and saved.generations.current.node == "n2"
        assert any("SECOND -> ALONE" in t for t in site.transitions("n2"))
        # The old primary boots again: it rejoins as SECOND of the fresher n2.
        back = await site.boot("n1")
        assert persist.read_marker(back.marker_path) is State.PRIM  # same boot: adopt
        back.marker_path.unlink()  # a power cut empties /run
        back.restore_state("PRIM", 0.0)
        reason = await back.resume()
        assert "afresh" in reason
        await reach(back, "SECOND")
        await reach(n2, "PRIM")

    run(tmp_path, scenario)


def test_swap_exchanges_roles_and_swap_while_alone_is_refused(tmp_path):
    async def scenario(site: Site) -> None:
        n1, n2 = await pair(site)
        reason = await n1.command("swap")
        assert "n2 is now PRIM" in reason, reason
        await reach(n1, "SECOND")
        assert "stop_prim:SECOND" in n1.effects.calls
        await site.crash("n1")
        await reach(n2, "ALONE")
        calls = list(n2.effects.calls)
        with pytest.raises(CommandRefused, match="ALONE, there is no SECOND"):
            await n2.command("swap")
        assert n2.current_state == "ALONE" and n2.effects.calls == calls

    run(tmp_path, scenario)


def test_prim_on_second_is_a_request_the_primary_grants(tmp_path):
    async def scenario(site: Site) -> None:
        n1, n2 = await pair(site)
        reason = await n2.command("prim")
        assert "asks n1" in reason and reason.endswith("now PRIM"), reason
        await reach(n1, "SECOND")

    run(tmp_path, scenario)


def test_failed_start_script_hands_over_to_the_second(tmp_path):
    async def scenario(site: Site) -> None:
        n1, n2 = await pair(site)
        n2.effects.fail_start = True
        await n1.command("swap")
        await reach(n2, "SECOND")  # n2 could not start the application: back to n1
        await reach(n1, "PRIM")
        assert any("application failed" in t for t in site.transitions("n2"))

    run(tmp_path, scenario)


def test_checker_failover_verdict_hands_over(tmp_path):
    async def scenario(site: Site) -> None:
        n1, n2 = await pair(site)
        n1.app_failed("process http.server: no running process matches")
        await reach(n1, "SECOND")
        await reach(n2, "PRIM")

    run(tmp_path, scenario)


def test_stop_publishes_stop_and_the_peer_takes_over_before_the_timeout(tmp_path):
    async def scenario(site: Site) -> None:
        n1, n2 = await pair(site)
        loop = asyncio.get_running_loop()
        began = loop.time()
        await n1.stop("test stop")
        await reach(n2, "ALONE")
        assert loop.time() - began < 0.6 + 0.5  # heard STOP: no timeout to wait for
        assert n1.current_state == "STOP" and "stop_prim:STOP" in n1.effects.calls
        assert not n1.marker_path.exists()
        assert any("(test stop)" in t for t in site.transitions("n1"))

    run(tmp_path, scenario)


def test_resume_in_the_same_boot_adopts_without_scripts(tmp_path):
    async def scenario(site: Site) -> None:
        _, n2 = await pair(site)
        await site.crash("n1")  # rampartd dies; its application and /run stay
        again = await site.boot("n1")
        again.restore_state("PRIM", 0.0)
        reason = await again.resume()
        assert reason == "resumed as PRIM (application left running)"
        assert again.effects.calls == []
        await asyncio.sleep(0)  # let the loop run one step with the peer still SECOND
        await reach(n2, "SECOND")
        assert again.current_state == "PRIM"

    run(tmp_path, scenario)


def test_unknown_command_is_a_one_line_refusal(tmp_path):
    async def scenario(site: Site) -> None:
        n1 = await site.boot("n1")
        with pytest.raises(CommandRefused, match="unknown command 'jump'"):
            await n1.command("jump")
        with pytest.raises(CommandRefused, match="swap refused: module web is STOP on n1"):
            await n1.command("swap")
        assert n1.current_state == "STOP" and n1.effects.calls == []

    run(tmp_path, scenario)


def test_payload_round_trips_and_garbage_reads_as_not_heard():
    me = Local("n1", State.PRIM, GenerationInfo(), True, False, handover=Handover.ASKING, epoch=7)
    data = wire.payload(me, echo=3)
    peer, problem = wire.peer_from_payload("n1", data, 0.1)
    assert problem is None
    assert (peer.state, peer.handover, peer.echo, peer.heard) == (
        State.PRIM, Handover.ASKING, 3, True,
    )  # fmt: skip
    assert wire.epoch_of(data) == 7
    peer, problem = wire.peer_from_payload("n1", {"state": "BOSS"}, 0.1)
    assert not peer.heard and "not understood" in problem


def test_corrupt_state_file_names_the_file(tmp_path):
    path = tmp_path / "mirror.json"
    path.write_text("{not json")
    with pytest.raises(ModuleError, match=r"mirror\.json: mirror state unreadable"):
        persist.load(path)


def test_stop_then_start_rejoins_at_once_on_the_same_heartbeat_registration(tmp_path):
    async def scenario(site: Site) -> None:
        n1, n2 = await pair(site)
        await n2.stop("maintenance")
        await reach(n1, "ALONE")
        assert n1.state()["peers"]["n2"]["state"] == "STOP"  # still heard, saying STOP
        await n2.start()
        # Well within the 0.6 s timeout: packets are not dropped as replays.
        await reach(n2, "SECOND", timeout=0.6)
        await reach(n1, "PRIM")

    run(tmp_path, scenario)


def test_close_stops_the_module_and_leaves_the_heartbeats(tmp_path):
    async def scenario(site: Site) -> None:
        n1, n2 = await pair(site)
        await n1.close()
        assert n1.current_state == "STOP" and "stop_prim:STOP" in n1.effects.calls
        assert "remove_vip:198.51.100.200" in n1.effects.calls
        with pytest.raises(KeyError):
            site.services["n1"].view("web")
        assert any("(rampartd is shutting down)" in t for t in site.transitions("n1"))
        await reach(n2, "ALONE")

    run(tmp_path, scenario)


def test_restart_reruns_the_scripts_in_place(tmp_path):
    async def scenario(site: Site) -> None:
        n1, _ = await pair(site)
        before = len(n1.effects.calls)
        reason = await n1.command("restart")
        assert "in place (PRIM kept)" in reason
        assert n1.effects.calls[before:] == ["stop_prim:PRIM", "start_prim:PRIM"]
        assert n1.current_state == "PRIM"

    run(tmp_path, scenario)


def test_without_the_witness_the_second_waits_and_primforce_serves_with_a_warning(tmp_path):
    async def scenario(site: Site) -> None:
        _, n2 = await pair(site)
        n2.checks.witness = lambda: False  # as if the witness did not answer
        await site.crash("n1")
        await reach(n2, "WAIT")
        assert "witness unreachable" in site.transitions("n2")[-1]
        reason = await n2.command("primforce")
        assert reason.startswith("primforce: operator forced n2 to serve as ALONE")
        assert n2.current_state == "ALONE" and "start_prim:ALONE" in n2.effects.calls
        warnings = [e["message"] for e in site.journals["n2"].recent("web", 100)
                    if e["kind"] == "warning"]  # fmt: skip
        assert any("primforce on n2" in w and "witness is unreachable" in w for w in warnings)

    run(tmp_path, scenario)
