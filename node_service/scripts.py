"""Running a module's scripts (``bin/prestart``, ``bin/start_prim``...).

A script runs in its own session and process group, with the module
directory as working directory, stdin from /dev/null and a small explicit
environment (``script_env``): the daemon's own environment is not passed on.
Its stdout and stderr share one pipe; each line goes to ``on_line`` (the
journal) as it arrives and the last lines are kept in the result.

The rules that keep a script from hanging the engine or leaving strays
(docs/dev/side-effects.md):

- timeout: SIGTERM to the whole process group, SIGKILL to the group after
  ``kill_grace_s``; the script process is always reaped;
- the caller being cancelled (daemon shutdown) kills the group the same way;
- a script that exits normally keeps its background children (that is how a
  start script launches the application); output is read until the script
  exits and then for ``output_grace_s`` more, after which the pipe is closed.
  A background child still holding the pipe is reported in the result: it
  should redirect its own output, or it gets EPIPE on its next write.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from node_service.errors import ModuleError

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TAIL_LINES = 20
MAX_LINE = 4096  # longer lines are cut: a runaway script must not fill memory
KILL_GRACE_S = 5.0
OUTPUT_GRACE_S = 0.5
NOT_EXECUTABLE = 126  # the shell's status for "found but cannot be run"

OnLine = Callable[[str], object]


@dataclass(frozen=True)
class ProcessOutcome:
    """How one child process ended."""

    returncode: int
    timed_out: bool
    duration_s: float
    output_tail: tuple[str, ...]
    output_held_open: bool  # a background child kept the output pipe open


@dataclass(frozen=True)
class ScriptResult:
    name: str
    returncode: int | None  # None: no such script; 126: it could not be run
    timed_out: bool
    duration_s: float
    output_tail: tuple[str, ...]
    reason: str

    @property
    def ok(self) -> bool:
        """True when the script succeeded or there was nothing to run."""
        return self.returncode in (0, None) and not self.timed_out


def script_env(module: str, module_dir: str, node: str, state: str, action: str) -> dict[str, str]:
    """The environment contract of ARCHITECTURE §3."""
    return {
        "RAMPART_MODULE": module,
        "RAMPART_MODULE_DIR": str(module_dir),
        "RAMPART_NODE": node,
        "RAMPART_STATE": state,
        "RAMPART_ACTION": action,
    }


class _LinePipe(asyncio.Protocol):
    """Splits the child's output into lines and hands each one on."""

    def __init__(self, on_line: OnLine | None):
        self._on_line = on_line
        self._partial = b""
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.closed = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self._partial += data
        *lines, self._partial = self._partial.split(b"\n")
        if len(self._partial) > MAX_LINE:
            lines.append(self._partial)
            self._partial = b""
        for line in lines:
            self._line(line)

    def _line(self, raw: bytes) -> None:
        text = raw[:MAX_LINE].decode("utf-8", "replace").rstrip("\r")
        self.tail.append(text)
        if self._on_line is not None:
            self._on_line(text)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._partial:
            self._line(self._partial)
            self._partial = b""
        if not self.closed.done():
            self.closed.set_result(None)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


async def _end_group(proc: asyncio.subprocess.Process, kill_grace_s: float) -> None:
    """SIGTERM the group, give it ``kill_grace_s``, then SIGKILL what is left."""
    _signal_group(proc.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), kill_grace_s)
    except TimeoutError:
        pass
    _signal_group(proc.pid, signal.SIGKILL)
    await proc.wait()


