"""The .safe format's pure rules: entry names, structure, manifest, listing."""

from __future__ import annotations

import stat
import zipfile

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node_service.errors import UnsafeArchiveError
from node_service.module.safe_format import (
    MAX_ENTRIES,
    MAX_TOTAL_BYTES,
    Manifest,
    ManifestEntry,
    ZipEntry,
    dtd_problem,
    listing_problem,
    manifest_bytes,
    parse_manifest,
    path_problem,
    structure_problem,
)

SIGNER = bytes(range(32))
HASH = "ab" * 32


@pytest.mark.parametrize(
    "name", ["userconfig.xml", "bin/start_prim", "README.md", "docs/a b/ü.txt", "a/b/c/d"]
)
def test_plain_relative_paths_are_accepted(name):
    assert path_problem(name) is None


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "empty name"),
        ("/etc/passwd", "absolute path"),
        ("C:/boot.ini", "absolute path"),
        ("c:evil", "absolute path"),
        ("..", "'..' component"),
        ("a/../../b", "'..' component"),
        ("a\\b", "backslash"),
        ("./a", "'.' component"),
        ("a//b", "empty path component"),
        ("bin/", "directory entry"),
        ("a\nb", "control character"),
        ("a\x00b", "control character"),
        ("x" * 2000, "longer than 1024 bytes"),
    ],
)
def test_unsafe_paths_have_a_reason(name, reason):
    assert reason in path_problem(name)


@given(st.text(min_size=1, max_size=40))
def test_an_accepted_path_never_leaves_the_module(name):
    # Whatever the name, if it is accepted it is a plain relative path below
    # the module directory.
    if path_problem(name) is None:
        parts = name.split("/")
        assert not name.startswith("/") and "\\" not in name
        assert all(p not in ("", ".", "..") for p in parts)


def test_structure_refuses_types_by_their_zip_attributes():
    link = ZipEntry("bin/x", external_attr=(stat.S_IFLNK | 0o777) << 16)
    socket = ZipEntry("s", external_attr=(stat.S_IFSOCK | 0o777) << 16)
    dos_dir = ZipEntry("d", external_attr=0x10)
    assert "symlink" in structure_problem([link])
    assert "socket" in structure_problem([socket])
    assert "directory" in structure_problem([dos_dir])
    assert structure_problem([ZipEntry("plain", external_attr=0)]) is None  # no unix bits


def test_structure_checks_count_before_names():
    entries = [ZipEntry(f"../{i}") for i in range(MAX_ENTRIES + 1)]
    assert "more than 10,000 entries" in structure_problem(entries)


def test_structure_checks_declared_sizes_and_ratios():
    big = [ZipEntry("a", file_size=MAX_TOTAL_BYTES, compress_size=MAX_TOTAL_BYTES),
           ZipEntry("b", file_size=1, compress_size=1)]  # fmt: skip
    assert "256 MiB" in structure_problem(big)
    assert "ratio of 201" in structure_problem([ZipEntry("z", file_size=201, compress_size=1)])
    assert structure_problem([ZipEntry("z", file_size=200, compress_size=1)]) is None
    assert "ratio" in structure_problem([ZipEntry("z", file_size=500, compress_size=0)])


def test_structure_refuses_odd_zip_features():
    assert "encrypted" in structure_problem([ZipEntry("e", flag_bits=1)])
    lzma = ZipEntry("l", compress_type=zipfile.ZIP_LZMA)
    assert "compression method 14" in structure_problem([lzma])
    assert "duplicate" in structure_problem([ZipEntry("a"), ZipEntry("a")])
    assert "both a file" in structure_problem([ZipEntry("a"), ZipEntry("a/b")])


def manifest(*entries: ManifestEntry) -> Manifest:
    return Manifest("web", "1.2", SIGNER, entries)


def test_manifest_bytes_round_trip_and_are_canonical():
    m = manifest(
        ManifestEntry("userconfig.xml", 10, HASH, 0o644),
        ManifestEntry("bin/start_prim", 5, HASH, 0o755),
    )
    data = manifest_bytes(m)
    parsed = parse_manifest(data)
    assert parsed.entries == tuple(sorted(m.entries, key=lambda e: e.path))
    assert (parsed.name, parsed.version, parsed.signer) == ("web", "1.2", SIGNER)
    assert manifest_bytes(parsed) == data
    assert data.endswith(b"\n") and b'"mode": "0755"' in data


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xff\xfe", "not UTF-8"),
        (b"[" * 100_000, "nested too deeply"),
        (b'{"format": 1', "malformed JSON (line 1"),
        (b'"text"', "must be a JSON object, not a string"),
        (b"{}", "has no 'entries' field"),
    ],
)
def test_malformed_manifests_have_a_reason(data, reason):
    with pytest.raises(UnsafeArchiveError, match=reason.replace("(", r"\(")):
        parse_manifest(data)


def test_manifest_fields_are_type_checked():
    good = manifest_bytes(manifest(ManifestEntry("userconfig.xml", 1, HASH, 0o644)))
    for old, new, reason in [
        (b'"size": 1', b'"size": true', "'size' must be a byte count"),
        (b'"size": 1', b'"size": -1', "'size' must be a byte count"),
        (b'"sha256": "ab', b'"sha256": "AB', "64 lowercase hex"),
        (b'"mode": "0644"', b'"mode": 420', "'mode' must be"),
        (b'"name": "web"', b'"name": ""', "'name' must be a non-empty string"),
        (b'"signer": "', b'"signer": "!!', "'signer' must be a base64 Ed25519"),
        (b'"format": 1', b'"format": "1"', "format '1' is not supported"),
        (b'"path": "userconfig.xml"', b'"path": "../x"', "'..' component"),
        (b'"path": "userconfig.xml"', b'"path": "u", "x": 1', "unknown field 'x'"),
    ]:
        assert old in good, old
        with pytest.raises(UnsafeArchiveError, match=reason):
            parse_manifest(good.replace(old, new))


def test_listing_compares_names_and_declared_sizes():
    m = manifest(ManifestEntry("userconfig.xml", 10, HASH, 0o644))
    head = [ZipEntry("MANIFEST.json"), ZipEntry("MANIFEST.sig")]
    assert listing_problem([*head, ZipEntry("userconfig.xml", file_size=10)], m) is None
    assert "not listed" in listing_problem([*head, ZipEntry("userconfig.xml", file_size=10),
                                            ZipEntry("x")], m)  # fmt: skip
    assert "no such entry" in listing_problem(head, m)
    assert "says 10 bytes" in listing_problem([*head, ZipEntry("userconfig.xml", file_size=9)], m)
    no_config = manifest(ManifestEntry("README.md", 0, HASH, 0o644))
    assert "no userconfig.xml" in listing_problem([*head, ZipEntry("README.md")], no_config)


def test_dtd_is_found_with_its_line():
    problem = dtd_problem(
        b'<?xml version="1.0"?>\n\n<!DOCTYPE x SYSTEM "file:///etc/passwd">\n<x/>'
    )
    assert str(problem) == "userconfig.xml:3: DTD and entity declarations are not allowed"
    assert dtd_problem(b"<module/>") is None
