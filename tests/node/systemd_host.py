"""A throwaway host booted by a real systemd, for the node package's tests.

This machine runs no systemd (PID 1 is the sandbox's own init), so the host
is made the way a container manager makes one: systemd 252 runs as PID 1 of
new PID, mount, network, UTS and cgroup namespaces, in a cgroup of its own
on the machine's cgroup2 hierarchy, and boots a root that is an overlay over
the machine's `/` with a tmpfs upper layer (dpkg, /etc and /var writes stay
there). Like systemd-nspawn it gets a fresh /proc whose /proc/sys is
read-only except /proc/sys/net (its own network namespace), a read-only
sysfs, a private /dev with only the device nodes a node needs, and
`container=` set, so the units that would change the machine (sysctl,
kernel modules, binfmt, clock) do not run; they are masked as well. It
boots `rt-boot.target` (basic.target and nothing else), not
multi-user.target, because the machine's own enabled services (sshd,
PostgreSQL...) would start too. The machine's /usr/sbin/policy-rc.d (a
Docker image's "exit 101", which makes deb-systemd-invoke start nothing) is
removed from the host's root: a server has none.

Cleanup kills the cgroup (systemd and everything it started), so nothing
survives a failed test; the mounts only ever existed in the host's mount
namespace.
"""

from __future__ import annotations

import secrets
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

HOSTNAME = "rt-sd-n1"
LAN_ADDRESS = "198.51.100.11"
BOOT_TIMEOUT_S = 60
HOST_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "DEBIAN_FRONTEND": "noninteractive",
}
# Units whose effect would reach the machine (kernel settings, modules, the
# clock) or that a container does not need. /proc/sys read-only already
# stops most of them; masking makes it independent of their conditions.
MASKED = (
    "systemd-sysctl.service",
    "systemd-modules-load.service",
    "systemd-binfmt.service",
    "proc-sys-fs-binfmt_misc.automount",
    "proc-sys-fs-binfmt_misc.mount",
    "systemd-timesyncd.service",
    "systemd-pstore.service",
    "systemd-remount-fs.service",
    "getty.target",
    "console-getty.service",
    # On a machine that runs them: udev, the kernel audit log, AppArmor
    # profiles and the network stack are the machine's, not the host's.
    "systemd-udevd.service",
    "systemd-udev-trigger.service",
    "systemd-journald-audit.socket",
    "apparmor.service",
    "systemd-networkd.service",
    "systemd-resolved.service",
)
BOOT_TARGET = """[Unit]
Description=Rampart test host: basic system only
Requires=basic.target
After=basic.target
AllowIsolate=yes
"""
# journald must not read the machine's kernel log, nor keep anything on disk.
JOURNALD_CONF = "[Journal]\nStorage=volatile\nReadKMsg=no\n"
DEVICES = ("null", "zero", "full", "random", "urandom", "tty", "fuse", "net/tun")


def cgroup2_mount() -> Path:
    """Where this machine mounts the cgroup2 (unified) hierarchy."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split(" - ", 1)
        if len(fields) == 2 and fields[1].split()[0] == "cgroup2":
            return Path(line.split()[4])
    raise AssertionError("no cgroup2 hierarchy mounted on this machine")


def _setup_script(base: Path) -> str:
    """Runs as PID 1 of the new namespaces, then execs systemd."""
    r = base / "root"
    devices = "\n".join(
        f"mkdir -p $(dirname {r}/dev/{d}); touch {r}/dev/{d}; mount --bind /dev/{d} {r}/dev/{d}"
        for d in DEVICES
    )
    units = r / "etc" / "systemd" / "system"
    masks = "\n".join(f"ln -sfn /dev/null {units}/{unit}" for unit in MASKED)
    return f"""
mount -t tmpfs -o mode=0755 rt-sd {base}
mkdir {base}/upper {base}/work {r}
mount -t overlay rt-sd -o lowerdir=/,upperdir={base}/upper,workdir={base}/work {r}
mount -t proc proc {r}/proc
mount --bind {r}/proc/sys {r}/proc/sys
mount -o remount,bind,ro {r}/proc/sys
mount --bind {r}/proc/sys/net {r}/proc/sys/net
mount -o remount,bind,rw {r}/proc/sys/net
mount -t sysfs -o ro sysfs {r}/sys
mount -t cgroup2 cgroup2 {r}/sys/fs/cgroup
mount -t tmpfs -o mode=0755 rt-dev {r}/dev
{devices}
mkdir {r}/dev/pts {r}/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts {r}/dev/pts
ln -s pts/ptmx {r}/dev/ptmx
mount -t tmpfs -o mode=1777 tmpfs {r}/dev/shm
mount -t tmpfs -o mode=0755 tmpfs {r}/run
mount -t tmpfs -o mode=1777 tmpfs {r}/tmp
hostname {HOSTNAME}
echo {HOSTNAME} > {r}/etc/hostname
mkdir -p {units} {r}/etc/systemd/journald.conf.d
printf '%s' '{BOOT_TARGET}' > {units}/rt-boot.target
printf '%s' '{JOURNALD_CONF}' > {r}/etc/systemd/journald.conf.d/rt-host.conf
{masks}
rm -f {r}/usr/sbin/policy-rc.d
ip link set lo up
ip link add eth0 type veth peer name rt-wire
ip address add {LAN_ADDRESS}/24 dev eth0
ip link set rt-wire up
ip link set eth0 up
cd {r}
pivot_root . .
umount -l .
echo ready
read -r go
exec env -i container=rampart-test PATH={HOST_ENV["PATH"]} \\
    /lib/systemd/systemd --system --unit=rt-boot.target --log-target=journal
