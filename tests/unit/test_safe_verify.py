"""Hostile `.safe` files: every refusal, through `module verify` AND `module extract`.

Each case forges an archive (signed by the TRUSTED key whenever the point is
to reach a check that comes after the signature), then asserts for both
commands: non-zero exit, exactly one line on stderr naming the problem, no
traceback, DEST absent or empty, and nothing written anywhere else.
"""

from __future__ import annotations

import stat
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from node_service.errors import (
    RampartError,
    SignatureError,
    UnsafeArchiveError,
    ValidationError,
)
from node_service.module import keys, safe
from tests.unit.safe_forge import (
    Member,
    forge,
    manifest_doc,
    manifest_json,
    module_members,
    patch_central,
    patch_entry_count,
    replace,
    userconfig_of,
)

Case = Callable[[Path, Ed25519PrivateKey, Ed25519PrivateKey], None]


@pytest.fixture
def work(tmp_path: Path) -> Path:
    (tmp_path / "keys").mkdir()
    (tmp_path / "parent").mkdir()
    return tmp_path


@pytest.fixture
def trusted(work: Path) -> tuple[Ed25519PrivateKey, Path]:
    key_path, pub_path = keys.generate(work / "keys" / "trusted")
    return keys.load_private(key_path), pub_path


@pytest.fixture
def stranger(work: Path) -> Ed25519PrivateKey:
    key_path, _ = keys.generate(work / "keys" / "stranger")
    return keys.load_private(key_path)


def snapshot(root: Path) -> list[tuple[str, int, int]]:
    return sorted(
        (p.relative_to(root).as_posix(), p.lstat().st_size if p.is_file() else 0, p.lstat().st_mode)
        for p in root.rglob("*")
    )


def assert_refused(rampart, work: Path, safe_path: Path, pub: Path, *words: str) -> str:
    """Both verify and extract refuse with one line holding `words`; nothing is written."""
    before = snapshot(work)
    dest = work / "parent" / "dest"
    lines = []
    for argv in (
        ("module", "verify", safe_path, "--trust", pub),
        ("module", "extract", safe_path, dest, "--trust", pub),
    ):
        result = rampart(*argv)
        assert result.rc != 0, (argv, result)
        assert result.out == ""
        assert "Traceback" not in result.err
        assert len(result.err_lines) == 1, result.err
        line = result.err_lines[0]
        assert line.startswith("rampart: ")
        for word in words:
            assert word.lower() in line.lower(), (word, line)
        assert not dest.exists() or not any(dest.iterdir())
        assert snapshot(work) == before, "something was written outside DEST"
        lines.append(line)
    assert lines[0] == lines[1]  # same reason from both commands
    return lines[0]


# --- the cases ---------------------------------------------------------------
# Each writes the hostile archive at `p`; `key` is trusted, `other` is not.


def _members() -> list[Member]:
    return module_members()


def not_a_zip(p, key, other):
    p.write_bytes(b"this is a shell script, not a module\n" * 20)


def empty_file(p, key, other):
    p.write_bytes(b"")


def truncated(p, key, other):
    forge(p, _members(), key)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def missing_manifest(p, key, other):
    forge(p, _members(), key, with_manifest=False)


def missing_signature(p, key, other):
    forge(p, _members(), key, with_signature=False)


def altered_after_signing(p, key, other):
    doc = manifest_doc(_members(), key)
    signature = key.sign(manifest_json(doc))
    doc["entries"][0]["mode"] = "0755"  # changed after the signature was made
    forge(p, _members(), key, manifest=doc, signature=signature)


def short_signature(p, key, other):
    forge(p, _members(), key, signature=b"\x00" * 10)


def garbage_signature(p, key, other):
    forge(p, _members(), key, signature=bytes(range(64)))


def untrusted_signer(p, key, other):
    forge(p, _members(), other)


def entry_not_in_manifest(p, key, other):
    members = _members()
    forge(p, [*members, Member("bin/backdoor", b"#!/bin/sh\n", 0o100755)], key, listed=members)


