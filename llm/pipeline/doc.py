"""Text for people: one Markdown table writer, one aligned-text table, one number format, and a
page built once and written twice: Markdown (renders on GitHub) and standalone HTML.

Only what a report needs: headings, paragraphs, tables, images and preformatted text. Text is
plain (escaped for both formats); `code` spans in Markdown become <code> in HTML. The HTML can
embed its PNGs, so the page is one file to mail or attach.
"""

from __future__ import annotations

import base64
import html
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:60em;margin:2em auto;padding:0 1em;line-height:1.45}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .6em;vertical-align:top}"
    "th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}"
    "img{max-width:100%}pre{background:#f6f8fa;padding:1em;overflow-x:auto;white-space:pre-wrap}"
)


def number(value: float | int, digits: int = 4) -> str:
    """A number as a reader wants it: integers (and whole floats from 1,000) with thousands
    separators, other floats to `digits` significant digits, NaN as `nan`."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) >= 1000):
        return f"{int(value):,}"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return f"{value:.{digits}g}"


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: list[str], rows: list[list], right: list[bool] | None = None) -> str:
    """A GitHub Markdown table. `right[i]`: right-align column i; by default, the columns whose
    every cell is a number (with an optional %, s or × unit) are right-aligned."""
    rows = [[str(c) for c in row] for row in rows]
    if right is None:
        right = [bool(rows) and all(_is_number(r[i]) for r in rows) for i in range(len(header))]
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |"]
    lines.append("| " + " | ".join("---:" if r else "---" for r in right) + " |")
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(header: list[str], rows: list[list]) -> str:
    """Columns padded to their widest cell, two spaces apart, for a terminal or a log."""
    rows = [[str(c) for c in row] for row in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]
    )


def _html_inline(text: str) -> str:
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(str(text)))


def _is_number(text: str) -> bool:
    return bool(re.fullmatch(r"[-+]?[\d,]*\.?\d+(e[-+]?\d+)?\s*(%|s|×)?", str(text).strip()))


@dataclass
class Doc:
    title: str
    blocks: list[tuple] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("h", level, text))

    def para(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, header: list[str], rows: list[list]) -> None:
        self.blocks.append(("table", header, [[str(c) for c in row] for row in rows]))

    def image(self, path: str, alt: str) -> None:
        self.blocks.append(("img", path, alt))

    def pre(self, text: str) -> None:
        self.blocks.append(("pre", text))

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for kind, *args in self.blocks:
            if kind == "h":
                out += [f"{'#' * args[0]} {args[1]}", ""]
            elif kind == "p":
                out += [args[0], ""]
            elif kind == "table":
                out += [markdown_table(*args), ""]
            elif kind == "img":
                out += [f"![{args[1]}]({args[0]})", ""]
            elif kind == "pre":
                out += ["```text", args[0].rstrip("\n"), "```", ""]
        return "\n".join(out)

    def html(self, image_root: Path | None = None) -> str:
        """The page as one file; with `image_root`, images are embedded from files below it."""
        title = html.escape(self.title)
        out = [f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>']
        out.append(f"<style>{_CSS}</style></head><body>\n<h1>{title}</h1>")
        for kind, *args in self.blocks:
            if kind == "h":
                out.append(f"<h{args[0]}>{_html_inline(args[1])}</h{args[0]}>")
            elif kind == "p":
                out.append(f"<p>{_html_inline(args[0])}</p>")
            elif kind == "table":
                header, rows = args
                out.append("<table><tr>" + "".join(f"<th>{_html_inline(h)}</th>" for h in header) + "</tr>")
                for row in rows:
                    cells = (f"<td{' class=num' if _is_number(c) else ''}>{_html_inline(c)}</td>" for c in row)
                    out.append("<tr>" + "".join(cells) + "</tr>")
                out.append("</table>")
            elif kind == "img":
                src = args[0]
                if image_root is not None and (image_root / src).is_file():
                    src = "data:image/png;base64," + base64.b64encode((image_root / src).read_bytes()).decode()
                out.append(f'<p><img src="{html.escape(src)}" alt="{html.escape(args[1])}"></p>')
            elif kind == "pre":
                out.append(f"<pre>{html.escape(args[0])}</pre>")
        out.append("</body></html>\n")
        return "\n".join(out)
