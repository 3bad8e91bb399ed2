"""Self-contained HTML reports: sections of figures, tables and facts, PNGs embedded.

The report opens anywhere (a browser, an artifact store, an e-mail) with no other file, and the
PNGs are also written beside it for people who want to paste one into a slide.
"""

from __future__ import annotations

import base64
import html
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from pipeline.outputs import check_location, figures_dir, temp_path
from pipeline.plots import png_bytes
from pipeline.signals import signals_held

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.2rem; border-bottom: 1px solid #ddd; padding-bottom: .2rem; margin-top: 2rem; }
table { border-collapse: collapse; font-size: .85rem; margin: .5rem 0; }
td, th { border: 1px solid #ddd; padding: .2rem .5rem; text-align: right; } th { background: #f4f4f4; }
td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; display: block; margin: .5rem 0; }
.alert { color: #b00; font-weight: bold; } .note { color: #555; font-size: .9rem; }
"""


@dataclass
class Section:
    title: str
    text: str = ""  # plain text, escaped; paragraphs split on blank lines
    figures: list = field(default_factory=list)  # (name, matplotlib Figure)
    tables: list = field(default_factory=list)  # (caption, DataFrame)
    alert: str = ""  # shown in red at the top of the section, one paragraph per line


def slug(text: str) -> str:
    """A figure's file name without ``.png`` (pipeline.outputs.SCORING_REPORT_FIGURES lists the scoring report's)."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "figure"


def facts_table(facts: dict) -> pd.DataFrame:
    return pd.DataFrame({"fact": list(facts), "value": [str(v) for v in facts.values()]})


def render(title: str, sections: list[Section]) -> tuple[str, dict[str, bytes]]:
    """The HTML text, and each figure's PNG by file name (``<name>.png``)."""
    body, pngs = [f"<h1>{html.escape(title)}</h1>"], {}
    for section in sections:
        body.append(f"<h2>{html.escape(section.title)}</h2>")
        for alert in filter(None, section.alert.split("\n")):  # alerts hold "; " themselves: one per paragraph
            body.append(f'<p class="alert">{html.escape(alert)}</p>')
        for paragraph in filter(None, section.text.split("\n\n")):
            body.append(f"<p>{html.escape(paragraph)}</p>")
        for name, figure in section.figures:
            data = pngs[f"{slug(name)}.png"] = png_bytes(figure)
            encoded = base64.b64encode(data).decode("ascii")
            body.append(f'<img alt="{html.escape(name)}" src="data:image/png;base64,{encoded}">')
        for caption, frame in section.tables:
            body.append(f'<p class="note">{html.escape(caption)}</p>')
            body.append(frame.to_html(index=False, border=0, float_format=lambda v: f"{v:.4g}"))
    text = ("<!doctype html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")
    return _ascii(text), pngs


def _ascii(text: str) -> str:
    """``text`` with every non-ASCII character as an HTML character reference.

    The file is then the same bytes whatever the locale encoding it is written in (an ASCII
    locale raised UnicodeEncodeError on "°"), and a file name that is not valid UTF-8 (kept by
    Python as lone surrogates) shows as its "\\xe9" escapes, as in the scores file, instead
    of failing the write.
    """
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # surrogates that are not escaped bytes
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text.encode("ascii", "xmlcharrefreplace").decode("ascii")


def check_report_location(path: Path) -> None:
    """Fail when the report, or its figures folder, can't go at ``path``: callers check before any
    work too, so a run is not spent scoring before the report fails."""
    check_location(path, "report", "file")
    check_location(figures_dir(path), "report figures", "directory")


def write_report(path: Path, title: str, sections: list[Section]) -> Path:
    """report.html (atomically) and its PNGs in ``<stem>_files/`` beside it.

    Every figure is rendered before anything is written, so a figure that fails leaves no
    half-written folder, and the folder is replaced whole, so no PNG of an earlier report stays.
    """
    png_dir = figures_dir(path)
    check_report_location(path)
    text, pngs = render(title, sections)
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    fresh, stale = path.parent / f".{png_dir.name}.tmp-{tag}", path.parent / f".{png_dir.name}.old-{tag}"
    page = temp_path(path)
    try:
        fresh.mkdir()
        for name, data in pngs.items():
            (fresh / name).write_bytes(data)
        page.write_text(text)
        # The page and its figures change together: a signal between the renames left a new page
        # beside no figures folder, or beside the earlier report's figures.
        with signals_held():
            if png_dir.is_dir():
                png_dir.rename(stale)
            fresh.rename(png_dir)
            os.replace(page, path)
    finally:
        page.unlink(missing_ok=True)
        shutil.rmtree(fresh, ignore_errors=True)
        shutil.rmtree(stale, ignore_errors=True)
    return path