def manifest_entry_missing(p, key, other):
    members = _members()
    forge(p, members, key, listed=[*members, Member("bin/poststop", b"#!/bin/sh\n", 0o100755)])


def hash_mismatch(p, key, other):
    members = _members()
    original = next(m.data for m in members if m.name == "bin/start_prim")
    evil = b"#!/bin/sh\nrm -rf /srv/data\n".ljust(len(original), b"#")
    forge(p, replace(members, "bin/start_prim", evil), key, listed=members)


def size_mismatch(p, key, other):
    members = _members()
    forge(p, replace(members, "README.md", b"short"), key, listed=members)


def absolute_path(p, key, other):
    forge(p, [*_members(), Member("/etc/cron.d/rampart", b"* * * * * root sh\n")], key)


def drive_letter(p, key, other):
    forge(p, [*_members(), Member("C:/Windows/evil.txt", b"x")], key)


def dotdot(p, key, other):
    forge(p, [*_members(), Member("bin/../../escape.txt", b"x")], key)


def leading_dotdot(p, key, other):
    forge(p, [*_members(), Member("../escape.txt", b"x")], key)


def backslash(p, key, other):
    forge(p, [*_members(), Member("..\\escape.txt", b"x")], key)


def symlink_entry(p, key, other):
    forge(p, [*_members(), Member("bin/shadow", b"/etc/shadow", stat.S_IFLNK | 0o777)], key)


def char_device(p, key, other):
    forge(p, [*_members(), Member("dev/mem", b"", stat.S_IFCHR | 0o600)], key)


def block_device(p, key, other):
    forge(p, [*_members(), Member("dev/sda", b"", stat.S_IFBLK | 0o600)], key)


def fifo_entry(p, key, other):
    forge(p, [*_members(), Member("run/fifo", b"", stat.S_IFIFO | 0o600)], key)


def directory_entry(p, key, other):
    forge(p, [Member("bin/", b"", stat.S_IFDIR | 0o755), *_members()], key)


def duplicate_name(p, key, other):
    members = _members()
    forge(p, [*members, Member("bin/start_prim", b"#!/bin/sh\nevil\n", 0o100755)], key)


def file_and_directory(p, key, other):
    forge(p, [*_members(), Member("bin", b"not a directory")], key)


def too_many_entries(p, key, other):
    forge(p, [*_members(), *(Member(f"data/{i}") for i in range(10_000))], key)


def declared_entry_count(p, key, other):
    forge(p, _members(), key)
    patch_entry_count(p, 0xFFFF)  # also what a zip64 archive says


def declared_total_size(p, key, other):
    forge(p, [*_members(), Member("data/blob", b"x" * 1000, compress=zipfile.ZIP_STORED)], key)
    patch_central(p, "data/blob", file_size=300 * 1024 * 1024)


def compression_ratio(p, key, other):
    forge(p, [*_members(), Member("data/zeros", bytes(2_000_000))], key)


def header_understates_size(p, key, other):
    # The central directory claims 100 bytes and the manifest agrees, but the
    # entry really holds more: reading stops at what was declared and refuses.
    blob = bytes(range(256)) * 64
    members = _members()
    forge(
        p,
        [*members, Member("data/blob", blob)],
        key,
        listed=[*members, Member("data/blob", blob[:100])],
    )
    patch_central(p, "data/blob", file_size=100)


def encrypted_entry(p, key, other):
    forge(p, _members(), key)
    blob = bytearray(p.read_bytes())
    at = blob.find(b"PK\x01\x02")
    blob[at + 8] |= 0x1
    p.write_bytes(bytes(blob))


def unsupported_compression(p, key, other):
    forge(p, [*_members(), Member("data/x", b"hello" * 100, compress=zipfile.ZIP_BZIP2)], key)


def dtd_entities(p, key, other):
    xml = (
        b'<?xml version="1.0"?>\n<!DOCTYPE module [\n<!ENTITY a "aaaaaaaaaa">\n'
        b'<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">\n]>\n'
        b'<module name="mirror" kind="mirror">&b;</module>\n'
    )
    forge(p, replace(_members(), "userconfig.xml", xml), key)


