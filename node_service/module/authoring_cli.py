"""`rampart module new` and `rampart module validate`: writing a module.

Only argparse is imported at load time (the CLI starts fast); the model,
templates and XML code load inside the handlers.
"""

from __future__ import annotations

import argparse
import sys


def register_module_verbs(module_sub: argparse._SubParsersAction) -> None:
    new = module_sub.add_parser(
        "new",
        help="create a module directory from a template",
        description="Create a module directory from a template; the result is validated "
        "before anything is written.",
    )
    new.add_argument("name", metavar="NAME", help="module name: [a-z][a-z0-9_-]{0,39}")
    new.add_argument(
        "--template",
        "-t",
        default="mirror",
        help="mirror (default), farm, postgresql, nginx, kvm-vm or docker",
    )
    new.add_argument("--out", required=True, metavar="DIR", help="new or empty directory")
    new.add_argument(
        "--node",
        action="append",
        required=True,
        metavar="NAME=ADDR[,ADDR2]",
        help="a node and its heartbeat addresses, LAN first (repeat per node)",
    )
    new.add_argument("--vip", metavar="ADDR[/PREFIX]", help="virtual IP (default: template's)")
    new.add_argument(
        "--dir", action="append", default=[], metavar="PATH", help="replicated directory (mirror)"
    )
    new.add_argument(
        "--port", action="append", default=[], type=_port, metavar="N", help="service port"
    )
    new.add_argument("--lb", choices=("ip", "ip_port"), help="farm: share clients by ip or ip_port")
    new.set_defaults(func=cmd_new)

    check = module_sub.add_parser(
        "validate",
        help="check a module directory or .safe file",
        description="Check userconfig.xml and bin/ of a module directory, or the userconfig.xml "
        "inside a .safe file (without verifying its signature).",
    )
    check.add_argument("path", metavar="DIR|FILE.safe")
    check.set_defaults(func=cmd_validate)


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port; expected 1 to 65535")
    return int(text)


def cmd_new(args: argparse.Namespace) -> int:
    from pathlib import Path

    from node_service.module import templates

    choice = templates.Fill(
        name=args.name,
        nodes=tuple(templates.parse_node(n) for n in args.node),
        vip=templates.parse_vip(args.vip) if args.vip else None,
        dirs=tuple(args.dir),
        ports=tuple(args.port),
        lb=args.lb,
    )
    module, summary = templates.create(args.template, choice, Path(args.out))
    print(f"created {args.out}: {module.name} ({module.kind}, template {args.template}; {summary})")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from node_service.errors import ModuleError, ValidationError
    from node_service.module import moduledir, userconfig

    path = Path(args.path)
    warnings: tuple[str, ...] = ()
    try:
        if not path.exists():
            raise ModuleError(f"{path}: no such module directory or .safe file")
        if path.is_file() and path.suffix == ".safe":
            try:
                from node_service.module import safe
            except ModuleNotFoundError as exc:
                raise ModuleError(
                    f"{path}: cannot read .safe files here ({exc.name} is missing)"
                ) from None
            data = safe.read_userconfig(path)
            module = userconfig.parse(data, f"{path}/{userconfig.FILENAME}")
        elif path.exists() and not path.is_dir():
            raise ModuleError(f"{path}: not a module directory nor a .safe file")
        else:
            result = moduledir.review(path)
            module, warnings = result.module, result.warnings
    except ValidationError as exc:
        for line in exc.lines():
            print(line, file=sys.stderr)
        return 1
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    count = len(module.nodes)
    print(f"valid: {module.name} ({module.kind}, {count} node{'s' if count != 1 else ''})")
    return 0
