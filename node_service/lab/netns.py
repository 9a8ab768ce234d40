"""The lab's wiring: network namespaces, the switch and the cables.

Everything is created inside the lab's own namespaces: veth pairs are made
in the switch namespace with their far end placed directly into the host
namespace, so no interface, address or route ever appears in the machine's
own namespace. We drive `ip` (iproute2) rather than netlink from Python: it
is what an operator would type, and `ip -batch` keeps a whole namespace's
setup to one process.
"""

from __future__ import annotations

import json
import os
import subprocess

from node_service.lab.site import Host, LabError, Layout, Link

IP_TIMEOUT_S = 20


def ip(*args: str, netns: str | None = None, batch: list[str] | None = None) -> str:
    argv = ["ip"]
    if netns:
        argv += ["-n", netns]
    argv += ["-batch", "-"] if batch is not None else list(args)
    text = "\n".join(batch) + "\n" if batch is not None else None
    try:
        done = subprocess.run(
            argv, input=text, capture_output=True, text=True, timeout=IP_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        raise LabError(f"`{' '.join(argv)}` did not finish in {IP_TIMEOUT_S} s") from None
    if done.returncode != 0:
        what = " ".join(args) if batch is None else "; ".join(batch)
        where = f" in {netns}" if netns else ""
        raise LabError(f"ip {what}{where} failed: {done.stderr.strip() or done.returncode}")
    return done.stdout


def exists(name: str) -> bool:
    return os.path.exists(f"/run/netns/{name}")


def listed() -> list[str]:
    try:
        return sorted(os.listdir("/run/netns"))
    except FileNotFoundError:
        return []


def ns_id(name: str) -> tuple[int, int] | None:
    """(device, inode) of a named network namespace, as /proc/PID/ns/net shows it."""
    try:
        st = os.stat(f"/run/netns/{name}")
    except OSError:
        return None
    return st.st_dev, st.st_ino


def create(layout: Layout) -> None:
    for name in layout.netns_names:
        ip("netns", "add", name)
    switch = [
        "link set lo up",
        # STP off and no forwarding delay: a port forwards as soon as it is up.
        "link add br-lan type bridge stp_state 0 forward_delay 0",
        "link add br-hb2 type bridge stp_state 0 forward_delay 0",
    ]
    for host in layout.hosts:
        for link in host.links:
            switch.append(
                f"link add {link.port} type veth peer name {link.ifname} netns {host.name}"
            )
            switch.append(f"link set {link.port} master {link.bridge} up")
    switch += ["link set br-lan up", "link set br-hb2 up"]
    ip(netns=layout.switch, batch=switch)
    for host in layout.hosts:
        lines = ["link set lo up"]
        for link in host.links:
            lines.append(f"addr add {link.address}/24 dev {link.ifname}")
            lines.append(f"link set {link.ifname} up")
        ip(netns=host.name, batch=lines)


def set_lan_ageing(layout: Layout, centiseconds: int) -> None:
    """Hook for the farm: ageing 0 makes the LAN switch flood every unicast frame.

    Unknown unicast is already flooded by default; with ageing 0 the bridge
    forgets MAC addresses at once, so every node sees every client frame, as
    a farm's shared MAC needs.
    """
    ip("link", "set", "br-lan", "type", "bridge", "ageing_time", str(centiseconds),
       netns=layout.switch)  # fmt: skip


def set_host_links(host: Host, links: list[Link], up: bool) -> None:
    state = "up" if up else "down"
    ip(netns=host.name, batch=[f"link set {link.ifname} {state}" for link in links])


def set_ports(layout: Layout, links: list[Link], up: bool) -> None:
    """Plug or unplug cables at the switch: the host keeps its links but loses carrier."""
    state = "up" if up else "down"
    ip(netns=layout.switch, batch=[f"link set {link.port} {state}" for link in links])


def carrier_settled(layout: Layout, host: Host, links: list[Link], up: bool) -> bool:
    """Whether both ends of these cables report the operational state asked for.

    The kernel applies carrier changes asynchronously (linkwatch, up to ~1 s);
    until then a plugged cable may still drop frames.
    """
    wanted = "UP" if up else "DOWN"
    ends = [(host.name, [link.ifname for link in links]), (layout.switch, [x.port for x in links])]
    for name, ifnames in ends:
        states = {x["ifname"]: x.get("operstate") for x in json.loads(ip("-j", "link", netns=name))}
        if any((states.get(ifname) == "UP") != (wanted == "UP") for ifname in ifnames):
            return False
    return True


def admin_up(netns: str) -> dict[str, bool]:
    """Interface name -> administratively up, inside ``netns``."""
    links = json.loads(ip("-j", "link", "show", netns=netns) or "[]")
    return {link["ifname"]: "UP" in link.get("flags", []) for link in links}


def delete(name: str) -> None:
    if not exists(name):
        return
    try:
        ip("netns", "del", name)
    except LabError:
        # A half-made entry (file without its bind mount) is just a file.
        os.unlink(f"/run/netns/{name}")
