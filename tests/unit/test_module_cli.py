"""`rampart module build|verify|inspect|extract`: the happy paths, end to end."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from node_service.module import keys, safe
from tests.unit.safe_forge import Member, copy_template, forge, module_members

# The installed entry point of the venv running the tests (.venv/bin/rampart in CI).
RAMPART = [str(Path(sys.executable).parent / "rampart")]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def site(tmp_path: Path, rampart):
    """A key pair, a second unrelated key pair and a built mirror module."""
    key, pub = keys.generate(tmp_path / "keys")
    _, other_pub = keys.generate(tmp_path / "other")
    module_dir = copy_template(tmp_path / "mirror")
    out = tmp_path / "mirror.safe"
    result = rampart("module", "build", module_dir, "--key", key, "--out", out)
    assert result.rc == 0, result.err
    return {"key": key, "pub": pub, "other_pub": other_pub, "dir": module_dir, "safe": out}


def fingerprint(pub: Path) -> str:
    return keys.fingerprint(keys.load_public(pub))


def test_build_then_verify_with_the_right_key(rampart, site):
    result = rampart("module", "verify", site["safe"], "--trust", site["pub"])
    assert result.rc == 0, result.err
    assert result.out == f"valid: mirror 1 signed by {fingerprint(site['pub'])}\n"
    assert result.err == ""


def test_verify_with_another_key_is_refused(rampart, site):
    result = rampart("module", "verify", site["safe"], "--trust", site["other_pub"])
    assert result.rc == 1
    assert result.out == ""
    assert result.err_lines == [
        f"rampart: {site['safe']}: signed by an untrusted key {fingerprint(site['pub'])} "
        "(add its public key with --trust if you trust it)"
    ]


def test_trust_may_be_repeated_or_a_directory(rampart, site, tmp_path):
    repeated = rampart(
        "module", "verify", site["safe"], "--trust", site["other_pub"], "--trust", site["pub"]
    )
    assert repeated.rc == 0 and repeated.out.startswith("valid: mirror 1")
    trust_dir = tmp_path / "trust"
    trust_dir.mkdir()
    (trust_dir / "site.pub").write_bytes(site["pub"].read_bytes())
    (trust_dir / "old.pub").write_bytes(site["other_pub"].read_bytes())
    by_dir = rampart("module", "verify", site["safe"], "--trust", trust_dir)
    assert by_dir.rc == 0 and by_dir.out == repeated.out


def test_trusting_a_private_key_is_refused(rampart, site):
    result = rampart("module", "verify", site["safe"], "--trust", site["key"])
    assert result.rc == 1
    assert len(result.err_lines) == 1 and "is a private key" in result.err


def test_extract_restores_files_and_modes(rampart, site, tmp_path):
    dest = tmp_path / "unpacked" / "mirror"
    dest.parent.mkdir()
    result = rampart("module", "extract", site["safe"], dest, "--trust", site["pub"])
    assert result.rc == 0, result.err
    assert "extracted mirror 1 (5 files)" in result.out
    source = sorted(p.relative_to(site["dir"]) for p in site["dir"].rglob("*") if p.is_file())
    unpacked = sorted(p.relative_to(dest) for p in dest.rglob("*") if p.is_file())
    assert unpacked == source
    for rel in source:
        assert (dest / rel).read_bytes() == (site["dir"] / rel).read_bytes()
        want = 0o755 if rel.parts[0] == "bin" else 0o644
        assert stat.S_IMODE((dest / rel).stat().st_mode) == want, rel
    assert stat.S_IMODE(dest.stat().st_mode) == 0o755
    assert [p.name for p in dest.parent.iterdir()] == ["mirror"]  # no temporary left


def test_extract_modes_do_not_depend_on_the_umask(site, tmp_path):
    old = os.umask(0o077)
    try:
        safe.extract(site["safe"], tmp_path / "m", [keys.load_public(site["pub"])])
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "m" / "bin").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "m" / "bin" / "stop_prim").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "m" / "README.md").stat().st_mode) == 0o644


def test_inspect_shows_the_module_without_checking_trust(rampart, site):
    result = rampart("module", "inspect", site["safe"])
    assert result.rc == 0, result.err
    text = result.out
    assert "module:    mirror 1 (mirror)" in text
    assert "n1 (198.51.100.11, 203.0.113.11)" in text and "n2 (198.51.100.12" in text
    assert "198.51.100.200/24" in text
    assert "/srv/data (sync)" in text
    assert "tcp 198.51.100.200:8080" in text
    assert f"{fingerprint(site['pub'])} (signature not checked" in text
    assert "0755" in text and "bin/start_prim" in text and "userconfig.xml" in text


def test_inspect_json_shape(rampart, site):
    result = rampart("module", "inspect", site["safe"], "--json")
    assert result.rc == 0, result.err
    info = json.loads(result.out)
    assert {
        "name",
        "version",
        "kind",
        "nodes",
        "vips",
        "dirs",
        "checkers",
        "entries",
        "signer",
        "signature",
    } <= info.keys()
    assert (info["name"], info["version"], info["kind"]) == ("mirror", "1", "mirror")
    assert info["nodes"][0] == {"name": "n1", "addresses": ["198.51.100.11", "203.0.113.11"]}
    assert info["vips"] == [{"address": "198.51.100.200", "prefix": 24, "interface": None}]
    assert info["dirs"] == ["/srv/data"]
    assert info["checkers"] == ["tcp 198.51.100.200:8080"]
    assert info["signature"] == "not checked"
    assert info["signer"] == fingerprint(site["pub"])
    by_path = {e["path"]: e for e in info["entries"]}
    assert set(by_path) == {
        "README.md",
        "app.env",
        "bin/start_prim",
        "bin/stop_prim",
        "userconfig.xml",
    }
    assert by_path["bin/start_prim"]["mode"] == "0755"
    assert len(by_path["userconfig.xml"]["sha256"]) == 64


def test_inspect_refuses_hostile_files_like_verify(rampart, tmp_path):
    key = keys.load_private(keys.generate(tmp_path / "k")[0])
    hostile = forge(tmp_path / "h.safe", [*module_members(), Member("../../x", b"x")], key)
    result = rampart("module", "inspect", hostile, "--json")
    assert result.rc == 1 and result.out == ""
    assert len(result.err_lines) == 1 and "'..' component" in result.err


def test_inspect_a_farm_module(rampart, tmp_path):
    key, _ = keys.generate(tmp_path / "k")
    farm = copy_template(tmp_path / "farm", "farm")
    assert rampart("module", "build", farm, "--key", key, "--out", tmp_path / "f.safe").rc == 0
    result = rampart("module", "inspect", tmp_path / "f.safe")
    assert result.rc == 0, result.err
    assert "(farm)" in result.out and "farm:      tcp 8080 by ip" in result.out
    info = json.loads(rampart("module", "inspect", tmp_path / "f.safe", "--json").out)
    assert info["farm"] == [{"ports": [8080], "protocol": "tcp", "criterion": "ip"}]
    assert info["dirs"] == []


def test_a_missing_file_or_a_directory_is_not_a_module(rampart, site, tmp_path):
    fifo = tmp_path / "fifo.safe"
    os.mkfifo(fifo)
    for target, words in (
        (tmp_path / "absent.safe", "no such file"),
        (tmp_path, "is a directory"),
        (fifo, "not a regular file"),
    ):
        result = rampart("module", "verify", target, "--trust", site["pub"])
        assert result.rc == 1 and len(result.err_lines) == 1
        assert words in result.err


def run(*argv: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*RAMPART, *map(str, argv)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def test_real_process_verify_and_refusal(site, tmp_path):
    ok = run("module", "verify", site["safe"], "--trust", site["pub"])
    assert ok.returncode == 0 and ok.stdout.startswith("valid: mirror 1 signed by SHA256:")
    damaged = tmp_path / "damaged.safe"
    damaged.write_bytes(site["safe"].read_bytes()[:-40])
    refused = run("module", "extract", damaged, tmp_path / "dest", "--trust", site["pub"])
    assert refused.returncode == 1
    assert refused.stderr.count("\n") == 1 and "truncated zip" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert not (tmp_path / "dest").exists()


def test_real_process_keygen_and_build(tmp_path):
    assert run("keygen", "--out", tmp_path / "k").returncode == 0
    module_dir = copy_template(tmp_path / "m")
    (module_dir / "userconfig.xml").unlink()
    result = run("module", "build", module_dir, "--key", tmp_path / "k" / "signing.key", "--out",
                 tmp_path / "m.safe")  # fmt: skip
    assert result.returncode == 1
    assert result.stderr == (
        f"rampart: {module_dir} has no userconfig.xml (a module directory holds userconfig.xml "
        "and bin/; create one with `rampart module new`)\n"
    )
    assert not (tmp_path / "m.safe").exists()
