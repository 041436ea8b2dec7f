"""A self-contained HTML report of a run, and a checker for it.

`write_report(out_dir, title, sections)` writes `out_dir/report.html`: a table of contents, then per
section its text, tables, figures and links.  Figures are PNG files embedded as base64 data URIs,
so the one file can be mailed or archived; each <img> also records where its PNG came from
(`data-src`, relative to out_dir when inside it) and the PNG's sha256 (`data-sha256`).  Links point
to artefacts next to the report (e.g. final_info.json) by relative path.

`check_report(out_dir)` re-reads the HTML and verifies that every image is an embedded PNG equal to
its source file, that every source file and linked file exists, and raises ReportError listing what
is wrong; tests and the experiment script call it after writing.

Section text is plain: blank lines separate paragraphs, lines starting "- " form a bullet list, and
`backticks` mark code.  Tables are HTML strings (e.g. `aggregate.comparison_table(fmt="html")`,
`html_table`, `kv_table`).
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import html
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from tsae.analysis.plotting import PNG_MAGIC, is_png

REPORT_FILE = "report.html"

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1150px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.5}
h1{border-bottom:2px solid #444;padding-bottom:.2em} h2{margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:1em 0;font-size:.9em} th,td{border:1px solid #ccc;padding:.3em .6em;
text-align:right} th:first-child,td:first-child{text-align:left} thead th{background:#f0f0f0}
figure{margin:1.5em 0} figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.9em;color:#444} code{background:#f4f4f4;padding:0 .2em}
.meta{color:#666;font-size:.9em} nav ol{columns:2}
"""


class ReportError(RuntimeError):
    """The report or one of the files it references is missing or broken."""


@dataclass
class FigureRef:
    path: str | Path  # a PNG; relative paths are relative to the report's out_dir
    caption: str = ""


@dataclass
class Section:
    heading: str
    text: str = ""
    tables: list[str] = field(default_factory=list)  # trusted HTML
    figures: list[FigureRef] = field(default_factory=list)
    links: list[tuple[str, str | Path]] = field(default_factory=list)  # (label, file path)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def html_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """An escaped HTML table; floats shown with 4 significant digits."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    cells = ("".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) for row in rows)
    body = "".join(f"<tr>{c}</tr>" for c in cells)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>\n"


def kv_table(items: Mapping[str, object]) -> str:
    return html_table(["key", "value"], list(items.items()))


def _text_html(text: str) -> str:
    out = []
    for block in re.split(r"\n\s*\n", text.strip()):
        if not block:
            continue
        esc = re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(block))
        lines = esc.splitlines()
        if all(line.lstrip().startswith("- ") for line in lines):
            out.append("<ul>" + "".join(f"<li>{line.lstrip()[2:]}</li>" for line in lines) + "</ul>")
        else:
            out.append(f"<p>{' '.join(lines)}</p>")
    return "\n".join(out)


def _resolve(out_dir: Path, path: str | Path) -> Path:
    path = Path(path)
    return path if path.is_absolute() else out_dir / path


def _ref(out_dir: Path, path: Path) -> str:
    """How the report names a file: relative to out_dir when inside it, else absolute."""
    try:
        return path.resolve().relative_to(out_dir.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


def _as_section(s: Section | Mapping) -> Section:
    if isinstance(s, Section):
        return s
    figs = [f if isinstance(f, FigureRef) else FigureRef(*f) if isinstance(f, tuple | list) else FigureRef(f)
            for f in s.get("figures", [])]
    return Section(heading=s["heading"], text=s.get("text", ""), tables=list(s.get("tables", [])),
                   figures=figs, links=[tuple(x) for x in s.get("links", [])])


def write_report(out_dir: str | Path, title: str, sections: Sequence[Section | Mapping], *,
                 subtitle: str = "") -> Path:
    """Write out_dir/report.html (see module doc); raises FileNotFoundError for a missing figure/link."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sections = [_as_section(s) for s in sections]
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = [f"<h1>{html.escape(title)}</h1>",
             f'<p class="meta">{html.escape(subtitle)}{" · " if subtitle else ""}generated {stamp}</p>',
             "<nav><ol>" + "".join(f'<li><a href="#s{i}">{html.escape(s.heading)}</a></li>'
                                   for i, s in enumerate(sections, 1)) + "</ol></nav>"]
    n_fig = 0
    for i, sec in enumerate(sections, 1):
        parts.append(f'<h2 id="s{i}">{i}. {html.escape(sec.heading)}</h2>')
        parts.append(_text_html(sec.text))
        parts.extend(sec.tables)
        for fig in sec.figures:
            path = _resolve(out_dir, fig.path)
            if not is_png(path):
                raise FileNotFoundError(f"figure {path} is missing or not a PNG")
            data = path.read_bytes()
            n_fig += 1
            parts.append(
                f'<figure id="fig{n_fig}"><img alt="Figure {n_fig}" src="data:image/png;base64,'
                f'{base64.b64encode(data).decode()}" data-src="{html.escape(_ref(out_dir, path))}" '
                f'data-sha256="{hashlib.sha256(data).hexdigest()}">'
                f"<figcaption><b>Figure {n_fig}.</b> {html.escape(fig.caption)}</figcaption></figure>")
        if sec.links:
            items = []
            for label, target in sec.links:
                path = _resolve(out_dir, target)
                if not path.exists():
                    raise FileNotFoundError(f"linked file {path} is missing")
                href = html.escape(_ref(out_dir, path))
                items.append(f'<li><a href="{href}">{html.escape(label)}</a></li>')
            parts.append("<ul>" + "".join(items) + "</ul>")
    doc = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
           f"<style>{_CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")
    path = out_dir / REPORT_FILE
    path.write_text(doc, encoding="utf-8")
    return path


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images: list[dict[str, str]] = []
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        if tag == "img":
            self.images.append(a)
        elif tag == "a" and a.get("href") and not a["href"].startswith(("#", "http:", "https:", "mailto:")):
            self.links.append(a["href"])


def check_report(out_dir: str | Path, name: str = REPORT_FILE) -> list[Path]:
    """Verify the report's embedded figures and referenced files (module doc); return the files checked."""
    out_dir = Path(out_dir)
    report = out_dir / name
    if not report.is_file():
        raise ReportError(f"{report} does not exist")
    refs = _Refs()
    refs.feed(report.read_text(encoding="utf-8"))
    problems, checked = [], []
    for img in refs.images:
        label = img.get("data-src") or img.get("alt", "?")
        src = img.get("src", "")
        if not src.startswith("data:image/png;base64,"):
            problems.append(f"image {label}: not embedded as a PNG data URI")
            continue
        data = base64.b64decode(src.split(",", 1)[1])
        if not data.startswith(PNG_MAGIC):
            problems.append(f"image {label}: embedded data is not a PNG")
        if img.get("data-src"):
            path = _resolve(out_dir, img["data-src"])
            checked.append(path)
            if not is_png(path):
                problems.append(f"image {label}: source file {path} is missing or not a PNG")
            elif hashlib.sha256(path.read_bytes()).hexdigest() != img.get("data-sha256"):
                problems.append(f"image {label}: source file {path} differs from the embedded copy")
    for href in refs.links:
        path = _resolve(out_dir, href)  # the parser has already unescaped attribute values
        checked.append(path)
        if not path.exists():
            problems.append(f"link {href}: {path} is missing")
    if problems:
        raise ReportError("; ".join(problems))
    return checked
