"""Static HTML pages that open from disk: no server, no network, no scripts, no external files.

Used by `kit.report` (a run's report) and `kit.leaderboard` (runs side by side). Everything is
escaped here (`esc`, `table`), the style sheet is inline (`page`), and links and images are
relative paths, so a page keeps working when its folder is copied elsewhere.
"""
from __future__ import annotations

import html
import math
from typing import Any, Sequence

CSS = """
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; color: #1b1f24; }
main { max-width: 1400px; margin: 0 auto; padding: 0 20px 40px; }
header { background: #1b1f24; color: #fff; padding: 12px 20px; }
header h1 { margin: 0; font-size: 20px; }
header p { margin: 4px 0 0; color: #c9d1d9; }
nav { position: sticky; top: 0; background: #f6f8fa; border-bottom: 1px solid #d0d7de; padding: 6px 20px; z-index: 10; }
nav a { margin-right: 14px; color: #0969da; text-decoration: none; }
h2 { border-bottom: 1px solid #d0d7de; padding-bottom: 4px; margin-top: 32px; }
h3 { margin-bottom: 6px; }
table { border-collapse: collapse; margin: 6px 0 12px; }
th, td { border: 1px solid #d0d7de; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.chosen td { background: #dafbe1; }
td.diff { background: #fff8c5; font-weight: 600; }
.note { color: #57606a; }
.warn { color: #9a6700; }
.grid { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
img.plot { max-width: 100%; border: 1px solid #d0d7de; }
code { background: #f6f8fa; padding: 0 3px; }
"""


def esc(value: Any) -> str:
    """Text for HTML (None -> empty)."""
    return "" if value is None else html.escape(str(value), quote=True)


def fmt(value: Any, digits: int = 4) -> str:
    """Numbers with `digits` decimals, missing ones (None, NaN) as an en dash, the rest as text."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "&ndash;"
    if isinstance(value, bool):
        return esc(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return esc(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, numeric: Sequence[bool] | None = None,
          row_class: Sequence[str] | None = None, cell_class: Sequence[Sequence[str]] | None = None,
          raw: bool = False, cls: str = "", digits: int = 4) -> str:
    """An HTML table (no header row when `headers` is empty); cells are formatted by `fmt` unless
    `raw` (cells already HTML)."""
    numeric = numeric or [False] * max(len(headers), max((len(r) for r in rows), default=0))
    out = [f'<table class="{esc(cls)}">' if cls else "<table>"]
    if headers:  # no headers: a table of label / value rows
        out.append("<thead><tr>")
        out += [f'<th class="num">{esc(h)}</th>' if n else f"<th>{esc(h)}</th>" for h, n in zip(headers, numeric)]
        out.append("</tr></thead>")
    out.append("<tbody>")
    for i, row in enumerate(rows):
        rc = row_class[i] if row_class and row_class[i] else ""
        out.append(f'<tr class="{rc}">' if rc else "<tr>")
        for j, value in enumerate(row):
            classes = " ".join(c for c in ("num" if j < len(numeric) and numeric[j] else "",
                                           cell_class[i][j] if cell_class else "") if c)
            text = str(value) if raw else fmt(value, digits)
            out.append(f'<td class="{classes}">{text}</td>' if classes else f"<td>{text}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def page(title: str, body: str, *, subtitle: str = "", nav: Sequence[tuple[str, str]] = (), css: str = "") -> str:
    """A whole HTML document: header, optional section links (anchor, text), body."""
    links = "".join(f'<a href="#{esc(a)}">{esc(t)}</a>' for a, t in nav)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{esc(title)}</title>"
        f"<style>{CSS}{css}</style></head><body>"
        f"<header><h1>{esc(title)}</h1>{f'<p>{subtitle}</p>' if subtitle else ''}</header>"
        + (f"<nav>{links}</nav>" if links else "")
        + f"<main>{body}</main></body></html>\n"
    )
