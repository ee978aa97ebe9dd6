"""HTML of the feature dashboards (eval/dashboard.py computes, this module only renders).

Pages are self-contained: inline CSS, an inline SVG histogram, a few lines of inline JavaScript
to sort the index, relative links only. Every piece of text that comes from data (tokens, paths)
goes through `html.escape`, attributes included.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from html import escape

NONE = '<p class="meta">none</p>'
VISIBLE = {"\n": "↵", "\r": "␍", "\t": "⇥"}  # whitespace that would otherwise vanish or break lines

CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em 2em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.2em; }
th, td { padding: 2px 8px; border-bottom: 1px solid #ddd; text-align: left; vertical-align: top; }
th[data-col] { cursor: pointer; text-decoration: underline dotted; }
td.num, td.act { text-align: right; font-variant-numeric: tabular-nums; }
td.ctx { font-family: ui-monospace, monospace; white-space: pre-wrap; font-size: 90%; }
span.tok { border-radius: 2px; }
span.hit { outline: 1.5px solid #c05000; }
.meta { color: #555; }
"""

SORT_JS = """
document.querySelectorAll("th[data-col]").forEach(function (th) {
  th.addEventListener("click", function () {
    var body = th.closest("table").tBodies[0], col = th.cellIndex;
    var desc = th.getAttribute("data-order") !== "desc";
    th.setAttribute("data-order", desc ? "desc" : "asc");
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = parseFloat(a.cells[col].getAttribute("data-v")), y = parseFloat(b.cells[col].getAttribute("data-v"));
      return desc ? y - x : x - y;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""


@dataclass
class Context:
    """A window of one held-out sequence around one token (the row the context is shown for)."""

    tokens: list[str]  # decoded tokens of the window
    acts: list[float]  # the feature's activation at each (0: does not fire, or not evaluated)
    center: int  # index in `tokens` of the row's token
    act: float  # the feature's activation at that token
    row: int = -1  # the token's row in the store


@dataclass
class FeaturePage:
    """Everything one feature's page shows."""

    index: int
    expert: int | None  # the expert that owns the feature (SAE layout); None without a router or in none
    density: float  # fraction of evaluated tokens where the feature fires
    fires: int
    max_act: float
    top: list[Context]
    deciles: list[tuple[str, list[Context]]]  # (label, contexts), top decile first
    zero: list[Context]
    hist_counts: list[int] = field(default_factory=list)
    hist_edges: list[float] = field(default_factory=list)  # len(hist_counts) + 1

    @property
    def filename(self) -> str:
        return f"feature_{self.index}.html"


def fmt(x: float) -> str:
    """Numbers as the pages print them."""
    return f"{x:.4g}"


def token_html(token: str, act: float, max_act: float, hit: bool = False) -> str:
    """One token as a <span>: background alpha = act / max_act, tooltip with the value."""
    shown = escape("".join(VISIBLE.get(c, c) for c in token), quote=True)
    classes = "tok hit" if hit else "tok"
    if act <= 0:
        return f'<span class="{classes}">{shown}</span>'
    alpha = min(1.0, act / max_act) if max_act > 0 else 1.0
    title = escape(f"{token!r}: {fmt(act)}", quote=True)
    return f'<span class="{classes}" style="background: rgba(255, 110, 0, {alpha:.3f})" title="{title}">{shown}</span>'


def context_rows(contexts: list[Context], max_act: float) -> str:
    """Table rows: the activation at the context's token, then the highlighted window."""
    out = []
    for c in contexts:
        spans = "".join(token_html(t, a, max_act, i == c.center) for i, (t, a) in enumerate(zip(c.tokens, c.acts, strict=True)))
        out.append(f'<tr data-row="{c.row}"><td class="act">{fmt(c.act)}</td><td class="ctx">{spans}</td></tr>')
    return "\n".join(out)


def context_table(table_id: str, contexts: list[Context], max_act: float) -> str:
    if not contexts:
        return NONE
    return (f'<table id="{table_id}"><thead><tr><th>activation</th><th>context</th></tr></thead><tbody>\n'
            f"{context_rows(contexts, max_act)}\n</tbody></table>")


