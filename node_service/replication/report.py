"""How ``rampart repl status`` and ``rampart repl verify`` read on a terminal (pure but print).

``eta_seconds`` and ``status_lines`` are pure; ``format_status`` adds a rich
progress bar for a running resync when the output is a terminal (plain
lines otherwise, so scripts and logs stay readable).
"""

from __future__ import annotations

from typing import Any, TextIO


def eta_seconds(remaining: int, bytes_per_s: float) -> float | None:
    """Seconds left at the current rate; None when nothing moves."""
    if remaining <= 0:
        return 0.0
    if bytes_per_s <= 0:
        return None
    return remaining / bytes_per_s


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover - the loop always returns


def status_lines(status: dict[str, Any]) -> list[str]:
    remaining = int(status.get("resync_remaining_bytes") or 0)
    rate = float(status.get("bytes_per_s") or 0)
    eta = eta_seconds(remaining, rate)
    lines = [
        f"module {status.get('module')} on {status.get('node')}: "
        f"{status.get('role', 'off')}, mode {status.get('mode')}",
        f"status      {status.get('status')}"
        + (f" ({status['reason']})" if status.get("reason") else ""),
        f"throughput  {human_bytes(rate)}/s",
        f"lag         {human_bytes(int(status.get('lag_bytes') or 0))}",
        f"resync left {human_bytes(remaining)}"
        + ("" if not remaining else f", ETA {'unknown' if eta is None else f'{eta:.0f} s'}"),
    ]
    last = status.get("last_resync")
    if last:
        kind = "full sync" if last.get("full") else "resync"
        lines.append(
            f"last {kind}: {last.get('differences')} differences, "
            f"{human_bytes(int(last.get('bytes_resent') or 0))} sent in {last.get('seconds')} s"
        )
    return lines


def format_status(status: dict[str, Any], out: TextIO) -> None:
    for line in status_lines(status):
        print(line, file=out)
    remaining = int(status.get("resync_remaining_bytes") or 0)
    if status.get("status") != "resyncing" or not remaining or not out.isatty():
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn

    # One frame of the bar: the total is what is left plus what the last pass sent.
    sent = int((status.get("last_resync") or {}).get("bytes_resent") or 0)
    with Progress(
        TextColumn("resync"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
        console=Console(file=out), transient=False, auto_refresh=False,
    ) as progress:  # fmt: skip
        progress.add_task("resync", total=remaining + sent, completed=sent)
        progress.refresh()


def format_verify(result: dict[str, Any]) -> str:
    diffs = result.get("differences") or []
    if not diffs:
        return f"module {result.get('module')}: both sides identical"
    head = f"module {result.get('module')}: {len(diffs)} differing path(s):"
    return "\n".join([head, *(f"  {line}" for line in diffs)])
