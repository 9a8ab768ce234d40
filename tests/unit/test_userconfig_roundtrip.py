"""emit is canonical and lossless: parse(emit(m)) == m for every valid module."""

from __future__ import annotations

import ipaddress

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node_service.module import userconfig, validate
from node_service.module.model import (
    KIND_SCRIPTS,
    SCRIPT_NAMES,
    Checker,
    Failover,
    Farm,
    FarmRule,
    InterfaceChecker,
    Module,
    Node,
    PingChecker,
    ProcessChecker,
    Replication,
    ScriptChecker,
    Scripts,
    ScriptTimeout,
    TcpChecker,
    VirtualIP,
)

# Printable text with no control, surrogate or unassigned characters: what XML can carry.
TEXT = st.characters(blacklist_categories=("Cc", "Cs", "Cn", "Co"))
SECONDS = st.floats(min_value=0.001, max_value=86400, allow_nan=False, allow_infinity=False)
IFNAME = st.from_regex(r"[A-Za-z0-9_.-]{1,15}", fullmatch=True)


@st.composite
def addresses(draw: st.DrawFn, count: int) -> list[str]:
    ips = draw(st.lists(st.ip_addresses(), min_size=count, max_size=count, unique=True))
    return [str(ip) for ip in ips]


@st.composite
def timing(draw: st.DrawFn) -> dict[str, float | int]:
    interval = draw(SECONDS.filter(lambda s: s > 0.002))
    timeout = draw(st.floats(min_value=0.001, max_value=interval, exclude_max=True))
    return {"interval": interval, "timeout": timeout, "failures": draw(st.integers(1, 100))}


@st.composite
def checkers(draw: st.DrawFn, ips: list[str]) -> Checker:
    common = draw(timing())
    kind = draw(st.sampled_from(["tcp", "ping", "interface", "process", "script"]))
    if kind == "tcp":
        return TcpChecker(
            address=draw(st.sampled_from(ips)), port=draw(st.integers(1, 65535)), **common
        )
    if kind == "ping":
        return PingChecker(target=draw(st.sampled_from(ips)), **common)
    if kind == "interface":
        return InterfaceChecker(interface=draw(IFNAME), **common)
    if kind == "process":
        pattern = draw(st.text(TEXT, min_size=1, max_size=30).filter(str.strip))
        return ProcessChecker(
            pattern=pattern,
            restarts=draw(st.integers(0, 100)),
            window=draw(SECONDS),
            **common,
        )
    name = draw(
        st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True).filter(
            lambda n: n not in SCRIPT_NAMES
        )
    )
    return ScriptChecker(script=name, **common)


