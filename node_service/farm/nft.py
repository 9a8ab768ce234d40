"""The farm packet filter: one nftables table per farm module.

Every node of a farm receives every client packet for the VIP (shared MAC,
flooded LAN); this filter makes exactly one node accept each new client
flow. The kernel puts a packet in a bucket with ``jhash`` over the client
address (criterion ``ip``) or address and source port (``ip_port``), modulo
``BUCKETS``, with the module's seed; the node accepts the buckets the bucket
map gives it. Python never predicts a kernel bucket: all nodes run the same
jhash with the same seed, so they only have to agree on which node owns
which bucket *number* (see ``buckets.py`` and docs/dev/farm.md).

Rules, per farm rule (protocol + ports). Every node receives every client
packet, so the common case on a node is a packet it will drop; the rules
are ordered so that case costs least:

0. (chain ``early``, ``raw`` priority, before conntrack) a TCP bare SYN in
   a bucket this node does not own: drop. Conntrack never sees it, so no
   entry is allocated and freed for the other nodes' new clients.
1. conntrack ``invalid``: drop. With ``nf_conntrack_tcp_loose=0`` (set by
   the runner, see ``conntrack.py``) a mid-stream packet of a flow this
   node does not know is invalid instead of a new entry picked up.
2. conntrack ``established,related``: accept, whatever the bucket. This is
   what keeps a flow on the node where it started when its bucket moves.
3. a new flow in an owned bucket: accept. For TCP only a bare SYN starts a
   flow; a mid-stream packet this node has no conntrack entry for belongs to
   another node's flow and must not reach the TCP stack (it would answer
   with a reset and kill that flow).
4. anything else to the VIP on those ports: drop, silently.

Rules 1-4 are in chain ``prerouting`` at the ``mangle`` priority: after
conntrack (so the state is known) and before routing and the input path. A
dropped first packet leaves no conntrack entry behind (entries are
confirmed only when a packet survives), so a non-owner keeps no trace of
other nodes' flows. Every drop rule's comment starts with ``dropped``, so
``counters`` adds them up.

Before all of that, when the filter knows the node's LAN interface
(``device``), a ``table netdev`` of the same name drops packets of buckets
this node neither owns nor holds flows in at the interface's ``ingress``
hook, before IP and conntrack see them: on a non-owner that is most of the
farm's packets, and it is the bulk of their cost (docs/dev/farm.md).
``held`` lists the buckets in which this node may still hold flows (after
a bucket moved away); rule 3 writes each accepted flow's bucket into its
conntrack mark (``MARK_BASE`` + bucket) so ``held.py`` can read them back.

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
    # buckets let through there besides ``owned`` (flows this node may hold).
    device: str | None = None
    held: frozenset[int] = ALL_BUCKETS


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
) -> FarmFilter:
    """The filter of ``node`` for the bucket map ``owners``."""
    owned = owned_by(owners, node)
    return FarmFilter(module, tuple(vips), tuple(rules), seed, owned, device, held)


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
    bad = sorted(b for b in farm.owned | farm.held if not (isinstance(b, int) and 0 <= b < BUCKETS))
    if bad:
        raise UserError(f"{where}: bucket {bad[0]!r} is not a bucket number 0-{BUCKETS - 1}")


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


def _mark_expr(rule: FilterRule, seed: int) -> str:
    return f"ct mark set {_hash_expr(rule, seed)} offset 0x{MARK_BASE:08x}"


def _syn(rule: FilterRule) -> str:
    # Only a bare SYN starts a TCP flow (see the module docstring).
    return " tcp flags & (fin | syn | rst | ack) == syn" if rule.protocol == "tcp" else ""


def _match(farm: FarmFilter, rule: FilterRule) -> str:
    return f"ip daddr {_elements_ip(farm.vips)} {rule.protocol} dport {_elements(rule.ports)}"


def _label(rule: FilterRule) -> str:
    return f"{rule.protocol} {','.join(str(p) for p in sorted(set(rule.ports)))}"


def _early_lines(farm: FarmFilter, rule: FilterRule) -> list[str]:
    """Rule 0: other nodes' new TCP clients, dropped before conntrack looks at them.

    UDP has no SYN: a UDP packet of a non-owned bucket may belong to a flow
    this node holds, which only conntrack knows.
    """
    foreign = set(range(BUCKETS)) - set(farm.owned)
    if rule.protocol != "tcp" or not foreign:
        return []
    # Owning nothing (WAIT): every SYN goes, no hash needed.
    bucket = "" if not farm.owned else f" {_hash_expr(rule, farm.seed)} {_elements(foreign)}"
    comment = f'comment "{DROPPED} syn {_label(rule)}"'
    return [f"{_match(farm, rule)}{_syn(rule)}{bucket} counter drop {comment}"]


def _ingress_lines(farm: FarmFilter, rule: FilterRule) -> list[str]:
    """Packets of buckets this node neither owns nor holds flows in, dropped before IP.

    Safe for every state: a packet dropped here is one the ip table would
    drop too (no owned bucket, so no new flow; not a held bucket, so no
    conntrack entry of this node's).
    """
    foreign = ALL_BUCKETS - farm.owned - farm.held
    if not foreign:
        return []
    bucket = (
        "" if foreign == ALL_BUCKETS else f" {_hash_expr(rule, farm.seed)} {_elements(foreign)}"
    )
    return [f'{_match(farm, rule)}{bucket} counter drop comment "{DROPPED} ingress {_label(rule)}"']


def _rule_lines(farm: FarmFilter, rule: FilterRule) -> list[str]:
    match, label = _match(farm, rule), _label(rule)
    lines = [
        f'{match} ct state invalid counter drop comment "{DROPPED} invalid {label}"',
        f'{match} ct state established,related counter accept comment "{ESTABLISHED} {label}"',
    ]
    if farm.owned:
        lines.append(
            f"{match}{_syn(rule)} {_hash_expr(rule, farm.seed)} {_elements(farm.owned)}"
            f' {_mark_expr(rule, farm.seed)} counter accept comment "{OWNED} {label}"'
        )
    lines.append(f'{match} counter drop comment "{DROPPED} {label}"')
    return lines


def _elements_ip(vips: Sequence[str]) -> str:
    # Printed from the parsed form: only a checked address ever reaches nft.
    return "{ " + ", ".join(str(a) for a in sorted({ipaddress.IPv4Address(v) for v in vips})) + " }"


def build(farm: FarmFilter, *, ingress_only: bool = False) -> Ruleset:
    """The nft script giving this node its share of the farm's clients.

    ``ingress_only``: replace the netdev table alone, for a change of the
    held buckets only (the ip table, and its counters, stay as they are).
    """
    _check(farm)
    table = table_name(farm.module)
    early = [line for rule in farm.rules for line in _early_lines(farm, rule)]
    body = [line for rule in farm.rules for line in _rule_lines(farm, rule)]
    ingress = [line for rule in farm.rules for line in _ingress_lines(farm, rule)]
    # Without a device or anything to drop there, the netdev table is only removed.
    netdev = [f"table netdev {table}", f"delete table netdev {table}"]
    if farm.device is not None and ingress:
        netdev += [
            f"table netdev {table} {{",
            "\tchain ingress {",
            f'\t\ttype filter hook ingress device "{farm.device}" priority filter; policy accept;',
            *(f"\t\t{line}" for line in ingress),
            "\t}",
            "}",
        ]
    if ingress_only:
        return Ruleset(farm.module, table, "\n".join([*netdev, ""]))
    text = "\n".join(
        [
            # Create-then-delete makes the replacement work whether or not
            # the table exists, inside the same atomic transaction.
            f"table ip {table}",
            f"delete table ip {table}",
            f"table ip {table} {{",
            "\tchain early {",
            "\t\ttype filter hook prerouting priority raw; policy accept;",
            *(f"\t\t{line}" for line in early),
            "\t}",
            "\tchain prerouting {",
            "\t\ttype filter hook prerouting priority mangle; policy accept;",
            *(f"\t\t{line}" for line in body),
            "\t}",
            "}",
            *netdev,
            "",
        ]
    )
    return Ruleset(farm.module, table, text)


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
