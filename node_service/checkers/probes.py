"""Network and script checkers: tcp, ping, interface, custom script, witness.

Each one does a single bounded probe in the node's own network namespace.
Ping uses a raw ICMP socket (rampartd runs as root) rather than spawning the
``ping`` binary every few seconds.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import random
import socket
import struct
from collections.abc import Mapping

from pyroute2 import IPRoute

from node_service.checkers.base import Check, CheckResult
from node_service.checkers.decide import ACT_REPORT, Policy
from node_service.scripts import run_process, script_path

IFF_UP = 0x1
ICMP_ECHO_REPLY = 0
ICMP_UNREACHABLE = 3
ICMP_ECHO_REQUEST = 8
ICMP_TIME_EXCEEDED = 11
MAX_ICMP_READS = 1000  # other traffic on the raw socket must not keep us looping


class TcpCheck(Check):
    """The application accepts a TCP connection on address:port."""

    kind = "tcp"

    def __init__(self, address: str, port: int, **settings):
        host = f"[{address}]" if ":" in address else address
        super().__init__(f"tcp {host}:{port}", **settings)
        self.address = address
        self.port = port

    async def check(self) -> CheckResult:
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(self.address, self.port), self.timeout_s
            )
        except TimeoutError:
            return CheckResult(False, f"{self.label} no answer within {self.timeout_s:g} s")
        except ConnectionRefusedError:
            return CheckResult(False, f"{self.label} refused")
        except OSError as exc:
            return CheckResult(False, f"{self.label} unreachable: {exc.strerror or exc}")
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
        return CheckResult(True, f"{self.label} accepts connections")


def icmp_checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071)."""
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def echo_request(ident: int, seq: int, payload: bytes = b"rampart-check") -> bytes:
    header = struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, 0, ident, seq)
    checksum = icmp_checksum(header + payload)
    return struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, checksum, ident, seq) + payload


def classify_icmp(packet: bytes, target: str, ident: int, seq: int) -> str | None:
    """What a received IPv4 packet says about our echo: "reply", "unreachable" or None."""
    if len(packet) < 20:
        return None
    icmp = packet[(packet[0] & 0x0F) * 4 :]
    if len(icmp) < 8:
        return None
    kind = icmp[0]
    source = str(ipaddress.IPv4Address(packet[12:16]))
    if kind == ICMP_ECHO_REPLY and source == target:
        return "reply" if struct.unpack("!HH", icmp[4:8]) == (ident, seq) else None
    if kind in (ICMP_UNREACHABLE, ICMP_TIME_EXCEEDED):
        inner = icmp[8:]  # the IP header and first bytes of our request
        if len(inner) >= 28:
            inner_icmp = inner[(inner[0] & 0x0F) * 4 :]
            if len(inner_icmp) >= 8 and struct.unpack("!HH", inner_icmp[4:8]) == (ident, seq):
                return "unreachable"
    return None


async def ping_once(target: str, timeout_s: float) -> tuple[bool, str]:
    """One ICMP echo to ``target`` (IPv4); ``(answered, reason)``."""
    loop = asyncio.get_running_loop()
    ident, seq = random.randrange(1, 0xFFFF), 1
    try:
        address = str(ipaddress.IPv4Address(target))
    except ValueError:  # a host name: resolve it without blocking the loop
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(target, None, family=socket.AF_INET), timeout_s
            )
        except (TimeoutError, OSError) as exc:
            return False, f"ping {target}: cannot resolve the name ({exc or 'timeout'})"
        address = infos[0][4][0]
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    except PermissionError:
        return False, f"ping {target}: needs root (CAP_NET_RAW) for an ICMP socket"
    with sock:
        sock.setblocking(False)
        start = loop.time()
        deadline = start + timeout_s
        try:
            await loop.sock_sendto(sock, echo_request(ident, seq), (address, 0))
            for _ in range(MAX_ICMP_READS):
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                packet = await asyncio.wait_for(loop.sock_recv(sock, 2048), remaining)
                verdict = classify_icmp(packet, address, ident, seq)
                if verdict == "reply":
                    rtt = (loop.time() - start) * 1000
                    return True, f"ping {target} answered in {rtt:.1f} ms"
                if verdict == "unreachable":
                    return False, f"ping {target}: unreachable"
        except TimeoutError:
            pass
        except OSError as exc:
            if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
                return False, f"ping {target}: unreachable ({exc.strerror})"
            return False, f"ping {target}: {exc.strerror or exc}"
    return False, f"ping {target}: no reply within {timeout_s:g} s"


