"""`make demo` for real: a lab, the sample mirror module, a crash, the outage a client saw.

The demo runs under a unique lab name (``--lab``) in a scratch directory,
so it never touches a person's "demo" lab; the lab is always taken down.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.node.conftest import lab_status, rampart, unique_lab_name

pytestmark = pytest.mark.node

DEMO_TIMEOUT_S = 240


def run_demo(cwd, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node_service.demo", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT_S,
        check=False,
    )


def test_module_workflow_only(tmp_path):
    done = run_demo(tmp_path, "--no-lab")
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "out/demo/web.safe").is_file()
    assert "$ rampart module verify" in done.stdout
    assert "A 2-node lab" not in done.stdout


def test_demo_crashes_the_primary_and_leaves_the_lab_up(tmp_path):
    name = unique_lab_name()
    try:
        # A lab of that name already up: the demo must say so and start afresh.
        rampart("lab", "up", "--name", name)
        done = run_demo(tmp_path, "--lab", name)
        out = done.stdout
        assert done.returncode == 0, out + done.stderr
        assert f"lab {name} is already up" in out
        assert f"$ rampart lab exec {name}-n1 -- rampart module install" in out
        assert f"$ rampart lab crash {name}-n1" in out
        outage = re.search(r"client-visible outage: ([0-9.]+) s", out)
        assert outage, out
        assert 0 < float(outage.group(1)) < 10
        assert f"served by {name}-n1 before, by {name}-n2 after" in out
        assert f"Take it down: rampart lab down --name {name}" in out
        # Left up: the crashed primary is down, the new primary still serves.
        status = lab_status(name)
        nodes = {n["name"]: n for n in status["nodes"]}
        assert nodes[f"{name}-n1"]["rampartd"] is False
        assert nodes[f"{name}-n2"]["rampartd"] is True
        state = rampart(
            "lab", "exec", f"{name}-n2", "--", sys.executable, "-m", "node_service.cli",
            "state", "-m", "web", "--json",
        )  # fmt: skip
        assert '"state": "ALONE"' in state.stdout
    finally:
        rampart("lab", "down", "--name", name, check=False)
