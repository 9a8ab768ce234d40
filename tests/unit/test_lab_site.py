"""The lab's layout and the pure helpers behind `rampart lab` (no root needed)."""

from __future__ import annotations

import pytest

from node_service.cli import build_parser
from node_service.lab.site import (
    HostFacts,
    LabError,
    Layout,
    Mount,
    fuse_mounts,
    is_lab_netns,
    judge_host,
    known_hosts_line,
    lab_of_host,
    networks_arg,
    parse_mountinfo,
    resolve_host,
    site_document,
    sshd_config,
    topmost_under,
    under,
    validate_name,
    validate_node_count,
)


def test_layout_names_and_addresses():
    layout = Layout("lab", 3)
    assert [h.name for h in layout.hosts] == ["lab-n1", "lab-n2", "lab-n3", "lab-client"]
    assert layout.nodes[2].addresses == ["198.51.100.13", "203.0.113.13"]
    assert layout.client.addresses == ["198.51.100.100"]
    assert layout.netns_names == ["lab-sw", "lab-n1", "lab-n2", "lab-n3", "lab-client"]
    assert layout.vip_pool[0] == "198.51.100.200" and layout.vip_pool[-1] == "198.51.100.219"
    ports = [link.port for h in layout.hosts for link in h.links]
    assert len(set(ports)) == len(ports) and all(len(p) <= 15 for p in ports)
    assert str(layout.api_socket(layout.nodes[0])).endswith("/lab/hosts/n1/run/rampart/api.sock")


@pytest.mark.parametrize("name", ["lab", "rtab12", "a", "abcdefgh"])
def test_valid_names(name):
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", "Lab", "1lab", "abcdefghi", "la-b", "la b"])
def test_invalid_names_say_what_is_expected(name):
    with pytest.raises(LabError, match="expected a lowercase letter"):
        validate_name(name)


def test_node_count_bounds():
    assert validate_node_count(8) == 8
    for bad in (0, 9):
        with pytest.raises(LabError, match="1 to 8"):
            validate_node_count(bad)


def test_host_names_resolve_short_or_full():
    layout = Layout("rt12", 2)
    assert resolve_host(layout, "n2").name == "rt12-n2"
    assert resolve_host(layout, "rt12-client").short == "client"
    with pytest.raises(LabError, match="unknown host 'n3' in lab rt12: expected one of rt12-n1"):
        resolve_host(layout, "n3")
    assert lab_of_host("rt12-n1", "lab") == "rt12"
    assert lab_of_host("n1", "lab") == "lab"


def test_cut_picks_one_network_or_all():
    node = Layout("lab", 1).nodes[0]
    assert [link.ifname for link in networks_arg(node, None)] == ["eth0", "eth1"]
    assert [link.ifname for link in networks_arg(node, "hb2")] == ["eth1"]
    with pytest.raises(LabError, match="lab-client has no hb2 network"):
        networks_arg(Layout("lab", 1).client, "hb2")


def test_only_this_labs_namespaces_are_claimed():
    assert is_lab_netns("rt", "rt-n1") and is_lab_netns("rt", "rt-sw")
    assert not is_lab_netns("rt", "rt-farm-probe")
    assert not is_lab_netns("lab", "lab2-n1")


def test_site_document_and_sshd_config():
    layout = Layout("lab", 2)
    doc = site_document(layout, "/venv/bin/python")
    ssh = doc["nodes"][1]["ssh"]
    assert ssh["host"] == "198.51.100.12" and ssh["user"] == "root" and ssh["port"] == 22
    relay = "/venv/bin/python -m node_service.lab.relay --netns lab-client %h %p"
    assert ssh["proxy_command"] == relay
    assert doc["trust_pub"].endswith("/lab/keys/signing.pub")
    config = sshd_config(layout, layout.nodes[0], "/venv/bin")
    assert "ListenAddress 198.51.100.11" in config and "PidFile /run/sshd.pid" in config
    assert "PasswordAuthentication no" in config and "SetEnv PATH=/venv/bin:" in config
    line = known_hosts_line(layout.nodes[0], "ssh-ed25519 AAAAC3Nza root@lab-n1")
    assert line == "198.51.100.11,lab-n1 ssh-ed25519 AAAAC3Nza\n"


MOUNTINFO = """\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
42 27 254:0 /run/netns /run/netns rw shared:1 - ext4 /dev/vda rw
43 42 0:4 net:[4026532177] /run/netns/x rw shared:2 - nsfs nsfs rw
50 27 0:50 / /srv/data rw - fuse.rampart rampart rw
51 50 0:51 / /srv/data/deep rw - fuse fuse rw
52 27 254:0 /a /run/my\\040dir rw - ext4 /dev/vda rw
"""


def test_mountinfo_helpers():
    mounts = parse_mountinfo(MOUNTINFO)
    assert mounts[0] == Mount(27, 1, "254:0", "/", "ext4")
    assert mounts[-1].mountpoint == "/run/my dir"
    assert [m.mountpoint for m in fuse_mounts(mounts)] == ["/srv/data/deep", "/srv/data"]
    assert topmost_under(mounts, "/run") == ["/run/my dir", "/run/netns"]
    assert under(mounts, ["/srv"]) == ["/srv/data/deep", "/srv/data"]


def facts(**changes) -> HostFacts:
    base = dict(
        netns=True,
        links_up={"lan": True, "hb2": True},
        ports_up={"lan": True, "hb2": True},
        sshd=True,
        rampartd_process=True,
        api_socket=True,
    )
    return HostFacts(**{**base, **changes})


def test_judging_a_host_gives_state_and_reason():
    node = Layout("lab", 1).nodes[0]
    entry, reason = judge_host(node, facts())
    assert entry["up"] and entry["sshd"] and entry["rampartd"]
    assert reason == "running, sshd and rampartd ready"
    entry, reason = judge_host(node, facts(links_up={"lan": False, "hb2": False}, sshd=False))
    assert not entry["up"] and "crashed" in reason
    entry, reason = judge_host(node, facts(ports_up={"lan": True, "hb2": False}))
    assert entry["up"] and entry["networks"] == {"lan": True, "hb2": False}
    assert reason == "running, cable cut on hb2"
    entry, reason = judge_host(node, facts(api_socket=False))
    assert entry["rampartd"] is False and "api.sock is not there yet" in reason
    entry, reason = judge_host(node, facts(rampartd_process=False))
    assert "rampartd.log" in reason


def test_cli_registers_every_lab_verb():
    parser = build_parser()
    for argv in (
        ["lab", "up", "--name", "x", "--nodes", "3"],
        ["lab", "status", "--json"],
        ["lab", "exec", "n1", "--", "true"],
        ["lab", "crash", "n1"],
        ["lab", "boot", "n1"],
        ["lab", "cut", "n1", "--net", "hb2"],
        ["lab", "heal", "n1"],
        ["lab", "down"],
    ):
        assert callable(parser.parse_args(argv).func)
