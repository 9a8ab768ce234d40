"""Task.on_done: the end of a piece of work is told, not polled."""

from __future__ import annotations

import threading

from app.workers import Task, Workers


def test_on_done_is_called_once_with_the_task_after_it_ends() -> None:
    workers = Workers("rt-done", max_workers=2)
    release = threading.Event()
    seen: list[tuple[Task, object]] = []
    told = threading.Event()
    try:
        task = workers.submit("slow", lambda token: release.wait(5) and "finished")
        task.on_done(lambda t: (seen.append((t, t.result(0))), told.set()))
        assert not told.is_set()  # not before the work ends
        release.set()
        assert told.wait(5)
        assert seen == [(task, "finished")]
        # Registered after the end: called at once, in the caller's thread.
        late: list[str] = []
        task.on_done(lambda t: late.append(threading.current_thread().name))
        assert late == [threading.current_thread().name]
    finally:
        assert workers.shutdown(5) == []


def test_on_done_sees_the_error_of_failed_work() -> None:
    workers = Workers("rt-done", max_workers=1)
    errors: list[BaseException | None] = []
    told = threading.Event()
    try:
        task = workers.submit("fails", lambda token: 1 / 0)
        task.on_done(lambda t: (errors.append(t.error), told.set()))
        assert told.wait(5)
        assert isinstance(errors[0], ZeroDivisionError)
    finally:
        assert workers.shutdown(5) == []
