"""The farm packet filter: one nftables table per farm module.

Every node of a farm receives every client packet for the VIP (shared MAC,
flooded LAN); this filter makes exactly one node accept each new client
flow. The kernel puts a packet in a bucket with ``jhash`` over the client
address (criterion ``ip``) or address and source port (``ip_port``), modulo
``BUCKETS``, with the module's seed; the node accepts the buckets the bucket
map gives it. Python never predicts a kernel bucket: all nodes run the same
jhash with the same seed, so they only have to agree on which node owns
which bucket *number* (see ``buckets.py`` and docs/dev/farm.md).

TCP rules keep no per-flow state in the steady state (no conntrack): a
packet's fate is decided by its bucket and by what this node's TCP stack
knows. At the LAN interface's ``netdev ingress`` hook (``device``), before
IP, per TCP rule ("the gate"):

1. a packet (not a bare SYN) of a flow this node *holds* (``held_flows``:
   client address and port of connections it accepted in buckets it no
   longer owns, read from its sockets, see ``flows.py``): accept;
2. a bucket this node does not own: drop (every packet when it owns
   nothing, no hash then);
3. a bare SYN of an owned bucket: count it (``owned``) and accept.

Everything else (mid-stream packets of owned buckets) goes on untouched.
Without a device (tests) the same lines run in the ip table's ``early``
chain (prerouting, raw priority).

Right after buckets moved *to* this node from a node that may still hold
flows in them, this node's TCP stack would answer those flows' packets
with a reset and kill them. So those buckets are *guarded* (``guarded``,
see ``guard.py``) until every peer says it holds nothing: only there
conntrack runs (every other bucket of the module's ports is ``notrack`` at
raw priority, both directions), and a guarded bucket's packet passes only
if it is a bare SYN, a flow conntrack saw start, or a flow this node holds;
anything else (another node's flow) is dropped silently.

UDP rules have no handshake and no per-flow socket, so they keep conntrack
(``prerouting`` chain, mangle priority, after conntrack):

1. conntrack ``invalid``: drop;
2. conntrack ``established,related``: accept, whatever the bucket (what
   keeps a flow where it started when its bucket moves);
3. a new flow in an owned bucket: accept, and write its bucket into the
   flow's conntrack mark (``MARK_BASE`` + bucket) so ``held.py`` can read
   back the buckets in which this node still has flows (``held``);
4. anything else: drop.

and at ingress a UDP packet whose bucket is neither owned nor held is
dropped. Every drop rule's comment starts with ``dropped``, so ``counters``
adds them up.

Replacement is atomic: the script creates each table if needed, deletes it
and defines it again, all in one ``nft -f`` transaction; the kernel applies
all of it or none of it. The owned buckets are an inline set in the rule
(nft 1.0.6 cannot list a named set typed from ``jhash``), so changing the
bucket map replaces the table, which is cheap (a few rules).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from node_service.errors import RetryableError, UserError
from node_service.farm.buckets import BUCKETS, BucketMap, owned_by

PROTOCOLS = ("tcp", "udp")
CRITERIA = ("ip", "ip_port")
DEFAULT_TIMEOUT_S = 10.0
NFT = ("nft",)

# Rule kinds, carried in each rule's comment so counters can be read back.
ESTABLISHED = "established"
OWNED = "owned"
DROPPED = "dropped"
KINDS = (ESTABLISHED, OWNED, DROPPED)

# Accepted flows carry MARK_BASE + bucket in their conntrack mark ("rf" in
# the upper half), so the buckets of live flows can be read back.
MARK_BASE = 0x7266_0000
MARK_MASK = 0xFFFF_FF00
ALL_BUCKETS = frozenset(range(BUCKETS))
HELD_SET = "held_flows"  # named set: its elements change without replacing the table
_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


class PacketFilterError(RetryableError):
    """nft is missing, timed out or refused a farm ruleset (previous rules intact)."""


@dataclass(frozen=True)
class FilterRule:
    """Clients of one protocol on some ports, split by a criterion."""

    protocol: str
    ports: tuple[int, ...]
    criterion: str = "ip"


@dataclass(frozen=True)
class FarmFilter:
    """Everything one node needs to filter one farm module's clients."""

    module: str
    vips: tuple[str, ...]
    rules: tuple[FilterRule, ...]
    seed: int
    owned: frozenset[int]
    # The LAN interface for the ingress drop (None: no ingress table) and the
    # buckets let through there besides ``owned`` for UDP (conntrack-held).
    device: str | None = None
    held: frozenset[int] = ALL_BUCKETS
    # TCP: flows (client address, port) this node holds outside its owned
    # buckets, and owned buckets guarded against other nodes' flows.
    held_flows: frozenset[tuple[str, int]] = frozenset()
    guarded: frozenset[int] = frozenset()


