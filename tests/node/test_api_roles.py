"""Roles from unix groups, checked on the socket's peer credentials.

Real users in real groups run the real CLI (setpriv --init-groups); the pure
decision is also tested directly.
"""

from __future__ import annotations

import grp
import json
import secrets
import subprocess

import pytest

from node_service.api import roles
from node_service.module import keys
from tests.node.daemon_fakes import Rampartd, build_safe

pytestmark = pytest.mark.node

ROLE_GROUPS = (roles.ADMIN, roles.OPERATOR, roles.MONITOR)


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


@pytest.fixture
def users():
    """One user per role plus an outsider; groups we create are removed afterwards."""
    created_groups, created_users = [], []
    suffix = secrets.token_hex(3)
    try:
        for group in ROLE_GROUPS:
            if not _group_exists(group):
                subprocess.run(["groupadd", group], check=True, timeout=30)
                created_groups.append(group)
        extra = ["rampart"] if _group_exists("rampart") else []  # socket group, if present
        wanted = {"admin": roles.ADMIN, "operator": roles.OPERATOR,
                  "monitor": roles.MONITOR, "outsider": None}  # fmt: skip
        names = {}
        for role, group in wanted.items():
            name = f"rt-{role[:3]}-{suffix}"
            groups = ",".join(filter(None, [group, *extra]))
            cmd = ["useradd", "-M", "-U", "-s", "/usr/sbin/nologin", name]
            if groups and role != "outsider":
                cmd[1:1] = ["-G", groups]
            elif extra:
                cmd[1:1] = ["-G", ",".join(extra)]
            subprocess.run(cmd, check=True, timeout=30)
            created_users.append(name)
            names[role] = name
        yield names
    finally:
        for name in created_users:
            subprocess.run(["userdel", name], check=False, timeout=30)
        for group in created_groups:
            subprocess.run(["groupdel", group], check=False, timeout=30)


@pytest.fixture
def daemon():
    d = Rampartd()
    try:
        d.trust_dir.mkdir()
        d.start()
        yield d
    finally:
        d.close()


def test_roles_decide_per_action():
    bob = roles.Identity(1000, "bob", frozenset({"users", roles.MONITOR}))
    ok, reason = roles.authorize(bob, "read")
    assert ok and reason == "user bob has rampart-monitor: read allowed"
    ok, reason = roles.authorize(bob, "swap")
    assert not ok
    assert (
        reason == "user bob is not in rampart-operator or rampart-admin: swap needs operator rights"
    )
    op = roles.Identity(1001, "op", frozenset({roles.OPERATOR, roles.MONITOR}))
    assert roles.authorize(op, "swap")[0] and not roles.authorize(op, "primforce")[0]
    root = roles.Identity(0, "root", frozenset({"root"}))
    assert all(roles.authorize(root, action)[0] for action in roles.NEEDS)
    nobody = roles.Identity(1002, "eve", frozenset())
    assert roles.authorize(nobody, "read") == (
        False,
        "user eve is not in rampart-monitor, rampart-operator or rampart-admin: "
        "reading state and events needs monitor rights",
    )


def test_each_role_through_the_real_cli(daemon, users):
    key, pub = keys.generate(daemon.base / "keys")
    (daemon.trust_dir / "site.pub").write_bytes(pub.read_bytes())
    module = build_safe(daemon.base, "web", "rt-n1", key)

    admin, operator, monitor, outsider = (users[r] for r in ("admin", "operator", "monitor",
                                                             "outsider"))  # fmt: skip
    installed = daemon.rampart("module", "install", str(module), user=admin)
    assert installed.returncode == 0, installed.stderr
    assert "by " + admin in daemon.rampart("events", "-n", "5").stdout

    # monitor: reads, but may not act
    state = daemon.rampart("state", "-m", "web", "--json", user=monitor)
    assert state.returncode == 0, state.stderr
    assert json.loads(state.stdout)["state"] == "STOP"
    refused = daemon.rampart("start", "-m", "web", user=monitor)
    assert refused.returncode == 3
    assert refused.stderr == (
        f"rampart: user {monitor} is not in rampart-operator or rampart-admin: "
        "start needs operator rights\n"
    )

    # operator: start and swap, but not install or primforce
    assert daemon.rampart("start", "-m", "web", user=operator).returncode == 0
    swapped = daemon.rampart("swap", "-m", "web", "--json", user=operator)
    assert swapped.returncode == 0, swapped.stderr
    assert json.loads(swapped.stdout)["state"]["state"] == "SECOND"
    refused = daemon.rampart("module", "install", str(module), user=operator)
    assert refused.returncode == 3
    assert f"user {operator} is not in rampart-admin: install needs admin rights" in refused.stderr
    assert daemon.rampart("primforce", "-m", "web", user=operator).returncode == 3

    # outsider: refused with one clear line, even for reading
    refused = daemon.rampart("state", user=outsider)
    assert refused.returncode == 3
    assert refused.stderr == (
        f"rampart: user {outsider} is not in rampart-monitor, rampart-operator or "
        "rampart-admin: reading state and events needs monitor rights\n"
    )
    assert daemon.rampart("watch", "--json", user=outsider).returncode == 3
