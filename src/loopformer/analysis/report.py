"""One self-contained HTML report (plots embedded as base64 PNG, tables, notes) plus a JSON file of the numbers.

The page is one centred column (:data:`COLUMN_PX` wide at most, with margins): a summary of the key numbers
first, then the sections. Images scale down to the column, tables scroll inside their own box, and tables longer
than :data:`COLLAPSE_ROWS` rows are collapsed in ``<details>``, so nothing is wider than the window.
"""

from __future__ import annotations

import base64
import html
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loopformer.config import atomic_write_text

COLUMN_PX = 1000
COLLAPSE_ROWS = 10

STYLE = f"""
*, *::before, *::after {{ box-sizing: border-box; }}
body {{ margin: 0; font-family: system-ui, sans-serif; line-height: 1.45; color: #222; background: #fff; }}
main {{ max-width: calc({COLUMN_PX}px + 4rem); margin: 0 auto; padding: 1.5rem 2rem 3rem; }}
h1 {{ font-size: 1.5em; overflow-wrap: anywhere; }}
h2 {{ font-size: 1.2em; border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 1.8em; }}
p, li, dd, figcaption, summary {{ overflow-wrap: anywhere; }}
p.note, figcaption {{ color: #555; }}
figure {{ margin: 1em 0; }}
figcaption {{ font-size: .9em; margin-top: .3em; }}
img {{ display: block; max-width: 100%; height: auto; border: 1px solid #eee; }}
.table-wrap {{ max-width: 100%; overflow-x: auto; margin: .8em 0; }}
table {{ border-collapse: collapse; font-size: .85em; }}
caption {{ text-align: left; color: #555; padding-bottom: .3em; }}
td, th {{ border: 1px solid #ccc; padding: .25em .6em; text-align: right; white-space: nowrap; }}
th {{ background: #f3f3f3; }} td:first-child, th:first-child {{ text-align: left; }}
details {{ margin: .8em 0; }} summary {{ cursor: pointer; color: #245; }}
.summary {{ background: #f6f8fa; border: 1px solid #dde2e8; border-radius: 6px; padding: .6em 1.2em; }}
.summary h2 {{ border: 0; margin-top: .3em; }}
.summary dl {{ display: grid; grid-template-columns: minmax(8em, max-content) minmax(0, 1fr); gap: .35em 1.2em; }}
.summary dt {{ font-weight: 600; }} .summary dd {{ margin: 0; }}
@media (max-width: 640px) {{ main {{ padding: 1rem; }} .summary dl {{ grid-template-columns: minmax(0, 1fr); }} }}
"""


@dataclass
class Table:
    """Column headers, rows and a caption (the ``<summary>`` line when the table is collapsed)."""

    headers: Sequence[str]
    rows: Sequence[Sequence[Any]]
    caption: str = ""


@dataclass
class Figure:
    """A PNG file and the caption shown under it."""

    path: Path
    caption: str = ""


@dataclass
class Section:
    """A titled part of the report: explanatory text, figures and tables."""

    title: str
    text: str = ""
    figures: list[Figure] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def _table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in table.headers)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in table.rows)
    caption = html.escape(table.caption)
    if len(table.rows) > COLLAPSE_ROWS:
        grid = f'<div class="table-wrap"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'
        return f"<details><summary>{caption or 'Table'} ({len(table.rows)} rows)</summary>{grid}</details>"
    caption = f"<caption>{caption}</caption>" if caption else ""
    return f'<div class="table-wrap"><table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _figure(figure: Figure) -> str:
    data = Path(figure.path).read_bytes()
    width, height = struct.unpack(">II", data[16:24])  # the PNG header's IHDR chunk
    source = base64.b64encode(data).decode("ascii")
    image = (
        f'<img alt="{html.escape(Path(figure.path).stem)}" width="{width}" height="{height}" '
        f'src="data:image/png;base64,{source}">'
    )
    caption = f"<figcaption>{html.escape(figure.caption)}</figcaption>" if figure.caption else ""
    return f"<figure>{image}{caption}</figure>"


def _summary(items: Sequence[tuple[str, str]]) -> str:
    rows = "".join(f"<dt>{html.escape(key)}</dt><dd>{html.escape(value)}</dd>" for key, value in items)
    return f'<section class="summary" id="summary"><h2>Summary</h2><dl>{rows}</dl></section>'


def render_html(title: str, intro: str, sections: Sequence[Section], summary: Sequence[tuple[str, str]] = ()) -> str:
    """The report as one HTML document with everything embedded (no external files); ``summary``: (name, finding)
    pairs shown first."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body><main>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="note">{html.escape(intro)}</p>',
    ]
    if summary:
        parts.append(_summary(summary))
    for section in sections:
        parts.append(f"<section><h2>{html.escape(section.title)}</h2>")
        if section.text:
            parts.append(f"<p>{html.escape(section.text)}</p>")
        parts.extend(_table(table) for table in section.tables)
        parts.extend(_figure(figure) for figure in section.figures)
        parts.append("</section>")
    parts.append("</main></body></html>")
    return "\n".join(parts)


def write_report(
    out_dir: Path,
    title: str,
    intro: str,
    sections: Sequence[Section],
    numbers: dict[str, Any],
    summary: Sequence[tuple[str, str]] = (),
) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.json`` into ``out_dir`` (atomically); returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    html_path, json_path = out_dir / "report.html", out_dir / "report.json"
    atomic_write_text(html_path, render_html(title, intro, sections, summary))
    atomic_write_text(json_path, json.dumps(numbers, indent=1))
    return html_path, json_path