@dataclass(frozen=True)
class Ruleset:
    """An nft script that atomically replaces one module's table."""

    module: str
    table: str
    text: str


def node_filter(
    module: str,
    vips: Iterable[str],
    rules: Iterable[FilterRule],
    seed: int,
    owners: BucketMap,
    node: str,
    device: str | None = None,
    held: frozenset[int] = ALL_BUCKETS,
    held_flows: frozenset[tuple[str, int]] = frozenset(),
    guarded: frozenset[int] = frozenset(),
) -> FarmFilter:
    """The filter of ``node`` for the bucket map ``owners``."""
    owned = owned_by(owners, node)
    return FarmFilter(
        module, tuple(vips), tuple(rules), seed, owned, device, held, held_flows,
        guarded & owned,
    )  # fmt: skip


def table_name(module: str) -> str:
    """The nft table of a farm module (``rampart_farm_<module>``).

    Characters nft identifiers cannot hold become ``_``; a short hash of the
    real name is then appended so ``web-1`` and ``web_1`` never share a table.
    """
    if not module:
        raise UserError("farm module name is empty: expected the module's name")
    safe = re.sub(r"[^A-Za-z0-9_]", "_", module)
    if safe != module:
        safe += "_" + hashlib.blake2b(module.encode(), digest_size=3).hexdigest()
    return f"rampart_farm_{safe}"


def _check(farm: FarmFilter) -> None:
    where = f"farm module {farm.module!r}"
    if not farm.vips:
        raise UserError(f"{where} has no virtual IP: expected at least one IPv4 address")
    for vip in farm.vips:
        try:
            ipaddress.IPv4Address(vip)
        except ValueError:
            raise UserError(f"{where}: VIP {vip!r} is not an IPv4 address") from None
    if not farm.rules:
        raise UserError(f"{where} has no port rule: expected at least one protocol and port")
    for rule in farm.rules:
        if rule.protocol not in PROTOCOLS:
            raise UserError(f"{where}: protocol {rule.protocol!r} is not one of tcp, udp")
        if rule.criterion not in CRITERIA:
            raise UserError(f"{where}: criterion {rule.criterion!r} is not one of ip, ip_port")
        if not rule.ports:
            raise UserError(f"{where}: a {rule.protocol} rule has no port: expected 1-65535")
        for port in rule.ports:
            if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
                raise UserError(f"{where}: port {port!r} is not a port number 1-65535")
    if isinstance(farm.seed, bool) or not isinstance(farm.seed, int) or not 0 <= farm.seed < 2**32:
        raise UserError(f"{where}: seed {farm.seed!r} is not a 32-bit unsigned integer")
    if farm.device is not None and not _IFNAME.match(farm.device):
        raise UserError(f"{where}: interface {farm.device!r} is not an interface name (1-15 chars)")
    buckets = farm.owned | farm.held | farm.guarded
    bad = sorted(b for b in buckets if not (isinstance(b, int) and 0 <= b < BUCKETS))
    if bad:
        raise UserError(f"{where}: bucket {bad[0]!r} is not a bucket number 0-{BUCKETS - 1}")
    for flow in farm.held_flows:
        _check_flow(where, flow)


def _check_flow(where: str, flow: tuple[str, int]) -> None:
    try:
        address, port = flow
        ipaddress.IPv4Address(address)
        ok = isinstance(port, int) and not isinstance(port, bool) and 1 <= port <= 65535
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise UserError(f"{where}: held flow {flow!r} is not an IPv4 address and a port")


def _elements(values: Iterable[int]) -> str:
    """``{ 0-3, 7, 9-10 }``: sorted, with runs folded into ranges."""
    ordered = sorted(set(values))
    parts: list[str] = []
    start = prev = ordered[0]
    for value in [*ordered[1:], None]:
        if value is not None and value == prev + 1:
            prev = value
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if value is not None:
            start = prev = value
    return "{ " + ", ".join(parts) + " }"


def _hash_expr(rule: FilterRule, seed: int) -> str:
    key = "ip saddr" if rule.criterion == "ip" else f"ip saddr . {rule.protocol} sport"
    return f"jhash {key} mod {BUCKETS} seed 0x{seed:08x}"


