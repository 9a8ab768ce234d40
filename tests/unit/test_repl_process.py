"""The replication process's plumbing: preamble, acceptor, control socket, split brain, status.

Real sockets on loopback and a real replication process talking over its
unix control socket; no FUSE and no root needed (the lab tests in
tests/node/test_repl_lab*.py mount for real).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from node_service.replication import acceptor as acceptor_module
from node_service.replication.acceptor import (
    Acceptor,
    PreambleError,
    encode_preamble,
    parse_preamble,
)
from node_service.replication.dirty import ENTRY, META, DirtyRegion
from node_service.replication.receiver import ReceiverStats
from node_service.replication.report import eta_seconds, format_verify, status_lines
from node_service.replication.roles import secondary_status
from node_service.replication.splitbrain import SplitBrainCopy

TIMEOUT_S = 10.0

# -- preamble (pure) -------------------------------------------------------------------


def test_a_preamble_names_one_module():
    assert parse_preamble(encode_preamble("web-1.db")) == "web-1.db"


@pytest.mark.parametrize(
    ("line", "why"),
    [
        (b"\x16\x03\x01\x02\x00", "expected 'RAMPART-REPL 1 <module>'"),
        (b"RAMPART-REPL 1 web", "expected"),  # no newline: cut short
        (b"RAMPART-REPL 1 ../etc\n", "invalid module name"),
        (b"RAMPART-REPL 1 \n", "invalid module name"),
    ],
)
def test_a_bad_preamble_says_what_is_wrong(line, why):
    with pytest.raises(PreambleError, match=why.replace("(", r"\(")):
        parse_preamble(line)


def test_a_module_name_that_cannot_be_sent_is_refused():
    with pytest.raises(PreambleError, match="cannot be sent"):
        encode_preamble("a b")


# -- the acceptor, over real sockets ----------------------------------------------------


class FakeProcess:
    """A module's control socket: takes the passed socket and reads what follows."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(4)
        self.server.settimeout(TIMEOUT_S)
        self.received: list[bytes] = []
        self.requests: list[dict] = []
        self.thread = threading.Thread(target=self._serve, name="fake-repl-process", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.server.accept()
        with conn:
            data, fds, _, _ = socket.recv_fds(conn, 4096, 2)
            self.requests.append(json.loads(data))
            conn.sendall(b'{"type":"reply","id":1,"ok":true,"result":{}}\n')
        with socket.socket(fileno=fds[0]) as peer:
            peer.settimeout(TIMEOUT_S)
            self.received.append(peer.recv(100))
            peer.sendall(b"welcome")

    def close(self) -> None:
        self.thread.join(TIMEOUT_S)
        self.server.close()


def run_with_acceptor(tmp_path: Path, client) -> tuple[Acceptor, object]:
    """Start an acceptor for module 'web' on loopback, run ``client(port)`` in a thread."""

    async def main():
        acc = Acceptor(0, host="127.0.0.1")
        await acc.register("web", tmp_path / "web.sock")
        try:
            return acc, await asyncio.to_thread(client, acc.port)
        finally:
            await acc.close()

    return asyncio.run(main())


def test_the_acceptor_passes_the_socket_without_consuming_the_tls_bytes(tmp_path):
    fake = FakeProcess(tmp_path / "web.sock")

    def client(port: int) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as s:
            s.sendall(encode_preamble("web") + b"\x16\x03\x01 client hello")
            return s.recv(100)

    acc, answer = run_with_acceptor(tmp_path, client)
    fake.close()
    assert answer == b"welcome"
    assert fake.received == [b"\x16\x03\x01 client hello"]
    assert fake.requests[0]["cmd"] == "peer_socket"
    assert fake.requests[0]["origin"].startswith("127.0.0.1:")
    assert acc.refusals == []


def test_an_unknown_module_is_closed_and_logged(tmp_path):
    def client(port: int) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as s:
            s.sendall(encode_preamble("other"))
            return s.recv(100)

    acc, answer = run_with_acceptor(tmp_path, client)
    assert answer == b""
    assert "module other has no replication process on this node" in acc.refusals[0]


def test_a_silent_connection_is_closed_after_the_preamble_timeout(tmp_path, monkeypatch):
    monkeypatch.setattr(acceptor_module, "PREAMBLE_TIMEOUT_S", 0.3)

    def client(port: int) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as s:
            s.sendall(b"RAMPART")
            return s.recv(100)

    acc, answer = run_with_acceptor(tmp_path, client)
    assert answer == b""
    assert "no preamble within 0.3 s" in acc.refusals[0]


# -- the replication process over its control socket -------------------------------------


@pytest.fixture
def module_dir(tmp_path) -> Path:
    out = tmp_path / "src"
    subprocess.run(
        [sys.executable, "-m", "node_service.cli", "module", "new", "web", "--template",
         "mirror", "--out", str(out), "--node", "n1=127.0.0.1", "--node", "n2=127.0.0.2",
         "--vip", "127.0.0.200", "--dir", str(tmp_path / "data")],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    installed = tmp_path / "modules" / "web"
    installed.mkdir(parents=True)
    (out).rename(installed / "module")
    return installed


def ask(path: Path, *requests: dict) -> list[dict]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(TIMEOUT_S)
        s.connect(str(path))
        reader = s.makefile("rb")
        answers = []
        for request in requests:
            s.sendall(json.dumps(request).encode() + b"\n")
            line = json.loads(reader.readline())
            while line.get("type") != "reply":  # pushed status/event lines
                line = json.loads(reader.readline())
            answers.append(line)
        return answers


def test_the_process_answers_on_its_control_socket_and_stops_cleanly(module_dir, tmp_path):
    control = tmp_path / "run" / "web.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "node_service.replication.process", "--module-dir",
         str(module_dir), "--node", "n1", "--site-dir", str(tmp_path / "site"), "--port", "7811",
         "--control", str(control)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "ready"
        status, verify, unknown, stop = ask(
            control,
            {"cmd": "status", "id": 1},
            {"cmd": "verify", "id": 2},
            {"cmd": "dance", "id": 3},
            {"cmd": "stop", "id": 4},
        )
        assert proc.wait(timeout=TIMEOUT_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert status["ok"] and status["result"]["role"] == "off"
    assert status["result"]["status"] == "off" and status["result"]["uptodate"] is False
    assert not verify["ok"] and "verify runs on the primary; this node is off" in verify["error"]
    assert not unknown["ok"] and "unknown replication command 'dance'" in unknown["error"]
    assert stop["ok"] and "stopping" in stop["result"]["reason"]
    assert not control.exists()
    assert (module_dir / "state" / "dirty.sqlite").exists()


# -- split brain: what is kept, and where ---------------------------------------------------


def test_split_brain_keeps_every_recorded_path_but_the_root(tmp_path):
    data = tmp_path / "data"
    (data / "d" / "sub").mkdir(parents=True)
    (data / "a").write_text("mine")
    os.chmod(data / "a", 0o640)
    (data / "d" / "sub" / "b").write_text("deep")
    os.symlink("a", data / "ln")
    regions = [
        DirtyRegion(str(data), "", META),  # the root's times: never the whole tree
        DirtyRegion(str(data), "a", 0),
        DirtyRegion(str(data), "a", META),
        DirtyRegion(str(data), "d", ENTRY),
        DirtyRegion(str(data), "ln", ENTRY),
        DirtyRegion(str(data), "gone", ENTRY),  # removed since: nothing to keep
        DirtyRegion("/elsewhere", "x", 0),  # not a replicated dir of this module
    ]
    copy = SplitBrainCopy.plan(tmp_path / "state", [str(data)], regions, now=1795627800)
    assert copy.folder == tmp_path / "state" / "split-brain" / "2026-11-25T17-30-00Z"
    assert [p for _, p, _ in copy.paths] == ["a", "d", "gone", "ln"]
    assert copy.run() == 3
    kept = copy.folder / str(data).strip("/")
    assert (kept / "a").read_text() == "mine"
    assert (kept / "a").stat().st_mode & 0o777 == 0o640
    assert (kept / "d" / "sub" / "b").read_text() == "deep"
    assert os.readlink(kept / "ln") == "a"
    assert not (kept / "gone").exists()


# -- status and its report (pure) ---------------------------------------------------------------


def test_a_secondary_is_up_to_date_only_after_a_resync():
    connected = ReceiverStats(connected=True, received=5, written=5, stale=None)
    gone = ReceiverStats(connected=False, received=0, written=0, stale=None)
    full = ReceiverStats(connected=True, received=9, written=8, stale="op 9: No space left")
    assert secondary_status("sync", connected, synced=False)["status"] == "resyncing"
    assert secondary_status("sync", connected, synced=True)["uptodate"] is True
    # the primary died after a complete resync: this copy can take over
    assert secondary_status("sync", gone, synced=True)["status"] == "uptodate"
    assert secondary_status("sync", gone, synced=False)["status"] == "stale"
    stale = secondary_status("sync", full, synced=True)
    assert stale["status"] == "stale" and "No space left" in stale["reason"]


def test_the_status_report_gives_the_eta_and_verify_lists_every_path():
    assert eta_seconds(0, 0) == 0.0
    assert eta_seconds(10 << 20, 0) is None
    assert eta_seconds(10 << 20, 1 << 20) == 10.0
    lines = status_lines({
        "module": "web", "node": "n1", "role": "primary", "mode": "sync",
        "status": "resyncing", "bytes_per_s": 1 << 20, "lag_bytes": 0,
        "resync_remaining_bytes": 5 << 20,
    })  # fmt: skip
    assert "status      resyncing" in lines
    assert "resync left 5.0 MiB, ETA 5 s" in lines
    text = format_verify({"module": "web", "differences": ["/srv/a: size", "/srv/b: missing"]})
    assert text.splitlines() == [
        "module web: 2 differing path(s):",
        "  /srv/a: size",
        "  /srv/b: missing",
    ]
