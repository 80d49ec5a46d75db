"""The two pages of `jaxkd.report`: report.md and a self-contained report.html.

A page is a list of blocks: ("title", text), ("h", text), ("p", text), ("table", header
[K], rows [[K strings]]) and ("fig", png path, caption). The Markdown links the PNGs next
to it; the HTML embeds them (base64), so the one file can be sent or opened anywhere.
"""

from __future__ import annotations

import base64
import html as _html
import os

__all__ = ["markdown", "html"]


def markdown(blocks) -> str:
  out = []
  for b in blocks:
    if b[0] == "title":
      out.append(f"# {b[1]}\n")
    elif b[0] == "h":
      out.append(f"## {b[1]}\n")
    elif b[0] == "p":
      out.append(b[1] + "\n")
    elif b[0] == "table":
      out.append("| " + " | ".join(b[1]) + " |")
      out.append("|" + "---|" * len(b[1]))
      out += ["| " + " | ".join(row) + " |" for row in b[2]]
      out.append("")
    elif b[0] == "fig":
      out.append(f"![{b[2]}]({os.path.basename(b[1])})\n")
  return "\n".join(out)


def html(blocks) -> str:
  e = _html.escape
  body = []
  for b in blocks:
    if b[0] in ("title", "h"):
      tag = "h1" if b[0] == "title" else "h2"
      body.append(f"<{tag}>{e(b[1])}</{tag}>")
    elif b[0] == "p":
      body.append(f"<p>{e(b[1])}</p>")
    elif b[0] == "table":
      head = "".join(f"<th>{e(h)}</th>" for h in b[1])
      rows = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>"
                     for row in b[2])
      body.append(f"<table><tr>{head}</tr>{rows}</table>")
    elif b[0] == "fig":
      with open(b[1], "rb") as f:
        data = base64.b64encode(f.read()).decode()
      body.append(f'<figure><img alt="{e(b[2])}" src="data:image/png;base64,{data}">'
                  f"<figcaption>{e(b[2])}</figcaption></figure>")
  style = ("body{font-family:sans-serif;max-width:70em;margin:2em auto;padding:0 1em}"
           "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;"
           "padding:3px 8px;text-align:right}td:first-child,th:first-child{text-align:left}"
           "img{max-width:100%}figcaption{color:#555;font-size:90%}")
  return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>jaxkd report</title>'
          f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
