"""One self-contained HTML report (plots embedded as base64 PNG, tables, notes) plus a JSON file of the numbers."""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loopformer.config import atomic_write_text

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ddd; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .85em; }
td, th { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; } p.note { color: #555; }
"""


@dataclass
class Section:
    """A titled part of the report: explanatory text, figures (PNG paths) and tables (headers, rows)."""

    title: str
    text: str = ""
    images: list[Path] = field(default_factory=list)
    tables: list[tuple[Sequence[str], Sequence[Sequence[Any]]]] = field(default_factory=list)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _image(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<p><img alt="{html.escape(Path(path).stem)}" src="data:image/png;base64,{data}"></p>'


def render_html(title: str, intro: str, sections: Sequence[Section]) -> str:
    """The report as one HTML document with everything embedded (no external files)."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="note">{html.escape(intro)}</p>',
    ]
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        if section.text:
            parts.append(f"<p>{html.escape(section.text)}</p>")
        parts.extend(_table(headers, rows) for headers, rows in section.tables)
        parts.extend(_image(path) for path in section.images)
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(
    out_dir: Path, title: str, intro: str, sections: Sequence[Section], numbers: dict[str, Any]
) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.json`` into ``out_dir`` (atomically); returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    html_path, json_path = out_dir / "report.html", out_dir / "report.json"
    atomic_write_text(html_path, render_html(title, intro, sections))
    atomic_write_text(json_path, json.dumps(numbers, indent=1))
    return html_path, json_path
