"""A tiny thread-safe signal: how app models tell views that something changed.

The model layer must not import Qt, yet its services run in worker threads.
A ``Signal`` is a named list of callbacks; ``emit`` calls them in the thread
that made the change. Views marshal to the GUI thread themselves (a queued
Qt signal), so nothing here knows about event loops.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

Callback = Callable[..., Any]


class Signal:
    """Callbacks connected to one kind of change."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._callbacks: tuple[Callback, ...] = ()

    def connect(self, callback: Callback) -> Callback:
        with self._lock:
            if callback not in self._callbacks:
                self._callbacks = (*self._callbacks, callback)
        return callback

    def disconnect(self, callback: Callback) -> None:
        with self._lock:
            self._callbacks = tuple(c for c in self._callbacks if c != callback)

    @property
    def receivers(self) -> int:
        return len(self._callbacks)

    def emit(self, *args: Any) -> None:
        # Call outside the lock: a callback may connect or disconnect, and a
        # slow one must not block other emitters.
        with self._lock:
            callbacks = self._callbacks
        for callback in callbacks:
            try:
                callback(*args)
            except Exception:
                # One broken view must not stop a deploy or a feed.
                log.exception("callback %r of signal %s failed", callback, self.name)

    def __repr__(self) -> str:
        return f"Signal({self.name!r}, {self.receivers} receivers)"
