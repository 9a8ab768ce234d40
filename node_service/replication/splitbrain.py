"""Split brain: keep the loser's diverging files before the resync overwrites them.

When both nodes served alone, the node that loses the election becomes
SECOND and is resynced from the winner. Every file it changed since the
split is in its dirty log (regions recorded while the peer was absent are
never forgotten), so those paths are copied, with their modes, owners and
times, under a dated folder beside the module's state:

    /var/lib/rampart/modules/M/state/split-brain/2026-11-25T17-30-00Z/srv/data/...

Nothing is silently discarded; an event names the folder. Planning is pure
(``SplitBrainCopy.plan``); ``run`` copies.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from node_service.replication.dirty import ENTRY, DirtyRegion

FOLDER = "split-brain"


def stamp(now: float) -> str:
    """A folder name that sorts by time and is valid on every filesystem."""
    return time.strftime("%Y-%m-%dT%H-%M-%SZ", time.gmtime(now))


@dataclass(frozen=True)
class SplitBrainCopy:
    folder: Path
    # (replicated dir, path inside it, whole subtree if it is a directory)
    paths: tuple[tuple[str, str, bool], ...]

    @classmethod
    def plan(
        cls,
        state_dir: Path,
        dirs: Iterable[str],
        regions: Iterable[DirtyRegion],
        now: float | None = None,
    ) -> SplitBrainCopy:
        """Which paths to keep (pure): every recorded path of a replicated dir but its root."""
        known = set(dirs)
        entries: dict[tuple[str, str], bool] = {}
        for r in regions:
            if r.dir in known and r.path:
                key = (r.dir, r.path)
                entries[key] = entries.get(key, False) or r.index == ENTRY
        paths = tuple((d, p, subtree) for (d, p), subtree in sorted(entries.items()))
        return cls(state_dir / FOLDER / stamp(time.time() if now is None else now), paths)

    def target(self, dir: str, path: str) -> Path:
        return self.folder / dir.strip("/") / path

    def run(self) -> int:
        """Copy what still exists; return how many files/links were kept."""
        copied = 0
        for dir, path, subtree in self.paths:
            source = os.path.join(os.path.realpath(dir), path)
            dest = self.target(dir, path)
            if not os.path.lexists(source):
                continue  # removed on this side since the split: nothing to keep
            dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            if os.path.isdir(source) and not os.path.islink(source):
                if subtree:
                    shutil.copytree(source, dest, symlinks=True, dirs_exist_ok=True)
                    copied += sum(len(files) for _, _, files in os.walk(dest))
                continue
            shutil.copy2(source, dest, follow_symlinks=False)
            copied += 1
        return copied
