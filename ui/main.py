"""`rampart-console`: open a site in the console, or take screenshots of it.

    rampart-console --site FILE
    rampart-console --site FILE --screenshot PNG [--after S]
    rampart-console --site FILE --screenshot-all DIR [--after S]

With --screenshot the main window is grabbed S seconds after it appears and
the program exits 0 (nodes that cannot be reached show as unreachable; the
window comes up regardless). With --screenshot-all every tab is saved as
DIR/<tab>.png and the paths are printed. A site file that cannot be used is
one clear line on stderr (a dialog when the window would be shown) and a
non-zero exit, never a traceback. With no display and no QT_QPA_PLATFORM,
screenshots use Qt's offscreen platform.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from node_service.errors import RampartError, UserError

EXIT_USAGE = 2
EXIT_BAD_SITE = 2
EXIT_SCREENSHOT = 1
# Late tabs' imports start once the window has painted and the monitors run,
# so they compete with neither (ui/main_window.py).
PREFETCH_AFTER_MS = 1000


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rampart-console",
        description="Rampart console: design, sign, deploy and watch modules of a site.",
    )
    parser.add_argument("--site", help="site file (YAML), e.g. the one `rampart lab up` writes")
    shots = parser.add_mutually_exclusive_group()
    shots.add_argument("--screenshot", metavar="PNG", help="grab the main window into PNG and exit")
    shots.add_argument(
        "--screenshot-all", metavar="DIR", help="save every tab as DIR/TAB.png and exit"
    )
    parser.add_argument("--after", type=float, default=2.0, metavar="S",
                        help="seconds to wait before the screenshot (default 2)")  # fmt: skip
    return parser


def _batch(args: argparse.Namespace) -> bool:
    return bool(args.screenshot or args.screenshot_all)


def _choose_platform(args: argparse.Namespace) -> None:
    headless = not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY")
    if _batch(args) and headless and not os.environ.get("QT_QPA_PLATFORM"):
        os.environ["QT_QPA_PLATFORM"] = "offscreen"


def _fail(message: str, gui: bool) -> None:
    print(f"rampart-console: {message}", file=sys.stderr)
    if gui:
        from PySide6.QtWidgets import QMessageBox

        QMessageBox.critical(None, "Rampart console", message)


def _save(image, path: Path) -> None:  # image: QImage
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {path.parent}: {exc.strerror}") from None
    if not image.save(str(path), "PNG"):
        raise UserError(f"cannot write screenshot {path}; expected a writable .png path")


# Notices Qt prints on every run of a platform that has no window manager
# (offscreen): not problems, so not shown to the user.
QUIET_QT_MESSAGES = ("This plugin does not support propagateSizeHints()",)


def _qt_message(mode, _context, message: str) -> None:  # mode: QtMsgType
    from PySide6.QtCore import QtMsgType

    if message in QUIET_QT_MESSAGES and mode != QtMsgType.QtCriticalMsg:
        return
    print(f"rampart-console: Qt: {message}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from PySide6.QtCore import qInstallMessageHandler

    previous = qInstallMessageHandler(_qt_message)
    try:
        return _run(args)
    finally:
        qInstallMessageHandler(previous)


def _run(args: argparse.Namespace) -> int:
    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QApplication, QFileDialog

    from app.site import load
    from ui import theme

    app = QApplication.instance() or QApplication([sys.argv[0]])
    app.setApplicationName("rampart-console")
    gui = not _batch(args)
    path = args.site
    if not path and gui:
        path, _ = QFileDialog.getOpenFileName(None, "Open a site", "", "Site files (*.yaml *.yml)")
    if not path:
        _fail("no site file; expected --site FILE", gui=False)
        return EXIT_USAGE
    try:
        site = load(path)  # before the window exists: nothing to freeze yet
    except RampartError as exc:
        _fail(str(exc), gui)
        return EXIT_BAD_SITE

    from ui.console import Console
    from ui.main_window import MainWindow
    from ui.qtcheck import protect

    theme.apply(app)
    ballast = protect(app)  # noqa: F841 (kept alive while the window runs)
    console = Console(site)
    window = MainWindow(console)
    outcome = {"code": 0}

    def shoot() -> None:
        try:
            if args.screenshot:
                _save(window.grab_image(), Path(args.screenshot))
                print(args.screenshot)
            else:
                for name, image in window.grab_tabs().items():
                    target = Path(args.screenshot_all) / f"{name}.png"
                    _save(image, target)
                    print(target)
        except RampartError as exc:
            print(f"rampart-console: {exc}", file=sys.stderr)
            outcome["code"] = EXIT_SCREENSHOT
        window.close()
        app.quit()

    window.show()
    console.start()
    if _batch(args):
        QTimer.singleShot(int(max(0.0, args.after) * 1000), shoot)
    else:
        window.start_prefetch(PREFETCH_AFTER_MS)
    try:
        app.exec()
    finally:
        window.stop_timers()
        console.close()
        _dispose(window)
    return outcome["code"]


def _dispose(window) -> None:  # window: QMainWindow
    """Delete the widgets while Qt and Python are both fully alive.

    Left to interpreter shutdown, PySide6 and pyqtgraph may free graphics
    items in an order that crashes the process after a successful run.
    """
    from PySide6.QtCore import QCoreApplication, QEvent

    window.deleteLater()
    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
    QCoreApplication.processEvents()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="rampart-console: %(message)s")
    # paramiko logs its transport thread's end (a link cut, the window closing
    # while a feed is open) as an ERROR with a traceback; app.ssh already turns
    # every such failure into one line naming the node, shown in the window.
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)
    _choose_platform(args)
    try:
        code = run(args)
    except KeyboardInterrupt:
        code = 130
    if argv is None:
        _exit_now(code)
    return code


def _exit_now(code: int) -> None:
    """End the program without the interpreter's final garbage collection.

    Everything is done by now (threads joined, files written and closed), but
    PySide6 can abort the process while Python frees Qt wrappers at shutdown
    ("bool_dealloc" at finalization, rare, seen after --screenshot-all), and
    the caller (make demo, CI) must get the exit code we decided, not SIGABRT.
    Only the real program does this; tests calling ``main(argv)`` return.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
