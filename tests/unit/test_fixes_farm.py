"""Farm runner fix: its loops end when cancelled, even as a wake-up fires.

The runner uses a real HeartbeatService (not started: no socket is needed
for membership waits) and the fake side effects of test_farm_states_runner.
"""

from __future__ import annotations

import asyncio

import pytest

from node_service.cluster.pki import heartbeat_key
from node_service.cluster.transport import HeartbeatService
from node_service.farm.runner import FarmRunner
from tests.unit.test_farm_states_runner import farm_module, make_runner


@pytest.fixture(autouse=True)
def no_leftover_registry():
    FarmRunner.active.clear()
    yield
    FarmRunner.active.clear()


def _service() -> HeartbeatService:
    return HeartbeatService(
        "n1", ["127.0.0.1"], 1, lambda m: heartbeat_key(b"k" * 32, m), incarnation=3
    )


def _tasks(runner: FarmRunner) -> dict[str, asyncio.Task[None]]:
    return {task.get_name(): task for task in runner._tasks}


def test_cancelled_farm_loops_end_even_as_their_wake_ups_fire(tmp_path):
    async def scenario():
        service = _service()
        runner = make_runner(tmp_path, farm_module(), hb=service)
        for attempt in range(40):
            await runner.start()
            try:
                tasks = _tasks(runner)
                watched = [tasks["farm:web"], tasks["farm-heartbeats:web"]]
                for _ in range(attempt % 3 + 1):  # the loops are parked in their waits
                    await asyncio.sleep(0)
                service._run("web").changed.set()  # a peer's news
                runner._wake.set()  # a checker event
                for task in watched:
                    task.cancel()
                done, _ = await asyncio.wait(watched, timeout=1.0)
                stuck = [t.get_name() for t in watched if t not in done]
                assert not stuck, f"attempt {attempt}: {stuck} kept running after cancel"
            finally:
                await runner.stop("attempt over")
            assert runner.current_state == "STOP"

    asyncio.run(scenario())


def test_stop_ends_the_loops_while_news_keeps_arriving(tmp_path):
    async def scenario():
        service = _service()
        runner = make_runner(tmp_path, farm_module(), hb=service)
        for attempt in range(20):
            await runner.start()
            tasks = list(runner._tasks)

            async def news(changed: asyncio.Event) -> None:
                for _ in range(500):
                    changed.set()
                    runner._wake.set()
                    await asyncio.sleep(0)

            pinger = asyncio.create_task(news(service._run("web").changed), name="rt-farm-news")
            stopping = asyncio.create_task(runner.stop("attempt over"), name="rt-farm-stop")
            done, _ = await asyncio.wait({stopping}, timeout=3.0)
            pinger.cancel()
            await asyncio.gather(pinger, return_exceptions=True)
            assert stopping in done, f"attempt {attempt}: stop did not return"
            assert all(t.done() for t in tasks)
            assert runner.current_state == "STOP"
        assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("farm")]

    asyncio.run(scenario())
