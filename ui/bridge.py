"""From model threads to the GUI thread: how every view listens to its model.

``app`` models notify through ``app.signals.Signal`` in whatever thread made
the change (usually a worker). Widgets may only be touched in the GUI
thread, so each view connects its model signals through a ``Relay``: a
QObject living in the GUI thread whose Qt signal is emitted from any thread
and delivered by Qt's queued connection to the view's slot.

Fast feeds (one line per node per second, times many nodes) would queue a
redraw per line; ``Coalescer`` instead marks the view dirty and lets a timer
redraw at a fixed rate, so the GUI thread's cost does not grow with the feed.

``Runner`` is the same idea for one-off work a view starts (open a template,
build & sign, check a package): the function runs in the console's workers
and its result or error comes back to a callback in the GUI thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from PySide6.QtCore import QObject, QTimer, Signal, Slot

from app.signals import Signal as ModelSignal
from app.workers import CancelToken, Task, Workers

log = logging.getLogger(__name__)


class Relay(QObject):
    """Delivers one model signal's emissions to ``slot`` in the GUI thread."""

    fired = Signal(object)

    def __init__(self, owner: QObject, model_signal: ModelSignal, slot: Callable[..., Any]) -> None:
        super().__init__(owner)
        self._model_signal = model_signal
        self._slot = slot
        self._attached = True
        # A method of an object living in the GUI thread: Qt queues the call
        # there whichever thread emits ``fired``.
        self.fired.connect(self._deliver)
        model_signal.connect(self.post)
        # The model outlives its views: stop it calling into a deleted widget.
        owner.destroyed.connect(self._model_detach_hook())

    def _model_detach_hook(self) -> Callable[..., None]:
        model_signal, post = self._model_signal, self.post
        return lambda *_: model_signal.disconnect(post)

    def post(self, *args: Any) -> None:
        """Called by the model, in any thread."""
        if not self._attached:
            return
        try:
            self.fired.emit(args)
        except RuntimeError:
            # The Qt side is already gone (window closing); nothing to draw.
            self._attached = False

    def detach(self) -> None:
        """Stop listening (the view shows another model now)."""
        self._attached = False
        self._model_signal.disconnect(self.post)
        self.deleteLater()

    @Slot(object)
    def _deliver(self, args: tuple[Any, ...]) -> None:
        if self._attached:
            self._slot(*args)


def relay(owner: QObject, model_signal: ModelSignal, slot: Callable[..., Any]) -> Relay:
    """Connect ``model_signal`` to ``slot`` so that ``slot`` runs in the GUI thread."""
    return Relay(owner, model_signal, slot)


class Coalescer(QObject):
    """Turns many "something changed" notifications into one redraw per period."""

    def __init__(
        self, owner: QObject, redraw: Callable[[], None], period_ms: int, name: str,
        always: bool = False,
    ) -> None:  # fmt: skip
        super().__init__(owner)
        self.setObjectName(name)
        self._redraw = redraw
        self._always = always  # scrolling graphs move with time even without new data
        self._dirty = True
        self.timer = QTimer(self)
        self.timer.setObjectName(f"{name}-timer")
        self.timer.setInterval(period_ms)
        self.timer.timeout.connect(self.tick)

    def mark(self, *_args: Any) -> None:
        self._dirty = True

    def start(self) -> None:
        self.timer.start()

    def stop(self) -> None:
        self.timer.stop()

    @Slot()
    def tick(self) -> None:
        """Redraw if anything changed since the last tick (also callable directly)."""
        if self._dirty or self._always:
            self._dirty = False
            self._redraw()


class Runner(QObject):
    """Runs a function in the console's workers and calls back in the GUI thread.

    ``on_done(result)`` or ``on_error(exception)`` run in the GUI thread once
    the work ends; the work itself never touches a widget.
    """

    _finished = Signal(object, object)

    def __init__(self, owner: QObject, workers: Workers) -> None:
        super().__init__(owner)
        self.workers = workers
        self._alive = True
        self._finished.connect(self._deliver)

    def run(
        self, name: str, fn: Callable[..., Any], *args: Any,
        on_done: Callable[[Any], None] | None = None,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> Task:  # fmt: skip
        def work(token: CancelToken) -> Any:
            try:
                result = fn(token, *args)
            except BaseException as exc:
                self._post(on_error, exc)
                raise
            self._post(on_done, result)
            return result

        return self.workers.submit(name, work)

    def _post(self, callback: Callable[[Any], None] | None, value: Any) -> None:
        if callback is None or not self._alive:
            return
        try:
            self._finished.emit(callback, value)
        except RuntimeError:
            self._alive = False  # the view closed while the work ran

    @Slot(object, object)
    def _deliver(self, callback: Callable[[Any], None], value: Any) -> None:
        if self._alive:
            callback(value)