def _reply_hash_expr(rule: FilterRule, seed: int) -> str:
    """The same bucket for a packet going back to the client (its address and port as daddr)."""
    key = "ip daddr" if rule.criterion == "ip" else f"ip daddr . {rule.protocol} dport"
    return f"jhash {key} mod {BUCKETS} seed 0x{seed:08x}"


def _mark_expr(rule: FilterRule, seed: int) -> str:
    return f"ct mark set {_hash_expr(rule, seed)} offset 0x{MARK_BASE:08x}"


def _syn(rule: FilterRule) -> str:
    # Only a bare SYN starts a TCP flow (see the module docstring).
    return " tcp flags & (fin | syn | rst | ack) == syn" if rule.protocol == "tcp" else ""


def _match(farm: FarmFilter, rule: FilterRule) -> str:
    return f"ip daddr {_elements_ip(farm.vips)} {rule.protocol} dport {_elements(rule.ports)}"


def _reply_match(farm: FarmFilter, rule: FilterRule) -> str:
    return f"ip saddr {_elements_ip(farm.vips)} {rule.protocol} sport {_elements(rule.ports)}"


def _label(rule: FilterRule) -> str:
    return f"{rule.protocol} {','.join(str(p) for p in sorted(set(rule.ports)))}"


def _tcp(farm: FarmFilter) -> list[FilterRule]:
    return [rule for rule in farm.rules if rule.protocol == "tcp"]


def _udp(farm: FarmFilter) -> list[FilterRule]:
    return [rule for rule in farm.rules if rule.protocol == "udp"]


def _gate_lines(farm: FarmFilter, rule: FilterRule) -> list[str]:
    """A TCP rule's whole steady-state filter: held flows, foreign buckets, owned SYNs.

    No conntrack: a held flow is known by its client address and port, a
    new flow by its bare SYN; any other packet of an owned bucket belongs
    to this node (or, in a guarded bucket, is sorted out by ``_guard_lines``).
    """
    match, label = _match(farm, rule), _label(rule)
    lines = [
        # A bare SYN of a held address and port is a new connection: it goes
        # to the bucket's owner, like any other.
        f"{match} tcp flags & (fin | syn | rst | ack) != syn ip saddr . tcp sport @{HELD_SET}"
        f' counter accept comment "{ESTABLISHED} {label}"'
    ]
    lines += _foreign_drop(farm, rule, ALL_BUCKETS - farm.owned)
    if farm.owned:
        lines.append(f'{match}{_syn(rule)} counter accept comment "{OWNED} {label}"')
    return lines


def _notrack_lines(farm: FarmFilter, rule: FilterRule) -> tuple[list[str], list[str]]:
    """Conntrack only for guarded buckets: everything else of the rule is ``notrack``.

    Both directions: a reply leaving untracked costs nothing, one tracked
    would be picked up mid-stream as a new entry per packet.
    """
    if not farm.guarded:
        return [], []
    rest = ALL_BUCKETS - farm.guarded
    if not rest:
        return [], []
    inbound = f"{_match(farm, rule)} {_hash_expr(rule, farm.seed)} {_elements(rest)} notrack"
    outbound = (
        f"{_reply_match(farm, rule)} {_reply_hash_expr(rule, farm.seed)} {_elements(rest)} notrack"
    )
    return [inbound], [outbound]


def _guard_lines(farm: FarmFilter, rule: FilterRule) -> list[str]:
    """Guarded buckets: new flows, flows conntrack saw start and held flows pass; no other.

    Another node's flow in a bucket that just moved here is a mid-stream
    packet conntrack never saw start: dropped silently, never reset.
    """
    if not farm.guarded:
        return []
    match, label = _match(farm, rule), _label(rule)
    guarded = f"{match} {_hash_expr(rule, farm.seed)} {_elements(farm.guarded)}"
    return [
        f"{guarded} ct state established,related accept",
        f"{guarded} ip saddr . tcp sport @{HELD_SET} accept",
        f"{guarded}{_syn(rule)} accept",
        f'{guarded} counter drop comment "{DROPPED} guarded {label}"',
    ]


def _ingress_lines(farm: FarmFilter, rule: FilterRule) -> list[str]:
    """UDP packets of buckets this node neither owns nor holds flows in, dropped before IP.

    Safe for every state: a packet dropped here is one the ip table would
    drop too (no owned bucket, so no new flow; not a held bucket, so no
    conntrack entry of this node's).
    """
    return _foreign_drop(farm, rule, ALL_BUCKETS - farm.owned - farm.held)


