"""Which leftover VIPs a starting rampartd keeps: only those of resumed PRIM/ALONE modules."""

from __future__ import annotations

from node_service.daemon import ResumeSeen, vips_to_keep


def test_only_modules_resumed_as_prim_or_alone_keep_their_vips():
    keep, why = vips_to_keep(
        [
            ResumeSeen("web", True, "PRIM", ("198.51.100.200",)),
            ResumeSeen("api", True, "ALONE", ("198.51.100.205", "198.51.100.206")),
            ResumeSeen("db", True, "SECOND", ("198.51.100.201",)),
            ResumeSeen("old", False, "PRIM", ("198.51.100.204",)),  # stopped, or unloadable
            ResumeSeen("lb", True, "UP", ()),  # a farm: its VIP carries no Rampart mark
        ]
    )
    assert keep == {"198.51.100.200", "198.51.100.205", "198.51.100.206"}
    assert why == (
        "keeping 198.51.100.200 (web resumes as PRIM); 198.51.100.205 (api resumes as ALONE); "
        "198.51.100.206 (api resumes as ALONE)"
    )


def test_nothing_resumed_keeps_nothing_and_says_so():
    keep, why = vips_to_keep([ResumeSeen("db", False, "STOP", ("198.51.100.201",))])
    assert keep == frozenset()
    assert why == "no module resumes holding a virtual IP"
