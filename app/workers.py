"""Owned worker threads: every SSH and file operation of the console runs here.

``Workers`` is a small pool (concurrent.futures) plus dedicated threads for
long-lived loops (one watch channel per node). Every thread is named, every
task carries a ``CancelToken``, and ``shutdown`` cancels and joins them all,
so closing the console never leaves a thread behind.

Cancellation is cooperative: work checks its token between steps (a deploy
never stops half-way through an SFTP write or an install).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from node_service.errors import RampartError

log = logging.getLogger(__name__)


class Cancelled(RampartError):
    """The user cancelled the work; not a failure of the node."""


class CancelToken:
    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled("cancelled")

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True (at once) when cancelled."""
        return self._event.wait(max(0.0, seconds))


class Task:
    """One piece of work submitted to ``Workers``."""

    def __init__(self, name: str, token: CancelToken, future: Future[Any]) -> None:
        self.name = name
        self.token = token
        self._future = future

    def cancel(self) -> None:
        self.token.cancel()
        self._future.cancel()  # only effective while still queued

    @property
    def done(self) -> bool:
        return self._future.done()

    def wait(self, timeout: float | None = None) -> bool:
        done = threading.Event()
        self._future.add_done_callback(lambda _f: done.set())
        return done.wait(timeout)

    def result(self, timeout: float | None = None) -> Any:
        return self._future.result(timeout)

    def on_done(self, fn: Callable[[Task], None]) -> None:
        """Call ``fn(task)`` once the work has ended (at once if it already has).

        It runs in the worker's thread (or the caller's, if already done): a
        view marshals it to the GUI thread itself, as with model signals.
        """
        self._future.add_done_callback(lambda _f: fn(self))

    @property
    def error(self) -> BaseException | None:
        if not self._future.done() or self._future.cancelled():
            return None
        return self._future.exception()

    def __repr__(self) -> str:
        return f"Task({self.name!r}, done={self.done})"


class Workers:
    """The console's threads: a bounded pool and named long-lived threads."""

    def __init__(self, name: str = "console", max_workers: int = 8) -> None:
        self.name = name
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=f"{name}-pool")
        self._lock = threading.Lock()
        self._tokens: set[CancelToken] = set()
        self._threads: list[threading.Thread] = []
        self._closed = False

    def _token(self) -> CancelToken:
        token = CancelToken()
        with self._lock:
            if self._closed:
                raise RampartError(f"workers {self.name} are shut down; no new work accepted")
            self._tokens.add(token)
        return token

    def _forget(self, token: CancelToken) -> None:
        with self._lock:
            self._tokens.discard(token)

    def submit(self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Task:
        """Run ``fn(token, *args, **kwargs)`` on the pool."""
        token = self._token()

        def run() -> Any:
            thread = threading.current_thread()
            pool_name = thread.name
            thread.name = f"{self.name}-{name}"  # shows what the thread is doing in dumps
            try:
                return fn(token, *args, **kwargs)
            finally:
                thread.name = pool_name
                self._forget(token)

        return Task(name, token, self._pool.submit(run))

    def spawn(self, name: str, fn: Callable[..., Any], *args: Any) -> Task:
        """Run ``fn(token, *args)`` in its own named thread (long-lived loops)."""
        token = self._token()
        future: Future[Any] = Future()

        def run() -> None:
            future.set_running_or_notify_cancel()
            try:
                future.set_result(fn(token, *args))
            except BaseException as exc:
                if not isinstance(exc, Cancelled):
                    log.exception("thread %s-%s failed", self.name, name)
                future.set_exception(exc)
            finally:
                self._forget(token)

        thread = threading.Thread(target=run, name=f"{self.name}-{name}", daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()
        return Task(name, token, future)

    def shutdown(self, timeout: float = 5.0) -> list[str]:
        """Cancel everything and join; returns the names of threads still alive."""
        with self._lock:
            self._closed = True
            tokens = list(self._tokens)
            threads = list(self._threads)
        for token in tokens:
            token.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)
        for thread in threads:
            thread.join(timeout)
        return [t.name for t in threads if t.is_alive()]
