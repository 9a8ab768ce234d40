"""A resync piece read straight into the frame that carries it.

The data phase sends files in pieces of ``PIECE`` bytes, one ``Write``
operation each. Built the ordinary way a piece is copied twice in this
process before TLS sees it: ``os.pread`` returns it, then ``ops.encode``
joins it behind the dir index and the operation's fields. Here the
payload's bytes are laid out first and the file is read into their tail
(``os.preadv``, the GIL released): the kernel's copy is the only one, and
the wire bytes are exactly those of ``frames.op_payload(index,
ops.encode(write))``.

``PIECE`` is larger than the secondary's ``INLINE_APPLY_BYTES``: a sync
secondary applies a read of at most one FUSE write in its receiving thread,
so with 1 MiB pieces it read, decrypted, wrote to disk and acknowledged one
piece after the other, with the apply thread idle. A larger piece goes to
the apply thread, which writes it while the receiving thread opens the next
(measured: docs/dev/replication.md, "Reintegration and full sync").
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from node_service.replication import frames, ops
from node_service.replication.receiver import INLINE_APPLY_BYTES

PIECE = 2 * 1024 * 1024
assert PIECE > INLINE_APPLY_BYTES, "a resync piece must go to the secondary's apply thread"
_LENGTH = struct.Struct(">I")  # ops' length prefix of a bytes field


@dataclass(frozen=True)
class Piece:
    """One ``Write`` of a resync and the OP frame payload that carries it."""

    op: ops.Write  # for the sender's bookkeeping (regions, handle); data is a view of payload
    payload: bytearray


def write_head(index: int, handle: int, offset: int, mtime_ns: int, length: int) -> bytes:
    """The payload's bytes before the data of a ``Write`` of ``length`` bytes (pure).

    ``Write.data`` is the record's last field, so an encoded empty write ends
    with the data's length prefix: only those 4 bytes change.
    """
    empty = frames.op_payload(index, ops.encode(ops.Write(handle, offset, mtime_ns, b"")))
    return empty[: -_LENGTH.size] + _LENGTH.pack(length)


def read_piece(
    fd: int, index: int, handle: int, offset: int, length: int, mtime_ns: int
) -> Piece | None:
    """Read up to ``length`` bytes at ``offset`` into a new payload; None past the end."""
    head = write_head(index, handle, offset, mtime_ns, length)
    payload = bytearray(len(head) + length)
    payload[: len(head)] = head
    got = 0
    with memoryview(payload) as view:
        while got < length:  # a read may return less; 0 is the end of the file
            n = os.preadv(fd, [view[len(head) + got :]], offset + got)
            if n == 0:
                break
            got += n
    if got == 0:
        return None
    if got < length:  # the application truncated the file since the size was taken
        del payload[len(head) + got :]
        payload[len(head) - _LENGTH.size : len(head)] = _LENGTH.pack(got)
    data = memoryview(payload)[len(head) :]
    return Piece(ops.Write(handle, offset, mtime_ns, data), payload)  # type: ignore[arg-type]
