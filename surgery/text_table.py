"""Aligned text tables for the terminal: a header row, a rule, the rows; long cells wrap to fit."""
from __future__ import annotations

import os
import re
import shutil
import sys
import textwrap


def terminal_width(watched: bool = False) -> int | None:
    """Columns to fit: `COLUMNS`, else the terminal's width; None (no limit) when stdout is no terminal.

    `watched`: output a person reads as it comes (a run's result table) also fits the terminal stderr
    is on when stdout is piped (`surgery run ... | tee log`)."""
    cols = os.environ.get("COLUMNS", "")
    if cols.isdigit() and int(cols) > 0:
        return int(cols)
    if sys.stdout.isatty():
        return shutil.get_terminal_size().columns
    if watched and sys.stderr.isatty():
        try:
            return os.get_terminal_size(sys.stderr.fileno()).columns
        except (OSError, ValueError):
            return None
    return None


def wrap_cell(cell: str, width: int) -> list[str]:
    """Lines of at most `width`: broken at spaces, else after . _ / , - (tensor names), else anywhere."""
    if len(cell) <= width:
        return [cell]
    lines, line = [], ""
    for token in re.findall(r"[^\s./_,-]*(?:[./_,-]+|\s+|$)", cell):
        if not token:
            continue
        if len(line + token.rstrip()) <= width:
            line += token
            continue
        if line.strip():
            lines.append(line.rstrip())
        line = token.lstrip()
        while len(line.rstrip()) > width:
            lines.append(line[:width])
            line = line[width:]
    if line.strip():
        lines.append(line.rstrip())
    return lines or [""]


def text_table(rows: list, right: set[int] = frozenset(), width: int | None = None,
               wrap: tuple[int, ...] = ()) -> list[str]:
    """Lines of `rows` (the first is the header) in aligned columns; `right` columns are right-aligned.

    With `width`, columns are narrowed until a line fits: the `wrap` columns in their order, then any
    left-aligned one (widest first), each down to its longest word; then the `wrap` columns, then
    the others, down to their header's width (at least 8), breaking words. Cells wrap onto continuation lines. A
    table whose narrowest form is still too wide is printed in that form.
    """
    n = len(rows[0])
    widths = [max(len(row[i]) for row in rows) for i in range(n)]
    if width is not None:
        header = [max(len(rows[0][i]), 8) for i in range(n)]
        word = [max([header[i]] + [len(w) for row in rows for w in row[i].split()]) for i in range(n)]
        left = [i for i in range(n) if i not in right]
        excess = lambda: sum(widths) + 2 * (n - 1) - width  # noqa: E731
        for i in wrap:
            widths[i] -= max(0, min(excess(), widths[i] - word[i]))
        for cols, floor in ((left, word), (wrap or left, header), (left, header)):
            while excess() > 0:
                cands = [i for i in cols if widths[i] > floor[i]]
                if not cands:
                    break
                widths[max(cands, key=lambda i: widths[i])] -= 1
    lines = []
    for k, row in enumerate(rows):
        cells = [wrap_cell(c, w) for c, w in zip(row, widths)]
        for j in range(max(len(c) for c in cells)):
            parts = [(c[j] if j < len(c) else "") for c in cells]
            lines.append("  ".join(p.rjust(w) if (i in right and k) else p.ljust(w)
                                   for i, (p, w) in enumerate(zip(parts, widths))).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def fit_lines(lines: list[str], width: int | None, indent: str = "  ") -> list[str]:
    """Prose lines under a table wrapped to `width` (continuations indented)."""
    if width is None:
        return lines
    return [w for line in lines for w in textwrap.wrap(line, width, subsequent_indent=indent, break_on_hyphens=False)]
