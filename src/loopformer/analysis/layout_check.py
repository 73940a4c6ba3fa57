"""Render an HTML report in headless Chromium and measure whether it scrolls horizontally.

``python -m loopformer.analysis.layout_check OUT/report.html --width 1200 --width 800`` prints, per window width,
the page's ``scrollWidth`` against its visible width and the elements reaching past the right edge; it exits 1
when a page scrolls horizontally and 0 (with a note) when no Chromium is installed. Chromium is an optional tool:
nothing else in the package needs it.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

# Runs after the images have decoded; the result goes into an attribute that --dump-dom prints.
_PROBE = """<script>
addEventListener("load", () => {
  const root = document.documentElement;
  const visible = root.clientWidth;
  const wide = [...document.body.querySelectorAll("*")]
    .filter((e) => e.getBoundingClientRect().right > visible + 0.5 && !e.closest("[data-scrolls]"))
    .map((e) => e.tagName.toLowerCase() + (e.className ? "." + e.className : ""));
  root.setAttribute("data-layout", JSON.stringify(
    {scroll: root.scrollWidth, visible: visible, window: innerWidth, wide: [...new Set(wide)].slice(0, 20)}));
});
</script>"""
_RESULT = re.compile(r'data-layout="([^"]*)"')


@dataclass(frozen=True)
class PageWidth:
    """One rendering: window width, the page's visible width (without a scroll bar), its scroll width and the
    elements (tag.class) whose right edge lies past the visible width."""

    window: int
    visible: int
    scroll: int
    wide: tuple[str, ...]

    @property
    def fits(self) -> bool:
        """True when the page has no horizontal scroll."""
        return self.scroll <= self.visible


def find_chromium() -> str | None:
    """Path of an installed Chromium / Chrome, or None."""
    return next((found for name in BROWSERS if (found := shutil.which(name))), None)


def measure(page: Path, width: int, *, browser: str, height: int = 900, timeout: float = 120) -> PageWidth:
    """Render ``page`` (a copy with a measuring script appended) at ``width`` x ``height`` and read the widths."""
    text = Path(page).read_text(encoding="utf-8")
    end = text.rfind("</body>")
    probed = text[:end] + _PROBE + text[end:] if end >= 0 else text + _PROBE
    with tempfile.TemporaryDirectory(prefix="loopformer-layout-") as tmp:
        copy = Path(tmp) / "page.html"
        copy.write_text(probed, encoding="utf-8")
        command = [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--user-data-dir={Path(tmp) / 'profile'}",
            f"--window-size={width},{height}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            copy.as_uri(),
        ]
        dom = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False).stdout
    match = _RESULT.search(dom)
    if match is None:
        raise RuntimeError(f"{browser} did not report the page's layout (no data-layout in --dump-dom).")
    result = json.loads(html.unescape(match.group(1)))
    return PageWidth(result["window"], result["visible"], result["scroll"], tuple(result["wide"]))


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: measure each width, print one line per width; 1 if any page scrolls horizontally."""
    parser = argparse.ArgumentParser(prog="python -m loopformer.analysis.layout_check", description=__doc__)
    parser.add_argument("page", type=Path, help="the HTML file, e.g. OUT/report.html")
    parser.add_argument("--width", type=int, action="append", help="window width in px (repeatable; default 1200)")
    args = parser.parse_args(argv)
    browser = find_chromium()
    if browser is None:
        print(f"skipped: none of {', '.join(BROWSERS)} is installed.", file=sys.stderr)
        return 0
    fits = True
    for width in args.width or [1200]:
        result = measure(args.page, width, browser=browser)
        fits &= result.fits
        verdict = "fits" if result.fits else f"scrolls horizontally; too wide: {', '.join(result.wide) or '?'}"
        print(f"window {result.window}px: scrollWidth {result.scroll}px, visible {result.visible}px: {verdict}")
    return 0 if fits else 1


if __name__ == "__main__":
    sys.exit(main())
