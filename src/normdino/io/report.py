"""Reports people open: self-contained HTML pages (evaluation reports, predict's index.html) and inline SVG
charts."""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import re
import os
from typing import Any, Callable

import numpy as np
from PIL import Image

from normdino.errors import InputError
from normdino.files import atomic_write_text
from normdino.io.rendering import as_uint_image

logger = logging.getLogger(__name__)

# Okabe–Ito palette for chart series.
SERIES_COLORS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")


# ---------------------------------------------------------------------------------------------------- SVG charts
# Drawn by matplotlib (no pyplot state: one Figure per chart) and embedded as inline SVG, so a report stays one
# self-contained file. Text stays text (svg.fonttype "none"): searchable, and small.


def _finite_xy(xs: Any, ys: Any) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(xs, dtype=np.float64).ravel(), np.asarray(ys, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise InputError(f"svg_curve: xs ({x.size} values) and ys ({y.size} values) must have the same length.")
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]


def _figure(width: int, height: int):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width / 100, height / 100), dpi=100, layout="constrained")
    return figure, figure.add_subplot()


def _style(axes, title: str, xlabel: str, ylabel: str) -> None:
    axes.set_title(title, fontsize=11, fontweight="bold")
    axes.set_xlabel(xlabel, fontsize=9)
    axes.set_ylabel(ylabel, fontsize=9)
    axes.tick_params(labelsize=8)
    axes.grid(color="#eaeef2", linewidth=0.8)
    axes.set_axisbelow(True)


def _svg(figure) -> str:
    """The figure as an inline ``<svg>`` element (no XML prolog, no date, stable ids)."""
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "normdino", "font.family": "sans-serif"}):
        figure.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None}, facecolor="white")
    text = buffer.getvalue()
    text = text[text.index("<svg"):]
    return re.sub(r"\s*<metadata>.*?</metadata>", "", text, count=1, flags=re.DOTALL)


def svg_curve(
    xs: Any,
    ys: Any,
    title: str,
    xlabel: str,
    ylabel: str,
    diagonal: bool = False,
    series: list[tuple[str, Any, Any]] | None = None,
    label: str | None = None,
    xlim: tuple[float, float] | None = None,
    ylim: tuple[float, float] | None = None,
    width: int = 440,
    height: int = 340,
) -> str:
    """An inline SVG line chart of (xs, ys) (None to skip) plus named ``series``, with a legend when curves are named.

    ``diagonal`` draws the chance line y = x (for ROC curves). Curve i is the SVG group ``id="curve-i"``.
    """
    curves: list[tuple[str, np.ndarray, np.ndarray]] = []
    if xs is not None:
        curves.append((label or "", *_finite_xy(xs, ys)))
    for name, sx, sy in series or []:
        curves.append((str(name), *_finite_xy(sx, sy)))
    figure, axes = _figure(width, height)
    _style(axes, title, xlabel, ylabel)
    if diagonal:
        axes.plot([0, 1], [0, 1], color="#8c959f", linestyle="--", linewidth=1, gid="chance")
    for i, (name, x, y) in enumerate(curves):
        axes.plot(x, y, color=SERIES_COLORS[i % len(SERIES_COLORS)], linewidth=1.8, label=name or None, gid=f"curve-{i}")
    if xlim is not None:
        axes.set_xlim(*xlim)
    if ylim is not None:
        axes.set_ylim(*ylim)
    if any(name for name, _, _ in curves):
        axes.legend(loc="lower right" if diagonal else "best", fontsize=8, frameon=True)
    return _svg(figure)


def svg_histograms(
    normal_hist: Any,
    anomalous_hist: Any,
    bin_edges: Any,
    title: str,
    xlabel: str = "anomaly score",
    labels: tuple[str, str] = ("normal pixels", "anomalous pixels"),
    width: int = 440,
    height: int = 340,
) -> str:
    """Two overlaid step histograms on shared bins, each normalised to fractions summing to 1 (so sizes compare)."""
    edges = np.asarray(bin_edges, dtype=np.float64).ravel()
    hists = [np.asarray(h, dtype=np.float64).ravel() for h in (normal_hist, anomalous_hist)]
    for h in hists:
        if h.size != edges.size - 1:
            raise InputError(f"svg_histograms: {h.size} counts need {h.size + 1} bin edges, got {edges.size}.")
    figure, axes = _figure(width, height)
    _style(axes, title, xlabel, "fraction of pixels")
    for i, (name, counts) in enumerate(zip(labels, hists, strict=True)):
        fraction = counts / counts.sum() if counts.sum() > 0 else counts
        color = SERIES_COLORS[i]
        axes.stairs(fraction, edges, fill=True, alpha=0.35, color=color, gid=f"histogram-{i}",
                    label=f"{name} (n={int(counts.sum()):,})")
        axes.stairs(fraction, edges, color=color, linewidth=1.2)
    axes.legend(fontsize=8)
    return _svg(figure)


