"""Small pieces of the replication process's roles (process.py), kept apart to keep it short.

``secondary_status`` is pure; ``clear_leftovers`` detaches what a crashed
run left at the replicated dirs; ``ensure_dirs`` creates missing ones;
``tracked_receiver`` makes a Receiver say when a resync completed.
"""

from __future__ import annotations

import os
from typing import Any


def tracked_receiver(base: type) -> type:
    """A Receiver that says when a resync completed (the SECOND is then up to date)."""

    class TrackedReceiver(base):  # type: ignore[misc, valid-type]
        def __init__(self, *, on_resynced: Any, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self._on_resynced = on_resynced

        def _resynced(self, conn: Any) -> None:
            super()._resynced(conn)
            if self.stale is None:
                self._on_resynced()

    return TrackedReceiver


def secondary_status(mode: str, stats: Any, synced: bool) -> dict[str, Any]:
    """The secondary's ``replication`` fields (pure): up to date only after a resync."""
    if stats.stale:
        status, reason = "stale", f"stale until a resync from the primary: {stats.stale}"
    elif synced:
        status = "uptodate"
        reason = "resync complete" + ("" if stats.connected else "; primary not connected now")
    elif stats.connected:
        status, reason = "resyncing", "connected, resync from the primary in progress"
    else:
        status, reason = "stale", "waiting for the primary to connect and resync"
    return {
        "status": status,
        "reason": reason,
        "uptodate": status == "uptodate",
        "connected": stats.connected,
        "received": stats.received,
        "written": stats.written,
        "bytes_per_s": 0,
        "lag_bytes": 0,
        "resync_remaining_bytes": 0,
    }


def clear_leftovers(dirs: tuple[str, ...]) -> int:
    """Remove what a crashed run left at the replicated dirs: a dead FUSE mount, a read-only view.

    A FUSE mount whose process died answers every call with ENOTCONN; it is
    detached lazily (``fusermount3 -u -z``) so nothing hangs on it. Returns
    how many mounts were detached.
    """
    import subprocess

    from node_service.replication.mount import mounted_at, remove_views

    detached = 0
    for d in dirs:
        path = os.path.realpath(d)
        for _ in range(8):  # bounded: stacked leftovers
            if not any(m.fstype.startswith("fuse") for m in mounted_at(path)):
                break
            subprocess.run(
                ["fusermount3", "-u", "-z", path], capture_output=True, timeout=10, check=False
            )
            detached += 1
        detached += remove_views(path)
    return detached


def ensure_dirs(dirs: tuple[str, ...]) -> list[str]:
    """Create the replicated dirs that do not exist yet (a new node); return them.

    An empty directory is what both sides agree on before the first sync, so
    creating it is safe; refusing would leave a fresh node unable to serve.
    """
    created = []
    for d in dirs:
        if not os.path.lexists(d):
            os.makedirs(d, mode=0o755, exist_ok=True)
            created.append(d)
    return created
