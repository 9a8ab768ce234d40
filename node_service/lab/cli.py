"""`rampart lab ...`: a virtual site of namespaced hosts on this machine.

Only argparse at import time; the handlers import the lab's machinery.
"""

from __future__ import annotations

import argparse
import sys

DEFAULT_NAME = "lab"


def register(subparsers: argparse._SubParsersAction) -> None:
    lab = subparsers.add_parser(
        "lab", help="a virtual site of namespaced hosts on this machine (root)"
    )
    verbs = lab.add_subparsers(dest="lab_verb", metavar="ACTION")
    verbs.required = True

    def verb(name: str, handler, help_text: str, host: bool = False) -> argparse.ArgumentParser:
        parser = verbs.add_parser(name, help=help_text)
        parser.add_argument(
            "--name", default=None, help=f"lab name (default {DEFAULT_NAME!r}, or the host's)"
        )
        if host:
            parser.add_argument("host", metavar="NODE", help="host: LAB-n1, n1, or client")
        parser.set_defaults(func=handler)
        return parser

    up = verb("up", _up, "create the lab's hosts, switch, keys and daemons")
    up.add_argument("--nodes", type=int, default=2, help="number of nodes, 1 to 8 (default 2)")
    st = verb("status", _status, "show the lab's hosts, addresses and files")
    st.add_argument("--json", action="store_true", help="print one JSON object")
    ex = verb("exec", _exec, "run a command inside a host", host=True)
    ex.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD...")
    verb("crash", _crash, "power cut: kill every process of the host, links down", host=True)
    verb("boot", _boot, "links up, start the host's sshd and rampartd", host=True)
    for name, handler, text in (
        ("cut", _cut, "unplug the host's cables (processes keep running)"),
        ("heal", _heal, "plug the host's cables back"),
    ):
        parser = verb(name, handler, text, host=True)
        parser.add_argument("--net", choices=("lan", "hb2"), help="only this network")
    verb("down", _down, "remove the lab: processes, mounts, namespaces, files")


def _name(args: argparse.Namespace) -> str:
    from node_service.lab.site import LabError, lab_of_host

    host = getattr(args, "host", None)
    if host is None:
        return args.name or DEFAULT_NAME
    implied = lab_of_host(host, args.name or DEFAULT_NAME)
    if args.name and implied != args.name:
        raise LabError(
            f"host {host} is not in lab {args.name} (give n1, client... or its full name)"
        )
    return implied


def _print(lines: list[str]) -> None:
    for line in lines:
        print(line)


def _up(args: argparse.Namespace) -> int:
    from node_service.lab import control

    _print(control.up(_name(args), args.nodes))
    return 0


def _status(args: argparse.Namespace) -> int:
    import json

    from node_service.lab import control

    doc = control.status(_name(args))
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        _print(control.status_lines(doc))
    return 0


def _exec(args: argparse.Namespace) -> int:
    import os

    from node_service.lab import control

    command = list(args.command)
    # REMAINDER swallows options given after NODE; accept --name there too.
    while command[:1] and command[0].startswith("--name"):
        option = command.pop(0)
        args.name = (
            option.split("=", 1)[1] if "=" in option else (command.pop(0) if command else "")
        )
    if command[:1] == ["--"]:
        command = command[1:]
    argv = control.exec_argv(_name(args), args.host, command)
    sys.stdout.flush()
    # nsenter execs the command in place: stdio, signals and exit code are the command's.
    os.execvp(argv[0], argv)
    return 127  # not reached


def _crash(args: argparse.Namespace) -> int:
    from node_service.lab import control

    _print(control.crash(_name(args), args.host))
    return 0


def _boot(args: argparse.Namespace) -> int:
    from node_service.lab import control

    _print(control.boot(_name(args), args.host))
    return 0


def _cut(args: argparse.Namespace) -> int:
    from node_service.lab import control

    _print(control.cut(_name(args), args.host, args.net, plugged=False))
    return 0


def _heal(args: argparse.Namespace) -> int:
    from node_service.lab import control

    _print(control.cut(_name(args), args.host, args.net, plugged=True))
    return 0


def _down(args: argparse.Namespace) -> int:
    from node_service.lab import control

    _print(control.down(_name(args)))
    return 0