def dtd_in_utf16(p, key, other):
    # The byte scan cannot see this one; the XML parser must refuse it too.
    xml = (
        '<?xml version="1.0" encoding="UTF-16"?>\n<!DOCTYPE m [<!ENTITY a "b">]>\n'
        '<module name="mirror" kind="mirror">&a;</module>\n'
    ).encode("utf-16")
    forge(p, replace(_members(), "userconfig.xml", xml), key)


def unknown_xml_encoding(p, key, other):
    xml = userconfig_of(_members()).replace(b'encoding="UTF-8"', b'encoding="klingon"')
    forge(p, replace(_members(), "userconfig.xml", xml), key)


def invalid_userconfig(p, key, other):
    xml = userconfig_of(_members())
    xml = xml.replace(b'prefix="24"', b'prefix="99"').replace(b"<nodes>", b"<nodes><frob/>")
    forge(p, replace(_members(), "userconfig.xml", xml), key)


def unknown_element(p, key, other):
    xml = userconfig_of(_members()).replace(b"</module>", b"  <frobnicate/>\n</module>")
    forge(p, replace(_members(), "userconfig.xml", xml), key)


def no_userconfig(p, key, other):
    forge(p, [m for m in _members() if m.name != "userconfig.xml"], key)


def manifest_not_json(p, key, other):
    forge(p, _members(), key, manifest=b'{"format": 1, "name": ')


def manifest_not_object(p, key, other):
    forge(p, _members(), key, manifest=b"[1, 2, 3]\n")


def manifest_wrong_type(p, key, other):
    doc = manifest_doc(_members(), key)
    doc["entries"][0]["size"] = str(doc["entries"][0]["size"])
    forge(p, _members(), key, manifest=doc)


def manifest_duplicate_key(p, key, other):
    data = manifest_json(manifest_doc(_members(), key)).replace(
        b'"name": "mirror"', b'"name": "mirror", "name": "evil"'
    )
    forge(p, _members(), key, manifest=data)


def manifest_setuid_mode(p, key, other):
    doc = manifest_doc(_members(), key)
    doc["entries"][0]["mode"] = "4755"
    forge(p, _members(), key, manifest=doc)


def manifest_missing_field(p, key, other):
    doc = manifest_doc(_members(), key)
    del doc["version"]
    forge(p, _members(), key, manifest=doc)


def manifest_future_format(p, key, other):
    doc = manifest_doc(_members(), key)
    doc["format"] = 99
    forge(p, _members(), key, manifest=doc)


def manifest_lists_itself(p, key, other):
    doc = manifest_doc(_members(), key)
    doc["entries"].append({"path": "MANIFEST.sig", "size": 64, "sha256": "0" * 64, "mode": "0644"})
    forge(p, _members(), key, manifest=doc)


def manifest_name_mismatch(p, key, other):
    doc = manifest_doc(_members(), key)
    doc["name"] = "payroll"
    forge(p, _members(), key, manifest=doc)


