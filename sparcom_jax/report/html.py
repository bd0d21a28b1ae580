"""One self-contained index.html: figures inlined as base64 PNG data URIs, tables as HTML."""

from __future__ import annotations

import base64
import dataclasses
import html
from typing import Any, Sequence

_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: .92em; color: #444; margin-top: .4em; }
table { border-collapse: collapse; font-size: .85em; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
caption { caption-side: top; text-align: left; font-weight: 600; padding-bottom: .3em; }
code, pre { background: #f6f6f6; } pre { padding: .6em; overflow-x: auto; font-size: .85em; }
"""


@dataclasses.dataclass
class FigureBlock:
    """A PNG figure with its title and a caption saying what it shows and how to read it."""

    title: str
    png: bytes
    caption: str
    filename: str = ""


@dataclasses.dataclass
class TableBlock:
    """A table shown inline."""

    title: str
    header: Sequence[str]
    rows: Sequence[Sequence[Any]]


@dataclasses.dataclass
class TextBlock:
    """A heading (level 2) or a paragraph / preformatted text."""

    text: str
    heading: bool = False
    pre: bool = False


def _cell(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def render_html(title: str, blocks: Sequence[FigureBlock | TableBlock | TextBlock]) -> str:
    """Render the report page.

    Args:
      title: page title.
      blocks: figures, tables and text in display order.

    Returns:
      The HTML document; it references no external file.
    """
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
           f"<h1>{html.escape(title)}</h1>"]
    for b in blocks:
        if isinstance(b, FigureBlock):
            data = base64.b64encode(b.png).decode("ascii")
            out.append(
                f'<figure id="{html.escape(b.filename)}"><h3>{html.escape(b.title)}</h3>'
                f'<img alt="{html.escape(b.title)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{html.escape(b.caption)}</figcaption></figure>")
        elif isinstance(b, TableBlock):
            head = "".join(f"<th>{html.escape(str(h))}</th>" for h in b.header)
            body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in r) + "</tr>" for r in b.rows)
            out.append(f"<table><caption>{html.escape(b.title)}</caption><thead><tr>{head}</tr></thead>"
                       f"<tbody>{body}</tbody></table>")
        elif b.heading:
            out.append(f"<h2>{html.escape(b.text)}</h2>")
        elif b.pre:
            out.append(f"<pre>{html.escape(b.text)}</pre>")
        else:
            out.append(f"<p>{html.escape(b.text)}</p>")
    out.append("</body></html>")
    return "\n".join(out)