async def run_process(
    argv: Sequence[str],
    *,
    cwd: str,
    env: Mapping[str, str],
    timeout_s: float,
    on_line: OnLine | None = None,
    kill_grace_s: float = KILL_GRACE_S,
    output_grace_s: float = OUTPUT_GRACE_S,
) -> ProcessOutcome:
    """Run ``argv`` under the rules above and report how it ended."""
    loop = asyncio.get_running_loop()
    full_env = {"PATH": DEFAULT_PATH, "LANG": "C.UTF-8", **env}
    read_fd, write_fd = os.pipe()
    started = time.monotonic()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=write_fd,
            stderr=asyncio.subprocess.STDOUT,
            cwd=cwd,
            env=full_env,
            start_new_session=True,
        )
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)  # only the children hold the write end now
    timed_out = False
    held_open = False
    transport = None
    output = os.fdopen(read_fd, "rb", buffering=0)
    try:
        transport, pipe = await loop.connect_read_pipe(lambda: _LinePipe(on_line), output)
        try:
            await asyncio.wait_for(proc.wait(), timeout_s)
        except TimeoutError:
            timed_out = True
            await _end_group(proc, kill_grace_s)
        try:
            await asyncio.wait_for(asyncio.shield(pipe.closed), output_grace_s)
        except TimeoutError:
            held_open = True
    finally:
        if proc.returncode is None:  # cancelled: nothing may outlive the caller
            await asyncio.shield(_end_group(proc, kill_grace_s))
        if transport is not None:
            transport.close()
        else:
            output.close()
    return ProcessOutcome(
        returncode=proc.returncode,
        timed_out=timed_out,
        duration_s=time.monotonic() - started,
        output_tail=tuple(pipe.tail),
        output_held_open=held_open,
    )


def script_path(module_dir: str, name: str) -> str:
    """``module_dir/bin/name``; a name with a path in it is refused."""
    if not name or "/" in name or name in (".", ".."):
        raise ModuleError(f"script name {name!r}: expected a plain file name inside bin/")
    return os.path.join(module_dir, "bin", name)


async def run_script(
    module_dir: str,
    name: str,
    *,
    env: Mapping[str, str],
    timeout_s: float,
    on_line: OnLine | None = None,
    kill_grace_s: float = KILL_GRACE_S,
    output_grace_s: float = OUTPUT_GRACE_S,
) -> ScriptResult:
    """Run ``bin/<name>`` of the module; a missing script means nothing to do."""
    module_dir = str(module_dir)
    path = script_path(module_dir, name)
    if not os.path.lexists(path):
        return ScriptResult(name, None, False, 0.0, (), f"no bin/{name} in module: nothing to do")
    if not os.path.isfile(path) or not os.access(path, os.X_OK):
        return ScriptResult(
            name,
            NOT_EXECUTABLE,
            False,
            0.0,
            (),
            f"{path} is not executable: expected a file with mode 0755 (chmod +x)",
        )
    try:
        outcome = await run_process(
            [path],
            cwd=module_dir,
            env={"RAMPART_MODULE_DIR": module_dir, **env},
            timeout_s=timeout_s,
            on_line=on_line,
            kill_grace_s=kill_grace_s,
            output_grace_s=output_grace_s,
        )
    except OSError as exc:  # e.g. a bad #! line
        reason = f"{path} cannot run: {exc.strerror} (check its #! line)"
        return ScriptResult(name, NOT_EXECUTABLE, False, 0.0, (), reason)
    return ScriptResult(
        name=name,
        returncode=outcome.returncode,
        timed_out=outcome.timed_out,
        duration_s=outcome.duration_s,
        output_tail=outcome.output_tail,
        reason=_reason(name, outcome, timeout_s),
    )


def _reason(name: str, outcome: ProcessOutcome, timeout_s: float) -> str:
    took = f"{outcome.duration_s:.1f} s"
    if outcome.timed_out:
        text = f"bin/{name} timed out after {timeout_s:g} s: process group killed"
    elif outcome.returncode == 0:
        text = f"bin/{name} succeeded in {took}"
    elif outcome.returncode < 0:
        text = f"bin/{name} killed by signal {-outcome.returncode} after {took}"
    else:
        text = f"bin/{name} failed with exit status {outcome.returncode} after {took}"
    if outcome.output_held_open:
        text += (
            "; a background process still holds the script's output: "
            "redirect its output (>>LOG 2>&1) so it does not get EPIPE"
        )
    return text