CASES: list[tuple[Case, tuple[str, ...], type[Exception]]] = [
    (not_a_zip, ("not a zip",), UnsafeArchiveError),
    (empty_file, ("empty file",), UnsafeArchiveError),
    (truncated, ("truncated zip",), UnsafeArchiveError),
    (missing_manifest, ("missing MANIFEST.json",), UnsafeArchiveError),
    (missing_signature, ("missing MANIFEST.sig",), SignatureError),
    (altered_after_signing, ("bad signature",), SignatureError),
    (short_signature, ("bad signature", "10 bytes"), SignatureError),
    (garbage_signature, ("bad signature",), SignatureError),
    (untrusted_signer, ("signed by an untrusted key", "SHA256:"), SignatureError),
    (entry_not_in_manifest, ("bin/backdoor", "not listed in MANIFEST.json"), UnsafeArchiveError),
    (manifest_entry_missing, ("bin/poststop", "no such entry"), UnsafeArchiveError),
    (hash_mismatch, ("hash mismatch", "bin/start_prim"), UnsafeArchiveError),
    (size_mismatch, ("size mismatch", "README.md"), UnsafeArchiveError),
    (absolute_path, ("absolute path", "/etc/cron.d"), UnsafeArchiveError),
    (drive_letter, ("absolute path",), UnsafeArchiveError),
    (dotdot, ("'..' component",), UnsafeArchiveError),
    (leading_dotdot, ("'..' component",), UnsafeArchiveError),
    (backslash, ("backslash",), UnsafeArchiveError),
    (symlink_entry, ("symlink", "bin/shadow"), UnsafeArchiveError),
    (char_device, ("character device",), UnsafeArchiveError),
    (block_device, ("block device",), UnsafeArchiveError),
    (fifo_entry, ("FIFO",), UnsafeArchiveError),
    (directory_entry, ("directory entry",), UnsafeArchiveError),
    (duplicate_name, ("duplicate entry", "bin/start_prim"), UnsafeArchiveError),
    (file_and_directory, ("both a file and the directory",), UnsafeArchiveError),
    (too_many_entries, ("more than 10,000 entries",), UnsafeArchiveError),
    (declared_entry_count, ("more than 10,000 entries", "65,535"), UnsafeArchiveError),
    (declared_total_size, ("256 MiB", "zip bomb"), UnsafeArchiveError),
    (compression_ratio, ("compression ratio", "data/zeros", "zip bomb"), UnsafeArchiveError),
    (header_understates_size, ("damaged entry", "data/blob"), UnsafeArchiveError),
    (encrypted_entry, ("encrypted",), UnsafeArchiveError),
    (unsupported_compression, ("compression method",), UnsafeArchiveError),
    (dtd_entities, ("userconfig.xml:2", "DTD"), ValidationError),
    (dtd_in_utf16, ("userconfig.xml:", "DTD"), ValidationError),
    (unknown_xml_encoding, ("userconfig.xml:1", "klingon"), ValidationError),
    (
        invalid_userconfig,
        ("invalid userconfig", "userconfig.xml:", "more problem"),
        ValidationError,
    ),
    (unknown_element, ("userconfig.xml:", "unknown element <frobnicate>"), ValidationError),
    (no_userconfig, ("no userconfig.xml",), UnsafeArchiveError),
    (manifest_not_json, ("MANIFEST.json", "malformed JSON"), UnsafeArchiveError),
    (manifest_not_object, ("MANIFEST.json", "JSON object"), UnsafeArchiveError),
    (manifest_wrong_type, ("entries[0]", "'size'"), UnsafeArchiveError),
    (manifest_duplicate_key, ("'name' twice",), UnsafeArchiveError),
    (manifest_setuid_mode, ("'mode'", "4755"), UnsafeArchiveError),
    (manifest_missing_field, ("no 'version' field",), UnsafeArchiveError),
    (manifest_future_format, ("format 99",), UnsafeArchiveError),
    (manifest_lists_itself, ("cannot sign itself",), UnsafeArchiveError),
    (
        manifest_name_mismatch,
        ("module payroll 1", "userconfig.xml says mirror 1"),
        UnsafeArchiveError,
    ),
]


@pytest.mark.parametrize(("case", "words", "error"), CASES, ids=[c[0].__name__ for c in CASES])
def test_hostile_safe_is_refused(case, words, error, rampart, work, trusted, stranger):
    key, pub = trusted
    hostile = work / "hostile.safe"
    case(hostile, key, stranger)
    line = assert_refused(rampart, work, hostile, pub, *words)
    assert str(hostile) in line  # the refusal says which file
    with pytest.raises(error):
        safe.verify(hostile, [key.public_key()])


def test_structure_is_checked_before_the_signature(rampart, work, trusted, stranger):
    # Signed by an unknown key AND hostile: the path is refused first, before
    # any signature work, because it needs no content at all.
    _, pub = trusted
    hostile = forge(work / "h.safe", [*_members(), Member("../x", b"x")], stranger)
    assert_refused(rampart, work, hostile, pub, "'..' component")


