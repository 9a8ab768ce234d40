"""Site file: load, validate with line numbers, save atomically."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app import site
from app.site import Site, SiteError, SiteNode, SshAccess
from node_service.lab.site import Layout, site_document

GOOD = """\
site: lab
nodes:
  - name: lab-n1
    addresses: [198.51.100.11, 203.0.113.11]
    ssh: {host: 198.51.100.11, port: 22, user: root, key: keys/id_ed25519,
          proxy_command: "relay %h %p"}
  - name: lab-n2
    addresses: [198.51.100.12, 203.0.113.12]
known_hosts: known_hosts
signing_key: /keys/signing.key
trust_pub: /keys/signing.pub
vip_pool: [198.51.100.200]
"""


def write(tmp_path: Path, text: str, name: str = "site.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_load_reads_every_field_and_resolves_relative_paths(tmp_path: Path) -> None:
    loaded = site.load(write(tmp_path, GOOD))
    assert loaded.name == "lab"
    assert loaded.node_names == ("lab-n1", "lab-n2")
    n1, n2 = loaded.nodes
    assert n1.ssh == SshAccess("198.51.100.11", 22, "root", "keys/id_ed25519", False, "relay %h %p")
    assert n2.ssh == SshAccess("198.51.100.12")  # ssh defaults to the first address
    assert loaded.resolve(n1.ssh.key or "") == tmp_path / "keys" / "id_ed25519"
    assert loaded.resolve("/abs") == Path("/abs")
    assert loaded.vip_pool == ("198.51.100.200",)


def test_the_labs_site_document_loads(tmp_path: Path) -> None:
    import yaml

    document = site_document(Layout("lab", 2), "/usr/bin/python3")
    loaded = site.load(write(tmp_path, yaml.safe_dump(document, sort_keys=False)))
    assert loaded.node_names == ("lab-n1", "lab-n2")
    assert loaded.nodes[0].ssh.proxy_command is not None
    assert loaded.known_hosts == document["known_hosts"]


def test_save_then_load_round_trips(tmp_path: Path) -> None:
    original = site.load(write(tmp_path, GOOD))
    target = tmp_path / "copy.yaml"
    site.save(original, target)
    again = site.load(target)
    assert again == original
    assert "password" not in target.read_text()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "site.yaml:1: the site file is empty"),
        ("site: lab\nnodes: [\n", "site.yaml:3: not valid YAML"),
        ("site: lab\n\tnodes: []\n", "site.yaml:2: not valid YAML"),
        ("- a\n- b\n", "site.yaml:1: the site file must be a mapping"),
        ("nodes: []\n", "site.yaml:1: no site name; expected site: NAME"),
        ("site: lab\n", "site.yaml:1: no nodes; expected nodes:"),
        ("site: lab\nnodes:\n  - addresses: [10.0.0.1]\n", "site.yaml:3: node 1 has no name"),
        ("site: lab\nnodes:\n  - name: n1\n", "site.yaml:3: node n1 has no addresses"),
        (
            "site: lab\nnodes:\n  - name: n1\n    addresses: [10.0.0.300]\n",
            "site.yaml:4: address of node n1 '10.0.0.300' is not an IP address",
        ),
        (
            "site: lab\nnodes:\n  - name: n1\n    addresses: [10.0.0.1]\n    ssh: {port: 70000}\n",
            "site.yaml:5: ssh port of node n1 must be an integer 1-65535, got 70000",
        ),
        (
            "site: lab\nnodes:\n  - name: n1\n    addresses: [10.0.0.1]\n"
            "    ssh:\n      password: hunter2\n",
            "site.yaml:6: ssh of node n1 has a 'password'; secrets are never stored",
        ),
        (
            "site: lab\nnodes:\n  - name: n1\n    addresses: [10.0.0.1]\n    colour: red\n",
            "site.yaml:5: unknown key 'colour' in node 1; expected addresses, name, ssh",
        ),
        (
            "site: lab\nnodes:\n  - {name: n1, addresses: [10.0.0.1]}\n"
            "  - {name: n1, addresses: [10.0.0.2]}\n",
            "site.yaml:4: node name 'n1' is used twice",
        ),
        (
            "site: lab\nsite: other\nnodes: []\n",
            "site.yaml:2: key 'site' appears twice in the site file",
        ),
        (
            "site: lab\nnodes:\n  - {name: n1, addresses: [10.0.0.1], ssh: {agent: maybe}}\n",
            "site.yaml:3: ssh agent of node n1 must be true or false, got 'maybe'",
        ),
    ],
)
def test_bad_site_files_say_what_and_where(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(SiteError) as info:
        site.load(write(tmp_path, text))
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


def test_unreadable_site_files(tmp_path: Path) -> None:
    with pytest.raises(SiteError, match="no such site file"):
        site.load(tmp_path / "missing.yaml")
    with pytest.raises(SiteError, match="is a directory"):
        site.load(tmp_path)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00site")
    with pytest.raises(SiteError, match="not UTF-8"):
        site.load(binary)


def test_failed_save_leaves_the_old_file_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, GOOD)
    before = path.read_bytes()
    changed = Site("lab", (SiteNode("n9", ("10.0.0.9",), SshAccess("10.0.0.9")),))

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(SiteError, match=r"cannot write .*No space left on device"):
        site.save(changed, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site.yaml"]  # no temp file left


def test_save_refuses_a_site_that_would_not_read_back(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    before = path.read_bytes()
    bad = Site("lab", (SiteNode("bad name!", ("10.0.0.1",), SshAccess("10.0.0.1")),))
    with pytest.raises(SiteError):
        site.save(bad, path)
    assert path.read_bytes() == before


def test_node_lookup_names_the_known_nodes(tmp_path: Path) -> None:
    loaded = site.load(write(tmp_path, GOOD))
    assert loaded.node("lab-n2").addresses[0] == "198.51.100.12"
    with pytest.raises(SiteError, match="no node named 'x'; its nodes are lab-n1, lab-n2"):
        loaded.node("x")
