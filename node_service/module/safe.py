"""Signed `.safe` module files: build, verify, extract, inspect.

This is the one entry point other areas use (the CLI, `module install` on a
node, the console's build & sign). The format's rules live in safe_format,
the writing in safe_build and the hostile-input reading in safe_verify; see
ARCHITECTURE §3 "Keys and modules" for the contract.
"""

from __future__ import annotations

import os
from typing import Any

from node_service.module.safe_build import BuildResult, build, build_module
from node_service.module.safe_format import (
    FORMAT,
    MANIFEST,
    MAX_ENTRIES,
    MAX_RATIO,
    MAX_TOTAL_BYTES,
    SIGNATURE,
    USERCONFIG,
    Manifest,
    ManifestEntry,
)
from node_service.module.safe_verify import (
    VerifiedModule,
    check_content,
    check_listing,
    check_userconfig,
    extract,
    open_archive,
    read_userconfig,
    verify,
)

__all__ = [
    "FORMAT",
    "MANIFEST",
    "MAX_ENTRIES",
    "MAX_RATIO",
    "MAX_TOTAL_BYTES",
    "SIGNATURE",
    "USERCONFIG",
    "BuildResult",
    "Manifest",
    "ManifestEntry",
    "VerifiedModule",
    "build",
    "build_module",
    "extract",
    "inspect",
    "read_userconfig",
    "verify",
]


def inspect(safe_path: str | os.PathLike[str]) -> dict[str, Any]:
    """What a .safe holds, as plain JSON-ready data; the signature is NOT checked.

    Structural checks and hashes still apply, so inspecting a hostile file is
    as safe as verifying it; only trust is skipped.
    """
    from node_service.module import keys

    arc = open_archive(safe_path)
    with arc:
        manifest = check_listing(arc)
        xml = check_content(arc, manifest)
    module = check_userconfig(xml, manifest)
    return {
        "file": str(safe_path),
        "format": manifest.format,
        **describe(module),
        "entries": [e.as_json() for e in manifest.entries],
        "signer": keys.fingerprint(manifest.signer),
        "signature": "not checked",
    }


def describe(module: Any) -> dict[str, Any]:
    """The parts of a module a person checks before trusting it to a node."""
    return {
        "name": module.name,
        "version": module.version,
        "kind": module.kind,
        "description": module.description,
        "nodes": [{"name": n.name, "addresses": list(n.addresses)} for n in module.nodes],
        "vips": [
            {"address": v.address, "prefix": v.prefix, "interface": v.interface}
            for v in module.vips
        ],
        "dirs": list(module.replicated_dirs),
        "replication_mode": module.replication_mode,
        "farm": [
            {"ports": list(r.ports), "protocol": r.protocol, "criterion": r.criterion}
            for r in (module.farm.rules if module.farm else ())
        ],
        "checkers": [c.label for c in module.checkers],
    }
