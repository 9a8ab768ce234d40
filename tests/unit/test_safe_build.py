"""`module build`: what goes in a .safe, reproducibility, and refused inputs."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import zipfile
from pathlib import Path

import pytest

from node_service.errors import KeyFileError, ModuleError, ValidationError
from node_service.module import keys, safe
from tests.unit.safe_forge import copy_template


@pytest.fixture
def key(tmp_path: Path) -> tuple[Path, Path]:
    return keys.generate(tmp_path / "keys")


@pytest.fixture
def module_dir(tmp_path: Path) -> Path:
    return copy_template(tmp_path / "mirror")


def entries_of(path: Path) -> list[tuple[str, int, tuple]]:
    with zipfile.ZipFile(path) as zf:
        return [(i.filename, i.external_attr >> 16, i.date_time) for i in zf.infolist()]


def test_build_writes_a_signed_manifest_of_every_file(tmp_path, key, module_dir):
    out = tmp_path / "mirror.safe"
    assert safe.build(module_dir, key[0], out) == []
    names = [name for name, _, _ in entries_of(out)]
    files = sorted(
        p.relative_to(module_dir).as_posix() for p in module_dir.rglob("*") if p.is_file()
    )
    assert names == ["MANIFEST.json", "MANIFEST.sig", *files]
    with zipfile.ZipFile(out) as zf:
        manifest_data, signature = zf.read("MANIFEST.json"), zf.read("MANIFEST.sig")
    keys.load_public(key[1]).verify(signature, manifest_data)  # raw 64-byte Ed25519
    manifest = json.loads(manifest_data)
    assert (manifest["name"], manifest["version"], manifest["format"]) == ("mirror", "1", 1)
    listed = {e["path"]: e for e in manifest["entries"]}
    assert sorted(listed) == files
    for path in files:
        data = (module_dir / path).read_bytes()
        assert listed[path]["size"] == len(data)
        assert listed[path]["sha256"] == hashlib.sha256(data).hexdigest()
        assert listed[path]["mode"] == ("0755" if path.startswith("bin/") else "0644")
    assert manifest_data == (json.dumps(manifest, sort_keys=True, indent=2) + "\n").encode()


def test_zip_attributes_are_fixed(tmp_path, key, module_dir):
    out = tmp_path / "m.safe"
    safe.build(module_dir, key[0], out)
    for name, mode, date_time in entries_of(out):
        assert date_time == (1980, 1, 1, 0, 0, 0)
        assert mode == stat.S_IFREG | (0o755 if name.startswith("bin/") else 0o644), name
    assert stat.S_IMODE(out.stat().st_mode) == 0o644


def test_build_is_reproducible(tmp_path, key, module_dir):
    a, b = tmp_path / "a.safe", tmp_path / "b.safe"
    safe.build(module_dir, key[0], a)
    safe.build(module_dir, key[0], b)
    assert a.read_bytes() == b.read_bytes()


def test_same_tree_in_another_place_with_other_mtimes_gives_the_same_bytes(tmp_path, key):
    first = copy_template(tmp_path / "one" / "mirror")
    second = copy_template(tmp_path / "two" / "elsewhere")
    for i, path in enumerate(sorted(second.rglob("*"))):
        os.utime(path, (1_000_000 + i, 2_000_000 + i))
    (second / "README.md").chmod(0o600)  # data files are stored 0644 whatever their mode
    safe.build(first, key[0], tmp_path / "one.safe")
    safe.build(second, key[0], tmp_path / "two.safe")
    assert (tmp_path / "one.safe").read_bytes() == (tmp_path / "two.safe").read_bytes()


def test_non_executable_script_is_stored_executable_with_a_warning(
    rampart, tmp_path, key, module_dir
):
    (module_dir / "bin" / "stop_prim").chmod(0o644)
    out = tmp_path / "m.safe"
    result = rampart("module", "build", module_dir, "--key", key[0], "--out", out)
    assert result.rc == 0, result.err
    assert result.err_lines == [
        "rampart: warning: bin/stop_prim is not executable; stored as executable (0755)"
    ]
    assert "built" in result.out and "mirror 1" in result.out
    modes = {name: mode for name, mode, _ in entries_of(out)}
    assert modes["bin/stop_prim"] == stat.S_IFREG | 0o755


def test_hidden_files_are_left_out_with_a_warning(tmp_path, key, module_dir):
    (module_dir / ".git").mkdir()
    (module_dir / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (module_dir / "bin" / ".start_prim.swp").write_bytes(b"\0")
    warnings = safe.build(module_dir, key[0], tmp_path / "m.safe")
    assert warnings == ["left out hidden files: .git/, bin/.start_prim.swp"]
    assert not any("/." in n or n.startswith(".") for n, _, _ in entries_of(tmp_path / "m.safe"))


def test_output_inside_the_module_dir_is_not_packed_into_itself(key, module_dir):
    out = module_dir / "mirror.safe"
    safe.build(module_dir, key[0], out)
    first = out.read_bytes()
    safe.build(module_dir, key[0], out)
    assert out.read_bytes() == first
    assert "mirror.safe" not in [n for n, _, _ in entries_of(out)]


def test_very_compressible_files_still_verify(tmp_path, key, module_dir):
    (module_dir / "zeros.bin").write_bytes(bytes(3_000_000))
    out = tmp_path / "m.safe"
    safe.build(module_dir, key[0], out)
    with zipfile.ZipFile(out) as zf:
        assert zf.getinfo("zeros.bin").compress_type == zipfile.ZIP_STORED
    assert safe.verify(out, [keys.load_public(key[1])]).name == "mirror"


def assert_build_refused(rampart, tmp_path, module_dir, key_path, *words) -> None:
    """One line naming the problem, and no output or temporary file left behind."""
    out_dir = tmp_path / "out"
    out_dir.mkdir(exist_ok=True)
    (out_dir / "m.safe").write_bytes(b"previous build")
    result = rampart("module", "build", module_dir, "--key", key_path, "--out", out_dir / "m.safe")
    assert result.rc == 1
    assert "Traceback" not in result.err and len(result.err_lines) == 1, result.err
    for word in words:
        assert word in result.err_lines[0], (word, result.err)
    assert [p.name for p in out_dir.iterdir()] == ["m.safe"]
    assert (out_dir / "m.safe").read_bytes() == b"previous build"


def test_module_dir_without_userconfig(rampart, tmp_path, key, module_dir):
    (module_dir / "userconfig.xml").unlink()
    assert_build_refused(rampart, tmp_path, module_dir, key[0], "has no userconfig.xml")
    assert_build_refused(rampart, tmp_path, tmp_path / "nowhere", key[0], "is not a directory")


def test_unknown_element_in_userconfig(rampart, tmp_path, key, module_dir):
    config = module_dir / "userconfig.xml"
    config.write_bytes(
        config.read_bytes()
        .replace(b"<nodes>", b"<frobnicate/>\n  <nodes>")
        .replace(b'prefix="24"', b'prefix="99"')
    )
    assert_build_refused(
        rampart,
        tmp_path,
        module_dir,
        key[0],
        "invalid userconfig",
        "unknown element <frobnicate>",
        "(and 1 more problem)",
    )
    with pytest.raises(ValidationError):
        safe.build(module_dir, key[0], tmp_path / "x.safe")


def test_dtd_in_userconfig(rampart, tmp_path, key, module_dir):
    config = module_dir / "userconfig.xml"
    config.write_bytes(
        config.read_bytes().replace(b"<module ", b'<!DOCTYPE m [<!ENTITY e "x">]>\n<module ', 1)
    )
    assert_build_refused(rampart, tmp_path, module_dir, key[0], "userconfig.xml:2", "DTD")


def test_symlinks_and_special_files_are_refused(rampart, tmp_path, key, module_dir):
    link = module_dir / "bin" / "start_both"
    link.symlink_to("/etc/passwd")
    assert_build_refused(rampart, tmp_path, module_dir, key[0], "bin/start_both is a symlink")
    link.unlink()
    (module_dir / "data").symlink_to("/etc", target_is_directory=True)
    assert_build_refused(rampart, tmp_path, module_dir, key[0], "data is a symlink")
    (module_dir / "data").unlink()
    os.mkfifo(module_dir / "pipe")
    assert_build_refused(rampart, tmp_path, module_dir, key[0], "pipe is a special file")


def test_names_the_verifier_would_refuse_are_refused_at_build(rampart, tmp_path, key, module_dir):
    (module_dir / "back\\slash.txt").write_text("x")
    assert_build_refused(rampart, tmp_path, module_dir, key[0], "backslash")


def test_bad_key_files(rampart, tmp_path, key, module_dir):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a key\n")
    assert_build_refused(rampart, tmp_path, module_dir, notes, "is not a PEM private key")
    assert_build_refused(rampart, tmp_path, module_dir, key[1], "is a public key")
    with pytest.raises(KeyFileError):
        safe.build(module_dir, key[1], tmp_path / "x.safe")


def test_output_directory_must_exist(rampart, tmp_path, key, module_dir):
    result = rampart(
        "module", "build", module_dir, "--key", key[0], "--out", tmp_path / "no" / "m.safe"
    )
    assert result.rc == 1 and len(result.err_lines) == 1
    assert "does not exist" in result.err
    with pytest.raises(ModuleError):
        safe.build(module_dir, key[0], tmp_path)  # a directory is not an output file
