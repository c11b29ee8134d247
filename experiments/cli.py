"""Command-line helpers shared by the benchmark and analysis scripts."""
from __future__ import annotations


def parse_list(s: str, conv, what: str) -> list:
    """A comma-separated option as a list of conv(item); a bad or empty one exits with one line naming `what`."""
    try:
        out = [conv(v) for v in s.split(",") if v.strip()]
    except ValueError:
        out = []
    if not out:
        raise SystemExit(f"{what}: a comma-separated list, got {s!r}")
    return out
