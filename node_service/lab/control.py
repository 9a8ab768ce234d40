"""What each `rampart lab` verb does, in order, with a sentence per step.

Every function returns the lines it wants shown; the CLI prints them. `up`
writes the lab's record (lab.json) before creating anything, so `down` knows
what to remove even when `up` died halfway, and `up` calls `down` itself on
any failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from node_service.lab import hosts, netns, sshd
from node_service.lab.site import (
    PRIVATE_DIRS,
    STATE_ROOT,
    Host,
    HostFacts,
    LabError,
    Layout,
    Link,
    is_lab_netns,
    judge_host,
    networks_arg,
    node_yaml,
    resolve_host,
    site_document,
    under,
    validate_name,
    validate_node_count,
)

# Generous: the wait ends as soon as every API socket exists, and a loaded
# machine (CI running several labs) can take well over 5 s to import and start
# rampartd; returning early made the next `rampart` call fail to connect.
RAMPARTD_READY_TIMEOUT_S = 30.0
LINK_SETTLE_TIMEOUT_S = 5.0


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError(
            "rampart lab needs root: it creates network and mount namespaces "
            "(run it as root, e.g. sudo rampart lab ...)"
        )


# -- finding a lab ---------------------------------------------------------
def labs_up() -> list[str]:
    try:
        return sorted(p.name for p in STATE_ROOT.iterdir() if (p / "lab.json").exists())
    except FileNotFoundError:
        return []


def load(name: str) -> Layout:
    layout = Layout(validate_name(name), 1)
    try:
        record = json.loads(layout.record_file.read_text())
        return Layout(name, int(record["nodes"]))
    except (OSError, ValueError, KeyError):
        pass
    others = labs_up()
    hint = f" (labs up: {', '.join(others)}; choose one with --name)" if others else ""
    raise LabError(f"no lab named {name} is up; start one with: rampart lab up --name {name}{hint}")


def _leftovers(name: str) -> Layout | None:
    """The layout of whatever a lab left behind, even without its record."""
    try:
        return load(name)
    except LabError:
        pass
    shorts = [e.split("-", 1)[1] for e in netns.listed() if is_lab_netns(name, e)]
    nodes = [int(s[1:]) for s in shorts if s.startswith("n")]
    layout = Layout(name, max(nodes, default=0))
    if shorts or layout.state_dir.exists() or layout.run_dir.exists():
        return layout
    return None


# -- up / down ----------------------------------------------------------------
def up(name: str, node_count: int) -> list[str]:
    require_root()
    layout = Layout(validate_name(name), validate_node_count(node_count))
    if _leftovers(name) is not None:
        raise LabError(
            f"lab {name} is already up (or partly up); take it down first with: "
            f"rampart lab down --name {name}"
        )
    layout.state_dir.mkdir(mode=0o755, parents=True)
    layout.record_file.write_text(json.dumps({"name": name, "nodes": node_count}) + "\n")
    try:
        return _build(layout)
    except BaseException:
        down(name)
        raise


def _build(layout: Layout) -> list[str]:
    hosts.ensure_run_root()
    layout.run_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    netns.create(layout)
    for host in layout.hosts:
        hosts.prepare_dirs(layout, host)
        hosts.create_mount_ns(layout, host)
    _write_secrets(layout)
    sshd.write_console_keys(layout)
    sshd.write_host_keys(layout)
    _write_site_file(layout)
    lines = [f"lab {layout.name}: {len(layout.nodes)} nodes and a client, switch {layout.switch}"]
    lines += _start_daemons(layout, list(layout.nodes))
    lines.append(f"site file: {layout.site_file}")
    lines.append(f"take it down with: rampart lab down --name {layout.name}")
    return lines


def _write_secrets(layout: Layout) -> None:
    import yaml

    from node_service.cluster import pki
    from node_service.module import keys

    pki.create_site(layout.site_secrets)
    keys.generate(layout.keys_dir)
    for node in layout.nodes:
        etc = layout.private_dir(node, "/etc/rampart")
        pki.issue_node(layout.site_secrets, node.name, etc / "site")
        (etc / "trust").mkdir(mode=0o755, exist_ok=True)
        shutil.copyfile(layout.trust_pub, etc / "trust" / "lab.pub")
        (etc / "node.yaml").write_text(yaml.safe_dump(node_yaml(node), sort_keys=False))


def _write_site_file(layout: Layout) -> None:
    import yaml

    document = site_document(layout, sys.executable)
    layout.site_file.write_text(yaml.safe_dump(document, sort_keys=False))


def down(name: str) -> list[str]:
    require_root()
    layout = _leftovers(validate_name(name))
    if layout is None:
        return [f"lab {name} is not up; nothing to do"]
    host_names = sorted(
        {*(h.name for h in layout.hosts), *(e for e in netns.listed() if is_lab_netns(name, e))}
    )
    ids: set[tuple[int, int]] = set()
    for host in layout.hosts:
        ids |= hosts.host_ns_ids(layout, host)
    mounted = {m.mountpoint for m in hosts.root_mounts()}
    for mnt in layout.run_dir.glob("*.mnt") if layout.run_dir.exists() else ():
        if str(mnt) in mounted:  # a half-made lab may have more than its record says
            st = os.stat(mnt)
            ids.add((st.st_dev, st.st_ino))
    for entry in (layout.switch, *host_names):
        found = netns.ns_id(entry)
        if found:
            ids.add(found)
    # Best effort to the end: one stuck step must not leave the rest behind.
    problems: list[str] = []

    def attempt(step, *args):
        try:
            return step(*args)
        except (LabError, OSError) as exc:
            problems.append(str(exc))
            return None

    killed = attempt(hosts.kill_all, ids) or []
    for host in layout.hosts:
        attempt(hosts.destroy_mount_ns, layout, host)
    for point in under(hosts.root_mounts(), [layout.run_dir, layout.state_dir]):
        attempt(hosts.run, ["umount", "-l", point], f"unmount {point}")
    for entry in (layout.switch, *host_names):
        attempt(netns.delete, entry)
    shutil.rmtree(layout.run_dir, ignore_errors=True)
    shutil.rmtree(layout.state_dir, ignore_errors=True)
    if problems:
        raise LabError(f"lab {name} is only partly down: {'; '.join(problems)}")
    return [f"lab {name} is down: {len(killed)} processes killed, namespaces and files removed"]


# -- status ----------------------------------------------------------------
def _rampartd_running(procs: list[hosts.Proc]) -> bool:
    return any(os.path.basename(arg) == "rampartd" for p in procs for arg in p.argv[:2])


def _facts(layout: Layout, host: Host, procs: list[hosts.Proc]) -> HostFacts:
    if not netns.exists(host.name):
        return HostFacts(False, {}, {}, False, False, False)
    mine = hosts.processes_in(hosts.host_ns_ids(layout, host), procs)
    links = netns.admin_up(host.name)
    ports = netns.admin_up(layout.switch) if netns.exists(layout.switch) else {}
    return HostFacts(
        netns=True,
        links_up={link.network: links.get(link.ifname, False) for link in host.links},
        ports_up={link.network: ports.get(link.port, False) for link in host.links},
        sshd=host.is_node and sshd.running(layout, host),
        rampartd_process=host.is_node and _rampartd_running(mine),
        api_socket=layout.api_socket(host).exists(),
    )


def status(name: str) -> dict:
    require_root()
    layout = load(name)
    procs = hosts.scan()
    nodes = []
    for node in layout.nodes:
        entry, _ = judge_host(node, _facts(layout, node, procs))
        entry["api_socket"] = str(layout.api_socket(node))
        entry["log_dir"] = str(layout.private_dir(node, "/var/log/rampart"))
        nodes.append(entry)
    client, _ = judge_host(layout.client, _facts(layout, layout.client, procs))
    client["address"] = layout.client.addresses[0]
    return {
        "name": layout.name,
        "nodes": nodes,
        "client": client,
        "switch": layout.switch,
        "vip_pool": layout.vip_pool,
        "site_file": str(layout.site_file),
        "signing_key": str(layout.signing_key),
        "trust_pub": str(layout.trust_pub),
        "known_hosts": str(layout.known_hosts),
        "console_key": str(layout.console_key),
        "site_secrets": str(layout.site_secrets),
        "state_dir": str(layout.state_dir),
    }


def status_lines(doc: dict) -> list[str]:
    lines = [f"lab {doc['name']} (site file {doc['site_file']})"]
    for entry in [*doc["nodes"], doc["client"]]:
        state = "up" if entry["up"] else "DOWN"
        addresses = " ".join(entry["addresses"])
        lines.append(f"  {entry['name']:<14} {state:<5} {addresses:<30} {entry['reason']}")
    pool = doc["vip_pool"]
    lines.append(f"  VIP pool {pool[0]}-{pool[-1].rsplit('.', 1)[1]}; trust {doc['trust_pub']}")
    return lines


# -- one host ----------------------------------------------------------------
def _host(name: str, given: str) -> tuple[Layout, Host]:
    require_root()
    layout = load(name)
    return layout, resolve_host(layout, given)


def exec_argv(name: str, given: str, command: list[str]) -> list[str]:
    layout, host = _host(name, given)
    if not command:
        raise LabError("lab exec needs a command: rampart lab exec NODE -- CMD...")
    cwd = os.getcwd()
    private = any(cwd == p or cwd.startswith(p + "/") for p in PRIVATE_DIRS)
    return [*hosts.nsenter(layout, host, wd="/" if private else cwd), *command]


def crash(name: str, given: str) -> list[str]:
    layout, host = _host(name, given)
    killed = hosts.kill_all(hosts.host_ns_ids(layout, host))
    released = hosts.release_fuse(layout, host) if hosts.mount_ns_id(layout, host) else []
    netns.set_host_links(host, list(host.links), up=False)
    # Nothing mounted and nothing in /run survives a power cut: the host gets
    # a fresh mount namespace holding only its private disks.
    hosts.destroy_mount_ns(layout, host)
    hosts.prepare_dirs(layout, host)
    hosts.create_mount_ns(layout, host)
    what = ", ".join(killed) if killed else "no processes"
    lines = [f"{host.name} crashed: killed {what}; links {_ifnames(host)} down"]
    if released:
        lines.append(f"{host.name}: detached FUSE mounts {', '.join(released)}")
    return lines


def boot(name: str, given: str) -> list[str]:
    layout, host = _host(name, given)
    if hosts.mount_ns_id(layout, host) is None:
        hosts.prepare_dirs(layout, host)
        hosts.create_mount_ns(layout, host)
    netns.set_host_links(host, list(host.links), up=True)
    _settle(layout, host, [x for x in host.links if _plugged(layout, x)], up=True)
    lines = [f"{host.name} booted: links {_ifnames(host)} up"]
    if host.is_node:
        lines += _start_daemons(layout, [host])
    return lines


def cut(name: str, given: str, network: str | None, plugged: bool) -> list[str]:
    layout, host = _host(name, given)
    links = networks_arg(host, network)
    netns.set_ports(layout, links, up=plugged)
    _settle(layout, host, links, up=plugged)
    verb = "reconnected" if plugged else "cut"
    nets = ", ".join(f"{link.network} ({link.ifname})" for link in links)
    return [f"{host.name}: {verb} {nets}; its processes keep running"]


def _plugged(layout: Layout, link: Link) -> bool:
    return netns.admin_up(layout.switch).get(link.port, False)


def _settle(layout: Layout, host: Host, links: list[Link], up: bool) -> None:
    """Return only once the change is in effect, so the next packet sees it."""
    if links and not hosts.wait_until(
        lambda: netns.carrier_settled(layout, host, links, up), LINK_SETTLE_TIMEOUT_S
    ):
        names = ", ".join(x.ifname for x in links)
        raise LabError(
            f"{host.name}: links {names} not {'up' if up else 'down'} after "
            f"{LINK_SETTLE_TIMEOUT_S:g} s"
        )


def _ifnames(host: Host) -> str:
    return ", ".join(link.ifname for link in host.links)


# -- daemons -------------------------------------------------------------
def _start_daemons(layout: Layout, nodes: list[Host]) -> list[str]:
    """Start sshd and rampartd where they are not running; wait (bounded) for both."""
    procs = hosts.scan()
    to_sshd = [n for n in nodes if not sshd.running(layout, n)]
    for node in to_sshd:
        sshd.start(layout, node)
    started: dict[str, subprocess.Popen] = {}
    rampartd = str(Path(hosts.venv_bin()) / "rampartd")
    for node in nodes:
        mine = hosts.processes_in(hosts.host_ns_ids(layout, node), procs)
        if not _rampartd_running(mine):
            argv = [rampartd, "--config", "/etc/rampart/node.yaml"]
            started[node.name] = hosts.start(layout, node, argv, "rampartd.log")
    listening = sshd.wait_listening(layout, to_sshd)

    def settled() -> bool:
        return all(
            layout.api_socket(n).exists()
            or (n.name in started and started[n.name].poll() is not None)
            for n in nodes
        )

    hosts.wait_until(settled, RAMPARTD_READY_TIMEOUT_S)
    lines = []
    for node in nodes:
        ssh = "sshd listening" if listening.get(node.name, True) else "sshd NOT listening"
        lines.append(
            f"{node.name}: {ssh} on {node.addresses[0]}:22; {_rampartd_line(layout, node, started)}"
        )
    return lines


def _rampartd_line(layout: Layout, node: Host, started: dict[str, subprocess.Popen]) -> str:
    if layout.api_socket(node).exists():
        return "rampartd ready"
    proc = started.get(node.name)
    log = layout.private_dir(node, "/var/log/rampart") / "rampartd.log"
    if proc is not None and proc.poll() is not None:
        return f"rampartd exited with code {proc.returncode} (see {log})"
    return f"rampartd running but its API socket is not there after {RAMPARTD_READY_TIMEOUT_S:g} s"
