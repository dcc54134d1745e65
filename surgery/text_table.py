"""Aligned text tables for the terminal: a header row, a rule, the rows."""
from __future__ import annotations


def text_table(rows: list, right: set[int] = frozenset()) -> list[str]:
    """Lines of `rows` (the first is the header) in aligned columns; `right` columns are right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for k, row in enumerate(rows):
        cells = [c.rjust(w) if (i in right and k) else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines
