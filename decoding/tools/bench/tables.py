"""Fixed-width plain-text tables: every section prints its results with `format_table`."""

from __future__ import annotations


def format_table(headers: list[str], rows: list[list], title: str = "") -> str:
    """Fixed-width plain text; floats with 2 decimals (3 below 10), None as '-'."""
    def cell(v: object) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    cells = [[cell(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths)).rstrip()  # noqa: E731
    out = ([title] if title else []) + [line(headers), line(["-" * w for w in widths])]
    return "\n".join(out + [line(r) for r in cells])
