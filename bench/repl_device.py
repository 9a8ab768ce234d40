"""The secondary's own device in the replication benchmark: ext4 on a RAM-backed loop device.

On a real site the secondary is another machine with its own disk. The
benchmark's pair runs on one machine, and by default every directory is on
the same disk (/var/tmp): the secondary's writes, fsyncs and dirty-log commits
then compete with the primary's and with the unreplicated baseline's, which
no deployment does. ``own_device()`` gives the secondary a filesystem of its
own instead: an ext4 image in tmpfs (/dev/shm), attached to a loop device and
mounted. fsync there is a real fsync of a real filesystem (ext4 journal
commit, cache flush request to the block device), but the device is memory:
it models a secondary whose disk is never the bottleneck, so figures
measured this way are an upper bound for two machines with equal disks, the
same-disk figures a lower bound. Only the secondary's side moves: the
primary and the baseline stay on the disk under test.

The image and the loop device are always removed, even when the benchmark
fails; ``losetup --detach`` of a device still held (a lab host created
meanwhile copied the mount) only marks it to detach once free.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from node_service.errors import RampartError

SHM = "/dev/shm"
MiB = 1024 * 1024
# ext4's own metadata and journal, on top of what the benchmark writes there
OVERHEAD = 256 * MiB
# tmpfs pages are memory: leave this much available to everyone else
MEMORY_SPARE = 4 * 1024 * MiB


class DeviceError(RampartError):
    """The secondary's own device could not be made or removed."""


def image_size(wanted: int, shm_free: int, mem_available: int) -> int:
    """Bytes for the image holding ``wanted`` bytes of files, or 0 if memory is short (pure)."""
    size = wanted + OVERHEAD
    if size > shm_free or size > mem_available - MEMORY_SPARE:
        return 0
    return size


def mem_available(meminfo: str) -> int:
    """``MemAvailable`` in bytes from the text of /proc/meminfo (pure)."""
    for line in meminfo.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise DeviceError("/proc/meminfo has no MemAvailable line; expected Linux 3.14 or later")


def room_for(wanted: int) -> int:
    """The image size that fits this machine's tmpfs and memory now (0: none)."""
    free = shutil.disk_usage(SHM).free
    return image_size(wanted, free, mem_available(Path("/proc/meminfo").read_text()))


def _run(*args: str) -> str:
    try:
        done = subprocess.run(list(args), capture_output=True, text=True, timeout=60, check=False)
    except subprocess.TimeoutExpired:
        raise DeviceError(f"{' '.join(args)}: no answer within 60 s") from None
    if done.returncode != 0:
        raise DeviceError(f"{' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done.stdout.strip()


@contextmanager
def own_device(tag: str, mountpoint: Path, size: int) -> Iterator[Path]:
    """A fresh ext4 of ``size`` bytes mounted at ``mountpoint``; removed on exit."""
    image = Path(SHM) / f"{tag}.img"
    loop = ""
    mounted = False
    try:
        with open(image, "wb") as f:
            f.truncate(size)  # sparse: tmpfs holds only what is written
        _run("mkfs.ext4", "-q", "-F", "-L", tag[:16], str(image))
        loop = _run("losetup", "--find", "--show", str(image))
        mountpoint.mkdir(parents=True, exist_ok=True)
        _run("mount", "-t", "ext4", loop, str(mountpoint))
        mounted = True
        yield mountpoint
    finally:
        if mounted:
            try:
                _run("umount", str(mountpoint))
            except DeviceError:
                try:
                    _run("umount", "-l", str(mountpoint))
                except DeviceError:
                    pass  # the loop device below is detached when free
        if loop:
            try:
                _run("losetup", "--detach", loop)
            except DeviceError:
                pass  # marked autoclear: it goes once its last user does
        image.unlink(missing_ok=True)
