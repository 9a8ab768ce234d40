"""The module store on real files (no daemon): decisions, atomic reinstall, refusals."""

from __future__ import annotations

import socket
import zipfile

import pytest

from node_service.config import NodeConfig
from node_service.daemon import sd_notify
from node_service.errors import CommandRefused, ModuleError, RampartError, SignatureError
from node_service.module import keys
from node_service.store import Installed, ModuleStore, install_decision
from tests.node.daemon_fakes import build_safe

pytestmark = pytest.mark.node


def tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


@pytest.fixture
def store(tmp_path):
    config = NodeConfig(node="rt-n1", state_dir=tmp_path / "state", trust_dir=tmp_path / "trust")
    key, pub = keys.generate(tmp_path / "keys")
    config.trust_dir.mkdir()
    (config.trust_dir / "site.pub").write_bytes(pub.read_bytes())
    return ModuleStore(config), key


def test_install_decision_reasons():
    current = Installed("web", "1", "mirror", 0.0, None)  # type: ignore[arg-type]
    nodes = ("n1", "n2")
    assert install_decision("web", "mirror", "n1", nodes, None, False) == (
        "module web installed (new, kind mirror)"
    )
    assert install_decision("web", "farm", "n1", nodes, current, False, "2") == (
        "module web upgraded from version 1 to 2"
    )
    assert install_decision("web", "mirror", "n1", nodes, current, True, "2") == (
        "module web upgraded from version 1 to 2; the running module keeps its old files "
        "until it is stopped and started"
    )
    with pytest.raises(CommandRefused, match="running as a mirror module; stop it before"):
        install_decision("web", "farm", "n1", nodes, current, True)
    with pytest.raises(CommandRefused, match=r"does not run on node n3 \(its nodes: n1, n2\)"):
        install_decision("web", "mirror", "n3", nodes, None, False)
    with pytest.raises(CommandRefused, match="cannot be used as a directory name"):
        install_decision("../x", "mirror", "n1", nodes, None, False)


def test_reinstall_swaps_files_and_keeps_state(store, tmp_path):
    modules, key = store
    safe_file = build_safe(tmp_path, "web", "rt-n1", key)
    installed, reason = modules.install(safe_file)
    assert (installed.name, installed.kind, reason) == (
        "web", "mirror", "module web installed (new, kind mirror)",
    )  # fmt: skip
    module_dir = modules.module_dir("web")
    (module_dir / "state" / "generation").write_text("42")
    first_release = (module_dir / "module").resolve()
    modules.install(safe_file)
    assert (module_dir / "module").resolve() != first_release
    assert not first_release.exists()
    assert (module_dir / "state" / "generation").read_text() == "42"
    assert modules.load("web").name == "web"
    assert [m.name for m in modules.list()] == ["web"]
    assert modules.remove("web") == "module web removed from node rt-n1"
    assert modules.list() == [] and tree(modules.root) == []
    with pytest.raises(ModuleError, match="module web is not installed on node rt-n1"):
        modules.remove("web")


def test_refusals_change_nothing(store, tmp_path):
    modules, key = store
    good = build_safe(tmp_path, "web", "rt-n1", key)
    modules.install(good)
    before = tree(modules.config.state_dir)

    tampered = tmp_path / "tampered.safe"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(tampered, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "userconfig.xml":
                data = data.replace(b"198.51.100.12", b"198.51.100.13")
            dst.writestr(item, data)
    with pytest.raises(RampartError) as info:
        modules.install(tampered)
    assert "\n" not in str(info.value)

    other_key, _ = keys.generate(tmp_path / "other")
    with pytest.raises(SignatureError):
        modules.install(build_safe(tmp_path, "web", "rt-n1", other_key))
    not_a_zip = tmp_path / "junk.safe"
    not_a_zip.write_bytes(b"not a zip at all")
    with pytest.raises(RampartError):
        modules.install(not_a_zip)
    assert tree(modules.config.state_dir) == before

    for pub in modules.config.trust_dir.glob("*.pub"):
        pub.unlink()
    with pytest.raises(SignatureError, match=r"no trusted keys in .*trust \(\*\.pub\)"):
        modules.install(good)
    assert tree(modules.config.state_dir) == before


def test_sd_notify_reaches_abstract_and_path_sockets(tmp_path):
    name = f"rt-notify-{tmp_path.name}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name)
        listener.settimeout(5)
        assert sd_notify("READY=1", {"NOTIFY_SOCKET": "@" + name})
        assert listener.recv(100) == b"READY=1"
    assert not sd_notify("READY=1", {})
    assert not sd_notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "absent.sock")})