"""


class SystemdHost:
    """A root booted by a real systemd (PID 1 of its own namespaces)."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="rt-sd-"))
        self.cgroup = cgroup2_mount() / f"rt-sd-{secrets.token_hex(4)}"
        self.starter: subprocess.Popen | None = None
        self.pid: int | None = None  # systemd, as this machine sees it
        # Not a pipe: nobody reads systemd's stderr while it runs.
        self.errors = tempfile.TemporaryFile()  # noqa: SIM115 (closed by close())

    # -- life cycle ------------------------------------------------------------

    def boot(self) -> None:
        # As systemd-nspawn does: the host's systemd gets a cgroup of its own
        # (payload, the root of its cgroup namespace) with the controllers
        # this machine delegates, and the unshare process that waits for it
        # sits beside it (supervisor), since cgroup2 allows no process in a
        # cgroup whose controllers are given to its children.
        self.cgroup.mkdir()
        controllers = (self.cgroup / "cgroup.controllers").read_text().split()
        if controllers:
            enable = " ".join(f"+{c}" for c in controllers)
            (self.cgroup / "cgroup.subtree_control").write_text(enable)
        (self.cgroup / "payload").mkdir()
        (self.cgroup / "supervisor").mkdir()
        self.starter = subprocess.Popen(
            ["sh", "-ec",
             f'echo $$ > {self.cgroup}/payload/cgroup.procs\n'
             "exec unshare --mount --net --uts --pid --cgroup --fork --kill-child "
             '--propagation private -- sh -ec "$0"',
             _setup_script(self.base)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.errors, text=True,
        )  # fmt: skip
        readable, _, _ = select.select([self.starter.stdout], [], [], BOOT_TIMEOUT_S)
        if not readable or self.starter.stdout.readline().strip() != "ready":
            self.starter.kill()
            self.starter.wait(timeout=10)
            self.errors.seek(0)
            raise AssertionError(f"the host did not boot: {self.errors.read().decode()}")
        (self.cgroup / "supervisor" / "cgroup.procs").write_text(str(self.starter.pid))
        children = Path(f"/proc/{self.starter.pid}/task/{self.starter.pid}/children")
        self.pid = int(children.read_text().split()[0])
        self.starter.stdin.write("go\n")  # the setup script execs systemd
        self.starter.stdin.close()
        # Blocks until boot is finished (or failed): the event, not a guess.
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while True:
            state = self.run("systemctl", "is-system-running", "--wait", check=False,
                             timeout=BOOT_TIMEOUT_S)  # fmt: skip
            if state.stdout.strip() in ("running", "degraded"):
                break
            # The private socket may not exist for the first instants.
            if time.monotonic() > deadline:
                raise AssertionError(f"systemd did not finish booting: {state.stdout}")
            time.sleep(0.2)
        failed = self.run("systemctl", "list-units", "--failed", "--plain", "--no-legend").stdout
        assert not failed.strip(), f"units failed at boot: {failed}"

    def close(self) -> None:
        if self.pid is not None:
            subprocess.run(["kill", "-KILL", str(self.pid)], check=False, capture_output=True)
        kill = self.cgroup / "cgroup.kill"
        if kill.exists():
            kill.write_text("1")
        if self.starter is not None:
            try:
                self.starter.wait(timeout=15)
            finally:
                self.starter.stdout.close()
                if not self.starter.stdin.closed:
                    self.starter.stdin.close()
        self.errors.close()
        self._remove_cgroup()
        shutil.rmtree(self.base, ignore_errors=True)

    def _remove_cgroup(self) -> None:
        if not self.cgroup.exists():
            return
        deadline = time.monotonic() + 15
        while True:
            try:
                for path in sorted(self.cgroup.rglob("*"), key=lambda p: -len(p.parts)):
                    if path.is_dir():
                        path.rmdir()
                self.cgroup.rmdir()
                return
            except OSError:
                # An emptied cgroup is removable only once its last process is reaped.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    # -- inside the host -------------------------------------------------------

    def run(self, *cmd: str, timeout: float = 60, check: bool = True, env: dict | None = None):
        """Run a command in the host (every namespace of its systemd, its root)."""
        done = subprocess.run(
            ["nsenter", "-t", str(self.pid), "-a", "--", "env", "-i",
             *(f"{k}={v}" for k, v in {**HOST_ENV, **(env or {})}.items()), *cmd],
            capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip
        if check:
            assert done.returncode == 0, (
                f"{cmd} exited {done.returncode}:\n{done.stdout}{done.stderr}"
            )
        return done

    def path(self, inside: str) -> Path:
        """A path of the host seen from the machine, through systemd's root."""
        return Path(f"/proc/{self.pid}/root") / inside.lstrip("/")

    def copy_in(self, src: Path) -> str:
        shutil.copyfile(src, self.path(f"/tmp/{src.name}"))
        return f"/tmp/{src.name}"

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
