"""Who may do what through the management socket.

Roles come from unix groups, checked on the peer credentials of the socket
(SO_PEERCRED), never from anything the client says about itself:

- ``rampart-admin`` (and root): everything, including install/remove and
  ``primforce`` (which can discard the newer data of the other node);
- ``rampart-operator``: start, stop, restart, stopstart, prim, second, swap;
- ``rampart-monitor``: read-only (state, list, events, watch, metrics).

The decision is a pure function of (user, groups, action) so it is tested
without sockets; only ``peer_identity`` touches the system.
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import struct
from dataclasses import dataclass

ADMIN, OPERATOR, MONITOR = "rampart-admin", "rampart-operator", "rampart-monitor"
RANK = {MONITOR: 1, OPERATOR: 2, ADMIN: 3}
ROLE_WORD = {MONITOR: "monitor", OPERATOR: "operator", ADMIN: "admin"}
ACTION_WORD = {"read": "reading state and events", "repl-sync": "repl sync"}

# action -> the least role that may perform it
NEEDS: dict[str, str] = {
    "read": MONITOR,
    "start": OPERATOR,
    "stop": OPERATOR,
    "restart": OPERATOR,
    "stopstart": OPERATOR,
    "prim": OPERATOR,
    "second": OPERATOR,
    "swap": OPERATOR,
    # A forced full sync only re-sends data from the primary: operator work.
    "repl-sync": OPERATOR,
    "primforce": ADMIN,
    "install": ADMIN,
    "remove": ADMIN,
}


@dataclass(frozen=True)
class Identity:
    uid: int
    user: str
    groups: frozenset[str]

    @property
    def role(self) -> str | None:
        if self.uid == 0:
            return ADMIN
        held = [g for g in RANK if g in self.groups]
        return max(held, key=RANK.__getitem__) if held else None


def authorize(identity: Identity, action: str) -> tuple[bool, str]:
    """(allowed, reason). The refusal reason is the one line the user sees."""
    needed = NEEDS.get(action, ADMIN)
    role = identity.role
    if role is not None and RANK[role] >= RANK[needed]:
        return True, f"user {identity.user} has {role}: {action} allowed"
    allowed = [g for g in RANK if RANK[g] >= RANK[needed]]
    groups = " or ".join([", ".join(allowed[:-1]), allowed[-1]] if len(allowed) > 2 else allowed)
    what = ACTION_WORD.get(action, action)
    return (
        False,
        f"user {identity.user} is not in {groups}: {what} needs {ROLE_WORD[needed]} rights",
    )


def peer_identity(sock: socket.socket) -> Identity:
    """The uid and groups of the process at the other end of a unix socket."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    gids = _process_groups(pid)
    try:
        entry = pwd.getpwuid(uid)
        user = entry.pw_name
        if gids is None:
            gids = set(os.getgrouplist(user, gid))
    except KeyError:
        user = f"uid {uid}"
    gids = (gids or set()) | {gid}
    names = set()
    for g in gids:
        try:
            names.add(grp.getgrgid(g).gr_name)
        except KeyError:
            continue
    return Identity(uid=uid, user=user, groups=frozenset(names))


def _process_groups(pid: int) -> set[int] | None:
    """The groups the client process really holds (not what the group file says now)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except (OSError, ValueError):
        return None
    return None