def test_signature_is_checked_before_the_manifest_is_trusted(rampart, work, trusted, stranger):
    _, pub = trusted
    doc = manifest_doc(_members(), stranger)
    doc["entries"][0]["size"] = "not a number"
    hostile = forge(work / "h.safe", _members(), stranger, manifest=doc)
    line = assert_refused(rampart, work, hostile, pub, "untrusted key")
    assert "'size'" not in line


def test_hashes_are_checked_before_the_userconfig(rampart, work, trusted):
    key, pub = trusted
    members = _members()
    bad_xml = replace(
        members, "userconfig.xml", userconfig_of(members).replace(b"<nodes>", b"<x/>")
    )
    hostile = forge(work / "h.safe", bad_xml, key, listed=members)
    assert_refused(rampart, work, hostile, pub, "size mismatch", "userconfig.xml")


def test_read_userconfig_applies_the_structural_checks(work, trusted, stranger):
    key, _ = trusted
    honest = forge(work / "ok.safe", _members(), stranger)  # no trust needed to read
    assert safe.read_userconfig(honest) == userconfig_of(_members())
    for case in (dotdot, symlink_entry, too_many_entries, hash_mismatch, compression_ratio):
        hostile = work / f"{case.__name__}.safe"
        case(hostile, key, stranger)
        with pytest.raises(UnsafeArchiveError):
            safe.read_userconfig(hostile)


def test_extract_refuses_a_non_empty_dest(rampart, work, trusted):
    key, pub = trusted
    good = forge(work / "good.safe", _members(), key)
    dest = work / "parent" / "dest"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    result = rampart("module", "extract", good, dest, "--trust", pub)
    assert result.rc == 1
    assert len(result.err_lines) == 1 and "is not empty" in result.err
    assert [p.name for p in dest.iterdir()] == ["keep.txt"]


def test_extract_into_an_existing_empty_dest(rampart, work, trusted):
    key, pub = trusted
    good = forge(work / "good.safe", _members(), key)
    dest = work / "parent" / "dest"
    dest.mkdir(mode=0o750)
    dest.chmod(0o750)
    result = rampart("module", "extract", good, dest, "--trust", pub)
    assert result.rc == 0, result.err
    assert (dest / "userconfig.xml").read_bytes() == userconfig_of(_members())
    assert stat.S_IMODE(dest.stat().st_mode) == 0o750
    assert sorted(p.name for p in (work / "parent").iterdir()) == ["dest"]


def test_forged_but_honest_archive_verifies(work, trusted):
    # The forge itself is sound: without a hostile twist the verifier accepts it.
    key, _ = trusted
    verified = safe.verify(forge(work / "ok.safe", _members(), key), [key.public_key()])
    assert (verified.name, verified.version) == ("mirror", "1")
    assert verified.signer == keys.fingerprint(key.public_key())


@pytest.fixture(scope="module")
def honest_safe(tmp_path_factory) -> tuple[bytes, Ed25519PrivateKey, Path]:
    root = tmp_path_factory.mktemp("fuzz")
    key = keys.load_private(keys.generate(root / "k")[0])
    return forge(root / "ok.safe", _members(), key).read_bytes(), key, root


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_damaged_bytes_never_escape_as_a_traceback(honest_safe, data):
    # Flip bytes anywhere, or cut the file anywhere: the verifier either
    # accepts (a byte it does not depend on) or refuses with a RampartError.
    blob, key, root = honest_safe
    mutated = bytearray(blob)
    if data.draw(st.booleans(), label="truncate"):
        del mutated[data.draw(st.integers(0, len(blob) - 1), label="cut at") :]
    else:
        for _ in range(data.draw(st.integers(1, 4), label="flips")):
            at = data.draw(st.integers(0, len(blob) - 1), label="at")
            mutated[at] ^= data.draw(st.integers(1, 255), label="xor")
    path = root / "mutated.safe"
    path.write_bytes(bytes(mutated))
    try:
        verified = safe.verify(path, [key.public_key()])
    except RampartError as exc:
        assert "\n" not in str(exc)
    else:
        # Accepted only if every byte that matters is intact.
        assert verified.entries == safe.verify(root / "ok.safe", [key.public_key()]).entries