class PingCheck(Check):
    """``target`` answers an ICMP echo within the timeout."""

    kind = "ping"

    def __init__(self, target: str, **settings):
        super().__init__(f"ping {target}", **settings)
        self.target = target

    async def check(self) -> CheckResult:
        return CheckResult(*await ping_once(self.target, self.timeout_s))


class WitnessCheck(PingCheck):
    """The split-brain witness: reachable or not, reported, never acted on here.

    The mirror state machine reads the latest witness result before a node
    goes ALONE; a witness that is unreachable must not move the application.
    """

    kind = "witness"

    def __init__(self, target: str, **settings):
        settings.setdefault("policy", Policy(failures=1, action=ACT_REPORT))
        super().__init__(target, **settings)
        self.label = f"witness {target}"

    async def check(self) -> CheckResult:
        ok, reason = await ping_once(self.target, self.timeout_s)
        state = "reachable" if ok else "unreachable"
        return CheckResult(ok, f"witness {self.target} {state} ({reason})")


def link_state(interface: str) -> tuple[bool, str]:
    """Whether the link exists, is up and has carrier, with the reason."""
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=interface)
        if not found:
            return False, f"interface {interface} does not exist"
        link = next(iter(ipr.get_links(found[0])))
    if not link["flags"] & IFF_UP:
        return False, f"interface {interface} is down (administratively)"
    if link.get("IFLA_CARRIER") != 1:
        return False, f"interface {interface} is up but has no carrier"
    return True, f"interface {interface} up with carrier"


class InterfaceCheck(Check):
    kind = "interface"

    def __init__(self, interface: str, **settings):
        super().__init__(f"interface {interface}", **settings)
        self.interface = interface

    async def check(self) -> CheckResult:
        # pyroute2's synchronous API runs its own loop: not on ours.
        return CheckResult(*await asyncio.to_thread(link_state, self.interface))


class ScriptCheck(Check):
    """``bin/<script>`` of the module: exit 0 is healthy; its last line is the reason."""

    kind = "script"

    def __init__(self, module_dir: str, script: str, *, env: Mapping[str, str], **settings):
        super().__init__(f"script {script}", **settings)
        self.path = script_path(str(module_dir), script)
        self.module_dir = str(module_dir)
        self.env = dict(env)

    async def check(self) -> CheckResult:
        if not os.access(self.path, os.X_OK):
            return CheckResult(False, f"{self.label}: {self.path} missing or not executable")
        try:
            outcome = await run_process(
                [self.path],
                cwd=self.module_dir,
                env=self.env,
                timeout_s=self.timeout_s,
                kill_grace_s=1.0,
                output_grace_s=0.2,
            )
        except OSError as exc:
            return CheckResult(False, f"{self.label} cannot run: {exc.strerror or exc}")
        said = next((line for line in reversed(outcome.output_tail) if line.strip()), "")
        said = f": {said}" if said else ""
        if outcome.timed_out:
            return CheckResult(False, f"{self.label} gave no verdict within {self.timeout_s:g} s")
        if outcome.returncode == 0:
            return CheckResult(True, f"{self.label} ok{said}")
        return CheckResult(False, f"{self.label} failed (exit {outcome.returncode}){said}")
