"""The few Linux calls the os module lacks, through libc: thin, no policy.

- ``set_mtime``: utimensat/futimens with UTIME_OMIT for the access time, so
  replicating a modification time never touches atime and costs one call.
- ``fallocate``: the real fallocate(2) with its mode bits (punch hole, keep
  size, zero range); ``os.posix_fallocate`` only knows mode 0.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

AT_SYMLINK_NOFOLLOW = 0x100
UTIME_OMIT = (1 << 30) - 2
UTIME_NOW = (1 << 30) - 1


class _Now:
    def __repr__(self) -> str:
        return "NOW"


NOW = _Now()  # set_times: this time becomes the current time

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_utimensat = _libc.utimensat
_utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_Timespec), ctypes.c_int]
_utimensat.restype = ctypes.c_int
_futimens = _libc.futimens
_futimens.argtypes = [ctypes.c_int, ctypes.POINTER(_Timespec)]
_futimens.restype = ctypes.c_int
_fallocate = _libc.fallocate64
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _times(atime_ns: int | _Now | None, mtime_ns: int | _Now | None):
    pair = (_Timespec * 2)()
    for slot, value in ((0, atime_ns), (1, mtime_ns)):
        if value is None:
            pair[slot].tv_sec, pair[slot].tv_nsec = 0, UTIME_OMIT
        elif isinstance(value, _Now):
            pair[slot].tv_sec, pair[slot].tv_nsec = 0, UTIME_NOW
        else:
            pair[slot].tv_sec, pair[slot].tv_nsec = divmod(value, 10**9)
    return pair


def set_times(
    dir_fd: int,
    name: str,
    atime_ns: int | _Now | None,
    mtime_ns: int | _Now | None,
    *,
    fd: int | None = None,
) -> None:
    """Set times of ``name`` under ``dir_fd`` (never following a symlink), or of ``fd``.

    Each time is nanoseconds since the epoch, NOW, or None to leave it as it is.
    """
    times = _times(atime_ns, mtime_ns)
    if fd is not None:
        _check(_futimens(fd, times), "futimens")
    else:
        _check(_utimensat(dir_fd, os.fsencode(name), times, AT_SYMLINK_NOFOLLOW), "utimensat")


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    _check(_fallocate(fd, mode, offset, length), "fallocate")
