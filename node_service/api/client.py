"""The CLI's side of the management API: HTTP over the unix socket.

Standard library only (http.client with a unix-socket connection) so that
`rampart` starts fast and needs nothing on a node beyond Python. Errors from
the daemon arrive as ``{"error", "exit_code"}`` and are raised as ApiError
carrying that exit code, so the CLI prints one line and exits like the
daemon asked.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from node_service.errors import RampartError, RetryableError

DEFAULT_SOCKET = "/run/rampart/api.sock"
SOCKET_ENV = "RAMPART_SOCKET"


class ApiError(RampartError):
    """The daemon refused or failed a request; the message is its one line."""

    def __init__(self, message: str, exit_code: int = 1, status: int = 0) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.status = status


class DaemonUnreachable(RetryableError):
    exit_code = 4


def socket_path(explicit: str | None = None) -> str:
    return explicit or os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("rampartd", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class Client:
    def __init__(self, path: str | None = None, timeout: float = 300.0) -> None:
        self.path = socket_path(path)
        self.timeout = timeout

    # -- transport -----------------------------------------------------------

    def _open(self, method: str, url: str, body: Any = None, headers: dict[str, str] | None = None,
              timeout: float | None = None
              ) -> tuple[UnixHTTPConnection, http.client.HTTPResponse]:  # fmt: skip
        conn = UnixHTTPConnection(self.path, self.timeout if timeout is None else timeout)
        try:
            conn.request(method, url, body=body, headers=headers or {})
            response = conn.getresponse()
        except (FileNotFoundError, ConnectionRefusedError):
            conn.close()
            raise DaemonUnreachable(
                f"cannot reach rampartd at {self.path}: is it running? (systemctl status rampartd)"
            ) from None
        except PermissionError:
            conn.close()
            raise DaemonUnreachable(
                f"cannot open {self.path}: permission denied; an admin must add you to "
                "rampart-monitor, rampart-operator or rampart-admin"
            ) from None
        except TimeoutError:
            conn.close()
            raise DaemonUnreachable(f"rampartd at {self.path} did not answer in time") from None
        if response.status >= 400:
            raw = response.read()
            conn.close()
            raise _error_from(response.status, raw)
        return conn, response

    def request(self, method: str, url: str, body: Any = None,
                headers: dict[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
        conn, response = self._open(method, url, body, headers)
        try:
            return json.loads(response.read() or b"{}")
        finally:
            conn.close()

    def stream(self, url: str, deadline: float | None = None) -> Iterator[dict[str, Any]]:
        """JSON lines from a streaming endpoint; stops at the deadline (monotonic) if given."""
        conn, response = self._open("GET", url, timeout=None)
        sock = conn.sock
        try:
            while True:
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return
                    if sock is not None:
                        sock.settimeout(remaining)
                try:
                    line = response.readline()
                except TimeoutError:
                    return
                if not line:
                    return
                line = line.strip()
                if line:
                    yield json.loads(line)
        finally:
            conn.close()

    # -- operations ----------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return self.request("GET", "/v1/health")

    def state(self, module: str | None = None) -> dict[str, Any]:
        query = f"?{urlencode({'module': module})}" if module else ""
        return self.request("GET", "/v1/state" + query)

    def command(self, module: str, verb: str) -> dict[str, Any]:
        return self.request("POST", f"/v1/modules/{quote(module, safe='')}/{verb}")

    def modules(self) -> dict[str, Any]:
        return self.request("GET", "/v1/modules")

    def install(self, safe_path: Path) -> dict[str, Any]:
        try:
            size = safe_path.stat().st_size
            stream = safe_path.open("rb")
        except OSError as exc:
            raise RampartError(f"{safe_path}: cannot read: {exc.strerror}") from None
        with stream:
            return self.request(
                "POST", "/v1/modules", body=stream,
                headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
            )  # fmt: skip

    def remove(self, module: str) -> dict[str, Any]:
        return self.request("DELETE", f"/v1/modules/{quote(module, safe='')}")

    def events(self, module: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        query = {"limit": str(limit), **({"module": module} if module else {})}
        return self.request("GET", "/v1/events?" + urlencode(query))["events"]

    def follow_events(self, module: str | None = None, limit: int = 50) -> Iterator[dict[str, Any]]:
        query = {"limit": str(limit), "follow": "1", **({"module": module} if module else {})}
        return self.stream("/v1/events?" + urlencode(query))

    def watch(self, module: str | None = None, deadline: float | None = None
              ) -> Iterator[dict[str, Any]]:  # fmt: skip
        query = f"?{urlencode({'module': module})}" if module else ""
        return self.stream("/v1/watch" + query, deadline)

    def metrics_text(self) -> str:
        conn, response = self._open("GET", "/metrics")
        try:
            return response.read().decode()
        finally:
            conn.close()


def _error_from(status: int, raw: bytes) -> ApiError:
    try:
        body = json.loads(raw)
        return ApiError(str(body["error"]), int(body.get("exit_code", 1)), status)
    except (ValueError, KeyError, TypeError):
        text = raw.decode(errors="replace").strip().splitlines()
        return ApiError(f"rampartd answered HTTP {status}: {text[0] if text else ''}", 1, status)
