"""Render report sections into one self-contained HTML file; every figure is embedded as a data URI."""

from __future__ import annotations

import base64
import datetime as dt
import html
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from jinja2 import Environment, select_autoescape

log = logging.getLogger(__name__)


@dataclass
class Section:
    """One report section: an id, a title, an HTML body (already escaped) and PNG figures with captions."""

    id: str
    title: str
    body: str = ""
    figures: list[tuple[Path, str]] = field(default_factory=list)
    ran: bool = True


_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<style>
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{border-bottom:2px solid #345} h2{margin-top:2em;color:#234} table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #bbb;padding:.25em .6em;text-align:right} th{background:#eef} td:first-child{text-align:left}
figure{display:inline-block;margin:.5em;vertical-align:top} figure img{max-width:520px;border:1px solid #ddd}
figcaption{font-size:.85em;color:#555;max-width:520px} .muted{color:#777} nav a{margin-right:.8em}
.missing{background:#fff4e5;padding:.5em;border-left:4px solid #f90}
</style></head><body>
<h1>{{ title }}</h1>
<p class="muted">Study <code>{{ study_hash[:16] }}</code> &middot; generated {{ generated }}</p>
<nav>{% for s in sections %}<a href="#{{ s.id }}">{{ s.title }}</a>{% endfor %}</nav>
{% for s in sections %}
<section id="{{ s.id }}" data-section="{{ s.id }}"><h2>{{ s.title }}</h2>
{% if not s.ran %}<p class="missing">This phase did not run in this study.</p>{% endif %}
{{ s.body | safe }}
{% for uri, caption in s.images %}
<figure><img src="{{ uri }}" alt="{{ caption }}"><figcaption>{{ caption }}</figcaption></figure>
{% endfor %}
</section>
{% endfor %}
<script>
// Lets a headless browser (and the tests) confirm that every embedded figure decoded.
window.addEventListener("load", () => {
  const imgs = Array.from(document.images);
  document.body.dataset.figures = imgs.length;
  document.body.dataset.figuresLoaded = imgs.filter((i) => i.complete && i.naturalWidth > 0).length;
});
</script>
</body></html>
"""


def png_data_uri(path: Path) -> str:
    """A PNG file as a data URI."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def table(rows: Sequence[dict], columns: Sequence[str] | None = None, digits: int = 3) -> str:
    """An HTML table from a list of dicts (values escaped, floats rounded)."""
    if not rows:
        return "<p class='muted'>(no rows)</p>"
    cols = list(columns or rows[0].keys())

    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.{digits}g}" if abs(v) < 1e-3 or abs(v) >= 1e5 else f"{v:.{digits}f}"
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{fmt(r.get(c, ''))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def build_report(sections: Sequence[Section], out: Path, title: str, study_hash: str) -> Path:
    """Write the report; figures that are missing on disk are reported in place, never silently dropped."""
    rendered = []
    for s in sections:
        images = []
        for path, caption in s.figures:
            if Path(path).is_file():
                images.append((png_data_uri(Path(path)), caption))
            else:
                log.warning("report: figure %s of section %s is missing", path, s.id)
                s.body += f"<p class='missing'>Figure missing: {html.escape(str(path))}</p>"
        rendered.append({"id": s.id, "title": s.title, "body": s.body, "images": images, "ran": s.ran})
    env = Environment(autoescape=select_autoescape(default=True))
    text = env.from_string(_TEMPLATE).render(
        title=title, study_hash=study_hash, sections=rendered,
        generated=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return out
