"""Self-contained HTML reports: sections of figures, tables and facts, PNGs embedded.

The report opens anywhere (a browser, an artifact store, an e-mail) with no other file, and the
PNGs are also written beside it for people who want to paste one into a slide.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from pipeline.outputs import write_atomic
from pipeline.plots import png_bytes

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
    alert: str = ""  # shown in red at the top of the section


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "figure"


def facts_table(facts: dict) -> pd.DataFrame:
    return pd.DataFrame({"fact": list(facts), "value": [str(v) for v in facts.values()]})


def render(title: str, sections: list[Section], png_dir: Path) -> str:
    """The HTML text; each figure is also written to ``png_dir/<name>.png``."""
    png_dir.mkdir(parents=True, exist_ok=True)
    body = [f"<h1>{html.escape(title)}</h1>"]
    for section in sections:
        body.append(f"<h2>{html.escape(section.title)}</h2>")
        if section.alert:
            body.append(f'<p class="alert">{html.escape(section.alert)}</p>')
        for paragraph in filter(None, section.text.split("\n\n")):
            body.append(f"<p>{html.escape(paragraph)}</p>")
        for name, figure in section.figures:
            data = png_bytes(figure)
            (png_dir / f"{slug(name)}.png").write_bytes(data)
            encoded = base64.b64encode(data).decode("ascii")
            body.append(f'<img alt="{html.escape(name)}" src="data:image/png;base64,{encoded}">')
        for caption, frame in section.tables:
            body.append(f'<p class="note">{html.escape(caption)}</p>')
            body.append(frame.to_html(index=False, border=0, float_format=lambda v: f"{v:.4g}"))
    return ("<!doctype html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def write_report(path: Path, title: str, sections: list[Section]) -> Path:
    """report.html (atomically) and its PNGs in ``<stem>_files/`` beside it."""
    text = render(title, sections, path.parent / f"{path.stem}_files")
    write_atomic(path, text)
    return path