@st.composite
def modules(draw: st.DrawFn) -> Module:
    kind = draw(st.sampled_from(["mirror", "farm"]))
    node_count = 2 if kind == "mirror" else draw(st.integers(2, 4))
    per_node = draw(st.integers(1, 3))
    vip_count = draw(st.integers(1 if kind == "farm" else 0, 2))
    ips = draw(addresses(node_count * per_node + vip_count + 1))
    names = draw(
        st.lists(
            st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True),
            min_size=node_count,
            max_size=node_count,
            unique=True,
        )
    )
    nodes = tuple(
        Node(
            names[i],
            tuple(ips[i * per_node : (i + 1) * per_node]),
            draw(st.integers(1, 1000)) if kind == "farm" else 1,
        )
        for i in range(node_count)
    )
    rest = ips[node_count * per_node :]
    vips = []
    for address in rest[:vip_count]:
        family_max = ipaddress.ip_address(address).max_prefixlen
        vips.append(VirtualIP(address, draw(st.integers(1, family_max)), draw(st.none() | IFNAME)))
    witness = draw(st.none() | st.just(rest[vip_count]))
    replication = farm = None
    if kind == "mirror":
        segments = draw(
            st.lists(
                st.from_regex(r"[a-z0-9_]{1,10}", fullmatch=True),
                min_size=1,
                max_size=3,
                unique=True,
            )
        )
        base = draw(st.sampled_from(["", "/srv", "/var/lib/app"]))
        replication = Replication(
            tuple(f"{base}/{s}" for s in segments), draw(st.sampled_from(["sync", "semi", "async"]))
        )
    else:
        ports = draw(st.lists(st.integers(1, 65535), min_size=1, max_size=6, unique=True))
        cut = draw(st.integers(1, len(ports)))
        groups = [ports[:cut], ports[cut:]] if ports[cut:] else [ports]
        farm = Farm(
            tuple(
                FarmRule(tuple(g), "tcp", draw(st.sampled_from(["ip", "ip_port"]))) for g in groups
            )
        )
    allowed = KIND_SCRIPTS[kind]
    overridden = draw(st.lists(st.sampled_from(allowed), unique=True, max_size=len(allowed)))
    scripts = Scripts(
        draw(SECONDS), tuple(ScriptTimeout(name, draw(SECONDS)) for name in overridden)
    )
    interval = draw(st.integers(10, 60000))
    failover = Failover(
        draw(st.booleans()), witness, interval, draw(st.integers(max(2 * interval, 20), 600000))
    )
    return Module(
        name=draw(st.from_regex(r"[a-z][a-z0-9_-]{0,39}", fullmatch=True)),
        kind=kind,
        version=draw(st.from_regex(r"[0-9A-Za-z][0-9A-Za-z.+_~-]{0,31}", fullmatch=True)),
        description=" ".join(draw(st.text(TEXT, max_size=40)).split()),
        nodes=nodes,
        vips=tuple(vips),
        replication=replication,
        farm=farm,
        checkers=tuple(draw(st.lists(checkers(ips), max_size=4))),
        scripts=scripts,
        failover=failover,
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(modules())
def test_round_trip(module: Module) -> None:
    assert validate.check(module) == []
    data = userconfig.emit(module)
    assert userconfig.parse(data) == module
    assert userconfig.emit(userconfig.parse(data)) == data


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(modules())
def test_canonical_form_shape(module: Module) -> None:
    data = userconfig.emit(module)
    text = data.decode("utf-8")
    assert text.startswith('<?xml version="1.0" encoding="UTF-8"?>\n<module name="')
    assert text.endswith("</module>\n")
    for line in text.splitlines()[1:]:
        indent = len(line) - len(line.lstrip(" "))
        assert indent % 2 == 0 and not line.endswith(" ")
    # Defaults are written: the failover line always carries both heartbeat settings.
    assert "heartbeat_interval_ms=" in text and "heartbeat_timeout_ms=" in text


def test_emit_of_defaults_is_explicit() -> None:
    m = Module(
        "web",
        "farm",
        nodes=(Node("a", ("10.0.0.1",)), Node("b", ("10.0.0.2",))),
        vips=(VirtualIP("10.0.0.100", 24),),
        farm=Farm((FarmRule((80,)),)),
    )
    assert userconfig.emit(m).decode() == (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<module name="web" kind="farm" version="1">\n'
        "  <nodes>\n"
        '    <node name="a" weight="1">\n'
        "      <address>10.0.0.1</address>\n"
        "    </node>\n"
        '    <node name="b" weight="1">\n'
        "      <address>10.0.0.2</address>\n"
        "    </node>\n"
        "  </nodes>\n"
        "  <vips>\n"
        '    <vip address="10.0.0.100" prefix="24"/>\n'
        "  </vips>\n"
        "  <farm>\n"
        '    <rule ports="80" protocol="tcp" criterion="ip"/>\n'
        "  </farm>\n"
        '  <scripts timeout="60"/>\n'
        '  <failover failback="false" heartbeat_interval_ms="250" heartbeat_timeout_ms="3000"/>\n'
        "</module>\n"
    )
    assert userconfig.parse(userconfig.emit(m)) == m


def test_special_characters_survive() -> None:
    m = Module(
        "web",
        "mirror",
        description='Tom & Jerry <"web"> café',
        nodes=(Node("a", ("10.0.0.1",)), Node("b", ("10.0.0.2",))),
        replication=Replication(("/srv/a&b",)),
        checkers=(ProcessChecker(pattern='python3 -m "x" <y> & z'),),
    )
    assert userconfig.parse(userconfig.emit(m)) == m
