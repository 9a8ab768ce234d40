"""`make demo`: the product end to end, one step after another, printed.

Each step runs the same `rampart` verbs a person would type, so the demo
proves the commands, not internals. First the module workflow (key, module,
validate, build, verify, inspect; kept in ./out/demo), then a 2-node lab
named "demo": the sample mirror module installed and started on both nodes,
both states, a crash of the primary with the outage a client sees, the new
primary. The lab is left up for a look around.

This file also holds what `make bench` reuses: ``LabDriver`` (the lab and a
module in it, driven through the CLI) and the client probe that runs on the
lab's client host (``python -m node_service.demo probe URL``), connecting to
the virtual IP every 50 ms and recording which node answered.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node_service.cli import main as rampart
from node_service.errors import RampartError

OUT = Path("out/demo")
LAB = "demo"
MODULE = "web"
PORT = 80
ROLES_TIMEOUT_S = 90.0
PROBE_INTERVAL_S = 0.05
ATTEMPT_TIMEOUT_S = 0.5  # below the 1 s SYN retransmit: a late answer never hides an outage
SETTLE_SUCCESSES = 10  # the probe stops after this many successes in a row once recovered
VENV_BIN = Path(sys.prefix) / "bin"
PROBE = (sys.executable, "-m", "node_service.demo", "probe")


class DemoError(RampartError):
    """A demo or benchmark step did not reach the expected outcome."""


# -- part 1: the module workflow, in process -----------------------------------


def step(title: str, *argv: str) -> None:
    print(f"\n== {title}\n$ rampart {shlex.join(argv)}", flush=True)
    code = rampart(list(argv))
    sys.stdout.flush()
    if code != 0:
        raise SystemExit(f"demo: step failed (exit {code}): rampart {shlex.join(argv)}")


def module_new_argv(out: Path, lab: str, vip: str) -> tuple[str, ...]:
    """`rampart module new` for the sample mirror module on the nodes of lab ``lab``."""
    return (
        "module", "new", MODULE, "--template", "mirror", "--out", str(out / MODULE),
        "--node", f"{lab}-n1=198.51.100.11,203.0.113.11",
        "--node", f"{lab}-n2=198.51.100.12,203.0.113.12",
        "--vip", vip, "--dir", f"/srv/{MODULE}", "--port", str(PORT),
    )  # fmt: skip


def module_demo(out: Path, lab: str = LAB) -> Path:
    """Create a key, write the sample mirror module, build, sign and verify it."""
    keys, safe = out / "keys", out / f"{MODULE}.safe"
    step("Create a signing key", "keygen", "--out", str(keys))
    step("Write a mirror module from the template", *module_new_argv(out, lab, "198.51.100.200"))
    src = out / MODULE
    step("Validate it", "module", "validate", str(src))
    step("Build and sign it", "module", "build", str(src), "--key", str(keys / "signing.key"),
         "--out", str(safe))  # fmt: skip
    step("Verify it against the trusted key", "module", "verify", str(safe),
         "--trust", str(keys / "signing.pub"))  # fmt: skip
    step("Inspect it", "module", "inspect", str(safe))
    return src


# -- the client probe (pure part) ----------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One connection attempt from the client: when it started, and who answered."""

    t: float  # time.monotonic() at the start of the attempt (one clock for all namespaces)
    ok: bool
    node: str | None  # the node named by node.txt, or None on failure
    error: str | None = None


@dataclass(frozen=True)
class Outage:
    """What a client saw: failures from ``first_failure`` until ``recovered``."""

    first_failure: float | None
    recovered: float | None
    failures: int
    before: str | None
    after: str | None
    reason: str

    @property
    def seconds(self) -> float | None:
        if self.first_failure is None:
            return 0.0 if self.recovered is not None else None
        return None if self.recovered is None else self.recovered - self.first_failure


def find_outage(samples: Sequence[Sample], since: float = float("-inf")) -> Outage:
    """The first outage at or after ``since``: first failure -> first success again.

    A change of the answering node without any failure is a zero-length
    outage (a clean handover), recovered at the first answer of the new node.
    """
    ordered = sorted(samples, key=lambda s: s.t)
    before = next((s.node for s in reversed(ordered) if s.ok and s.t < since), None)
    first_failure: Sample | None = None
    failures = 0
    for s in (s for s in ordered if s.t >= since):
        if not s.ok:
            first_failure = first_failure or s
            failures += 1
        elif first_failure is not None:
            why = f"{failures} failed connection(s), then {s.node} answered"
            return Outage(first_failure.t, s.t, failures, before, s.node, why)
        elif before is None:
            before = s.node
        elif s.node != before:
            why = f"{s.node} answered instead of {before} without any failure"
            return Outage(None, s.t, 0, before, s.node, why)
    if first_failure is None:
        return Outage(None, None, 0, before, None, "no failure and no change of node seen")
    why = f"{failures} failed connection(s) and no answer since"
    return Outage(first_failure.t, None, failures, before, None, why)


