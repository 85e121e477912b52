"""A self-contained HTML report. All text is escaped; images are embedded as base64 PNG data URIs.

Each analysis contributes a :class:`Section` built from its plain-data results; the report only lays
them out. Nothing here computes statistics.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffdissect.atomic import atomic_write_bytes

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{border-bottom:2px solid #444}h2{margin-top:2em;border-bottom:1px solid #bbb}
table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}
figure{display:inline-block;margin:0.5em 1em 0.5em 0;vertical-align:top}figcaption{font-size:13px;color:#555;max-width:520px}
img{image-rendering:pixelated}.note{background:#fff7d6;border-left:4px solid #e0b000;padding:0.5em 1em}
code{background:#f4f4f4;padding:0 3px}
"""


@dataclass
class Section:
    """One analysis' part of the report: paragraphs, tables and figures, in the order added."""

    title: str
    blocks: list[str] = field(default_factory=list)

    def paragraph(self, text: str) -> Section:
        self.blocks.append(f"<p>{html.escape(text)}</p>")
        return self

    def note(self, text: str) -> Section:
        self.blocks.append(f'<p class="note">{html.escape(text)}</p>')
        return self

    def code(self, text: str) -> Section:
        self.blocks.append(f"<pre><code>{html.escape(text)}</code></pre>")
        return self

    def table(self, header: Sequence[Any], rows: Sequence[Sequence[Any]], caption: str | None = None) -> Section:
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
        cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
        self.blocks.append(f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        return self

    def image(self, png: bytes, caption: str = "", width: int | None = None) -> Section:
        src = "data:image/png;base64," + base64.b64encode(png).decode()
        size = f' width="{int(width)}"' if width else ""
        self.blocks.append(
            f'<figure><img src="{src}"{size} alt="{html.escape(caption, quote=True)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
        return self


@dataclass
class Report:
    title: str
    sections: list[Section] = field(default_factory=list)

    def section(self, title: str) -> Section:
        section = Section(title)
        self.sections.append(section)
        return section

    def render(self) -> str:
        toc = "".join(f'<li><a href="#s{i}">{html.escape(s.title)}</a></li>' for i, s in enumerate(self.sections))
        body = "".join(
            f'<h2 id="s{i}">{html.escape(s.title)}</h2>' + "".join(s.blocks) for i, s in enumerate(self.sections)
        )
        return (
            f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(self.title)}</h1><ul>{toc}</ul>{body}"
            "</body></html>"
        )

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, self.render().encode())
        return path


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)
