"""Signals and workers: thread-safe notification, named threads, cancel, clean shutdown."""

from __future__ import annotations

import threading

import pytest

from app.signals import Signal
from app.workers import Cancelled, CancelToken, Workers

WAIT_S = 5.0


def test_signal_calls_every_receiver_even_after_one_fails(caplog: pytest.LogCaptureFixture) -> None:
    sig = Signal("changed")
    got: list[int] = []

    def broken(value: int) -> None:
        raise RuntimeError("view bug")

    sig.connect(broken)
    sig.connect(got.append)
    sig.connect(got.append)  # connected once only
    sig.emit(1)
    sig.disconnect(broken)
    sig.disconnect(broken)  # unknown: ignored
    sig.emit(2)
    assert got == [1, 2]
    assert sig.receivers == 1
    assert "signal changed failed" in caplog.text


def test_signal_from_many_threads_delivers_everything() -> None:
    sig = Signal("many")
    lock = threading.Lock()
    got: list[int] = []

    def receive(value: int) -> None:
        with lock:
            got.append(value)

    sig.connect(receive)
    threads = [threading.Thread(target=lambda k=k: [sig.emit(k * 100 + i) for i in range(100)],
                                name=f"rt-emit-{k}") for k in range(4)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    assert sorted(got) == list(range(400))


def test_submit_runs_in_a_named_thread_and_returns_the_result() -> None:
    workers = Workers("rt")
    try:
        task = workers.submit("job", lambda token, x: (threading.current_thread().name, x * 2), 21)
        assert task.result(WAIT_S) == ("rt-job", 42)
        failing = workers.submit("bad", lambda token: 1 / 0)
        assert failing.wait(WAIT_S)
        assert isinstance(failing.error, ZeroDivisionError)
    finally:
        assert workers.shutdown(WAIT_S) == []


def test_cancel_wakes_a_waiting_task_and_shutdown_joins_spawned_threads() -> None:
    workers = Workers("rt")
    started = threading.Event()

    def loop(token: CancelToken) -> str:
        started.set()
        while not token.wait(60):  # would sleep a minute without the cancel
            pass
        token.check()
        return "not reached"

    task = workers.spawn("loop", loop)
    assert started.wait(WAIT_S)
    assert any(t.name == "rt-loop" for t in threading.enumerate())
    assert workers.shutdown(WAIT_S) == []
    assert task.done and isinstance(task.error, Cancelled)
    with pytest.raises(Exception, match="shut down"):
        workers.submit("late", lambda token: None)
