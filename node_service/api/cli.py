"""Node verbs of `rampart`: commands, state, wait, events, watch, repl; module install/list/remove.

Every verb talks to rampartd through the management socket (``--socket`` or
``$RAMPART_SOCKET``, default /run/rampart/api.sock). Human output by default,
``--json`` for scripts. Only argparse is imported at load time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

COMMAND_HELP = {
    "start": "start the module on this node",
    "stop": "stop the module on this node",
    "restart": "restart the application locally (scripts stop/start)",
    "stopstart": "stop the module, then start it again",
    "prim": "make this node primary (when allowed)",
    "second": "make this node secondary",
    "swap": "swap primary and secondary roles",
    "primforce": "force this node primary even with stale data (admin only)",
}


def _common(json_flag: bool = True) -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--socket", metavar="PATH", help="rampartd API socket (env RAMPART_SOCKET)")
    if json_flag:
        parent.add_argument("--json", action="store_true", help="machine-readable output")
    return parent


def register(sub: argparse._SubParsersAction) -> None:
    common = _common()
    for verb, text in COMMAND_HELP.items():
        p = sub.add_parser(verb, parents=[common], help=text)
        p.add_argument("-m", "--module", required=True, metavar="MODULE")
        p.set_defaults(func=cmd_command, command=verb)

    p = sub.add_parser("state", parents=[common], help="state of the modules on this node")
    p.add_argument("-m", "--module", metavar="MODULE")
    p.set_defaults(func=cmd_state)

    p = sub.add_parser("wait", parents=[common], help="wait until a module reaches a state")
    p.add_argument("-m", "--module", required=True, metavar="MODULE")
    p.add_argument("--state", required=True, metavar="STATE[,STATE]", help="e.g. PRIM,ALONE")
    p.add_argument("--timeout", type=float, default=60.0, metavar="S", help="seconds (60)")
    p.set_defaults(func=cmd_wait)

    p = sub.add_parser("events", parents=[common], help="journal: transitions, checks, actions")
    p.add_argument("-m", "--module", metavar="MODULE")
    p.add_argument("-n", "--limit", type=int, default=50, help="how many past entries (50)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new entries")
    p.set_defaults(func=cmd_events)

    p = sub.add_parser("watch", parents=[common], help="live states and metric samples")
    p.add_argument("-m", "--module", metavar="MODULE")
    p.set_defaults(func=cmd_watch)

    repl = sub.add_parser("repl", help="replication of a mirror module: status, verify, sync")
    repl_sub = repl.add_subparsers(dest="repl_command", metavar="status|verify|sync", required=True)
    for verb, text in (
        ("status", "mode, state, throughput, lag, resync progress and ETA"),
        ("verify", "compare both sides by hashes; list every differing file (exit 1 if any)"),
        ("sync", "force a full sync (block hashes) from the primary"),
    ):
        p = repl_sub.add_parser(verb, parents=[common], help=text)
        p.add_argument("-m", "--module", required=True, metavar="MODULE")
        p.set_defaults(func=cmd_repl, repl_command=verb)


def register_module_verbs(module_sub: argparse._SubParsersAction) -> None:
    common = _common()
    p = module_sub.add_parser("install", parents=[common], help="install a signed module here")
    p.add_argument("file", metavar="FILE.safe")
    p.set_defaults(func=cmd_install)
    p = module_sub.add_parser("list", parents=[common], help="modules installed on this node")
    p.set_defaults(func=cmd_list)
    p = module_sub.add_parser("remove", parents=[common], help="remove a stopped module")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=cmd_remove)


def _client(args: argparse.Namespace):
    from node_service.api.client import Client

    return Client(args.socket)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


# -- handlers ----------------------------------------------------------------


def cmd_command(args: argparse.Namespace) -> int:
    result = _client(args).command(args.module, args.command)
    if args.json:
        _print_json(result)
    else:
        state = result.get("state", {}).get("state", "?")
        print(f"{args.module}: {args.command}: {result.get('reason')} (now {state})")
    return 0


def cmd_state(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.module:
        state = client.state(args.module)
        if args.json:
            _print_json(state)
        else:
            print(format_states([state]))
        return 0
    states = client.state()
    if args.json:
        _print_json(states)
    else:
        print(format_states(states["modules"]) if states["modules"] else "no modules installed")
    return 0


def format_states(states: list[dict[str, Any]]) -> str:
    """A compact table: one line per module."""
    rows = [("MODULE", "KIND", "NODE", "STATE", "SINCE", "PEERS", "REPLICATION")]
    for s in states:
        peers = ", ".join(
            f"{name}={p.get('state', '?')}{'' if p.get('reachable', True) else '(lost)'}"
            for name, p in (s.get("peers") or {}).items()
        )
        repl = s.get("replication") or {}
        since = time.strftime("%H:%M:%S", time.localtime(s["since"])) if s.get("since") else "-"
        rows.append((
            str(s.get("module")), str(s.get("kind")), str(s.get("node")),
            str(s.get("state")) + (f" ({s['error']})" if s.get("error") else ""),
            since, peers or "-", str(repl.get("status", "-")),
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1]
        for row in rows
    )


def cmd_wait(args: argparse.Namespace) -> int:
    wanted = {s.strip() for s in args.state.split(",") if s.strip()}
    deadline = time.monotonic() + max(0.0, args.timeout)
    last = None
    # The watch stream sends the current state first, then every change and a
    # metric sample each second: no polling, and the deadline is re-checked
    # at least once per second.
    for line in _client(args).watch(args.module, deadline):
        if line.get("type") == "state":
            last = line["state"].get("state")
        elif line.get("type") == "metrics":
            last = line.get("state", last)
        if last in wanted:
            if args.json:
                _print_json({"module": args.module, "state": last, "reached": True})
            else:
                print(f"{args.module}: {last}")
            return 0
    if args.json:
        _print_json({"module": args.module, "state": last, "reached": False})
    else:
        print(
            f"rampart: {args.module} did not reach {','.join(sorted(wanted))} within "
            f"{args.timeout:g}s (state {last})",
            file=sys.stderr,
        )
    return 1


def cmd_events(args: argparse.Namespace) -> int:
    from node_service.journal import format_entry

    client = _client(args)
    entries = (
        client.follow_events(args.module, args.limit)
        if args.follow
        else client.events(args.module, args.limit)
    )
    for entry in entries:
        print(json.dumps(entry) if args.json else format_entry(entry), flush=True)
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    for line in _client(args).watch(args.module):
        if args.json:
            print(json.dumps(line, separators=(",", ":")), flush=True)
        elif line["type"] == "state":
            print(f"{line['module']}: {line['state'].get('state')} ({line['reason']})", flush=True)
        elif line["type"] == "event" and line["entry"].get("kind") != "transition":
            from node_service.journal import format_entry

            print(format_entry(line["entry"]), flush=True)
    return 0


def cmd_repl(args: argparse.Namespace) -> int:
    from urllib.parse import quote

    from node_service.replication.report import format_status, format_verify

    name = quote(args.module, safe="")
    if args.repl_command == "status":
        result = _client(args).request("GET", f"/v1/modules/{name}/repl/status")
    else:
        result = _client(args).request("POST", f"/v1/modules/{name}/repl/{args.repl_command}")
    if args.json:
        _print_json(result)
    elif args.repl_command == "status":
        format_status(result, sys.stdout)
    elif args.repl_command == "verify":
        print(format_verify(result))
    else:
        print(result.get("reason", ""))
    if args.repl_command == "verify" and result.get("differences"):
        return 1
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    from pathlib import Path

    result = _client(args).install(Path(args.file))
    if args.json:
        _print_json(result)
    else:
        print(result["reason"])
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    result = _client(args).modules()
    if args.json:
        _print_json(result)
        return 0
    if not result["modules"]:
        print(f"no modules installed on node {result['node']}")
    for m in result["modules"]:
        extra = f"  ({m['error']})" if m.get("error") else ""
        print(f"{m['name']:<20} {m['kind']:<7} {m['version']:<10} {m['state']}{extra}")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    result = _client(args).remove(args.name)
    if args.json:
        _print_json(result)
    else:
        print(result["reason"])
    return 0