# ---------------------------------------------------------------------------------------------------- JSON


def json_safe(value: Any) -> Any:
    """``value`` with NaN/inf as None and numpy scalars/paths as plain values, so ``json.dumps(allow_nan=False)``
    writes strict JSON (bare NaN is not JSON; an undefined metric, e.g. AUROC with one class, becomes null)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


# ---------------------------------------------------------------------------------------------------- HTML

_CSS = """
:root { --fg:#1f2328; --muted:#57606a; --line:#d0d7de; --bg:#f6f8fa; --accent:#0969da; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--fg);
  font:15px/1.5 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; }
header { background:#ffffff; border-bottom:1px solid var(--line); padding:22px 40px 16px; }
header h1 { margin:0; font-size:24px; font-weight:600; }
header .subtitle { color:var(--muted); margin-top:4px; }
nav { margin-top:10px; font-size:13px; }
nav a { color:var(--accent); text-decoration:none; margin-right:16px; }
main { max-width:1240px; margin:0 auto; padding:24px 40px 40px; }
.warning { display:flex; gap:12px; align-items:flex-start; background:#fff8c5; border:1px solid #d4a72c;
  border-left:6px solid #bf8700; border-radius:6px; padding:12px 16px; margin:0 0 24px;
  font-weight:600; color:#4d2d00; }
.warning .icon { font-size:20px; line-height:1.2; }
section { background:#ffffff; border:1px solid var(--line); border-radius:8px; padding:18px 24px 22px;
  margin-bottom:22px; }
section h2 { margin:0 0 14px; font-size:18px; font-weight:600; border-bottom:1px solid #eaeef2; padding-bottom:8px; }
.charts { display:flex; flex-wrap:wrap; gap:18px; }
table { border-collapse:collapse; font-size:14px; font-variant-numeric:tabular-nums; }
th, td { padding:6px 12px; border-bottom:1px solid #eaeef2; text-align:left; white-space:nowrap; }
th { background:#f6f8fa; font-weight:600; border-bottom:1px solid var(--line); }
td.num, th.num { text-align:right; }
.table-wrap { overflow-x:auto; max-width:100%; }
td.wrap { white-space:normal; overflow-wrap:anywhere; min-width:16em; max-width:40em; }
tbody tr:hover { background:#f6f8fa; }
.grid { display:grid; grid-template-columns:repeat(auto-fill, minmax(var(--thumb, 520px), 1fr)); gap:16px; }
figure { margin:0; background:#181a20; border-radius:6px; overflow:hidden; }
figure img { display:block; width:100%; height:auto; image-rendering:auto; }
figcaption { color:#e2e4e9; font-size:13px; padding:6px 10px 8px;
  font-family:ui-monospace, SFMono-Regular, Menlo, monospace; }
footer { color:var(--muted); font-size:12px; text-align:center; padding:8px 0 24px; }
"""


def png_data_uri(array: np.ndarray) -> str:
    """A ``data:image/png;base64,…`` URI of an image array (as accepted by ``save_png``)."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(as_uint_image(array))).save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _anchor(heading: str, index: int) -> str:
    slug = "".join(c if c.isalnum() else "-" for c in heading.lower()).strip("-")
    return f"s{index}-{slug}"[:60]


def html_report(
    path: str | os.PathLike,
    title: str,
    sections: list[tuple[str, str]],
    warning: str | None = None,
    subtitle: str | None = None,
) -> None:
    """Write a self-contained HTML report atomically: headed sections of (trusted) HTML, an optional warning banner."""
    from normdino import __version__

    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        "<header>",
        f"<h1>{e(title)}</h1>",
    ]
    if subtitle:
        parts.append(f'<div class="subtitle">{e(subtitle)}</div>')
    if len(sections) > 2:
        links = " ".join(f'<a href="#{_anchor(h, i)}">{e(h)}</a>' for i, (h, _) in enumerate(sections))
        parts.append(f"<nav>{links}</nav>")
    parts += ["</header>", "<main>"]
    if warning:
        parts.append(
            f'<div class="warning" role="alert"><span class="icon">&#9888;</span><span>{e(warning)}</span></div>'
        )
    for i, (heading, body) in enumerate(sections):
        parts.append(f'<section id="{_anchor(heading, i)}">\n<h2>{e(heading)}</h2>\n{body}\n</section>')
    parts += ["</main>", f"<footer>Generated by normdino {e(__version__)}</footer>", "</body>", "</html>", ""]
    atomic_write_text(path, "\n".join(parts))
    logger.info("wrote report %s", path)


def _format_cell(value: Any, fmt: str | Callable[[Any], str] | None) -> tuple[str, bool]:
    """Cell text (escaped) and whether it is numeric."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "&mdash;", False
    numeric = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if callable(fmt):
        text = fmt(value)
    elif fmt is not None:
        text = format(value, fmt.strip("{}:") if fmt.startswith("{") else fmt)
    elif isinstance(value, (float, np.floating)):
        text = format(float(value), ".4g")
    else:
        text = str(value)
    return html.escape(text), numeric


def _column_format(values: list) -> Callable[[Any], str] | None:
    """One number format per column: the same decimals for every float in it (4, 2 or 0, by its largest value)."""
    floats = [abs(float(v)) for v in values if isinstance(v, (float, np.floating)) and math.isfinite(v)]
    if not floats:
        return None
    largest = max(floats)
    decimals = 4 if largest < 10 else 2 if largest < 1000 else 0
    return lambda v: f"{float(v):.{decimals}f}" if isinstance(v, (float, np.floating)) else str(v)


#: Text cells longer than this may wrap (paths, settings), so a table never runs off the page.
_WRAP_AT = 40
_WRAP_CLASS = ' class="wrap"'


def html_table(rows: list[dict], columns: list[str], formats: dict | None = None, headers: dict | None = None) -> str:
    """An HTML table of ``rows`` over ``columns``, in a box that scrolls sideways rather than overflowing.

    ``formats`` maps a column to a format spec (".3f") or a callable (default: one decimals count per column);
    ``headers`` maps a column to its human header (default: the key with spaces for underscores).
    """
    formats = formats or {}
    headers = headers or {}
    column_formats = [formats.get(col) or _column_format([row.get(col) for row in rows]) for col in columns]
    cells = [[_format_cell(row.get(col), fmt) for col, fmt in zip(columns, column_formats)] for row in rows]
    numeric_col = [
        any(c[j][1] for c in cells) and all(c[j][1] or c[j][0] == "&mdash;" for c in cells) for j in range(len(columns))
    ]
    attr = [' class="num"' if numeric else "" for numeric in numeric_col]
    head = "".join(f"<th{attr[j]}>{html.escape(str(headers.get(col, str(col).replace('_', ' '))))}</th>"
                   for j, col in enumerate(columns))
    body = "\n".join(
        "<tr>" + "".join(f"<td{attr[j] or (_WRAP_CLASS if len(text) > _WRAP_AT else '')}>{text}</td>"
                         for j, (text, _) in enumerate(row)) + "</tr>" for row in cells
    )
    return (f'<div class="table-wrap"><table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n'
            "</table></div>")


def image_grid_html(items: list[tuple[str, np.ndarray]], thumb_width: int = 520) -> str:
    """A responsive grid of captioned images (e.g. overlays) embedded as base64 PNG."""
    figures = [
        f'<figure><img src="{png_data_uri(array)}" alt="{html.escape(caption, quote=True)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        for caption, array in items
    ]
    return f'<div class="grid" style="--thumb:{int(thumb_width)}px">\n' + "\n".join(figures) + "\n</div>"


def charts_row(*svgs: str) -> str:
    """Place several inline SVG charts side by side (wrapping on narrow screens)."""
    return '<div class="charts">' + "".join(svgs) + "</div>"
