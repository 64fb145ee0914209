r"""A report is a list of blocks; this module writes it as Markdown and as self-contained HTML.

Every string in a block may come from data, models or configs, so both renderers escape all of it:
HTML through ``html.escape``; Markdown headings, paragraphs, notes and table cells through
``html.escape`` plus a backslash before the Markdown characters that could open a link, an image,
code or emphasis or split a table cell (``\ ` * [ ] |``); free text (prompts, responses) as
``html.escape``d text in a ``<pre>`` block, which Markdown passes through as HTML, so it shows
verbatim and nothing in it is markup. The HTML has no script and no external resource: images are
base64 data URIs.
"""
from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    text: str


@dataclass
class Note:
    """A visible remark, e.g. why a plot or table was skipped."""

    text: str


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Image:
    path: Path  # a PNG inside the report directory
    caption: str


@dataclass
class Samples:
    """Responses of several methods to the same prompts, shown side by side."""

    methods: list[str]
    items: list[dict] = field(default_factory=list)  # {"prompt_id", "prompt", "responses": {method: text}}


Block = Heading | Para | Note | Table | Image | Samples

_CSS = """body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px;vertical-align:top}
th{background:#f3f3f3}.note{background:#fff6dd;border-left:4px solid #e0b000;padding:4px 8px}
img{max-width:100%}pre{white-space:pre-wrap;word-break:break-word;margin:0;font-size:90%}"""


_MD_SPECIAL = re.compile(r"([\\`*\[\]|])")


def _md_text(text) -> str:
    return _MD_SPECIAL.sub(r"\\\1", html.escape(" ".join(str(text).split()), quote=False))


def _pre(text: str) -> str:
    """Free text as a Markdown HTML block: escaped, so it renders verbatim and inert. Blank lines
    would end the block in some renderers, so they keep a non-breaking space."""
    lines = [line if line.strip() else "&#160;" for line in html.escape(text, quote=False).split("\n")]
    return "<pre>\n" + "\n".join(lines) + "\n</pre>"


def to_markdown(blocks: list[Block]) -> str:
    out = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append("#" * b.level + " " + _md_text(b.text))
        elif isinstance(b, Para):
            out.append(_md_text(b.text))
        elif isinstance(b, Note):
            out.append("> **Note:** " + _md_text(b.text))
        elif isinstance(b, Table):
            lines = ["| " + " | ".join(_md_text(h) for h in b.header) + " |",
                     "|" + "---|" * len(b.header)]
            lines += ["| " + " | ".join(_md_text(c) for c in row) + " |" for row in b.rows]
            out.append("\n".join(lines))
        elif isinstance(b, Image):
            out.append(f"![{_md_text(b.caption)}]({b.path.name})")
        elif isinstance(b, Samples):
            for item in b.items:
                out.append(f"**Prompt {_md_text(item['prompt_id'])}**\n\n" + _pre(item["prompt"]))
                out += [f"*{_md_text(m)}*\n\n" + _pre(item["responses"].get(m, "(none)")) for m in b.methods]
    return "\n\n".join(out) + "\n"


def _h(text) -> str:
    return html.escape(str(text), quote=True)


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _html_table(header, rows, cell=_h) -> str:
    head = "".join(f"<th>{_h(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def to_html(blocks: list[Block], title: str) -> str:
    out = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"<h{b.level}>{_h(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            out.append(f"<p>{_h(b.text)}</p>")
        elif isinstance(b, Note):
            out.append(f'<p class="note"><b>Note:</b> {_h(b.text)}</p>')
        elif isinstance(b, Table):
            out.append(_html_table(b.header, b.rows))
        elif isinstance(b, Image):
            out.append(f'<figure><img src="{_data_uri(b.path)}" alt="{_h(b.caption)}">'
                       f"<figcaption>{_h(b.caption)}</figcaption></figure>")
        elif isinstance(b, Samples):
            rows = [[f"{item['prompt_id']}: {item['prompt']}", *(item["responses"].get(m, "(none)") for m in b.methods)]
                    for item in b.items]
            out.append(_html_table(["prompt", *b.methods], rows, cell=lambda c: f"<pre>{_h(c)}</pre>"))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_h(title)}</title>'
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n")
