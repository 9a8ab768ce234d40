"""Module designer: form edits <-> XML, node's messages on the right field, build & sign."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from app import designer_fields as df
from app.credentials import Credentials
from app.designer import DesignerError, DesignerModel, PassphraseNeeded
from node_service.errors import KeyFileError
from node_service.module import keys, safe, userconfig
from tests.keyrings import MemoryKeyring, installed_memory_keyring


@pytest.fixture
def backend() -> Iterator[MemoryKeyring]:
    yield from installed_memory_keyring()


def mirror() -> DesignerModel:
    return DesignerModel.from_template("mirror")


def test_form_edits_update_the_xml_and_parse_back_to_the_same_model() -> None:
    dm = mirror()
    events: list[str] = []
    dm.changed.connect(events.append)
    assert dm.set_field(("module", "name"), "web")
    assert dm.set_field(("node", 0, "address", 1), "203.0.113.21")
    assert dm.set_field(("vip", 0, "prefix"), "25")
    assert dm.set_field(("failover", "failback"), "yes")
    assert dm.set_field(("checker", 0, "interval"), "4s")
    assert dm.set_field(("dir", 0), "/srv/www")
    assert 'name="web"' in dm.xml and "203.0.113.21" in dm.xml and 'prefix="25"' in dm.xml
    assert userconfig.parse(dm.xml.encode()) == dm.module
    assert dm.text(("failover", "failback")) == "true"
    assert dm.text(("checker", 0, "interval")) == "4"
    assert dm.valid and dm.problems == {}
    assert events == ["form"] * 6


def test_xml_edits_update_the_form() -> None:
    dm = mirror()
    xml = dm.xml.replace('mode="sync"', 'mode="async"').replace("/srv/data", "/srv/other")
    assert dm.set_xml(xml) is True
    assert dm.text(("replication", "mode")) == "async"
    assert dm.text(("dir", 0)) == "/srv/other"
    assert dm.xml == xml  # the author's text is kept as typed
    assert dm.xml_problems == ()


def test_broken_xml_keeps_the_last_good_model_and_lists_the_lines() -> None:
    dm = mirror()
    before = dm.module
    broken = dm.xml.replace("</nodes>", "</nodez>")
    assert dm.set_xml(broken) is False
    assert dm.module == before
    assert dm.xml == broken
    problem = dm.xml_problems[0]
    assert problem.line is not None and "not well-formed XML" in problem.message
    with pytest.raises(DesignerError, match=r"userconfig\.xml has problems"):
        dm.save("/nonexistent-never-written")
    invalid = dm.xml.replace("</nodez>", "</nodes>").replace("198.51.100.11", "198.51.100.999")
    assert dm.set_xml(invalid) is False
    assert any("is not an IP address" in p.message for p in dm.xml_problems)


def test_problems_are_the_nodes_messages_on_the_right_field() -> None:
    dm = mirror()
    dm.set_field(("node", 1, "address", 0), "198.51.100.999")
    dm.set_field(("vip", 0, "prefix"), "40")
    dm.add("checker:ping")
    assert dm.problems_for(("node", 1, "address", 0)) == (
        "node address '198.51.100.999' is not an IP address; expected IPv4 or IPv6",
    )
    assert dm.problems_for(("vip", 0, "prefix")) == (
        "virtual IP prefix 40 is out of range; expected 1 to 32",
    )
    assert dm.problems_for(("checker", 1, "target")) == (
        "ping checker target '' is not an IP address; expected IPv4 or IPv6",
    )
    assert dm.problems_for(("node", 0, "name")) == ()
    assert not dm.valid
    # the same words a node would print for this file
    with pytest.raises(Exception) as info:
        userconfig.parse(dm.xml.encode())
    node_messages = {p.message for p in info.value.problems}  # type: ignore[attr-defined]
    assert {m for msgs in dm.problems.values() for m in msgs} == node_messages


def test_typed_text_that_cannot_convert_stays_on_its_field() -> None:
    dm = mirror()
    xml = dm.xml
    assert dm.set_field(("vip", 0, "prefix"), "twenty") is False
    assert dm.problems_for(("vip", 0, "prefix")) == ("prefix 'twenty' is not a whole number",)
    assert dm.xml == xml  # the model keeps its last good value
    assert dm.set_field(("vip", 0, "prefix"), "24") is True
    assert dm.problems == {}


def test_kind_switch_and_structural_edits() -> None:
    dm = mirror()
    dm.set_field(("module", "kind"), "farm")
    assert dm.module.replication is None and dm.module.farm is not None
    assert dm.problems_for(("farm",)) == ("<farm> has no <rule>; expected at least one",)
    dm.add("rule")
    dm.set_field(("rule", 0, "ports"), "80, 443")
    assert dm.module.farm is not None and dm.module.farm.rules[0].ports == (80, 443)
    dm.add("node")
    assert dm.problems_for(("node", 2)) == ("node 'node3' has no <address>; expected at least one",)
    dm.add("address", at=2)
    dm.set_field(("node", 2, "address", 0), "198.51.100.13")
    dm.add("address", at=2)
    dm.set_field(("node", 2, "address", 1), "203.0.113.13")
    assert dm.problems_for(("script", 0)) == (
        "script 'stop_prim' is not run by a farm module; expected one of prestart, start_both, "
        "stop_both, poststop",
    )
    dm.remove(("script", 0))
    assert dm.valid, dm.problems
    dm.remove(("node", 2))
    assert len(dm.module.nodes) == 2
    with pytest.raises(df.FieldError, match="unknown checker"):
        dm.add("checker:smoke")


def test_duplicate_port_message_names_the_rule_not_a_pseudo_line() -> None:
    dm = mirror()
    dm.set_field(("module", "kind"), "farm")
    dm.add("rule")
    dm.add("rule")
    dm.set_field(("rule", 0, "ports"), "80")
    dm.set_field(("rule", 1, "ports"), "80")
    assert dm.problems_for(("rule", 1, "ports")) == (
        "port tcp/80 is already in rule 1; expected each port in one rule",
    )


def test_build_and_sign_with_a_plain_key(tmp_path: Path) -> None:
    key, pub = keys.generate(tmp_path / "keys")
    dm = mirror()
    dm.set_field(("module", "name"), "web")
    dm.set_script("start_prim", "#!/bin/sh\necho started\n")
    result = dm.build(tmp_path / "web", key, tmp_path / "web.safe")
    assert result.name == "web"
    verified = safe.verify(tmp_path / "web.safe", [keys.load_public(pub)])
    assert verified.module == dm.module
    assert (tmp_path / "web" / "bin" / "start_prim").stat().st_mode & 0o777 == 0o755


def encrypted_key(tmp_path: Path, passphrase: bytes) -> tuple[Path, Path]:
    key, pub = keys.generate(tmp_path / "plain")
    private = keys.load_private(key)
    locked = tmp_path / "locked.key"
    locked.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(passphrase),
        )
    )
    return locked, pub


def test_build_with_an_encrypted_key_uses_the_keyring(
    tmp_path: Path, backend: MemoryKeyring
) -> None:
    locked, pub = encrypted_key(tmp_path, b"author phrase")
    dm = mirror()
    with pytest.raises(PassphraseNeeded) as info:
        dm.build(tmp_path / "web", locked, tmp_path / "web.safe")
    assert info.value.account == f"key:{locked}"
    Credentials().set_key_passphrase(locked, "wrong")
    with pytest.raises(KeyFileError, match="does not open signing key"):
        dm.build(tmp_path / "web", locked, tmp_path / "web.safe")
    assert not (tmp_path / "web.safe").exists()
    Credentials().set_key_passphrase(locked, "author phrase")
    dm.build(tmp_path / "web", locked, tmp_path / "web.safe")
    assert safe.verify(tmp_path / "web.safe", [keys.load_public(pub)]).name == "mirror"


def test_invalid_module_is_not_built(tmp_path: Path) -> None:
    key, _ = keys.generate(tmp_path / "keys")
    dm = mirror()
    dm.set_field(("vip", 0, "address"), "not-an-ip")
    with pytest.raises(DesignerError, match="vip/0: virtual IP 'not-an-ip' is not an IP address"):
        dm.build(tmp_path / "web", key, tmp_path / "web.safe")
    assert not (tmp_path / "web.safe").exists()
    assert not (tmp_path / "web").exists()


def test_from_dir_reads_xml_and_scripts(tmp_path: Path) -> None:
    dm = mirror()
    dm.set_script("start_prim", "#!/bin/sh\nexit 0\n")
    dm.save(tmp_path / "m")
    again = DesignerModel.from_dir(tmp_path / "m")
    assert again.module == dm.module
    assert again.scripts["start_prim"] == "#!/bin/sh\nexit 0\n"
    with pytest.raises(DesignerError, match="script 'evil' is not used by this module"):
        again.set_script("evil", "rm -rf /")
