"""The replication benchmark's pair: two network namespaces, a real FUSE primary, a real secondary.

``replicated_pair()`` builds, and always tears down:

- namespaces ``rt-rbXXXXp`` (primary, 198.51.100.11) and ``rt-rbXXXXs``
  (secondary, 198.51.100.12) joined by one veth pair, so the link can be
  delayed like a distant site's;
- site secrets (one CA, nodes n1 and n2) under a scratch directory in
  /var/tmp, on the same disk as the unreplicated baselines; with
  ``own_device`` the secondary's directory and dirty log are on a device of
  their own instead (``bench.repl_device``: two machines' disks);
- the **secondary** process (``python -m bench.repl_setup secondary``, in the
  secondary namespace): read-only view, dirty log, ``Receiver`` behind a
  mutual-TLS ``ReplicationServer``;
- on demand, a **primary** process per mode (``... primary``, in the primary
  namespace): dirty log, ``Sender`` connected over TLS, the FUSE layer
  mounted over the primary directory. The benchmark's workloads write into
  that mount from the bench process, as an application would, so the
  primary process's memory is the replication's alone.

Children join only the network namespace (``nsenter --net``), so their
mounts are visible to the bench. Each child answers JSON lines on stdin
(one reply per command); end of input stops it cleanly.

The link delay is ``tc netem`` on both veths (half the round trip each
side). A kernel without sch_netem (this sandbox's) gets a delaying TCP relay
in the secondary namespace instead, said in the output.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bench.replication import Run
from node_service.errors import RampartError

MODULE = "bench"
DIR = "/srv/data"  # the replicated dir's name in the stream; the real paths differ per side
PRIMARY_ADDR = "198.51.100.11"
SECONDARY_ADDR = "198.51.100.12"
TIMEOUT_S = 3.0  # the module's default heartbeat timeout
REPLY_TIMEOUT_S = 60.0
RESYNC_TIMEOUT_S = 600.0
MAX_COMMANDS = 100_000
LOG_TAIL = 8
FUSE_ONLY = "fuse-only"  # the primary's FUSE layer with a replicator that sends nothing
REPO = Path(__file__).resolve().parents[1]
# The primary mounts FUSE in a mount namespace of its own (the workloads join it):
# a lab host made later copies the machine's mounts, and its teardown aborts every
# FUSE connection it sees; ours must not be one of them. It also means a primary
# that dies takes its mount along.
PRIVATE_MOUNTS = ("--", "unshare", "--mount", "--propagation", "private")


class BenchSetupError(RampartError):
    """The benchmark's namespaces, mounts or processes could not be set up."""


# -- pure --------------------------------------------------------------------------


def netem_commands(ns: str, ifname: str, rtt_ms: float) -> list[list[str]]:
    """The tc command delaying one side of the link by half the round trip (0: no delay)."""
    if rtt_ms <= 0:
        return [["tc", "-n", ns, "qdisc", "del", "dev", ifname, "root"]]
    half = f"{rtt_ms / 2:g}ms"
    return [["tc", "-n", ns, "qdisc", "replace", "dev", ifname, "root", "netem", "delay", half]]


def memory_kib(status: str, key: str) -> int:
    """``VmRSS``/``VmHWM`` (KiB) from the text of /proc/PID/status."""
    for line in status.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise BenchSetupError(f"/proc status has no {key} line; expected a Linux process status")


def parse_reply(line: bytes, role: str) -> dict:
    """One child reply; an error reply becomes a one-line BenchSetupError."""
    try:
        reply = json.loads(line)
    except ValueError:
        raise BenchSetupError(f"{role} process answered {line[:80]!r}, expected JSON") from None
    if not isinstance(reply, dict):
        raise BenchSetupError(f"{role} process answered {reply!r}, expected an object")
    if not reply.get("ok", False):
        raise BenchSetupError(f"{role} process: {reply.get('error', 'failed')}")
    return reply


