"""Aligned text tables for the terminal: a header row, a rule, the rows; long cells wrap to fit."""
from __future__ import annotations

import os
import shutil
import sys
import textwrap


def terminal_width() -> int | None:
    """Columns to fit: `COLUMNS`, else the terminal's width; None (no limit) when stdout is no terminal."""
    cols = os.environ.get("COLUMNS", "")
    if cols.isdigit() and int(cols) > 0:
        return int(cols)
    if sys.stdout.isatty():
        return shutil.get_terminal_size().columns
    return None


def text_table(rows: list, right: set[int] = frozenset(), width: int | None = None,
               wrap: set[int] | None = None) -> list[str]:
    """Lines of `rows` (the first is the header) in aligned columns; `right` columns are right-aligned.

    With `width`, the widest `wrap` columns (default: all left-aligned ones) are narrowed, down to
    their header's width, until a line fits; their cells wrap onto continuation lines.
    """
    n = len(rows[0])
    widths = [max(len(row[i]) for row in rows) for i in range(n)]
    if width is not None:
        shrinkable = set(range(n)) - set(right) if wrap is None else set(wrap)
        floor = [max(len(rows[0][i]), 8) for i in range(n)]
        while sum(widths) + 2 * (n - 1) > width:
            cands = [i for i in shrinkable if widths[i] > floor[i]]
            if not cands:
                break
            widths[max(cands, key=lambda i: widths[i])] -= 1
    lines = []
    for k, row in enumerate(rows):
        cells = [textwrap.wrap(c, w, break_on_hyphens=False) or [""] if len(c) > w else [c] for c, w in zip(row, widths)]
        for j in range(max(len(c) for c in cells)):
            parts = [(c[j] if j < len(c) else "") for c in cells]
            lines.append("  ".join(p.rjust(w) if (i in right and k) else p.ljust(w)
                                   for i, (p, w) in enumerate(zip(parts, widths))).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines
