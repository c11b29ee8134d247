"""Coloured text -> PNG with matplotlib only (offline): the chat transcript or a tmux capture.

Text is laid out on a monospace character grid; each segment gets its background box and foreground
colour. Used for the chat capture (from the chat's JSON transcript, same colours as the terminal and
the HTML page) and for rendering an ANSI terminal capture (tmux `capture-pane -e`).
"""
from __future__ import annotations

import unicodedata

Segment = tuple[str, str | None, str | None]   # (text, background, foreground)


def _cells(ch: str) -> int:
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def layout(segments: list[Segment], width: int) -> list[list[tuple[int, str, str | None, str | None]]]:
    """Wrap segments into lines of at most `width` cells: per line, (column, text, bg, fg) runs."""
    lines: list[list] = [[]]
    col = 0
    for text, bg, fg in segments:
        run, start = "", col
        for ch in text:
            if ch == "\n":
                if run:
                    lines[-1].append((start, run, bg, fg))
                elif bg and not text.strip("\n"):   # a token that is only a newline: show a small box
                    lines[-1].append((col, " ", bg, fg))
                lines.append([])
                run, col, start = "", 0, 0
                continue
            if ch == "\t":
                ch = "    "
            w = sum(_cells(c) for c in ch)
            if col + w > width:
                if run:
                    lines[-1].append((start, run, bg, fg))
                lines.append([])
                run, col, start = "", 0, 0
            run += ch
            col += w
        if run:
            lines[-1].append((start, run, bg, fg))
    return lines


def render_png(segments: list[Segment], path, width: int = 100, title: str | None = None,
               footer: list[str] | None = None, legend: tuple[str, list[str], str] | None = None,
               fontsize: float = 9.0, dpi: int = 150, page_bg: str = "#ffffff", page_fg: str = "#222222"):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    import textwrap
    footer = [w for f in footer or [] for w in textwrap.wrap(f, width, subsequent_indent="  ")]
    lines = layout(segments, width)
    head = (1 if title else 0) + (2 if legend else 0)
    foot = len(footer or [])
    n = len(lines) + head + foot + 1
    cw, lh = 0.6 * fontsize / 72, 1.45 * fontsize / 72        # inches per cell / per line
    fig = plt.figure(figsize=(cw * (width + 4), lh * (n + 1)), dpi=dpi)
    fig.patch.set_facecolor(page_bg)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(-2, width + 2)
    ax.set_ylim(n + 0.5, -0.5)
    ax.axis("off")
    font = dict(family="DejaVu Sans Mono", fontsize=fontsize, va="center", ha="left")
    y = 0
    if title:
        ax.text(0, y, title, color=page_fg, weight="bold", **font)
        y += 1
    if legend:
        lo, colours, hi = legend
        ax.text(0, y, lo, color=page_fg, **font)
        x0 = len(lo) + 1
        for i, c in enumerate(colours):
            ax.add_patch(Rectangle((x0 + 3 * i, y - 0.42), 3, 0.84, color=c, lw=0))
        ax.text(x0 + 3 * len(colours) + 1, y, hi, color=page_fg, **font)
        y += 2
    for line in lines:
        for col, text, bg, fg in line:
            w = sum(_cells(c) for c in text)
            if bg:
                ax.add_patch(Rectangle((col, y - 0.5), w, 1.0, color=bg, lw=0))
            if text.strip():
                ax.text(col, y, text, color=fg or page_fg, **font)
        y += 1
    y += 1
    for f in footer or []:
        ax.text(0, y, f, color="#555555", **{**font, "fontsize": fontsize * 0.9})
        y += 1
    fig.savefig(path, dpi=dpi, facecolor=page_bg)
    plt.close(fig)


def transcript_segments(tr: dict, prompt: bool = True) -> tuple[list[Segment], list[str]]:
    """Segments of a chat transcript (the JSON of `python -m cwic_exp.chat --json`), coloured as in the
    terminal, and one summary line per turn."""
    from cwic_exp.chat import ComputeScale, summary_line
    scale = ComputeScale(**tr["scale"])
    segs: list[Segment] = []
    foot = []
    for i, t in enumerate(tr["turns"]):
        if prompt:
            segs.append((f"[turn {i + 1}: the prompt as the model saw it]\n", None, "#777777"))
            segs += _tok_segments(t["prompt"], scale)
        else:
            segs.append((f"you> {t['user']}\n", None, "#777777"))
        segs.append(("\n" if prompt and not t["prompt"][-1]["text"].endswith("\n") else "", None, None))
        segs += _tok_segments(t["reply"], scale)
        segs.append(("\n\n", None, None))
        foot.append(f"turn {i + 1}: {summary_line(t['summary'])}")
    return segs, foot


def _tok_segments(toks: list[dict], scale) -> list[Segment]:
    out, group = [], []
    for j, t in enumerate(toks):
        group.append(t)
        if t["text"] or j == len(toks) - 1:
            bg, fg = scale.colours(sum(g["ap"] for g in group) / len(group))
            out.append(("".join(g["text"] for g in group), bg, fg))
            group = []
    return out


def ansi_segments(ansi: str) -> list[Segment]:
    """An ANSI capture (e.g. `tmux capture-pane -e -p`) -> segments, via rich's ANSI decoder.

    Decoded as a whole: tmux writes style changes only, so a style carries over line ends."""
    from rich.text import Text

    def colour(c):
        return None if c is None or c.is_default else c.get_truecolor().hex

    segs: list[Segment] = []
    for line in Text.from_ansi(ansi).split("\n", allow_blank=True):
        pos = 0
        for sp in sorted(line.spans, key=lambda s: s.start):
            if sp.start > pos:
                segs.append((line.plain[pos:sp.start], None, None))
            st = sp.style if not isinstance(sp.style, str) else None
            bg = colour(st.bgcolor) if st is not None else None
            fg = colour(st.color) if st is not None else None
            if st is not None and st.dim and fg is None:
                fg = "#8a8a8a"
            if sp.end > pos:
                segs.append((line.plain[max(sp.start, pos):sp.end], bg, fg))
            pos = max(pos, sp.end)
        if pos < len(line.plain):
            segs.append((line.plain[pos:], None, None))
        segs.append(("\n", None, None))
    return segs