def recovered(samples: Sequence[Sample], settle: int = SETTLE_SUCCESSES) -> bool:
    """The probe may stop: an outage (or a node change) happened and ended ``settle`` ago."""
    ordered = sorted(samples, key=lambda s: s.t)
    start = next((i for i, s in enumerate(ordered) if s.ok), None)
    if start is None:
        return False
    outage = find_outage(ordered[start:], ordered[start].t)
    if outage.recovered is None:
        return False
    tail = ordered[-settle:]
    return len(tail) == settle and tail[0].t >= outage.recovered and all(s.ok for s in tail)


# -- the client probe (side effects: runs on the lab's client host) -------------


async def _attempt(session: Any, url: str, samples: list[Sample]) -> None:
    import aiohttp

    start = time.monotonic()
    try:
        async with session.get(url) as response:
            body = (await response.text()).strip()
        ok = response.status == 200
        samples.append(
            Sample(start, ok, body if ok else None, None if ok else f"HTTP {response.status}")
        )
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        samples.append(Sample(start, False, None, type(exc).__name__))


async def probe(
    url: str, max_s: float, until_recovered: bool, emit: Callable[[dict[str, Any]], None]
) -> list[Sample]:
    """Start one GET every PROBE_INTERVAL_S (each on its own connection) until done.

    Attempts overlap (each may take up to ATTEMPT_TIMEOUT_S), so a hung
    connection never stretches the 50 ms spacing. Emits ``serving`` once at
    the first success; stops at ``max_s``, on SIGTERM, or once recovered.
    """
    import aiohttp

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    samples: list[Sample] = []
    attempts: set[asyncio.Task[None]] = set()
    timeout = aiohttp.ClientTimeout(total=ATTEMPT_TIMEOUT_S)
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    announced = False
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.monotonic()
        for tick in range(int(max_s / PROBE_INTERVAL_S) + 1):
            if stop.is_set() or (until_recovered and recovered(samples)):
                break
            task = loop.create_task(_attempt(session, url, samples), name=f"probe-attempt-{tick}")
            attempts.add(task)
            task.add_done_callback(attempts.discard)
            if not announced and any(s.ok for s in samples):
                announced = True
                emit({"event": "serving", "node": next(s.node for s in samples if s.ok)})
            # Pacing, not synchronisation: the next attempt starts on the 50 ms grid.
            delay = start + (tick + 1) * PROBE_INTERVAL_S - time.monotonic()
            try:
                await asyncio.wait_for(stop.wait(), max(0.0, delay))
            except TimeoutError:
                pass
        await asyncio.gather(*attempts, return_exceptions=True)
    return samples


def run_probe_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m node_service.demo probe")
    parser.add_argument("url")
    parser.add_argument("--max-seconds", type=float, default=60.0)
    parser.add_argument("--until-recovered", action="store_true")
    parser.add_argument("--once", action="store_true", help="one GET; print who answered")
    args = parser.parse_args(argv)

    def emit(doc: dict[str, Any]) -> None:
        print(json.dumps(doc, separators=(",", ":")), flush=True)

    max_s = 0.0 if args.once else max(0.0, min(args.max_seconds, 3600.0))
    samples = asyncio.run(probe(args.url, max_s, args.until_recovered, emit))
    if args.once:
        first = samples[0] if samples else Sample(0, False, None, "no attempt")
        print(f"GET {args.url}: " + (f"{first.node}" if first.ok else f"failed ({first.error})"))
        return 0 if first.ok else 1
    emit({"event": "done", "samples": [[s.t, s.ok, s.node or s.error] for s in samples]})
    return 0


def parse_samples(rows: list[list[Any]]) -> list[Sample]:
    return [Sample(t, ok, who if ok else None, None if ok else who) for t, ok, who in rows]


# -- the lab, driven through the CLI -------------------------------------------


def up_to_date(state: dict[str, Any]) -> bool:
    """A SECOND's copy is usable: replication says so (or, with replication off, the runner)."""
    status = (state.get("replication") or {}).get("status")
    return status == "uptodate" or (status == "off" and state.get("uptodate") is True)