def histogram_svg(counts: list[int], edges: list[float], width: int = 480, height: int = 140) -> str:
    """Bars of counts [n] over bins with edges [n + 1], as inline SVG with axis end labels."""
    if not counts or max(counts) == 0:
        return '<p class="meta">no non-zero activations</p>'
    top, pad, n = max(counts), 20, len(counts)
    bar_w = (width - 2 * pad) / n
    bars = []
    for i, c in enumerate(counts):
        h = (height - 2 * pad) * c / top
        bars.append(f'<rect x="{pad + i * bar_w:.2f}" y="{height - pad - h:.2f}" '
                    f'width="{max(bar_w - 1, 0.5):.2f}" height="{h:.2f}" fill="#e06000">'
                    f"<title>{fmt(edges[i])} .. {fmt(edges[i + 1])}: {c}</title></rect>")
    labels = (f'<text x="{pad}" y="{height - 5}" font-size="11">{fmt(edges[0])}</text>'
              f'<text x="{width - pad}" y="{height - 5}" font-size="11" text-anchor="end">{fmt(edges[-1])}</text>'
              f'<text x="{pad}" y="{pad - 6}" font-size="11">{top} tokens</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
            f'aria-label="activation histogram">{"".join(bars)}{labels}'
            f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#444"/></svg>')


def _page(title: str, body: str, script: str = "") -> str:
    tail = f"<script>{script}</script>\n" if script else ""
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{escape(title)}</title>\n'
            f"<style>{CSS}</style>\n</head>\n<body>\n{body}\n{tail}</body>\n</html>\n")


def feature_page(f: FeaturePage, source: str, n_tokens: int) -> str:
    """The page of one feature; `source` names the run, n_tokens how many tokens were evaluated."""
    expert = f", expert {f.expert}" if f.expert is not None else ""
    deciles = "\n".join(f"<h3>{escape(label)}</h3>\n{context_table(f'decile{i}', cs, f.max_act)}"
                        for i, (label, cs) in enumerate(f.deciles)) or NONE
    body = (f'<p><a href="index.html">&larr; all features</a></p>\n<h1>Feature {f.index}{expert}</h1>\n'
            f'<p class="meta">{escape(source)}: fires on {f.fires} of {n_tokens} held-out tokens '
            f"(density {fmt(f.density)}), max activation {fmt(f.max_act)}</p>\n"
            f"<h2>Activation histogram (non-zero)</h2>\n{histogram_svg(f.hist_counts, f.hist_edges)}\n"
            f"<h2>Top activations</h2>\n{context_table('top', f.top, f.max_act)}\n"
            f"<h2>Samples by activation decile</h2>\n{deciles}\n"
            f"<h2>Random contexts where it does not fire</h2>\n{context_table('zero', f.zero, f.max_act)}")
    return _page(f"Feature {f.index}", body)


def index_page(pages: list[FeaturePage], title: str, summary: str) -> str:
    """The list of features, sorted by density (highest first); column headers sort on click."""
    switch = any(p.expert is not None for p in pages)
    head = ('<th data-col="1">feature</th>' + ('<th data-col="1">expert</th>' if switch else "")
            + '<th data-col="1" data-order="desc">density</th><th data-col="1">fires</th><th data-col="1">max act</th>'
            "<th>top token</th>")
    rows = []
    for p in sorted(pages, key=lambda p: (-p.density, p.index)):
        top = p.top[0].tokens[p.top[0].center] if p.top else ""
        cells = [f'<td class="num" data-v="{p.index}"><a href="{p.filename}">{p.index}</a></td>']
        if switch:
            cells.append(f'<td class="num" data-v="{p.expert}">{p.expert}</td>')
        cells += [f'<td class="num" data-v="{p.density!r}">{fmt(p.density)}</td>',
                  f'<td class="num" data-v="{p.fires}">{p.fires}</td>',
                  f'<td class="num" data-v="{p.max_act!r}">{fmt(p.max_act)}</td>',
                  f'<td class="ctx">{token_html(top, 0.0, 1.0)}</td>']
        rows.append(f"<tr>{''.join(cells)}</tr>")
    table = (f'<table id="features"><thead><tr>{head}</tr></thead><tbody>\n' + "\n".join(rows) + "\n</tbody></table>"
             if rows else '<p class="meta">no features to show</p>')
    body = (f"<h1>{escape(title)}</h1>\n<p class=\"meta\">{escape(summary)}</p>\n"
            f'<p class="meta">Click a column header to sort (sorted by density).</p>\n{table}')
    return _page(title, body, SORT_JS)
