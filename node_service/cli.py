"""`rampart`: the command line of a node (and of a module author's laptop).

Each area registers its own verbs (``register(subparsers)``); handlers take
the parsed arguments and return an exit code. Area modules import only
argparse at load time so that `rampart` starts fast; heavy imports happen
inside handlers.

Any RampartError becomes one line on stderr and its exit code: a user never
sees a traceback for a mistake in their input.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from node_service import __version__
from node_service.errors import RampartError

# Areas that add verbs. Each module has register(subparsers) and, for the
# shared `module` group, register_module_verbs(module_subparsers).
AREAS = (
    "node_service.module.cli",
    "node_service.module.authoring_cli",
    "node_service.api.cli",
    "node_service.lab.cli",
)


def _areas():
    for name in AREAS:
        try:
            yield importlib.import_module(name)
        except ModuleNotFoundError as exc:
            # An area still being built must not break the others.
            if exc.name != name:
                raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rampart", description="Rampart high availability: node and module commands."
    )
    parser.add_argument("--version", action="version", version=f"rampart {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    module = sub.add_parser("module", help="create, validate, sign and install modules")
    module_sub = module.add_subparsers(dest="module_verb", metavar="ACTION")
    module_sub.required = True
    for area in _areas():
        if hasattr(area, "register"):
            area.register(sub)
        if hasattr(area, "register_module_verbs"):
            area.register_module_verbs(module_sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except RampartError as exc:
        print(f"rampart: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("rampart: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
