"""Resync pieces read straight into their frame payload (resync_pieces.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from node_service.replication import frames, ops
from node_service.replication.receiver import inline_apply
from node_service.replication.resync_pieces import PIECE, read_piece, write_head

MTIME = 1_700_000_000_000_000_000


@pytest.mark.parametrize("size", [0, 1, 4096, PIECE])
def test_the_payload_is_the_ordinary_encoding_of_the_write(size):
    data = os.urandom(size)
    expected = frames.op_payload(3, ops.encode(ops.Write(2**62 + 5, 7 * PIECE, MTIME, data)))
    assert write_head(3, 2**62 + 5, 7 * PIECE, MTIME, size) + data == expected


def _file(tmp_path: Path, size: int) -> tuple[int, bytes]:
    data = os.urandom(size)
    (tmp_path / "f").write_bytes(data)
    return os.open(tmp_path / "f", os.O_RDONLY), data


def _decoded(payload: bytearray) -> ops.Op:
    frame = frames.Frame(frames.FrameType.OP, 1, bytes(payload))
    index, body = frames.split_op(frame, 2)
    assert index == 1
    return ops.decode(body)


def test_a_piece_reads_the_file_into_a_payload_the_secondary_decodes(tmp_path):
    fd, data = _file(tmp_path, 3 * PIECE)
    try:
        piece = read_piece(fd, 1, 9, PIECE, PIECE, MTIME)
    finally:
        os.close(fd)
    assert piece is not None
    assert bytes(piece.op.data) == data[PIECE : 2 * PIECE]
    assert (piece.op.offset, piece.op.handle, piece.op.mtime_ns) == (PIECE, 9, MTIME)
    assert _decoded(piece.payload) == ops.Write(9, PIECE, MTIME, data[PIECE : 2 * PIECE])


def test_a_file_truncated_since_its_size_was_taken_gives_a_shorter_piece(tmp_path):
    fd, data = _file(tmp_path, PIECE + 100)
    try:
        short = read_piece(fd, 1, 9, PIECE, PIECE, MTIME)
        past = read_piece(fd, 1, 9, 2 * PIECE, PIECE, MTIME)
    finally:
        os.close(fd)
    assert short is not None
    assert len(short.op.data) == 100
    assert _decoded(short.payload) == ops.Write(9, PIECE, MTIME, data[PIECE:])
    assert past is None  # nothing left to send: no empty Write


def test_a_piece_goes_to_the_secondary_apply_thread_a_fuse_write_does_not():
    """A piece larger than one FUSE write is applied while the next is read."""
    piece = ops.Write(1, 0, MTIME, bytes(PIECE))
    fuse_write = ops.Write(1, 0, MTIME, bytes(1024 * 1024))
    size = len(write_head(0, 1, 0, MTIME, PIECE)) + PIECE
    assert not inline_apply(False, [piece], size)
    assert inline_apply(False, [fuse_write], len(frames.op_payload(0, ops.encode(fuse_write))))