class ProbeRun:
    """A probe running on the client host; read its ``serving`` line, then its samples."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name="probe-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _next(self, deadline: float) -> dict[str, Any] | None:
        while True:
            try:
                line = self._lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                return None
            if line is None:
                return None
            if line.startswith("{"):
                return json.loads(line)

    def wait_serving(self, timeout: float) -> str:
        doc = self._next(time.monotonic() + timeout)
        if not doc or doc.get("event") != "serving":
            self.stop()
            raise DemoError(f"the client never reached the virtual IP within {timeout:g} s")
        return str(doc["node"])

    def samples(self, timeout: float) -> list[Sample]:
        """Wait (bounded) for the probe to finish; stop it at the deadline."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGTERM)
        doc = self._next(time.monotonic() + 10.0)
        self.stop()
        if not doc or doc.get("event") != "done":
            raise DemoError("the client probe ended without reporting its samples")
        return parse_samples(doc["samples"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


class LabDriver:
    """One lab and one mirror module in it, through `rampart` as a person types it.

    With ``show`` each verb is printed as ``$ rampart ...`` with its output;
    without it (the benchmarks) the verbs run quietly.
    """

    def __init__(self, name: str, show: Callable[[str, str], None] | None = None) -> None:
        self.name = name
        self.show = show
        self.env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}"}
        self.status: dict[str, Any] = {}

    def rampart(
        self, *argv: str, timeout: float = 120.0, check: bool = True, quiet: bool = False
    ) -> subprocess.CompletedProcess[str]:
        try:
            done = subprocess.run(
                [str(VENV_BIN / "rampart"), *argv],
                capture_output=True,
                text=True,
                timeout=timeout,
                env=self.env,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise DemoError(f"`rampart {shlex.join(argv)}` took more than {timeout:g} s") from None
        if self.show and not quiet:
            self.show(f"$ rampart {shlex.join(argv)}", (done.stdout + done.stderr).rstrip())
        if check and done.returncode != 0:
            raise DemoError(
                f"`rampart {shlex.join(argv)}` failed (exit {done.returncode}): "
                f"{(done.stderr or done.stdout).strip()}"
            )
        return done

    def on(self, node: str, *argv: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        """`rampart ARGV` on a lab node (`rampart lab exec NODE -- rampart ...`)."""
        return self.rampart("lab", "exec", node, "--", "rampart", *argv, **kw)

    @property
    def nodes(self) -> list[str]:
        return [n["name"] for n in self.status["nodes"]]

    @property
    def client(self) -> str:
        return str(self.status["client"]["name"])

    def is_up(self) -> bool:
        done = self.rampart("lab", "status", "--name", self.name, "--json", check=False, quiet=True)
        return done.returncode == 0

    def up(self) -> None:
        self.rampart("lab", "up", "--name", self.name)
        self.refresh()

    def refresh(self) -> dict[str, Any]:
        done = self.rampart("lab", "status", "--name", self.name, "--json", quiet=True)
        self.status = json.loads(done.stdout)
        return self.status

    def down(self) -> None:
        self.rampart("lab", "down", "--name", self.name, check=False, timeout=180.0)

    def install(self, src: Path, out: Path) -> Path:
        """Sign the module with the key every lab node trusts, install and start it."""
        safe = (out / f"{MODULE}-{self.name}.safe").resolve()
        self.rampart("module", "build", str(src), "--key", self.status["signing_key"],
                     "--out", str(safe))  # fmt: skip
        for node in self.nodes:
            self.on(node, "module", "install", str(safe))
        for node in self.nodes:
            self.on(node, "start", "-m", MODULE)
        return safe

    def state(self, node: str) -> dict[str, Any]:
        """`rampart state -m web --json` on a node; ``{"state": "down"}`` if it does not answer."""
        done = self.on(node, "state", "-m", MODULE, "--json", check=False, quiet=True, timeout=30)
        if done.returncode != 0:
            return {"node": node, "state": "down", "error": (done.stderr or done.stdout).strip()}
        return dict(json.loads(done.stdout))

    def roles(self, timeout: float = ROLES_TIMEOUT_S) -> tuple[str, str]:
        """Wait (bounded) for one PRIM and one SECOND that is up to date; return both names.

        Polled, because "up to date" is a replication status, not a state
        `rampart wait` could wait for.
        """
        deadline = time.monotonic() + timeout
        states: dict[str, dict[str, Any]] = {}
        for _ in range(int(timeout / 0.5) + 1):
            states = {n: self.state(n) for n in self.nodes}
            prim = [n for n, s in states.items() if s.get("state") == "PRIM"]
            second = [n for n, s in states.items() if s.get("state") == "SECOND" and up_to_date(s)]
            if len(prim) == 1 and len(second) == 1:
                return prim[0], second[0]
            if any(s.get("state") in ("unsupported", "error") for s in states.values()):
                break  # waiting cannot help: the node cannot run the module at all
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        seen = "; ".join(
            f"{n} {s.get('state')}" + (f" ({s['error']})" if s.get("error") else "")
            for n, s in states.items()
        )
        raise DemoError(
            f"module {MODULE} has no PRIM and up-to-date SECOND after {timeout:g} s: {seen}"
        )

    def serving(self, timeout: float = ROLES_TIMEOUT_S, nodes: Sequence[str] = ()) -> str:
        """Wait (bounded) until one of ``nodes`` serves (PRIM or ALONE); return it."""
        for node in nodes:
            argv = ("wait", "-m", MODULE, "--state", "PRIM,ALONE", "--timeout", f"{timeout:g}")
            done = self.on(node, *argv, check=False, timeout=timeout + 30)
            if done.returncode == 0:
                return node
        raise DemoError(f"none of {', '.join(nodes)} served module {MODULE} within {timeout:g} s")

    def url(self) -> str:
        return f"http://{self.vip()}:{PORT}/node.txt"

    def vip(self) -> str:
        return str(self.status["vip_pool"][0])

    def start_probe(self, max_s: float, until_recovered: bool = True) -> ProbeRun:
        until = ["--until-recovered"] if until_recovered else []
        argv = [str(VENV_BIN / "rampart"), "lab", "exec", self.client, "--", *PROBE, self.url(),
                "--max-seconds", f"{max_s:g}", *until]  # fmt: skip
        if self.show:
            self.show(f"$ {shlex.join(['rampart', *argv[1:]])} &", "")
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=self.env
        )
        return ProbeRun(proc)

    def events(self, node: str, limit: int = 200) -> list[dict[str, Any]]:
        argv = ("events", "-m", MODULE, "-n", str(limit), "--json")
        done = self.on(node, *argv, quiet=True, check=False, timeout=30)
        return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


# -- part 2: the lab -------------------------------------------------------------


def lab_demo(src: Path, out: Path, name: str = LAB) -> int:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, soft_wrap=True)

    def show(command: str, output: str) -> None:
        console.print(command, style="bold cyan", markup=False)
        if output:
            console.print(output, markup=False)

    def states_table(lab: LabDriver, title: str, crashed: str | None = None) -> None:
        table = Table(title=title, title_justify="left")
        for column in ("node", "state", "since", "peer", "replication"):
            table.add_column(column)
        for node in lab.nodes:
            if node == crashed:
                table.add_row(node, "[red]crashed[/]", "-", "-", "-")
                continue
            show(f"$ rampart lab exec {node} -- rampart state -m {MODULE} --json  # as a table", "")
            s = lab.state(node)
            since = time.strftime("%H:%M:%S", time.localtime(s["since"])) if s.get("since") else "-"
            peers = ", ".join(
                f"{p} {v.get('state') if v.get('reachable') else 'lost'}"
                for p, v in (s.get("peers") or {}).items()
            )
            style = {"PRIM": "green", "ALONE": "yellow", "SECOND": "blue"}.get(s["state"], "red")
            repl = str((s.get("replication") or {}).get("status", "-"))
            table.add_row(node, f"[{style}]{s['state']}[/]", since, peers or "-", repl)
        console.print(table)

    lab = LabDriver(name, show)
    console.rule(f"[bold]A 2-node lab named {name!r}")
    if lab.is_up():
        console.print(f"lab {name} is already up (a previous demo): taking it down first")
        lab.down()
    lab.up()
    console.rule("[bold]Install the sample mirror module on both nodes and start it")
    lab.install(src, out)
    prim, second = lab.roles()
    states_table(lab, f"Module {MODULE}: {prim} serves, {second} has an up-to-date copy")
    lab.rampart("lab", "exec", lab.client, "--", *PROBE, lab.url(), "--once")

    console.rule(f"[bold]Crash the primary {prim} while the client connects every 50 ms")
    probe_run = lab.start_probe(max_s=60.0)
    before = probe_run.wait_serving(15.0)
    crashed_at = time.monotonic()
    lab.rampart("lab", "crash", prim)
    lab.serving(nodes=[second])
    outage = find_outage(probe_run.samples(70.0), since=crashed_at)
    print_outage(console, outage, before)
    states_table(lab, f"After the crash: {second} serves alone", crashed=prim)
    lab.on(second, "events", "-m", MODULE, "-n", "6")
    show_console(lab)
    console.rule("[bold]The lab stays up")
    console.print(
        f"Look at it: rampart lab status --name {name} · "
        f"rampart lab exec {second} -- rampart state · rampart lab boot {prim} (brings it back "
        f"as SECOND)\nTake it down: rampart lab down --name {name}",
        markup=False,
    )
    return 0 if outage.seconds is not None else 1


def print_outage(console: Any, outage: Outage, before: str) -> None:
    def clock(t: float) -> str:
        wall = time.time() - (time.monotonic() - t)
        return time.strftime("%H:%M:%S", time.localtime(wall)) + f".{int(wall % 1 * 1000):03d}"

    if outage.seconds is None:
        console.print(f"[red]client: no recovery seen[/] ({outage.reason})")
        return
    start = clock(outage.first_failure) if outage.first_failure is not None else "-"
    console.print(
        f"client-visible outage: [bold]{outage.seconds:.2f} s[/] — first failure {start}, "
        f"first success again {clock(outage.recovered or 0)}; served by {before} before, "
        f"by [bold]{outage.after}[/] after ({outage.reason})"
    )


def show_console(lab: LabDriver, after_s: float = 5.0, timeout_s: float = 90.0) -> None:
    """Open the console on the lab; with no display, screenshot each window under Xvfb.

    Never fails the demo: whatever goes wrong is one line, and the lab stays up.
    """
    site = str(lab.status["site_file"])
    command = [str(VENV_BIN / "rampart-console"), "--site", site]
    if os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"):
        log = OUT / "console.log"
        try:
            with open(log, "ab") as out:
                proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=out, start_new_session=True)  # fmt: skip
        except OSError as exc:
            print(f"console: could not start it ({exc.strerror}); run: {shlex.join(command)}")
            return
        print(f"console: opened on site {site} (pid {proc.pid}, messages in {log}); "
              f"close its window, or `kill {proc.pid}`")  # fmt: skip
        return
    xvfb_run = shutil.which("xvfb-run")
    if xvfb_run is None:
        print(f"console: no display and no xvfb-run (apt install xvfb); on a desktop run: "
              f"{shlex.join(command)}")  # fmt: skip
        return
    shots = OUT / "console"
    # xvfb-run -a: a private X server on a free display, stopped when the console exits.
    argv = [xvfb_run, "-a", "-s", "-screen 0 1280x1024x24 -nolisten tcp", *command,
            "--screenshot-all", str(shots), "--after", f"{after_s:g}"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "QT_QPA_PLATFORM"}
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env,
                                start_new_session=True)  # fmt: skip
    except OSError as exc:
        print(f"console: could not run xvfb-run ({exc.strerror}); run: {shlex.join(command)}")
        return
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the console and its Xvfb: one session
        proc.communicate()
        print(f"console: screenshots took more than {timeout_s:g} s; stopped")
        return
    paths = [line for line in stdout.splitlines() if line.endswith(".png")]
    if proc.returncode != 0 or not paths:
        why = (stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        print(f"console: screenshots under Xvfb failed: {why}")
        return
    print("console: no display here, so each window was captured under Xvfb:")
    for path in paths:
        print(f"  {path}")
    print(f"console: on a desktop, open it with: {shlex.join(command)}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["probe"]:
        return run_probe_cli(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m node_service.demo", description=__doc__)
    parser.add_argument("--no-lab", action="store_true", help="only the module workflow")
    parser.add_argument("--lab", default=LAB, help=f"lab name (default {LAB!r})")
    args = parser.parse_args(argv)
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    src = module_demo(OUT, args.lab)
    print(f"\ndemo: signed module at {OUT / (MODULE + '.safe')}; keys under {OUT / 'keys'}")
    if args.no_lab:
        return 0
    if os.geteuid() != 0:
        print("demo: the lab part needs root (network namespaces); run `sudo make demo`")
        return 1
    try:
        return lab_demo(src, OUT, args.lab)
    except RampartError as exc:
        print(
            f"demo: {exc}\ndemo: the lab is left up to look at; take it down with: "
            f"rampart lab down --name {args.lab}",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
