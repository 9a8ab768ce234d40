"""Run the calling thread inside a named network namespace.

Rampart's own code always works in the namespace it runs in (a lab host's
rampartd is started inside its namespace). This helper exists for the lab and
for tests, which drive several namespaces from one process: ``setns`` moves
only the calling thread, so the rest of the process is unaffected, and
threads or subprocesses started while inside inherit the namespace.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager

from node_service.errors import RampartError, UserError

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise RampartError(f"cannot enter network namespace {what}: {os.strerror(err)}")


@contextmanager
def enter(name: str) -> Iterator[None]:
    """Run the body inside network namespace ``name`` (as in ``ip netns``)."""
    path = os.path.join(NETNS_RUN_DIR, name)
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise UserError(
            f"network namespace {name} does not exist ({path}); create it with ip netns add"
        ) from None
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target, name)
        try:
            yield
        finally:
            _setns(own, "of this process")
    finally:
        os.close(target)
        os.close(own)
