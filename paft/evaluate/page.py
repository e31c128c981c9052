"""The experiment report page: ``report.md`` and a standalone ``report.html`` with charts, from one data dict.

:func:`write_report` renders what the caller collected (from MLflow: see ``paft report``) and draws no
conclusions of its own; a section without data is left out. The HTML needs nothing but itself: CSS inline,
charts inline as ``<svg>`` (matplotlib's SVG backend, text drawn as paths so no font is needed) and a
Content-Security-Policy that forbids loading anything. ``charts/<slug>.svg`` holds the same SVGs, which
``report.md`` links to. Both outputs are built from one list of sections, so they always agree.
"""

from __future__ import annotations

import html
import io
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from paft.evaluate.report import COLUMNS, results_table
from paft.io import atomic_dir

DEFAULT_CHART_METRICS = ("score", "task_em", "pref_accuracy", "pref_reward_accuracy", "style_rate", "task_loss",
                         "sft_loss", "rec_faithfulness", "rec_instruction_following", "rec_coherence", "rec_completeness",
                         "rec_citations_verified", "delta_sparsity")
COLOURS = {"paft": "#e07b18", "sequential": "#2a9d8f", "other": "#9aa9b8"}
KIND_LABELS = {"paft": "PAFT merges (paft_*)", "sequential": "sequential", "other": "other candidates"}
MAX_PANELS = 6  # series per training run drawn as small multiples
CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2933;margin:0;background:#f5f7fa}
header,main{max-width:1200px;margin:0 auto;padding:0 1.2rem}
header{padding-top:1rem}h1{font-size:1.6rem;margin:.4rem 0}h2{border-bottom:2px solid #d9e2ec;padding-bottom:.2rem}
section{background:#fff;border-radius:8px;padding:.2rem 1.2rem 1rem;margin:1rem 0;box-shadow:0 1px 3px #0001}
nav a{margin-right:.8rem}a{color:#1565c0}dl.meta{display:grid;grid-template-columns:max-content 1fr;gap:.1rem 1rem}
dl.meta dt{font-weight:600}dl.meta dd{margin:0;word-break:break-all}
.verdict{font-size:1.1rem;background:#fff8e6;border-left:4px solid #e07b18;padding:.6rem 1rem}
.verdict.lost{background:#fdecea;border-color:#c62828}
.scroll{overflow-x:auto}table{border-collapse:collapse;font-size:.9rem;margin:.6rem 0}
th,td{padding:.25rem .6rem;border-bottom:1px solid #e4e7eb;text-align:left;white-space:nowrap}
th{background:#f0f4f8;position:sticky;top:0}tr:nth-child(even) td{background:#fafbfc}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(440px,100%),1fr));gap:1rem}
figure.chart{margin:0;border:1px solid #e4e7eb;border-radius:6px;padding:.4rem;background:#fff}
figure.chart svg{width:100%;height:auto;display:block}figcaption{font-size:.85rem;color:#52606d;text-align:center}
"""
_NUMERIC = re.compile(r"[-+–]?[\d.,]+(e[-+]?\d+)?%?|–|n/a", re.I)


@dataclass
class Chart:
    slug: str
    caption: str
    svg: str


# ----------------------------------------------------------------------------- formatting
def _float(v) -> float | None:
    """A finite number, or None (missing, NaN, not a number)."""
    ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    return float(v) if ok else None


def _num(v, fmt: str = ".3f") -> str:
    """Like the markdown tables: 3 decimals, "–" for missing or NaN; text as it is."""
    f = _float(v)
    return format(f, fmt) if f is not None else "–" if v is None or isinstance(v, float) else str(v)


def _href(url) -> str | None:
    return url if isinstance(url, str) and re.match(r"https?://", url) else None


def _md(s) -> str:
    return html.escape(str(s), quote=False).replace("|", "\\|").replace("[", "\\[").replace("]", "\\]")


def _slugify(s: str, taken: set[str]) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-") or "chart"
    slug, i = base, 1
    while slug in taken:
        i += 1
        slug = f"{base}-{i}"
    taken.add(slug)
    return slug


def _md_tables(md: str) -> list[tuple[list[str], list[list[str]]]]:
    """The pipe tables of a markdown text: (header, rows), cells unescaped."""
    blocks, cur = [], []
    for line in [*md.splitlines(), ""]:
        if line.strip().startswith("|"):
            cur.append(line.strip())
        elif cur:
            blocks.append(cur)
            cur = []
    out = []
    for lines in blocks:
        cells = [[c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", ln[1:-1])] for ln in lines]
        rows = [r for r in cells[1:] if not all(re.fullmatch(r":?-+:?", c) for c in r)]
        out.append((cells[0], rows))
    return out


# ----------------------------------------------------------------------------- charts
def _svg(slug: str, caption: str, size: tuple[float, float], draw: Callable) -> Chart:
    """Draw with ``draw(fig)``; return the SVG without prolog/metadata, every id prefixed by ``slug``.

    matplotlib's ids (glyphs ``DejaVuSans-14``, clip paths, markers) repeat across figures with other
    meanings, and in one HTML page a ``<use href="#id">`` takes the first element of that id.
    """
    import matplotlib
    from matplotlib.backends.backend_svg import FigureCanvasSVG
    from matplotlib.figure import Figure

    rc = {"svg.fonttype": "path", "svg.hashsalt": slug, "font.size": 9}
    with matplotlib.rc_context(rc):
        fig = Figure(figsize=size, layout="constrained")
        FigureCanvasSVG(fig)
        draw(fig)
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None})
    svg = buf.getvalue()
    svg = re.sub(r"<metadata>.*?</metadata>\s*", "", svg[svg.index("<svg"):], flags=re.S)
    ids = set(re.findall(r'\sid="([^"]+)"', svg))
    svg = re.sub(r'(\sid="|url\(#|href="#)([^")]+)', lambda m: m[1] + (f"{slug}-{m[2]}" if m[2] in ids else m[2]), svg)
    return Chart(slug, caption, svg.replace("<svg ", f'<svg role="img" aria-label="{html.escape(caption)}" ', 1))


def _t(s) -> str:
    """Data text for a matplotlib label: "$" would start mathtext (which the log axes' tick labels need on)."""
    return str(s).replace("$", r"\$")


def _kind(name: str) -> str:
    return "paft" if name.startswith("paft_") else "sequential" if name == "sequential" else "other"


def _metric_chart(metric: str, cands: dict[str, dict], taken: set[str]) -> Chart | None:
    names = list(cands)
    vals = [_float(cands[n].get(metric)) for n in names]
    if all(v is None for v in vals):
        return None

    def draw(fig):
        from matplotlib.patches import Patch

        ax = fig.add_subplot()
        bars = ax.barh(range(len(names)), [v or 0.0 for v in vals], color=[COLOURS[_kind(n)] for n in names])
        ax.bar_label(bars, labels=[_num(v) for v in vals], padding=3, fontsize=8)
        ax.set_yticks(range(len(names)), [_t(n) for n in names])
        ax.invert_yaxis()
        ax.margins(x=0.18)
        if any(v is not None and v < 0 for v in vals):
            ax.axvline(0, color="#52606d", linewidth=0.8)
        ax.set_xlabel(_t(metric))
        kinds = [k for k in COLOURS if any(_kind(n) == k for n in names)]
        ax.legend(handles=[Patch(color=COLOURS[k], label=KIND_LABELS[k]) for k in kinds], fontsize=7, loc="best")

    return _svg(_slugify(f"metric-{metric}", taken), f"{metric} per candidate", (6.4, 1.1 + 0.26 * len(names)), draw)


def _hist_chart(title: str, hists: dict[str, dict], eps_abs, taken: set[str]) -> Chart:
    def draw(fig):
        ax = fig.add_subplot()
        overlay = len(hists) > 1
        for name, h in hists.items():
            ax.stairs(h["shares"], h["edges"], label=_t(name), fill=not overlay, alpha=1.0 if overlay else 0.7,
                      linewidth=1.4)
        if _float(eps_abs) and eps_abs > 0:
            ax.axvline(math.log10(eps_abs), color="k", linestyle="--", linewidth=1, label=f"eps_abs = {eps_abs:g}")
        positive = [s for h in hists.values() for s in h["shares"] if s and s > 0]
        ax.set_yscale("log")
        ax.set_ylim(min(positive, default=1e-3) / 2, 1.5)
        ax.set(xlabel="log10(|δ|)", ylabel="share of entries (log scale)")
        ax.legend(fontsize=7, loc="best")

    return _svg(_slugify(f"sparsity-{title}", taken), f"|δ| histogram: {title}", (6.4, 3.6), draw)


def _points(series) -> tuple[list[float], list[float]]:
    pts = [(_float(p[0]), _float(p[1])) for p in series or () if isinstance(p, list | tuple) and len(p) == 2]
    pts = [(x, y) for x, y in pts if x is not None and y is not None]
    return [x for x, _ in pts], [y for _, y in pts]


def _curve_charts(curves: dict[str, dict], taken: set[str]) -> list[Chart]:
    charts = []
    losses = {run: _points(s.get("loss")) for run, s in curves.items() if _points(s.get("loss"))[0]}
    if len(losses) > 1:
        def draw_all(fig):
            ax = fig.add_subplot()
            for run, (x, y) in losses.items():
                ax.plot(x, y, label=_t(run), linewidth=1.4)
            ax.set(xlabel="step", ylabel="loss")
            ax.legend(fontsize=7)

        charts.append(_svg(_slugify("curves-loss", taken), "training loss, all runs", (6.4, 3.6), draw_all))
    for run, series in curves.items():
        keys = sorted((k for k in series if _points(series[k])[0]), key=lambda k: k != "loss")[:MAX_PANELS]
        if not keys:
            continue
        cols = min(3, len(keys))
        rows = math.ceil(len(keys) / cols)

        def draw(fig, keys=keys, series=series, cols=cols, rows=rows):
            for i, k in enumerate(keys, 1):
                ax = fig.add_subplot(rows, cols, i)
                x, y = _points(series[k])
                ax.plot(x, y, marker="o" if len(x) < 20 else None, markersize=3, linewidth=1.4)
                ax.set_title(_t(k), fontsize=9)
                ax.set_xlabel("step")

        charts.append(_svg(_slugify(f"curves-{run}", taken), f"{run}: {', '.join(keys)}",
                           (3.2 * cols if cols > 1 else 6.4, 2.8 * rows), draw))
    return charts


def _search_chart(points: list[dict], metrics: list[str], best, taken: set[str]) -> Chart | None:
    axes = ["task_em", "pref_accuracy"] if {"task_em", "pref_accuracy"} <= set(metrics) else metrics[:2]
    if len(axes) < 2:
        return None
    mx, my = axes
    pts = [(p, _float(p["metrics"].get(mx)), _float(p["metrics"].get(my))) for p in points]
    if not (pts := [(p, x, y) for p, x, y in pts if x is not None and y is not None]):
        return None

    def draw(fig):
        ax = fig.add_subplot()
        ax.scatter([x for _, x, _ in pts], [y for _, _, y in pts], color=COLOURS["other"], zorder=2)
        for p, x, y in pts:
            if p.get("name") == best:
                ax.scatter([x], [y], marker="*", s=220, color=COLOURS["paft"], zorder=3, label=_t(f"best: {best}"))
            if len(pts) <= 12 or p.get("name") == best:
                ax.annotate(_t(p.get("name", "")), (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
        ax.set(xlabel=_t(mx), ylabel=_t(my))
        ax.margins(0.15)
        if any(p.get("name") == best for p, _, _ in pts):
            ax.legend(fontsize=7)

    return _svg(_slugify("search", taken), f"merge search: {my} vs {mx}", (6.4, 4.0), draw)


# ----------------------------------------------------------------------------- sections
# blocks: ("p", text) | ("verdict", text, beat) | ("table", header, rows) | ("charts", [Chart]) | ("links", [(label, url)])
# a table cell is text or (text, url)
def _sections(data: dict) -> list[tuple[str, str, list]]:
    results, taken = data["results"], set()
    cands = {k: v for k, v in results.items() if not k.startswith("rec")}
    secs = []
    if v := data.get("verdict"):
        blocks = [("verdict", v.get("text", ""), v.get("beat"))]
        if d := v.get("delta"):
            blocks.append(("table", ["metric", f"{v.get('paft', 'PAFT')} − {v.get('sequential', 'sequential')}"],
                           [[k, _num(x, "+.3f")] for k, x in d.items()]))
        secs.append(("verdict", "Verdict", blocks))
    tables = _md_tables(data.get("table") or results_table(results))
    metrics = dict.fromkeys(data.get("chart_metrics") or DEFAULT_CHART_METRICS)
    charts = [c for m in metrics if (c := _metric_chart(m, cands, taken))]
    secs.append(("candidates", "Candidates", [("table", *t) for t in tables[:1]] + [("charts", charts)] * bool(charts)))
    rec = _md_tables(data["rec_table"]) if data.get("rec_table") else tables[1:]
    if rec:
        secs.append(("rec", "REC evaluator quality", [("table", *t) for t in rec]))
    if (s := data.get("search")) and s.get("points"):
        secs.append(("search", "Merge search", _search_blocks(s, taken)))
    if (sp := data.get("sparsity")) and sp.get("inputs"):
        secs.append(("sparsity", "Sparsity of the deltas", _sparsity_blocks(sp, taken)))
    if (cv := data.get("curves")) and (charts := _curve_charts(cv, taken)):
        secs.append(("training", "Training curves", [("charts", charts)]))
    if links := data.get("links"):
        secs.append(("runs", "MLflow runs", [("links", [(str(a), b) for a, b in links])]))
    return secs


def _search_blocks(s: dict, taken: set[str]) -> list:
    points = [{**p, "metrics": p.get("metrics") or {}} for p in s["points"]]
    logged = list(dict.fromkeys(k for p in points for k in p["metrics"]))
    metrics = [m for m in COLUMNS if m in logged] or logged  # the candidate table's columns, not every sub-metric
    key = "score" if "score" in metrics else metrics[0] if metrics else None
    if key:  # best first, points without the objective last
        points.sort(key=lambda p: -v if (v := _float(p["metrics"].get(key))) is not None else math.inf)
    best = s.get("best")
    rows = [[(("★ " if p.get("name") == best else "") + str(p.get("name", "")), p.get("url")),
             str(p.get("method", "–")), _num(p.get("density"), "g"),
             " / ".join(_num(w, "g") for w in p.get("weights") or []) or "–",
             *(_num(p["metrics"].get(m)) for m in metrics)] for p in points]
    blocks = [("p", t) for t in (s.get("objective") and f"Objective: {s['objective']}", best and f"Best: {best}") if t]
    blocks.append(("table", ["point", "method", "density", "weights", *metrics], rows))
    chart = _search_chart(points, metrics, best, taken)
    return blocks + ([("charts", [chart])] if chart else [])


def _is_histogram(h: dict) -> bool:
    edges, shares = h.get("edges") or [], h.get("shares") or []
    return len(edges) == len(shares) + 1 > 1 and all(_float(x) is not None for x in [*edges, *shares])


def _sparsity_blocks(sp: dict, taken: set[str]) -> list:
    eps_abs, eps_rel = sp.get("eps_abs"), sp.get("eps_rel")

    def pct(x):
        return "–" if _float(x) is None else f"{100 * x:.2f}%"

    rows = []
    for name, i in sp["inputs"].items():
        o = i.get("overall") or {}
        rows.append([name, _num(o.get("entries"), ",.0f"), pct(o.get("share_abs")), pct(o.get("share_rel")),
                     _num(o.get("mean_abs"), ".3g")])
    header = ["input", "entries", f"share ≤ eps_abs ({_num(eps_abs, 'g')})",
              f"share ≤ eps_rel·scale ({_num(eps_rel, 'g')})", "mean |δ|"]
    hists = {n: h for n, i in sp["inputs"].items() if (h := i.get("histogram")) and _is_histogram(h)}
    charts = [_hist_chart(n, {n: h}, eps_abs, taken) for n, h in hists.items()]
    if len(hists) > 1:
        charts.append(_hist_chart("all inputs", hists, eps_abs, taken))
    return [("table", header, rows)] + ([("charts", charts)] if charts else [])


# ----------------------------------------------------------------------------- rendering
def _inline(c, md: bool) -> str:
    """A cell (text or (text, url)) as markdown or HTML; only http(s) URLs become links."""
    text, url = c if isinstance(c, tuple) else (c, None)
    text = str(text)
    if md:
        return f"[{_md(text)}]({url.replace(' ', '%20').replace(')', '%29')})" if _href(url) else _md(text)
    return f'<a href="{html.escape(url)}">{html.escape(text)}</a>' if _href(url) else html.escape(text)


def _td(c) -> str:
    text = c[0] if isinstance(c, tuple) else c
    return f'<td{" class=num" if _NUMERIC.fullmatch(str(text)) else ""}>{_inline(c, False)}</td>'


def _md_block(b) -> str:
    if b[0] in ("p", "verdict"):
        return f"**{_md(b[1])}**" if b[0] == "verdict" else _md(b[1])
    if b[0] == "table":
        lines = ["| " + " | ".join(_md(h) for h in b[1]) + " |", "|" + "---|" * len(b[1])]
        return "\n".join(lines + ["| " + " | ".join(_inline(c, True) for c in r) + " |" for r in b[2]])
    if b[0] == "charts":
        return "\n\n".join(f"![{_md(c.caption)}](charts/{c.slug}.svg)" for c in b[1])
    return "\n".join(f"- {_inline((label, url), True)}" for label, url in b[1])


def _html_block(b) -> str:
    if b[0] in ("p", "verdict"):
        return f'<p class="{b[0]}{" lost" if b[0] == "verdict" and b[2] is False else ""}">{html.escape(b[1])}</p>'
    if b[0] == "table":
        head = "".join(f"<th>{html.escape(h)}</th>" for h in b[1])
        body = "".join("<tr>" + "".join(_td(c) for c in r) + "</tr>" for r in b[2])
        return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'
    if b[0] == "charts":
        figs = (f'<figure class="chart" id="chart-{c.slug}">{c.svg}<figcaption>{html.escape(c.caption)}</figcaption>'
                "</figure>" for c in b[1])
        return '<div class="charts">' + "".join(figs) + "</div>"
    return "<ul>" + "".join(f"<li>{_inline((label, url), False)}</li>" for label, url in b[1]) + "</ul>"


def _run_meta(run: dict) -> list[tuple[str, str | tuple]]:
    meta = [("run", run.get("name")), ("run id", run.get("id")), ("started", run.get("start_time"))]
    meta += [(f"tag {k}", v) for k, v in (run.get("tags") or {}).items()]
    return [(k, (str(v), run.get("url")) if k == "run id" else str(v)) for k, v in meta if v not in (None, "")]


def write_report(data: dict, out_dir: str | Path) -> dict:
    """Write ``out_dir`` (atomically): ``report.md``, ``report.html``, ``charts/*.svg``; return their absolute paths.

    ``data``: ``title``, ``run`` and ``results`` (candidate -> metrics) are required; ``table``, ``rec_table``,
    ``verdict``, ``chart_metrics``, ``search``, ``sparsity``, ``curves`` and ``links`` add their sections.
    """
    out_dir = Path(out_dir).absolute()
    sections, title = _sections(data), str(data["title"])
    charts = [c for _, _, blocks in sections for b in blocks if b[0] == "charts" for c in b[1]]
    meta = _run_meta(data.get("run") or {})
    md = [f"# {_md(title)}", "\n".join(f"- **{_md(k)}**: {_inline(v, True)}" for k, v in meta)]
    md += [f"## {_md(t)}\n\n" + "\n\n".join(_md_block(b) for b in blocks) for _, t, blocks in sections]
    dl = "".join(f"<dt>{html.escape(k)}</dt><dd>{_inline(v, False)}</dd>" for k, v in meta)
    nav = "".join(f'<a href="#{sid}">{html.escape(t)}</a>' for sid, t, _ in sections)
    body = "".join(f'<section id="{sid}"><h2>{html.escape(t)}</h2>{"".join(_html_block(b) for b in blocks)}</section>'
                   for sid, t, blocks in sections)
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n<body><header><h1>{html.escape(title)}"
            f'</h1><dl class="meta">{dl}</dl><nav>{nav}</nav></header>\n<main>{body}</main></body></html>\n')
    with atomic_dir(out_dir) as tmp:
        (tmp / "charts").mkdir()
        for c in charts:
            (tmp / "charts" / f"{c.slug}.svg").write_text(c.svg, encoding="utf-8")
        (tmp / "report.md").write_text("\n\n".join(md) + "\n", encoding="utf-8")
        (tmp / "report.html").write_text(page, encoding="utf-8")
    return {"markdown": str(out_dir / "report.md"), "html": str(out_dir / "report.html"),
            "charts": [str(out_dir / "charts" / f"{c.slug}.svg") for c in charts]}
