"""A cancelled journal subscriber always ends, even when an entry arrives at once.

The race: Python 3.11's ``asyncio.wait_for`` returns the result instead of
raising when the cancellation and the wake-up land in the same loop
iteration, so a `events --follow` / watch loop around ``get`` would keep
running after the daemon cancelled it.
"""

from __future__ import annotations

import asyncio

from node_service.journal import Journal


def test_cancelled_get_always_ends_even_as_an_entry_arrives(tmp_path):
    async def scenario() -> int:
        journal = Journal("n1", tmp_path / "journal.jsonl")
        ended = 0
        for attempt in range(150):
            sub = journal.subscribe()
            blocked = asyncio.Event()

            async def follow(sub=sub, blocked=blocked) -> None:
                for _ in range(1000):
                    blocked.set()
                    await sub.get(5.0)

            task = asyncio.create_task(follow(), name=f"rt-follow-{attempt}")
            await blocked.wait()
            for _ in range(attempt % 3):
                await asyncio.sleep(0)
            journal.record("info", f"entry {attempt}", "web")
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=1.0)
            assert task in done, f"attempt {attempt}: the cancelled follower kept waiting"
            assert task.cancelled()
            sub.close()
            ended += 1
        return ended

    assert asyncio.run(scenario()) == 150