def _foreign_drop(farm: FarmFilter, rule: FilterRule, foreign: frozenset[int]) -> list[str]:
    """Drop the rule's packets of ``foreign`` buckets (no hash when that is every bucket)."""
    if not foreign:
        return []
    bucket = (
        "" if foreign == ALL_BUCKETS else f" {_hash_expr(rule, farm.seed)} {_elements(foreign)}"
    )
    return [f'{_match(farm, rule)}{bucket} counter drop comment "{DROPPED} ingress {_label(rule)}"']


def _rule_lines(farm: FarmFilter, rule: FilterRule) -> list[str]:
    """A UDP rule after conntrack: invalid, established, owned (marked), the rest."""
    match, label = _match(farm, rule), _label(rule)
    lines = [
        f'{match} ct state invalid counter drop comment "{DROPPED} invalid {label}"',
        f'{match} ct state established,related counter accept comment "{ESTABLISHED} {label}"',
    ]
    if farm.owned:
        lines.append(
            f"{match} {_hash_expr(rule, farm.seed)} {_elements(farm.owned)}"
            f' {_mark_expr(rule, farm.seed)} counter accept comment "{OWNED} {label}"'
        )
    lines.append(f'{match} counter drop comment "{DROPPED} {label}"')
    return lines


def _flow_elements(flows: Iterable[tuple[str, int]]) -> str:
    # Printed from the parsed form: only a checked address ever reaches nft.
    ordered = sorted((ipaddress.IPv4Address(a), p) for a, p in flows)
    return ", ".join(f"{a} . {p}" for a, p in ordered)


def _set_lines(farm: FarmFilter) -> list[str]:
    lines = [f"\tset {HELD_SET} {{", "\t\ttype ipv4_addr . inet_service"]
    if farm.held_flows:
        lines.append(f"\t\telements = {{ {_flow_elements(farm.held_flows)} }}")
    return [*lines, "\t}"]


def _chain(name: str, hook: str, priority: str, lines: list[str]) -> list[str]:
    if not lines:
        return []
    return [
        f"\tchain {name} {{",
        f"\t\ttype filter hook {hook} priority {priority}; policy accept;",
        *(f"\t\t{line}" for line in lines),
        "\t}",
    ]


def _elements_ip(vips: Sequence[str]) -> str:
    # Printed from the parsed form: only a checked address ever reaches nft.
    return "{ " + ", ".join(str(a) for a in sorted({ipaddress.IPv4Address(v) for v in vips})) + " }"


def build(farm: FarmFilter, *, ingress_only: bool = False) -> Ruleset:
    """The nft script giving this node its share of the farm's clients.

    ``ingress_only``: replace the netdev table alone, for a change of the
    UDP held buckets only (the ip table, and its counters, stay as they are).
    """
    _check(farm)
    table = table_name(farm.module)
    tcp, udp = _tcp(farm), _udp(farm)
    gate = [line for rule in tcp for line in _gate_lines(farm, rule)]
    ingress = [line for rule in udp for line in _ingress_lines(farm, rule)]
    on_device = farm.device is not None
    notrack_in, notrack_out = [], []
    for rule in tcp:
        inbound, outbound = _notrack_lines(farm, rule)
        notrack_in += inbound
        notrack_out += outbound
    guard = [line for rule in tcp for line in _guard_lines(farm, rule)]
    body = guard + [line for rule in udp for line in _rule_lines(farm, rule)]
    # Without a device or anything to do there, the netdev table is only removed.
    netdev = [f"table netdev {table}", f"delete table netdev {table}"]
    if on_device and (gate or ingress):
        netdev += [
            f"table netdev {table} {{",
            *(_set_lines(farm) if tcp else []),
            *_chain("ingress", f'ingress device "{farm.device}"', "filter", gate + ingress),
            "}",
        ]
    if ingress_only:
        return Ruleset(farm.module, table, "\n".join([*netdev, ""]))
    early = ([] if on_device else gate) + notrack_in
    text = "\n".join(
        [
            # Create-then-delete makes the replacement work whether or not
            # the table exists, inside the same atomic transaction.
            f"table ip {table}",
            f"delete table ip {table}",
            f"table ip {table} {{",
            *(_set_lines(farm) if tcp else []),
            *_chain("early", "prerouting", "raw", early),
            *_chain("replies", "output", "raw", notrack_out),
            *_chain("prerouting", "prerouting", "mangle", body),
            "}",
            *netdev,
            "",
        ]
    )
    return Ruleset(farm.module, table, text)


