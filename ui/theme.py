"""The console's look: the stylesheet from resources/theme and the state colours.

State colours are the model's (``app.dashboard.STATE_COLOURS``) so that the
dashboard, the timeline and the legend always agree.
"""

from __future__ import annotations

import logging

from PySide6.QtGui import QColor
from PySide6.QtWidgets import QApplication

from app.dashboard import STATE_COLOURS, UNKNOWN
from node_service.resources import resources_dir

log = logging.getLogger(__name__)


def state_colour(state: str | None) -> QColor:
    if state is None:
        return QColor(STATE_COLOURS[UNKNOWN])
    return QColor(STATE_COLOURS.get(state) or STATE_COLOURS.get(state.upper()) or
                  STATE_COLOURS[UNKNOWN])  # fmt: skip


def text_colour_on(background: QColor) -> QColor:
    """Black or white, whichever reads better on ``background``."""
    luminance = 0.299 * background.red() + 0.587 * background.green() + 0.114 * background.blue()
    return QColor("#000000" if luminance > 150 else "#ffffff")


def apply(app: QApplication) -> None:
    """Load resources/theme/console.qss; a missing theme leaves Qt's default look."""
    path = resources_dir() / "theme" / "console.qss"
    try:
        app.setStyleSheet(path.read_text(encoding="utf-8"))
    except OSError as exc:
        log.warning("theme %s not loaded: %s", path, exc.strerror)
