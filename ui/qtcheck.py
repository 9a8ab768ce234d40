"""A guard against PySide6 6.12.0's reference-count bug in ``Signal.emit``.

PySide6 6.12.0 returns ``True`` from ``SignalInstance.emit`` without taking
a reference, so every emit (ours, and pyqtgraph's many per redraw) takes
one reference away from ``True``. When the count reaches zero CPython
aborts ("bool_dealloc: deallocating True or False"): a console showing
live graphs dies after a few minutes, and short runs die at exit. 6.11.x
does not have the bug; the real fix is to install a version without it.

Until then ``protect()`` measures the loss once at start and, only when
there is one, gives the references back: a timer adds references to
``True`` through the C API whenever its count runs low. They are never
released (releasing them at exit would expose the deficit and abort the
process then); the cost is nothing but the count itself.
"""

from __future__ import annotations

import ctypes
import logging
import sys

from PySide6 import __version__ as PYSIDE_VERSION
from PySide6.QtCore import QObject, QTimer, Signal

log = logging.getLogger(__name__)

PROBE_EMITS = 64
TOP_UP = 200_000  # references added when the count gets low
LOW_WATER = 100_000
CHECK_MS = 1000


class _Probe(QObject):
    ping = Signal(object)


def _give_back(count: int) -> None:
    incref = ctypes.pythonapi.Py_IncRef
    incref.argtypes, incref.restype = [ctypes.py_object], None
    target = ctypes.py_object(True)
    for _ in range(count):
        incref(target)


def emit_leaks_references() -> bool:
    """True when this PySide6 loses a reference to True on each Signal.emit."""
    probe = _Probe()
    probe.ping.connect(lambda _x: None)
    before = sys.getrefcount(True)
    for _ in range(PROBE_EMITS):
        probe.ping.emit(None)
    lost = before - sys.getrefcount(True)
    probe.deleteLater()
    if lost > 0:
        _give_back(lost)  # the probe itself must not leave a deficit behind
    return lost >= PROBE_EMITS // 2


class Ballast(QObject):
    """Gives True back the references PySide6 takes, before its count reaches zero."""

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("pyside-refcount-ballast")
        self.given = 0
        self.timer = QTimer(self)
        self.timer.setObjectName("pyside-refcount-ballast")
        self.timer.setInterval(CHECK_MS)
        self.timer.timeout.connect(self.top_up)
        self.top_up()

    def top_up(self) -> None:
        if sys.getrefcount(True) < LOW_WATER:
            _give_back(TOP_UP)
            self.given += TOP_UP


def protect(parent: QObject | None = None, timer: bool = True) -> Ballast | None:
    """Start the guard if this PySide6 needs it; None when it does not."""
    if not emit_leaks_references():
        return None
    log.warning(
        "PySide6 %s loses a reference on every Signal.emit (a known bug of this version); "
        "the console compensates, but install PySide6-Essentials<6.12 to fix it",
        PYSIDE_VERSION,
    )
    ballast = Ballast(parent)
    if timer:
        ballast.timer.start()
    return ballast
