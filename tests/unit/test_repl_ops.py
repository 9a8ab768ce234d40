"""Operation records: codec round trips, refusals of malformed records, regions."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node_service.errors import RampartError
from node_service.replication import ops
from node_service.replication.ops import (
    ENTRY,
    META,
    REGION_SIZE,
    Chmod,
    Chown,
    Fallocate,
    Fsync,
    HandlePaths,
    Link,
    Mkdir,
    Mknod,
    Open,
    OpFormatError,
    OpPathError,
    Region,
    Release,
    Rename,
    Rmdir,
    Stamp,
    Symlink,
    Truncate,
    Unlink,
    Utimens,
    Write,
    decode,
    encode,
    regions,
)

FIVE_GIB = 5 * 1024**3
STAMPS = (Stamp("", 1), Stamp("dir", 1_700_000_000_123_456_789))

EXAMPLES = [
    Open(7, "dir/new file", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640, 1000, 1000, True, STAMPS),
    Write(7, FIVE_GIB, 1_700_000_000_000_000_001, b"\x00payload\xff"),
    Write(7, 0, 0, b""),
    Truncate(7, "", 12345, 5),
    Truncate(0, "a/b", 0, -5),
    Fsync(7, True),
    Fallocate(7, 0x03, FIVE_GIB, REGION_SIZE, 9),
    Release(7),
    Mkdir("d\udcff/é", 0o2775, 0, 50, STAMPS),
    Rmdir("d", STAMPS),
    Unlink("d/f", ()),
    Rename("a", "b/c", STAMPS),
    Symlink("lnk", "/etc/passwd", 1, 2, STAMPS),
    Link("a", "b", ()),
    Mknod("fifo", 0o10644, 3, 4, ()),
    Chmod(0, "", 0o755),
    Chmod(9, "", 0o4755),
    Chown(0, "x", -1, 100),
    Utimens(0, "x", -1, 2**62),
]


@pytest.mark.parametrize("op", EXAMPLES, ids=lambda op: type(op).__name__)
def test_every_operation_survives_the_codec(op):
    record = encode(op)
    assert record[0] == ops.CODEC_VERSION
    assert decode(record) == op
    assert decode(memoryview(record)) == op


def test_every_operation_class_has_an_example_and_a_unique_code():
    assert {type(op) for op in EXAMPLES} == set(ops.OPS)
    assert len({cls.CODE for cls in ops.OPS}) == len(ops.OPS)


def test_write_record_is_header_plus_three_integers_plus_data():
    record = encode(Write(1, 2, 3, b"x" * 100))
    assert len(record) == 2 + 3 * 8 + 4 + 100
    assert record.endswith(b"x" * 100)


@given(
    handle=st.integers(1, 2**63 - 1),
    offset=st.integers(0, 2**63 - 1),
    mtime=st.integers(-(2**63), 2**63 - 1),
    data=st.binary(max_size=2048),
)
def test_write_round_trips_for_any_values(handle, offset, mtime, data):
    op = Write(handle, offset, mtime, data)
    assert decode(encode(op)) == op


_name = st.text(
    st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)), min_size=1, max_size=20
).filter(lambda s: s not in (".", ".."))


@given(parts=st.lists(_name, min_size=1, max_size=4), mode=st.integers(0, 0o7777))
def test_paths_of_any_names_round_trip(parts, mode):
    op = Mkdir("/".join(parts), mode, 0, 0, (Stamp("/".join(parts[:-1]), 1),))
    assert decode(encode(op)) == op


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (b"", "shorter than its header"),
        (b"\x01", "shorter than its header"),
        (b"\x09\x02", "version 9"),
        (b"\x01\xee", "unknown operation code 238"),
        (b"\x01\x02\x00", "Write: record truncated"),
    ],
)
def test_malformed_records_are_refused_with_a_reason(record, message):
    with pytest.raises(OpFormatError, match=message) as info:
        decode(record)
    assert isinstance(info.value, RampartError)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("op", EXAMPLES, ids=lambda op: type(op).__name__)
def test_every_truncation_of_a_record_is_refused(op):
    record = encode(op)
    for cut in range(len(record)):
        with pytest.raises(OpFormatError):
            decode(record[:cut])


def test_trailing_bytes_are_refused():
    with pytest.raises(OpFormatError, match="1 trailing bytes"):
        decode(encode(Release(1)) + b"\x00")


def test_a_forged_huge_data_length_is_refused_before_allocating():
    record = struct.pack(">BBqqqI", 1, Write.CODE, 1, 0, 0, 2**31)
    with pytest.raises(OpFormatError, match="exceeds"):
        decode(record)


@pytest.mark.parametrize(
    "path",
    ["/etc/passwd", "../x", "a/../../x", "a//b", "a/", "./a", "a/.", "nul\0byte", ""],
)
def test_paths_leaving_the_tree_are_refused_in_records(path):
    with pytest.raises(OpPathError):
        Unlink(path)
    # the same path forged into raw bytes is refused by decode
    raw = path.encode("utf-8", "surrogateescape")
    forged = struct.pack(">BBH", 1, Unlink.CODE, len(raw)) + raw + struct.pack(">H", 0)
    with pytest.raises(OpPathError):
        decode(forged)


def test_root_is_allowed_only_for_attributes_and_stamps():
    assert Chmod(0, "", 0o700).path == ""
    assert Stamp("", 0).path == ""
    with pytest.raises(OpPathError, match=r"Rmdir\.path: empty path"):
        Rmdir("")
    with pytest.raises(OpPathError, match=r"Rename\.dst"):
        Rename("a", "")
    with pytest.raises(OpPathError, match="stamp"):
        Stamp("../up", 0)


def test_symlink_targets_may_point_anywhere_but_not_be_empty():
    assert Symlink("l", "../../outside", 0, 0).target == "../../outside"
    with pytest.raises(OpPathError, match="empty or contains NUL"):
        Symlink("l", "", 0, 0)


# -- regions ----------------------------------------------------------------


def paths(mapping):
    return mapping.get


def test_a_write_dirties_every_region_it_touches_even_beyond_4_gib():
    path_of = paths({3: "big"})
    start = FIVE_GIB - 10
    dirty = regions(Write(3, start, 0, b"x" * 20), path_of)
    assert dirty == [Region("big", start // REGION_SIZE), Region("big", start // REGION_SIZE + 1)]
    assert regions(Write(3, REGION_SIZE, 0, b"x" * REGION_SIZE), path_of) == [Region("big", 1)]


def test_an_unlinked_handle_dirties_nothing():
    assert regions(Write(4, 0, 0, b"x"), paths({4: None})) == []
    assert regions(Fallocate(4, 0, 0, 10, 0), paths({})) == []


def test_truncate_and_fallocate_mark_the_size_change():
    assert regions(Truncate(0, "f", REGION_SIZE * 3 + 1, 0), paths({})) == [
        Region("f", 3),
        Region("f", META),
    ]
    assert regions(Fallocate(2, 0, 0, REGION_SIZE + 1, 0), paths({2: "g"})) == [
        Region("g", 0),
        Region("g", 1),
        Region("g", META),
    ]


def test_namespace_operations_mark_entries_and_stamped_parents():
    assert regions(Rename("a", "d/b", (Stamp("d", 1),)), paths({})) == [
        Region("a", ENTRY),
        Region("d/b", ENTRY),
        Region("d", META),
    ]
    created = Open(1, "d/f", os.O_WRONLY | os.O_CREAT, 0o600, 0, 0, True, (Stamp("d", 1),))
    assert regions(created, paths({})) == [Region("d/f", ENTRY), Region("d", META)]
    plain = Open(1, "d/f", os.O_WRONLY, 0o600, 0, 0, False)
    assert regions(plain, paths({})) == []
    assert regions(Chown(5, "", 1, 1), paths({5: "x"})) == [Region("x", META)]
    assert regions(Utimens(0, "y", 1, 1), paths({})) == [Region("y", META)]
    assert regions(Fsync(1, False), paths({})) == []


def test_handle_paths_follow_renames_of_files_and_parents_and_unlinks():
    track = HandlePaths()
    track.follow(Open(1, "d/f", os.O_WRONLY, 0, 0, 0, False))
    track.follow(Open(2, "g", os.O_WRONLY, 0, 0, 0, False))
    track.follow(Rename("d", "e"))
    assert track(1) == "e/f"
    track.follow(Rename("e/f", "g"))  # over the file handle 2 has open
    assert (track(1), track(2)) == ("g", None)
    track.follow(Unlink("g"))
    assert track(1) is None
    track.follow(Release(1))
    assert track(1) is None
    assert track(99) is None


def test_describe_never_prints_file_data():
    text = ops.describe(Write(1, 2, 3, b"secret"))
    assert "secret" not in text
    assert "<6 bytes>" in text


def test_encode_with_the_frame_prefix_is_the_op_payload_in_one_piece():
    from node_service.replication import frames

    data = os.urandom(300_000)
    for op in (Write(3, 4096, 77, data), Write(3, 0, 77, memoryview(data)[1:]), Fsync(3, True)):
        whole = encode(op, frames.dir_prefix(9))
        assert whole == frames.op_payload(9, encode(op))
        assert decode(memoryview(whole)[2:]) == op
