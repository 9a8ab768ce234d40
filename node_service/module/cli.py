"""`rampart keygen` and `rampart module build|verify|inspect|extract`.

Only argparse is imported at load time (the CLI must start fast); keys,
crypto and the zip code load inside the handlers. Every refusal reaches the
user as one line through node_service.cli; warnings go to stderr, results
to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    keygen = subparsers.add_parser(
        "keygen",
        help="create an Ed25519 signing key pair for modules",
        description="Write DIR/signing.key (private, 0600) and DIR/signing.pub (public). "
        "Existing keys are never overwritten.",
    )
    keygen.add_argument("--out", required=True, metavar="DIR", help="directory for the key pair")
    keygen.set_defaults(func=cmd_keygen)


def register_module_verbs(module_subparsers: argparse._SubParsersAction) -> None:
    build = module_subparsers.add_parser(
        "build",
        help="validate, pack and sign a module directory into FILE.safe",
        description="Reproducible: the same directory and key give a byte-identical file.",
    )
    build.add_argument("dir", metavar="DIR", help="module directory (userconfig.xml, bin/)")
    build.add_argument("--key", required=True, metavar="KEYFILE", help="private signing key")
    build.add_argument("--out", required=True, metavar="FILE.safe", help="file to write")
    build.set_defaults(func=cmd_build)

    trust_help = "trusted public key, or a directory of *.pub (repeatable)"
    verify = module_subparsers.add_parser(
        "verify", help="check a .safe file's signature, contents and userconfig"
    )
    verify.add_argument("file", metavar="FILE.safe")
    verify.add_argument(
        "--trust", required=True, action="append", metavar="PUBFILE", help=trust_help
    )
    verify.set_defaults(func=cmd_verify)

    inspect = module_subparsers.add_parser(
        "inspect", help="show what a .safe file holds (the signature is not checked)"
    )
    inspect.add_argument("file", metavar="FILE.safe")
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    inspect.set_defaults(func=cmd_inspect)

    extract = module_subparsers.add_parser(
        "extract", help="verify a .safe file, then unpack it into DEST only"
    )
    extract.add_argument("file", metavar="FILE.safe")
    extract.add_argument("dest", metavar="DEST", help="new or empty directory")
    extract.add_argument(
        "--trust", required=True, action="append", metavar="PUBFILE", help=trust_help
    )
    extract.set_defaults(func=cmd_extract)


def _one_line(error: Exception, where: str | None = None) -> Exception:
    """A ValidationError as one line: the first problem and how many more there are."""
    from node_service.errors import ModuleError, ValidationError

    if not isinstance(error, ValidationError):
        return error
    lines = error.lines() or [str(error)]
    more = len(lines) - 1
    text = lines[0] + (f" (and {more} more problem{'s' if more != 1 else ''})" if more else "")
    prefix = f"{where}: " if where else ""
    return ModuleError(f"{prefix}invalid userconfig: {text}")


def cmd_keygen(args: argparse.Namespace) -> int:
    from node_service.module import keys

    key_path, pub_path = keys.generate(args.out)
    print(f"wrote {key_path} (private, 0600) and {pub_path}")
    print(f"fingerprint {keys.fingerprint(keys.load_public(pub_path))}")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from node_service.errors import ValidationError
    from node_service.module import safe

    try:
        result = safe.build_module(args.dir, args.key, args.out)
    except ValidationError as exc:
        raise _one_line(exc, args.dir) from None
    for warning in result.warnings:
        print(f"rampart: warning: {warning}", file=sys.stderr)
    print(
        f"built {result.path}: {result.name} {result.version}, {len(result.entries)} files, "
        f"signed by {result.signer}"
    )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from node_service.errors import ValidationError
    from node_service.module import keys, safe

    trusted = keys.load_trusted(args.trust)
    try:
        verified = safe.verify(args.file, trusted)
    except ValidationError as exc:
        raise _one_line(exc, args.file) from None
    print(f"valid: {verified.name} {verified.version} signed by {verified.signer}")
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from node_service.errors import ValidationError
    from node_service.module import keys, safe

    trusted = keys.load_trusted(args.trust)
    try:
        verified = safe.extract(args.file, args.dest, trusted)
    except ValidationError as exc:
        raise _one_line(exc, args.file) from None
    print(
        f"extracted {verified.name} {verified.version} ({len(verified.entries)} files) "
        f"into {args.dest}; signed by {verified.signer}"
    )
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from node_service.errors import ValidationError
    from node_service.module import safe

    try:
        info = safe.inspect(args.file)
    except ValidationError as exc:
        raise _one_line(exc, args.file) from None
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
    else:
        print(render_inspection(info))
    return 0


def render_inspection(info: dict[str, Any]) -> str:
    """The human form of `module inspect`: the summary first, then every entry."""
    nodes = ", ".join(f"{n['name']} ({', '.join(n['addresses'])})" for n in info["nodes"])
    vips = ", ".join(
        f"{v['address']}/{v['prefix']}" + (f" on {v['interface']}" if v["interface"] else "")
        for v in info["vips"]
    )
    lines = [
        f"module:    {info['name']} {info['version']} ({info['kind']})",
        *([f"about:     {info['description']}"] if info["description"] else []),
        f"nodes:     {nodes or '-'}",
        f"vips:      {vips or '-'}",
        f"dirs:      {', '.join(info['dirs']) or '-'}"
        + (f" ({info['replication_mode']})" if info["replication_mode"] else ""),
        *([f"farm:      {', '.join(_farm_rule(r) for r in info['farm'])}"] if info["farm"] else []),
        f"checkers:  {', '.join(info['checkers']) or '-'}",
        f"signer:    {info['signer']} (signature not checked; use `rampart module verify`)",
        f"entries:   {len(info['entries'])}",
    ]
    width = max((len(f"{e['size']:,}") for e in info["entries"]), default=1)
    for e in info["entries"]:
        lines.append(f"  {e['mode']}  {e['size']:>{width},}  {e['sha256'][:16]}  {e['path']}")
    return "\n".join(lines)


def _farm_rule(rule: dict[str, Any]) -> str:
    ports = ",".join(str(p) for p in rule["ports"]) or "all ports"
    return f"{rule['protocol']} {ports} by {rule['criterion']}"
