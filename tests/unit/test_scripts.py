"""Module scripts: environment, output, timeouts, strays, and missing scripts.

These run real shell scripts in a temporary module directory.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from node_service.checkers.process import process_alive
from node_service.errors import ModuleError
from node_service.scripts import NOT_EXECUTABLE, run_script, script_env


@pytest.fixture
def module_dir(tmp_path):
    (tmp_path / "bin").mkdir()
    strays: list[int] = []
    yield tmp_path, strays
    for pid in strays:  # background children a test left behind on purpose
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def write_script(module: Path, name: str, body: str, mode: int = 0o755) -> Path:
    path = module / "bin" / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(mode)
    return path


def wait_until(condition, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def run(module: Path, name: str, timeout_s: float = 10.0, **kw):
    lines: list[str] = []
    env = kw.pop("env", script_env("web", str(module), "lab-n1", "PRIM", "start"))
    result = asyncio.run(
        run_script(str(module), name, env=env, timeout_s=timeout_s, on_line=lines.append, **kw)
    )
    return result, lines


def test_env_cwd_stdin_and_output(module_dir):
    module, _ = module_dir
    write_script(
        module,
        "start_prim",
        'echo "$RAMPART_MODULE $RAMPART_NODE $RAMPART_STATE $RAMPART_ACTION"\n'
        'echo "dir=$RAMPART_MODULE_DIR"\necho "cwd=$(pwd)"\n'
        'echo "path=$PATH"\necho "secret=${HOME:-unset}"\n'
        'cat; echo "stdin closed"\necho "to stderr" >&2\n',
    )
    result, lines = run(module, "start_prim")
    assert result.ok and result.returncode == 0 and not result.timed_out
    assert lines == [
        "web lab-n1 PRIM start",
        f"dir={module}",
        f"cwd={module}",
        "path=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "secret=unset",  # the daemon's environment is not passed on
        "stdin closed",
        "to stderr",
    ]
    assert result.output_tail == tuple(lines)
    assert result.reason.startswith("bin/start_prim succeeded in ")


def test_lines_arrive_while_the_script_runs(module_dir):
    module, _ = module_dir
    write_script(module, "prestart", "echo first\nread _ < /dev/zero; sleep 30\n")

    async def scenario():
        first = asyncio.Event()
        task = asyncio.create_task(
            run_script(
                str(module),
                "prestart",
                env={},
                timeout_s=1.0,
                on_line=lambda line: first.set(),
                kill_grace_s=1.0,
            ),
            name="test: prestart",
        )
        await asyncio.wait_for(first.wait(), 5)
        running = not task.done()
        return running, await task

    running, result = asyncio.run(scenario())
    assert running
    assert result.timed_out and result.output_tail == ("first",)


def test_timeout_kills_the_whole_group(module_dir):
    module, _ = module_dir
    pidfile = module / "child.pid"
    write_script(
        module,
        "stop_prim",
        f"sleep 60 > /dev/null 2>&1 &\necho $! > {pidfile}\necho $$\n"
        "trap '' TERM\nsleep 60\n",  # ignores SIGTERM: SIGKILL must follow
    )
    started = time.monotonic()
    result, lines = run(module, "stop_prim", timeout_s=0.5, kill_grace_s=0.5)
    assert result.timed_out and not result.ok
    assert result.reason == "bin/stop_prim timed out after 0.5 s: process group killed"
    assert time.monotonic() - started < 5
    script_pid, child_pid = int(lines[0]), int(pidfile.read_text())
    assert wait_until(lambda: not process_alive(script_pid) and not process_alive(child_pid))


def test_runs_in_its_own_process_group(module_dir):
    module, _ = module_dir
    write_script(module, "poststop", "echo $$ $(cut -d' ' -f5 /proc/$$/stat)\n")
    result, lines = run(module, "poststop")
    pid, pgid = lines[0].split()
    assert result.ok and pid == pgid
    assert int(pgid) != os.getpgid(0)


def test_failure_status_is_reported(module_dir):
    module, _ = module_dir
    write_script(module, "start_both", "echo 'cannot bind port 80'\nexit 3\n")
    result, _ = run(module, "start_both")
    assert not result.ok and result.returncode == 3
    assert "failed with exit status 3" in result.reason


def test_missing_script_means_nothing_to_do(module_dir):
    module, _ = module_dir
    result, lines = run(module, "start_prim")
    assert result.ok and result.returncode is None and lines == []
    assert result.reason == "no bin/start_prim in module: nothing to do"


def test_not_executable_is_a_clear_error(module_dir):
    module, _ = module_dir
    write_script(module, "start_prim", "echo never\n", mode=0o644)
    result, lines = run(module, "start_prim")
    assert not result.ok and result.returncode == NOT_EXECUTABLE and lines == []
    assert "is not executable" in result.reason and "chmod +x" in result.reason


def test_bad_interpreter_is_a_clear_error(module_dir):
    module, _ = module_dir
    path = module / "bin" / "prestart"
    path.write_text("#!/no/such/shell\n")
    path.chmod(0o755)
    result, _ = run(module, "prestart")
    assert not result.ok and result.returncode == NOT_EXECUTABLE
    assert "cannot run" in result.reason


def test_script_name_with_a_path_is_refused(module_dir):
    module, _ = module_dir
    with pytest.raises(ModuleError, match="plain file name"):
        run(module, "../escape")


def test_background_child_holding_output_does_not_hang(module_dir):
    module, strays = module_dir
    pidfile = module / "app.pid"
    write_script(module, "start_prim", f"sleep 60 &\necho $! > {pidfile}\necho started\n")
    started = time.monotonic()
    result, lines = run(module, "start_prim", output_grace_s=0.3)
    strays.append(int(pidfile.read_text()))
    assert time.monotonic() - started < 5
    assert result.ok and lines == ["started"]
    assert "still holds the script's output" in result.reason
    # A start script's background child is the application: it keeps running.
    assert process_alive(strays[0])


def test_redirected_background_child_keeps_running_quietly(module_dir):
    module, strays = module_dir
    pidfile = module / "app.pid"
    write_script(
        module, "start_prim", f"sleep 60 > /dev/null 2>&1 &\necho $! > {pidfile}\necho up\n"
    )
    result, lines = run(module, "start_prim")
    strays.append(int(pidfile.read_text()))
    assert result.ok and lines == ["up"]
    assert "holds" not in result.reason
    assert process_alive(strays[0])


def test_cancelling_the_caller_kills_the_group(module_dir):
    module, _ = module_dir
    write_script(module, "start_prim", "echo $$\nsleep 60\n")

    async def scenario():
        pids: list[str] = []
        seen = asyncio.Event()

        def on_line(line: str) -> None:
            pids.append(line)
            seen.set()

        task = asyncio.create_task(
            run_script(str(module), "start_prim", env={}, timeout_s=30, on_line=on_line),
            name="test: cancelled start_prim",
        )
        await asyncio.wait_for(seen.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return int(pids[0])

    pid = asyncio.run(scenario())
    assert wait_until(lambda: not process_alive(pid))


def test_long_lines_are_cut_and_tail_is_bounded(module_dir):
    module, _ = module_dir
    write_script(
        module,
        "prestart",
        "head -c 10000 /dev/zero | tr '\\0' x; echo\nfor i in $(seq 1 50); do echo line$i; done\n",
    )
    result, lines = run(module, "prestart")
    assert result.ok
    assert all(len(line) <= 4096 for line in lines)
    assert result.output_tail[-1] == "line50" and len(result.output_tail) == 20
