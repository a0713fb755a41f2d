"""Plain Markdown tables: readable in a terminal, in an MLflow artifact and in a README alike."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence


def format_cell(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.4g}"
        return f"{value:.3e}"
    return "–" if value is None else str(value)


def _escaped(text: str) -> str:
    """A "|" in a label or value ("max |Δ|") would end its cell: Markdown's escape keeps it in."""
    return text.replace("|", "\\|")


def markdown_table(rows: Sequence[Mapping[str, Any]], title: str | None = None) -> str:
    """Rows (dicts with the same keys, first row's order) as a Markdown table."""
    if not rows:
        return (f"### {title}\n\n" if title else "") + "(no rows)\n"
    columns = list(rows[0].keys())
    for row in rows[1:]:
        columns += [key for key in row if key not in columns]
    cells = [[_escaped(format_cell(row.get(col))) for col in columns] for row in rows]
    headers = [_escaped(col) for col in columns]
    widths = [max(len(col), *(len(line[i]) for line in cells)) for i, col in enumerate(headers)]
    lines = [
        "| " + " | ".join(col.ljust(w) for col, w in zip(headers, widths)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
        *("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in cells),
    ]
    return (f"### {title}\n\n" if title else "") + "\n".join(lines) + "\n"
