"""Console test fixtures: Qt offscreen, real models, and no thread left behind.

QT_QPA_PLATFORM is set before anything imports Qt, so every view test runs
without a display. Fixtures give real ``app`` models (a site whose nodes
are on loopback ports nobody listens on, so any SSH attempt fails at once
and never leaves this machine) and one ``Workers`` per test that is shut
down afterwards; a view test fails if it leaves a thread running.
"""

from __future__ import annotations

import os

os.environ["QT_QPA_PLATFORM"] = "offscreen"  # before any Qt import, including pytest-qt's
os.environ.setdefault("XDG_RUNTIME_DIR", "/tmp")

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

UI_TESTS = "test_ui_"


def free_port() -> int:
    """A loopback TCP port with no listener (connections to it are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def site_text(port: int, nodes: int = 2, extra: str = "") -> str:
    lines = ["site: lab", "nodes:"]
    for i in range(1, nodes + 1):
        lines += [
            f"  - name: lab-n{i}",
            f"    addresses: [198.51.100.{10 + i}, 203.0.113.{10 + i}]",
            f"    ssh: {{host: 127.0.0.1, port: {port}, user: root}}",
        ]
    lines.append("vip_pool: [198.51.100.200, 198.51.100.201]")
    return "\n".join(lines) + "\n" + extra


@pytest.fixture
def site_file(tmp_path: Path) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(site_text(free_port()))
    return path


@pytest.fixture
def site(site_file: Path):
    from app.site import load

    return load(site_file)


@pytest.fixture
def workers() -> Iterator[object]:
    from app.workers import Workers

    pool = Workers("uitest", max_workers=4)
    try:
        yield pool
    finally:
        left = pool.shutdown(timeout=10)
        assert not left, f"threads still running after the test: {left}"


@pytest.fixture
def site_model(site, workers):
    from app.credentials import Credentials
    from app.nodes import SiteModel

    model = SiteModel(site, Credentials(), workers)
    try:
        yield model
    finally:
        model.close()


_guard: list[object] = []


def _pyside_guard() -> None:
    """Once per session: compensate PySide6 6.12.0's lost references (see ui.qtcheck)."""
    if not _guard:
        from ui.qtcheck import protect

        _guard.append(protect(timer=False))


@pytest.fixture(autouse=True)
def _no_stray_threads(request: pytest.FixtureRequest) -> Iterator[None]:
    """A view test must end with the threads it found (workers joined, no timers' threads)."""
    if not request.module.__name__.rsplit(".", 1)[-1].startswith(UI_TESTS):
        yield
        return
    _pyside_guard()
    before = {t.ident for t in threading.enumerate()}
    yield
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        extra = [t for t in threading.enumerate() if t.ident not in before and t.is_alive()]
        if not extra:
            return
        extra[0].join(0.1)
    names = [t.name for t in threading.enumerate() if t.ident not in before]
    raise AssertionError(f"threads left running by the test: {names}")


def distinct_colours(image, samples: int = 64) -> int:
    """How many different colours a grid of pixels of a QImage has (1 = blank)."""
    width, height = image.width(), image.height()
    assert width > 0 and height > 0, "empty image"
    seen = set()
    for i in range(samples):
        for j in range(samples):
            seen.add(
                image.pixel(i * (width - 1) // (samples - 1), j * (height - 1) // (samples - 1))
            )
    return len(seen)