def held_update(farm: FarmFilter) -> Ruleset:
    """Only the held flows changed: new set contents in place, counters and rules kept."""
    _check(farm)
    table = table_name(farm.module)
    families = ["ip", *(["netdev"] if farm.device is not None else [])]
    elements = _flow_elements(farm.held_flows)
    lines = []
    for family in families:
        lines.append(f"flush set {family} {table} {HELD_SET}")
        if elements:
            lines.append(f"add element {family} {table} {HELD_SET} {{ {elements} }}")
    return Ruleset(farm.module, table, "\n".join([*lines, ""]))


def removal(module: str) -> Ruleset:
    """The nft script removing a module's tables (fine if they are absent)."""
    table = table_name(module)
    text = "".join(f"table {f} {table}\ndelete table {f} {table}\n" for f in ("ip", "netdev"))
    return Ruleset(module, table, text)


def _run(args: Sequence[str], stdin: str | None, what: str, timeout: float) -> str:
    try:
        done = subprocess.run(
            list(args), input=stdin, capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError:
        raise PacketFilterError(
            f"{what}: {args[0]!r} not found; install nftables (apt install nftables)"
        ) from None
    except subprocess.TimeoutExpired:
        raise PacketFilterError(
            f"{what}: nft did not finish within {timeout:g}s; previous rules left in place"
        ) from None
    if done.returncode != 0:
        errors = [ln.strip() for ln in done.stderr.splitlines() if "Error" in ln]
        detail = errors[0] if errors else (done.stderr.strip().splitlines() or ["no message"])[0]
        raise PacketFilterError(
            f"{what}: nft exited {done.returncode}: {detail}; previous rules left in place"
        )
    return done.stdout


def apply(
    ruleset: Ruleset, *, nft: Sequence[str] = NFT, timeout: float = DEFAULT_TIMEOUT_S
) -> None:
    """Load ``ruleset`` in one nft transaction; on failure nothing changes.

    ``nft`` is the command to run (tests prefix it with ``ip netns exec``).
    """
    _run([*nft, "-f", "-"], ruleset.text, f"farm module {ruleset.module}", timeout)


def remove(module: str, *, nft: Sequence[str] = NFT, timeout: float = DEFAULT_TIMEOUT_S) -> None:
    """Remove the module's packet filter (the VIP then answers on every node)."""
    apply(removal(module), nft=nft, timeout=timeout)


def listing(
    module: str,
    *,
    nft: Sequence[str] = NFT,
    timeout: float = DEFAULT_TIMEOUT_S,
    family: str = "ip",
) -> str:
    """The module's table of ``family`` (ip, netdev) as nft prints it, ``""`` when none."""
    table = table_name(module)
    text = _run([*nft, "list", "tables", family], None, f"farm module {module}", timeout)
    if f"table {family} {table}" not in (line.strip() for line in text.splitlines()):
        return ""
    return _run([*nft, "list", "table", family, table], None, f"farm module {module}", timeout)


def counters(
    module: str, *, nft: Sequence[str] = NFT, timeout: float = DEFAULT_TIMEOUT_S
) -> dict[str, int]:
    """Packets per rule kind (established, owned, dropped) on this node, both tables.

    One ``nft`` run for both (read once a second on every node): the whole
    ruleset, filtered by table name; the netdev table comes and goes with
    the bucket map, the ip table must be there.
    """
    table, what = table_name(module), f"farm module {module}"
    raw = _run([*nft, "-j", "list", "ruleset"], None, what, timeout)
    tables = {
        (t.get("family"), t.get("name"))
        for item in json.loads(raw).get("nftables", [])
        if isinstance(t := item.get("table"), dict)
    }
    if ("ip", table) not in tables:
        raise PacketFilterError(f"{what}: table ip {table} is not loaded")
    return parse_counters(raw, table)


def parse_counters(nft_json: str, table: str | None = None) -> dict[str, int]:
    """Sum the packet counters of ``nft -j list`` output by rule kind (of ``table`` only).

    ``table`` keeps the farm's ip and netdev tables of that name (other
    families cannot hold a farm table).
    """
    totals = dict.fromkeys(KINDS, 0)
    for item in json.loads(nft_json).get("nftables", []):
        rule = item.get("rule")
        if not rule:
            continue
        if table is not None and (
            rule.get("table") != table or rule.get("family") not in ("ip", "netdev")
        ):
            continue
        kind = str(rule.get("comment", "")).split(" ", 1)[0]
        if kind not in totals:
            continue
        for expr in rule.get("expr", []):
            if isinstance(expr, dict) and "counter" in expr:
                totals[kind] += int(expr["counter"].get("packets", 0))
    return totals