# -- the bench process's side --------------------------------------------------------


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(list(args), capture_output=True, text=True, timeout=30, check=False)
    except subprocess.TimeoutExpired:
        raise BenchSetupError(f"{' '.join(args)}: no answer within 30 s") from None
    if check and done.returncode != 0:
        raise BenchSetupError(f"{' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done


@dataclass
class Child:
    """One benchmark child process speaking JSON lines."""

    role: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    pid: int = 0
    ready: dict = field(default_factory=dict)

    @classmethod
    def start(
        cls, ns: str, role: str, args: list[str], log_path: Path, enter: tuple[str, ...] = ()
    ) -> Child:
        command = ["nsenter", f"--net=/run/netns/{ns}", *enter, "--", sys.executable, "-m"]
        command += ["bench.repl_setup", role, *args]
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                cwd=REPO,
                # entering a mount namespace resets the working directory
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )
        child = cls(role, proc, log_path)
        try:
            child.ready = child._read(REPLY_TIMEOUT_S)
        except BenchSetupError:
            child.stop()
            raise
        child.pid = int(child.ready["pid"])
        return child

    def ask(self, cmd: str, timeout: float = REPLY_TIMEOUT_S, **kw: object) -> dict:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}).encode() + b"\n")
            self.proc.stdin.flush()
        except OSError as exc:
            why = f"{self.role} process is gone ({exc}); {self._last_log()}"
            raise BenchSetupError(why) from None
        return self._read(timeout)

    def _read(self, timeout: float) -> dict:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else b""
        if not line:
            why = "no answer" if not ready else "exited"
            raise BenchSetupError(f"{self.role} process: {why}; {self._last_log()}")
        return parse_reply(line, self.role)

    def _last_log(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            lines = []
        return f"last log line: {lines[-1]}" if lines else "no log"

    def memory_kib(self, key: str) -> int:
        return memory_kib(Path(f"/proc/{self.pid}/status").read_text(), key)

    def stop(self) -> None:
        """Ask politely (end of input), then kill after a bound."""
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@dataclass
class Pair:
    """A secondary running, a primary started per mode; the link's delay settable."""

    root: Path
    primary_ns: str
    secondary_ns: str
    primary_if: str
    secondary_if: str
    secondary: Child | None = None
    primary: Child | None = None
    worker: Child | None = None
    relay: Child | None = None
    netem: bool | None = None  # None: not probed yet
    starts: int = 0
    secondary_home: Path | None = None  # the secondary's own device; None: the same disk

    @property
    def primary_dir(self) -> Path:
        return self.root / "primary"

    @property
    def secondary_dir(self) -> Path:
        return (self.secondary_home or self.root) / "secondary"

    @property
    def secondary_state(self) -> Path:
        return (self.secondary_home or self.root) / "n2-state"

    @property
    def baseline_dir(self) -> Path:
        return self.root / "baseline"

    def start_primary(self, mode: str, *, delayed: bool = False) -> Child:
        """A new primary process in ``mode``; ``delayed``: through the relay if no netem."""
        self.stop_primary()
        assert self.secondary is not None
        port = int(self.secondary.ready["port"])
        target = f"{SECONDARY_ADDR}:{port}"
        if delayed and not self.has_netem():
            target = f"{SECONDARY_ADDR}:{self._relay(port).ready['port']}"
        self.starts += 1
        args = ["--root", str(self.root), "--mode", mode, "--connect", target]
        args += ["--state", f"n1-state-{self.starts}"]
        self.primary = Child.start(
            self.primary_ns, "primary", args, self.root / "primary.log", enter=PRIVATE_MOUNTS
        )
        self.worker = Child.start(
            self.primary_ns,
            "worker",
            [],
            self.root / "worker.log",
            enter=(f"--mount=/proc/{self.primary.pid}/ns/mnt",),
        )
        return self.primary

    def work(self, workload: str, timeout: float = REPLY_TIMEOUT_S, **kw: object) -> Run:
        """Run one workload (bench.replication) in the worker, which sees the primary's mount."""
        if self.worker is None:
            raise BenchSetupError("no primary is running: start_primary() first")
        args = {k: str(v) if isinstance(v, Path) else v for k, v in kw.items()}
        reply = self.worker.ask("run", timeout, workload=workload, args=args)
        return Run(reply["amount"], reply["seconds"])

    def stop_primary(self) -> None:
        for child in (self.worker, self.primary):
            if child is not None:
                child.stop()
        self.worker = self.primary = None

    def has_netem(self) -> bool:
        if self.netem is None:
            cmd = netem_commands(self.primary_ns, self.primary_if, 2)[0]
            self.netem = run(*cmd, check=False).returncode == 0
            if self.netem:
                run(*netem_commands(self.primary_ns, self.primary_if, 0)[0])
        return self.netem

    def set_rtt(self, rtt_ms: float) -> str:
        """Delay the link to ``rtt_ms`` round trip; returns how (for the output)."""
        if self.has_netem():
            for ns, ifname in (
                (self.primary_ns, self.primary_if),
                (self.secondary_ns, self.secondary_if),
            ):
                for cmd in netem_commands(ns, ifname, rtt_ms):
                    run(*cmd, check=rtt_ms > 0)
            return "tc netem on both veths"
        assert self.secondary is not None
        self._relay(int(self.secondary.ready["port"])).ask("delay", rtt_ms=rtt_ms)
        return "a delaying TCP relay (this kernel has no sch_netem)"

    def _relay(self, port: int) -> Child:
        if self.relay is None:
            args = ["--listen", SECONDARY_ADDR, "--target", f"{SECONDARY_ADDR}:{port}"]
            self.relay = Child.start(self.secondary_ns, "relay", args, self.root / "relay.log")
        return self.relay


def _tell_logs(pair: Pair) -> None:
    """The children's last words, before teardown removes their logs."""
    for role in ("primary", "worker", "secondary", "relay"):
        path = pair.root / f"{role}.log"
        if path.exists():
            lines = path.read_text(errors="replace").strip().splitlines()[-LOG_TAIL:]
            for line in lines:
                print(f"bench: {role} process: {line}", file=sys.stderr, flush=True)


@contextmanager
def replicated_pair(
    tag: str | None = None, scratch: str = "/var/tmp", own_device: int = 0
) -> Iterator[Pair]:
    """The namespaces, site and secondary of the benchmark; everything removed on exit.

    ``own_device``: bytes of a device of the secondary's own (see
    bench.repl_device) for its directory and dirty log; 0: the scratch disk.
    """
    tag = tag or "rt-rb" + secrets.token_hex(2)
    root = Path(tempfile.mkdtemp(prefix="rampart-bench-repl-", dir=scratch))
    try:
        if own_device:
            from bench.repl_device import own_device as device

            with device(tag, root / "own-device", own_device) as home:
                yield from _pair(tag, root, home)
        else:
            yield from _pair(tag, root, None)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _pair(tag: str, root: Path, home: Path | None) -> Iterator[Pair]:
    from node_service.cluster import pki
    from node_service.replication.mount import unprotect

    pair = Pair(root, f"{tag}p", f"{tag}s", f"{tag}p0", f"{tag}s0", secondary_home=home)
    try:
        run("ip", "netns", "add", pair.primary_ns)
        run("ip", "netns", "add", pair.secondary_ns)
        run("ip", "link", "add", pair.primary_if, "type", "veth", "peer", "name", pair.secondary_if)
        run("ip", "link", "set", pair.primary_if, "netns", pair.primary_ns)
        run("ip", "link", "set", pair.secondary_if, "netns", pair.secondary_ns)
        for ns, ifname, addr in (
            (pair.primary_ns, pair.primary_if, PRIMARY_ADDR),
            (pair.secondary_ns, pair.secondary_if, SECONDARY_ADDR),
        ):
            run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", ifname)
            run("ip", "-n", ns, "link", "set", ifname, "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")
        pki.create_site(root / "site")
        for node in ("n1", "n2"):
            pki.issue_node(root / "site", node, root / node)
        for path in (pair.primary_dir, pair.secondary_dir, pair.baseline_dir):
            path.mkdir()
        args = ["--root", str(root), "--dir", str(pair.secondary_dir)]
        args += ["--state", str(pair.secondary_state)]
        pair.secondary = Child.start(pair.secondary_ns, "secondary", args, root / "secondary.log")
        yield pair
    except BaseException:
        _tell_logs(pair)
        raise
    finally:
        pair.stop_primary()
        for child in (pair.relay, pair.secondary):
            if child is not None:
                child.stop()
        unprotect(str(pair.secondary_dir))
        for ns in (pair.primary_ns, pair.secondary_ns):
            run("ip", "netns", "del", ns, check=False)  # takes its veth end (and qdisc) along


# -- the child processes -------------------------------------------------------------


def _reply(**fields: object) -> None:
    sys.stdout.write(json.dumps({"ok": True, **fields}) + "\n")
    sys.stdout.flush()


def _serve(handlers: dict) -> None:
    """Answer commands until ``stop`` or end of input (bounded)."""
    for _ in range(MAX_COMMANDS):
        line = sys.stdin.readline()
        if not line:
            return
        cmd = json.loads(line)
        if cmd.get("cmd") == "stop":
            _reply()
            return
        handler = handlers.get(cmd.get("cmd"))
        if handler is None:
            sys.stdout.write(json.dumps({"ok": False, "error": f"unknown command {cmd}"}) + "\n")
        else:
            try:
                _reply(**handler(cmd))
                continue
            except (RampartError, OSError) as exc:
                sys.stdout.write(json.dumps({"ok": False, "error": str(exc)}) + "\n")
        sys.stdout.flush()


def _secondary(args: argparse.Namespace) -> None:
    from node_service.cluster import pki
    from node_service.replication.applier import Applier
    from node_service.replication.dirty import DirtyLog, DirtyTracker
    from node_service.replication.mount import protect_readonly
    from node_service.replication.receiver import Receiver, syncfs
    from node_service.replication.transport import Endpoint, ReplicationServer

    root = Path(args.root)
    view = protect_readonly(args.dir)
    log = DirtyLog(Path(args.state) / "dirty.sqlite")
    tracker = DirtyTracker(log, name="n2", before_clear=lambda: syncfs(view.fd))
    receiver = Receiver(
        module=MODULE,
        node="n2",
        peer="n1",
        dirs=(DIR,),
        tracker=tracker,
        dirty_log=log,
        appliers=lambda: [Applier(view.fd)],
        timeout=TIMEOUT_S,
    )
    server = ReplicationServer(
        (SECONDARY_ADDR, 0), pki.tls_context(root / "n2", server=True), node="n2"
    ).start()
    server.serve(Endpoint(MODULE, "n1", receiver.accept))

    def flush(_: dict) -> dict:
        began = time.monotonic()
        syncfs(view.fd)
        return {"seconds": time.monotonic() - began}

    try:
        _reply(pid=os.getpid(), port=server.address[1])
        _serve({"syncfs": flush, "stale": lambda _: {"stale": receiver.stale}})
    finally:
        server.close()
        receiver.close()
        tracker.close()
        log.close()
        view.unprotect()


def _primary(args: argparse.Namespace) -> None:
    from node_service.cluster import pki
    from node_service.replication.dirty import DirtyLog, DirtyTracker
    from node_service.replication.mount import mount_replicated
    from node_service.replication.resync import Resync
    from node_service.replication.sender import Sender

    root = Path(args.root)
    if args.mode == FUSE_ONLY:
        _fuse_only(root)
        return
    host, _, port = args.connect.rpartition(":")
    address = (host, int(port))
    ctx = pki.tls_context(root / "n1", server=False)
    log = DirtyLog(root / args.state / "dirty.sqlite")
    tracker = DirtyTracker(log, name="n1")
    sender = Sender(
        module=MODULE,
        node="n1",
        peer="n2",
        dirs=(DIR,),
        tracker=tracker,
        mode=args.mode,
        timeout=TIMEOUT_S,
    )
    mount = None
    try:
        sender.connect(address, ctx)
        mount = mount_replicated(str(root / "primary"), sender.replicator(DIR), name="bench")

        def resync(_: dict) -> dict:
            began = time.monotonic()
            passes = Resync(
                sender, [mount.root_fd], ordering=[mount.operations], timeout=RESYNC_TIMEOUT_S
            )
            result = passes.run(lambda: sender.connect(address, ctx, resync=True), full=False)
            drained = sender.drain(RESYNC_TIMEOUT_S)
            return {
                "seconds": time.monotonic() - began,
                "bytes_resent": result.bytes_resent,
                "regions": result.regions,
                "drained": drained,
                "reason": result.reason,
            }

        def absent(_: dict) -> dict:
            sender.mark_absent("benchmark: the secondary is away")
            return {"link": sender.link.value}

        def stats(_: dict) -> dict:
            s = sender.stats()
            return {"link": s.link, "ops": s.ops, "lag_bytes": s.lag_bytes, "reason": s.reason}

        _reply(pid=os.getpid(), link=sender.link.value)
        _serve({"resync": resync, "absent": absent, "stats": stats})
    finally:
        if mount is not None:
            mount.unmount()
        sender.close()
        tracker.close()
        log.close()


class Discard:
    """A Replicator that sends nothing: what the FUSE layer costs by itself."""

    def submit(self, op: object) -> None:
        return None

    def wait(self, ticket: object) -> None:
        return None


def _fuse_only(root: Path) -> None:
    from node_service.replication.mount import mount_replicated

    with mount_replicated(str(root / "primary"), Discard(), name="bench"):
        _reply(pid=os.getpid(), link="none (FUSE only)")
        _serve({})


def _worker(_: argparse.Namespace) -> None:
    from bench import replication

    def run_workload(cmd: dict) -> dict:
        name = cmd["workload"]
        if name not in replication.WORKLOADS:
            raise BenchSetupError(f"unknown workload {name!r}; known: {replication.WORKLOADS}")
        done = getattr(replication, name)(**cmd["args"])
        return {"amount": done.amount, "seconds": done.seconds}

    _reply(pid=os.getpid())
    _serve({"run": run_workload})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.repl_setup")
    roles = parser.add_subparsers(dest="role", required=True)
    sec = roles.add_parser("secondary")
    sec.add_argument("--root", required=True)
    sec.add_argument("--dir", required=True)
    sec.add_argument("--state", required=True)
    pri = roles.add_parser("primary")
    pri.add_argument("--root", required=True)
    pri.add_argument("--mode", required=True, choices=("sync", "semi", "async", FUSE_ONLY))
    pri.add_argument("--connect", required=True)
    pri.add_argument("--state", required=True)
    roles.add_parser("worker")
    rel = roles.add_parser("relay")
    rel.add_argument("--listen", required=True)
    rel.add_argument("--target", required=True)
    args = parser.parse_args(argv)
    # stderr is the child's log file: the replication's own log lines land there
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(threadName)s %(message)s")
    try:
        if args.role == "secondary":
            _secondary(args)
        elif args.role == "primary":
            _primary(args)
        elif args.role == "worker":
            _worker(args)
        else:
            from bench.repl_relay import serve_relay

            serve_relay(args.listen, args.target, _reply, _serve)
    except RampartError as exc:
        sys.stdout.write(json.dumps({"ok": False, "error": str(exc)}) + "\n")
        sys.stdout.flush()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
