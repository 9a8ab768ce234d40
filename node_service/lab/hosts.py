"""Lab hosts as processes see them: mount namespaces, processes, daemons.

A host is a network namespace (made by netns.py) plus a persistent mount
namespace, pinned by a bind mount of its nsfs file under /run/rampart-lab/LAB/.
That directory is a private bind mount of itself, as `ip netns` does for
/run/netns: an nsfs file of a mount namespace may not sit on a shared mount,
or the namespace could end up holding a reference to itself.

Processes are "in" a host when their network or mount namespace is the
host's; that is how crash and down find them, whoever started them.
"""

from __future__ import annotations

import fcntl
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from node_service.lab import netns
from node_service.lab.site import (
    PRIVATE_DIRS,
    RUN_ROOT,
    Host,
    LabError,
    Layout,
    Mount,
    fuse_mounts,
    parse_mountinfo,
    topmost_under,
)

CMD_TIMEOUT_S = 20
KILL_TIMEOUT_S = 5.0
POLL_S = 0.05


def run(argv: list[str], what: str, input_text: str | None = None) -> str:
    try:
        done = subprocess.run(
            argv, input=input_text, capture_output=True, text=True, timeout=CMD_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        raise LabError(f"{what}: `{argv[0]}` did not finish in {CMD_TIMEOUT_S} s") from None
    if done.returncode != 0:
        raise LabError(f"{what}: {done.stderr.strip() or f'{argv[0]} exit {done.returncode}'}")
    return done.stdout


def venv_bin() -> str:
    """The bin dir of the running interpreter's venv: where rampartd lives."""
    return os.path.join(sys.prefix, "bin")


def wait_until(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_S)


# -- mount namespaces -------------------------------------------------------
def root_mounts() -> list[Mount]:
    with open("/proc/self/mountinfo") as f:
        return parse_mountinfo(f.read())


def ensure_run_root() -> None:
    RUN_ROOT.mkdir(parents=True, exist_ok=True)
    # Two labs coming up at once must not both bind it: the second bind would
    # hide the first lab's namespace files under it.
    fd = os.open(RUN_ROOT, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if not any(m.mountpoint == str(RUN_ROOT) for m in root_mounts()):
            run(["mount", "--bind", str(RUN_ROOT), str(RUN_ROOT)], "private /run/rampart-lab")
        run(["mount", "--make-private", str(RUN_ROOT)], "private /run/rampart-lab")
    finally:
        os.close(fd)


def prepare_dirs(layout: Layout, host: Host) -> None:
    for path in PRIVATE_DIRS:
        layout.private_dir(host, path).mkdir(mode=0o755, parents=True, exist_ok=True)
        # The mount point itself must exist in the shared tree (an empty dir).
        Path(path).mkdir(mode=0o755, parents=True, exist_ok=True)
    reset_run_dir(layout, host)


def reset_run_dir(layout: Layout, host: Host) -> None:
    """An empty /run, as after power-on, with the dirs sshd and rampartd expect."""
    run_dir = layout.private_dir(host, "/run")
    for child in run_dir.iterdir() if run_dir.exists() else ():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
    (run_dir / "sshd").mkdir(mode=0o755, parents=True, exist_ok=True)
    (run_dir / "rampart").mkdir(mode=0o755, exist_ok=True)


def mount_ns_id(layout: Layout, host: Host) -> tuple[int, int] | None:
    path = str(layout.mnt_file(host))
    if not any(m.mountpoint == path for m in root_mounts()):
        return None
    st = os.stat(path)
    return st.st_dev, st.st_ino


def create_mount_ns(layout: Layout, host: Host) -> None:
    mnt = layout.mnt_file(host)
    mnt.parent.mkdir(parents=True, exist_ok=True)
    mnt.touch()
    # The copy of the machine's /run holds other namespaces' nsfs mounts
    # (/run/netns/*); dropping them keeps this host from pinning those.
    script = ["set -e"]
    for point in topmost_under(root_mounts(), "/run"):
        script.append(f"umount -l {shlex.quote(point)} 2>/dev/null || true")
    for path in PRIVATE_DIRS:
        script.append(f"mount --bind {shlex.quote(str(layout.private_dir(host, path)))} {path}")
    script += shell_rc_mounts(layout, host)
    argv = ["unshare", f"--mount={mnt}", "--propagation", "private", "sh", "-c", "\n".join(script)]
    run(argv, f"mount namespace of {host.name}")


# root's shell start-up files on this machine are the machine's, not a lab
# host's: a shell rc that does slow or locking work (a version manager's
# rehash, say) would run in every ssh command a console sends to a node, and
# a `lab crash` in the middle of it can leave a lock that hangs every later
# session. Each host gets its own, plain start-up file instead.
SHELL_RC_FILES = ("/root/.bashrc", "/root/.profile", "/root/.bash_profile")


def shell_rc_mounts(layout: Layout, host: Host) -> list[str]:
    rc = layout.host_dir(host) / "root.shellrc"
    rc.write_text(f"# root's shell start-up on lab host {host.name} (written by rampart lab)\n")
    return [
        f"mount --bind {shlex.quote(str(rc))} {path}"
        for path in SHELL_RC_FILES
        if Path(path).is_file()
    ]


def destroy_mount_ns(layout: Layout, host: Host) -> None:
    mnt = layout.mnt_file(host)
    if mount_ns_id(layout, host) is not None:
        run(["umount", "-l", str(mnt)], f"release mount namespace of {host.name}")
    mnt.unlink(missing_ok=True)


def nsenter(layout: Layout, host: Host, wd: str = "/") -> list[str]:
    return [
        "nsenter",
        f"--net={layout.netns_file(host.name)}",
        f"--mount={layout.mnt_file(host)}",
        f"--wd={wd}",
        "--",
    ]


def host_mounts(layout: Layout, host: Host) -> list[Mount]:
    text = run([*nsenter(layout, host), "cat", "/proc/self/mountinfo"], f"mounts of {host.name}")
    return parse_mountinfo(text)


def release_fuse(layout: Layout, host: Host) -> list[str]:
    """Unhang and detach every FUSE mount in the host (after its daemons died).

    The host's mount namespace began as a copy of the machine's, so it also
    sees FUSE mounts the machine had then. Those belong to someone else: they
    are detached from this host only, never aborted (an abort would cut the
    connection for every namespace, the machine's included).
    """
    released = []
    machines = {m.device for m in fuse_mounts(root_mounts())}
    for mount in fuse_mounts(host_mounts(layout, host)):
        if mount.device not in machines:
            # Aborting the connection wakes anything still waiting on the dead daemon.
            abort = Path("/sys/fs/fuse/connections") / mount.device.split(":")[1] / "abort"
            try:
                abort.write_text("1")
            except OSError:
                pass
        argv = [*nsenter(layout, host), "umount", "-l", mount.mountpoint]
        subprocess.run(argv, capture_output=True, timeout=CMD_TIMEOUT_S, check=False)
        released.append(mount.mountpoint)
    return released


# -- processes -----------------------------------------------------------
@dataclass(frozen=True)
class Proc:
    pid: int
    net: tuple[int, int] | None
    mnt: tuple[int, int] | None
    argv: tuple[str, ...]
    exe: str

    @property
    def label(self) -> str:
        name = os.path.basename(self.exe or (self.argv[0] if self.argv else "?"))
        # A Python daemon is better known by its script (rampartd) than "python3".
        if name.startswith("python") and len(self.argv) > 1:
            return os.path.basename(self.argv[1])
        return name


def _ns(pid: int, kind: str) -> tuple[int, int] | None:
    try:
        st = os.stat(f"/proc/{pid}/ns/{kind}")
    except OSError:
        return None
    return st.st_dev, st.st_ino


def scan() -> list[Proc]:
    procs = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = tuple(a.decode(errors="replace") for a in f.read().split(b"\0") if a)
            exe = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            continue  # gone, or a kernel thread
        procs.append(Proc(pid, _ns(pid, "net"), _ns(pid, "mnt"), argv, exe))
    return procs


def _protected() -> set[int]:
    """This process and its ancestors: a crash never kills whoever asked for it."""
    pids, pid = set(), os.getpid()
    for _ in range(64):
        pids.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
        if pid <= 1:
            break
    return pids


def processes_in(ns_ids: set[tuple[int, int]], procs: list[Proc] | None = None) -> list[Proc]:
    protected = _protected()
    return [
        p
        for p in (procs if procs is not None else scan())
        if p.pid not in protected and (p.net in ns_ids or p.mnt in ns_ids)
    ]


def host_ns_ids(layout: Layout, host: Host) -> set[tuple[int, int]]:
    ids = {netns.ns_id(host.name), mount_ns_id(layout, host)}
    return {i for i in ids if i is not None}


def kill_all(ns_ids: set[tuple[int, int]]) -> list[str]:
    """SIGKILL every process in these namespaces until none is left (bounded)."""
    killed: list[str] = []
    if not ns_ids:
        return killed
    deadline = time.monotonic() + KILL_TIMEOUT_S
    while True:
        victims = processes_in(ns_ids)
        if not victims:
            return killed
        if time.monotonic() >= deadline:
            pids = ", ".join(str(p.pid) for p in victims)
            raise LabError(f"processes {pids} survived SIGKILL for {KILL_TIMEOUT_S} s")
        for proc in victims:
            try:
                os.kill(proc.pid, signal.SIGKILL)
                killed.append(f"{proc.label}[{proc.pid}]")
            except ProcessLookupError:
                pass
        time.sleep(POLL_S)


def start(layout: Layout, host: Host, argv: list[str], log_name: str) -> subprocess.Popen:
    """Start a daemon in the host that outlives this command (own session, log file)."""
    log_path = layout.private_dir(host, "/var/log/rampart") / log_name
    env = dict(os.environ)
    # The host's `rampart` (scripts, checkers) is the venv's, as on a node.
    env["PATH"] = f"{venv_bin()}:{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [*nsenter(layout, host), *argv],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            env=env,
        )
