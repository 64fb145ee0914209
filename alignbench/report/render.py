r"""A report is a list of blocks; this module writes it as Markdown and as self-contained HTML.

Every string in a block may come from data, models or configs, so both renderers escape all of it:
HTML through ``html.escape``; Markdown headings, paragraphs, notes and table cells through
``html.escape`` plus a backslash before the Markdown characters that could open a link, an image,
code or emphasis or split a table cell (``\ ` * [ ] |``); free text (prompts, responses) as
``html.escape``d text in a ``<pre>`` block, which Markdown passes through as HTML, so it shows
verbatim and nothing in it is markup. The HTML has no script and no external resource: images are
base64 data URIs, and a Content-Security-Policy meta forbids scripts, so a payload that escaped the
escaping still could not run. Each HTML table sits in a box that scrolls sideways (``WIDE``, a class
of the page's own style sheet, which the CSP allows), so a wide table never widens the page. Every
heading below the title gets a stable, unique anchor (``slugs``) and both renderers open with a
table of contents linking to them.
"""
from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote


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


@dataclass
class Links:
    """Links to other reports beside this one (relative paths the report builds, never data)."""

    items: list[tuple[str, str]]  # (text, relative href)


Block = Heading | Para | Note | Table | Image | Samples | Links

WIDE = "wide"  # the class of the box around each table: it scrolls sideways, so a wide table never widens the page
_CSS = """body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px;vertical-align:top}
th{background:#f3f3f3}.note{background:#fff6dd;border-left:4px solid #e0b000;padding:4px 8px}
img{max-width:100%}pre{white-space:pre-wrap;word-break:break-word;margin:0;font-size:90%}
nav ul{list-style:none;padding-left:0}nav .toc3{padding-left:1.5em}
p,li,h1,h2,h3,figcaption{overflow-wrap:break-word}""" + f".{WIDE}{{overflow-x:auto;max-width:100%}}"


# No script, no fetch: only inline styles and data-URI images may load.
CSP = "default-src 'none'; script-src 'none'; img-src data:; style-src 'unsafe-inline'"
TOC_ID = "contents"  # the table of contents' own anchor, never a heading's
_SLUG_DROP = re.compile(r"[^a-z0-9]+")


def slug(text: str) -> str:
    """A heading's anchor: lower case, every run of other characters than a-z and 0-9 one "-"."""
    return _SLUG_DROP.sub("-", str(text).lower()).strip("-") or "section"


def slugs(blocks: list) -> dict[int, str]:
    """{index of each heading block below level 1: its anchor}, unique in the document: a repeated
    slug gets "-2", "-3", ... in order of appearance, so earlier anchors never change."""
    seen, out = {TOC_ID}, {}
    for i, b in enumerate(blocks):
        if isinstance(b, Heading) and b.level > 1:
            base = candidate = slug(b.text)
            k = 1
            while candidate in seen:
                k += 1
                candidate = f"{base}-{k}"
            seen.add(candidate)
            out[i] = candidate
    return out


def _toc_entries(blocks: list, anchors: dict[int, str]) -> list[tuple[int, str, str]]:
    """(level, text, anchor) of each anchored heading."""
    return [(blocks[i].level, blocks[i].text, a) for i, a in anchors.items()]


_MD_SPECIAL = re.compile(r"([\\`*\[\]|])")


def _md_text(text) -> str:
    return _MD_SPECIAL.sub(r"\\\1", html.escape(" ".join(str(text).split()), quote=False))


def _pre(text: str) -> str:
    """Free text as a Markdown HTML block: escaped, so it renders verbatim and inert. Blank lines
    would end the block in some renderers, so they keep a non-breaking space."""
    lines = [line if line.strip() else "&#160;" for line in html.escape(text, quote=False).split("\n")]
    return "<pre>\n" + "\n".join(lines) + "\n</pre>"


def _md_toc(blocks: list[Block], anchors: dict[int, str]) -> str:
    return "**Contents**\n\n" + "\n".join(f"{'  ' * (level - 2)}- [{_md_text(text)}](#{a})"
                                           for level, text, a in _toc_entries(blocks, anchors))


def to_markdown(blocks: list[Block]) -> str:
    out, anchors = [], slugs(blocks)
    for i, b in enumerate(blocks):
        if isinstance(b, Heading):
            if i in anchors:  # an explicit anchor: renderers differ in the ids they derive themselves
                out.append(f'<a id="{anchors[i]}"></a>')
            out.append("#" * b.level + " " + _md_text(b.text))
            if b.level == 1 and anchors:
                out.append(_md_toc(blocks, anchors))
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
        elif isinstance(b, Links):
            out.append("\n".join(f"- [{_md_text(text)}]({quote(href)})" for text, href in b.items))
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
    return f'<div class="{WIDE}"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _html_toc(blocks: list[Block], anchors: dict[int, str]) -> str:
    items = "".join(f'<li class="toc{level}"><a href="#{a}">{_h(text)}</a></li>'
                    for level, text, a in _toc_entries(blocks, anchors))
    return f'<nav id="{TOC_ID}"><b>Contents</b><ul>{items}</ul></nav>'


def to_html(blocks: list[Block], title: str) -> str:
    out, anchors = [], slugs(blocks)
    for i, b in enumerate(blocks):
        if isinstance(b, Heading):
            anchor = f' id="{anchors[i]}"' if i in anchors else ""
            out.append(f"<h{b.level}{anchor}>{_h(b.text)}</h{b.level}>")
            if b.level == 1 and anchors:
                out.append(_html_toc(blocks, anchors))
        elif isinstance(b, Para):
            out.append(f"<p>{_h(b.text)}</p>")
        elif isinstance(b, Note):
            out.append(f'<p class="note"><b>Note:</b> {_h(b.text)}</p>')
        elif isinstance(b, Table):
            out.append(_html_table(b.header, b.rows))
        elif isinstance(b, Links):
            out.append("<ul>" + "".join(f'<li><a href="{_h(quote(href))}">{_h(text)}</a></li>'
                                        for text, href in b.items) + "</ul>")
        elif isinstance(b, Image):
            out.append(f'<figure><img src="{_data_uri(b.path)}" alt="{_h(b.caption)}">'
                       f"<figcaption>{_h(b.caption)}</figcaption></figure>")
        elif isinstance(b, Samples):
            rows = [[f"{item['prompt_id']}: {item['prompt']}", *(item["responses"].get(m, "(none)") for m in b.methods)]
                    for item in b.items]
            out.append(_html_table(["prompt", *b.methods], rows, cell=lambda c: f"<pre>{_h(c)}</pre>"))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}"><title>{_h(title)}</title>'
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n")
