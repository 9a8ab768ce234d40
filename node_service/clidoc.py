"""Writes docs/cli-reference.md from the argument parsers themselves.

``python -m node_service.clidoc`` regenerates the file; ``--check`` exits 1
when it is out of date (a unit test does the same), so the reference can
never drift from what ``rampart --help`` says. Everything comes from
``cli.build_parser()`` and ``daemon.build_parser()``: verbs, their help,
usage lines, arguments, defaults and choices. Output is deterministic
(fixed width, parser order, no environment), so the file diffs cleanly.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "docs" / "cli-reference.md"
WIDTH = 100

HEADER = """\
# CLI reference

Generated from the parsers by `python -m node_service.clidoc`: do not edit
by hand, regenerate instead (a unit test fails when this file and the parser
disagree). Every command also prints its own help with `-h`.

Exit codes: 0 success; 1 failure or invalid input (one line on stderr,
`rampart: ...`); 2 wrong arguments; 3 refused (unknown module, wrong state,
missing role); 4 rampartd cannot be reached. `rampart wait` exits 1 on
timeout.
"""


def _fixed_width(parser: argparse.ArgumentParser) -> None:
    # argparse sizes help to the terminal; a generated file must not depend on it.
    parser.formatter_class = lambda prog: argparse.HelpFormatter(prog, width=WIDTH)


def _subcommands(
    parser: argparse.ArgumentParser,
) -> Iterator[tuple[str, str, argparse.ArgumentParser]]:
    """(name, one-line help, parser) of each direct sub-command, in parser order."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            for name, sub in action.choices.items():
                yield name, helps.get(name, ""), sub


def _argument_name(action: argparse.Action) -> str:
    if not action.option_strings:
        return str(action.metavar or action.dest)
    names = ", ".join(action.option_strings)
    if action.nargs == 0:
        return names
    metavar = action.metavar or action.dest.upper()
    return f"{names} {metavar if isinstance(metavar, str) else ' '.join(metavar)}"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _sentence(text: str) -> str:
    text = _cell(text)
    return text[0].upper() + text[1:] + ("" if text.endswith(".") else ".")


def _notes(action: argparse.Action) -> str:
    parts = [action.help or ""] if action.help != argparse.SUPPRESS else []
    if action.choices is not None and not isinstance(action, argparse._SubParsersAction):
        parts.append("one of: " + ", ".join(f"`{c}`" for c in action.choices))
    if isinstance(action, argparse._AppendAction) and "repeat" not in (action.help or ""):
        parts.append("repeatable")
    default = action.default
    if default not in (None, False, [], argparse.SUPPRESS) and action.nargs != 0:
        parts.append(f"default `{default}`")
    return _cell("; ".join(p for p in parts if p))


def _arguments_table(parser: argparse.ArgumentParser) -> list[str]:
    rows = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        if action.help == argparse.SUPPRESS:
            continue
        required = "yes" if (action.required or not action.option_strings) else ""
        rows.append(f"| `{_cell(_argument_name(action))}` | {required} | {_notes(action)} |")
    if not rows:
        return []
    return ["| argument | required | description |", "| --- | --- | --- |", *rows, ""]


def _section(
    path: list[str], summary: str, parser: argparse.ArgumentParser, depth: int
) -> list[str]:
    _fixed_width(parser)
    lines = [f"{'#' * min(depth, 4)} `{' '.join(path)}`", ""]
    texts = [t for t in (summary, parser.description) if t]
    if len(texts) == 2 and texts[1].lower().startswith(texts[0].lower().rstrip(".")):
        texts = texts[1:]  # the description already begins with the one-line help
    for text in texts:
        lines += [_sentence(text), ""]
    lines += ["```", parser.format_usage().strip(), "```", ""]
    lines += _arguments_table(parser)
    children = list(_subcommands(parser))
    if children and depth > 1:
        lines += [f"Actions: {', '.join(f'`{name}`' for name, _, _ in children)}.", ""]
    for name, help_text, sub in children:
        lines += _section([*path, name], help_text, sub, depth + 1)
    return lines


def render() -> str:
    """The whole reference, as markdown."""
    from node_service.cli import build_parser
    from node_service.daemon import build_parser as daemon_parser

    rampart = build_parser()
    rampart.prog = "rampart"
    verbs = list(_subcommands(rampart))
    lines = [HEADER, "## Contents", ""]
    lines += ["- [`rampartd`](#rampartd): the node daemon"]
    lines += [
        f"- [`rampart {name}`](#rampart-{name}): {_cell(help_text)}" for name, help_text, _ in verbs
    ]
    lines += [""]
    daemon = daemon_parser()
    daemon.prog = "rampartd"
    lines += _section(["rampartd"], "", daemon, 2)
    _fixed_width(rampart)
    lines += ["## `rampart`", "", _cell(rampart.description or ""), ""]
    lines += ["```", rampart.format_usage().strip(), "```", ""]
    lines += _arguments_table(rampart)
    for name, help_text, sub in verbs:
        lines += _section(["rampart", name], help_text, sub, 2)
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m node_service.clidoc",
        description="Write docs/cli-reference.md from the rampart and rampartd parsers.",
    )
    parser.add_argument("--out", type=Path, default=REFERENCE, help="file to write")
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if the file is out of date; write nothing"
    )
    args = parser.parse_args(argv)
    text = render()
    current = args.out.read_text(encoding="utf-8") if args.out.exists() else None
    if args.check:
        if current != text:
            print(f"{args.out}: out of date; run python -m node_service.clidoc", file=sys.stderr)
            return 1
        return 0
    if current != text:
        args.out.write_text(text, encoding="utf-8")
        print(f"wrote {args.out}")
    else:
        print(f"{args.out} is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
