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


def at_least(lo: int):
    """An argparse type: a whole number ≥ lo, else argparse's one-line error (exit 2) naming the option."""
    def whole(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = lo - 1
        if v < lo:
            import argparse
            raise argparse.ArgumentTypeError(f"expected a whole number ≥ {lo}, got {text!r}")
        return v
    whole.__name__ = f"whole number ≥ {lo}"
    return whole
