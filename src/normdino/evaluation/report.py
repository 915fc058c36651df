"""Reports: inline SVG charts and self-contained HTML pages of evaluation results."""

from __future__ import annotations

import base64
import html
import io
import logging
import math
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from normdino.errors import InputError
from normdino.files import atomic_write_text
from normdino.io.rendering import as_uint_image

logger = logging.getLogger(__name__)

# Okabe–Ito palette for chart series.
SERIES_COLORS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")


# ---------------------------------------------------------------------------------------------------- SVG charts

_FONT_FAMILY = "-apple-system, 'Segoe UI', Helvetica, Arial, sans-serif"


def _nice_ticks(lo: float, hi: float, target: int = 5) -> np.ndarray:
    """Round tick values covering [lo, hi] with about ``target`` intervals (steps of 1, 2, 2.5 or 5 × 10^k)."""
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    raw = (hi - lo) / target
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw * 0.999)
    start, stop = math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step
    return np.round(np.arange(start, stop + step / 2, step), 12)


def _tick_label(value: float, step: float) -> str:
    decimals = max(0, -math.floor(math.log10(step) + 1e-9)) if step < 1 else 0
    if step < 1 and abs(round(step * 10**decimals) - step * 10**decimals) > 1e-6:
        decimals += 1
    return f"{value:.{decimals}f}"


def _finite_xy(xs: Any, ys: Any) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(xs, dtype=np.float64).ravel(), np.asarray(ys, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise InputError(f"svg_curve: xs ({x.size} values) and ys ({y.size} values) must have the same length.")
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]


class _Axes:
    """Maps data to SVG coordinates inside a plot frame and draws the frame, grid, ticks and labels."""

    def __init__(self, width: int, height: int, xlim: tuple[float, float], ylim: tuple[float, float]):
        self.left, self.right, self.top, self.bottom = 58, width - 16, 38, height - 46
        self.width, self.height = width, height
        self.xticks, self.yticks = _nice_ticks(*xlim), _nice_ticks(*ylim)
        self.x0, self.x1 = float(self.xticks[0]), float(self.xticks[-1])
        self.y0, self.y1 = float(self.yticks[0]), float(self.yticks[-1])

    def px(self, x: np.ndarray) -> np.ndarray:
        return self.left + (np.asarray(x) - self.x0) / (self.x1 - self.x0) * (self.right - self.left)

    def py(self, y: np.ndarray) -> np.ndarray:
        return self.bottom - (np.asarray(y) - self.y0) / (self.y1 - self.y0) * (self.bottom - self.top)

    def frame(self, title: str, xlabel: str, ylabel: str) -> list[str]:
        e = html.escape
        out = [
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.width}" height="{self.height}" '
            f'viewBox="0 0 {self.width} {self.height}" font-family="{e(_FONT_FAMILY)}" font-size="11" role="img">',
            f"<title>{e(title)}</title>",
            f'<rect x="0" y="0" width="{self.width}" height="{self.height}" fill="#ffffff"/>',
            f'<text x="{self.width / 2:.1f}" y="20" text-anchor="middle" '
            f'font-size="13" font-weight="600" fill="#1f2328">{e(title)}</text>',
        ]
        xstep = float(self.xticks[1] - self.xticks[0]) if len(self.xticks) > 1 else 1.0
        ystep = float(self.yticks[1] - self.yticks[0]) if len(self.yticks) > 1 else 1.0
        for t in self.xticks:
            x = float(self.px(t))
            out.append(f'<line x1="{x:.1f}" y1="{self.top}" x2="{x:.1f}" y2="{self.bottom}" stroke="#eaeef2"/>')
            out.append(
                f'<text x="{x:.1f}" y="{self.bottom + 15}" text-anchor="middle" '
                f'fill="#57606a">{_tick_label(t, xstep)}</text>'
            )
        for t in self.yticks:
            y = float(self.py(t))
            out.append(f'<line x1="{self.left}" y1="{y:.1f}" x2="{self.right}" y2="{y:.1f}" stroke="#eaeef2"/>')
            out.append(
                f'<text x="{self.left - 6}" y="{y + 3.5:.1f}" text-anchor="end" '
                f'fill="#57606a">{_tick_label(t, ystep)}</text>'
            )
        out.append(
            f'<rect x="{self.left}" y="{self.top}" width="{self.right - self.left}" height="{self.bottom - self.top}" '
            'fill="none" stroke="#8c959f"/>'
        )
        cx, cy = (self.left + self.right) / 2, (self.top + self.bottom) / 2
        out.append(f'<text x="{cx:.1f}" y="{self.height - 10}" text-anchor="middle" fill="#1f2328">{e(xlabel)}</text>')
        out.append(
            f'<text x="16" y="{cy:.1f}" text-anchor="middle" fill="#1f2328" '
            f'transform="rotate(-90 16 {cy:.1f})">{e(ylabel)}</text>'
        )
        return out

    def legend(self, entries: list[tuple[str, str, str]], corner: str) -> list[str]:
        """Legend box with (name, colour, kind) entries, kind 'line' or 'fill'; corner 'br' or 'tr'."""
        if not entries:
            return []
        width = 34 + 6.2 * max(len(name) for name, _, _ in entries)
        height = 8 + 16 * len(entries)
        x = self.right - width - 8
        y = self.bottom - height - 8 if corner == "br" else self.top + 8
        out = [
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{width:.1f}" height="{height}" '
            'rx="3" fill="#ffffff" fill-opacity="0.9" stroke="#d0d7de"/>'
        ]
        for i, (name, color, kind) in enumerate(entries):
            ly = y + 12 + 16 * i
            if kind == "fill":
                out.append(
                    f'<rect x="{x + 8:.1f}" y="{ly - 5:.1f}" width="16" height="10" '
                    f'fill="{color}" fill-opacity="0.45" stroke="{color}"/>'
                )
            else:
                out.append(
                    f'<line x1="{x + 8:.1f}" y1="{ly:.1f}" x2="{x + 24:.1f}" '
                    f'y2="{ly:.1f}" stroke="{color}" stroke-width="2.5"/>'
                )
            out.append(f'<text x="{x + 30:.1f}" y="{ly + 3.5:.1f}" fill="#1f2328">{html.escape(name)}</text>')
        return out


def _path(px: np.ndarray, py: np.ndarray) -> str:
    """SVG path data through the points, rounded to 0.1 px with consecutive duplicates dropped (keeps files small)."""
    pts = np.round(np.stack([px, py], axis=1), 1)
    if len(pts) > 1:
        keep = np.ones(len(pts), dtype=bool)
        keep[1:] = np.any(pts[1:] != pts[:-1], axis=1)
        pts = pts[keep]
    return "M" + " L".join(f"{x:.1f},{y:.1f}" for x, y in pts)


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

    ``diagonal`` draws the chance line y = x (for ROC curves). Limits default to nice round numbers around the data.
    """
    curves: list[tuple[str, np.ndarray, np.ndarray]] = []
    if xs is not None:
        curves.append((label or "", *_finite_xy(xs, ys)))
    for name, sx, sy in series or []:
        curves.append((str(name), *_finite_xy(sx, sy)))
    all_x = np.concatenate([c[1] for c in curves] + [np.zeros(0)])
    all_y = np.concatenate([c[2] for c in curves] + [np.zeros(0)])
    if xlim is None:
        xlim = (float(all_x.min()), float(all_x.max())) if all_x.size else (0.0, 1.0)
    if ylim is None:
        ylim = (float(all_y.min()), float(all_y.max())) if all_y.size else (0.0, 1.0)
    axes = _Axes(width, height, xlim, ylim)
    out = axes.frame(title, xlabel, ylabel)
    out.append(
        f'<clipPath id="plot-{id(axes)}"><rect x="{axes.left}" y="{axes.top}" '
        f'width="{axes.right - axes.left}" height="{axes.bottom - axes.top}"/></clipPath>'
    )
    out.append(f'<g clip-path="url(#plot-{id(axes)})">')
    if diagonal:
        lo, hi = max(axes.x0, axes.y0), min(axes.x1, axes.y1)
        out.append(
            f'<line x1="{float(axes.px(lo)):.1f}" y1="{float(axes.py(lo)):.1f}" x2="{float(axes.px(hi)):.1f}" '
            f'y2="{float(axes.py(hi)):.1f}" stroke="#8c959f" stroke-dasharray="4 4"/>'
        )
    entries = []
    for i, (name, x, y) in enumerate(curves):
        color = SERIES_COLORS[i % len(SERIES_COLORS)]
        if x.size:
            out.append(
                f'<path d="{_path(axes.px(x), axes.py(y))}" fill="none" stroke="{color}" stroke-width="2" '
                'stroke-linejoin="round" stroke-linecap="round"/>'
            )
        if name:
            entries.append((name, color, "line"))
    out.append("</g>")
    out += axes.legend(entries, "br" if diagonal else "tr")
    out.append("</svg>")
    return "\n".join(out)


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
    fractions = [h / h.sum() if h.sum() > 0 else h for h in hists]
    top = max(float(f.max()) if f.size else 0.0 for f in fractions) or 1.0
    axes = _Axes(width, height, (float(edges[0]), float(edges[-1])), (0.0, top))
    out = axes.frame(title, xlabel, "fraction of pixels")
    entries = []
    for i, (name, frac, count) in enumerate(zip(labels, fractions, hists, strict=True)):
        color = SERIES_COLORS[i]
        xs = np.repeat(edges, 2)[1:-1]
        ys = np.repeat(frac, 2)
        px = np.concatenate([[axes.px(edges[0])], axes.px(xs), [axes.px(edges[-1])]])
        py = np.concatenate([[axes.py(0.0)], axes.py(ys), [axes.py(0.0)]])
        out.append(
            f'<path d="{_path(px, py)} Z" fill="{color}" fill-opacity="0.35" stroke="{color}" stroke-width="1.5"/>'
        )
        entries.append((f"{name} (n={int(count.sum()):,})", color, "fill"))
    out += axes.legend(entries, "tr")
    out.append("</svg>")
    return "\n".join(out)


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


def html_table(rows: list[dict], columns: list[str], formats: dict | None = None) -> str:
    """An HTML table of ``rows`` over ``columns``; ``formats`` maps a column to a format spec (".3f") or a callable."""
    formats = formats or {}
    cells = [[_format_cell(row.get(col), formats.get(col)) for col in columns] for row in rows]
    numeric_col = [
        any(c[j][1] for c in cells) and all(c[j][1] or c[j][0] == "&mdash;" for c in cells) for j in range(len(columns))
    ]
    attr = [' class="num"' if numeric else "" for numeric in numeric_col]
    head = "".join(f"<th{attr[j]}>{html.escape(str(col))}</th>" for j, col in enumerate(columns))
    body = "\n".join(
        "<tr>" + "".join(f"<td{attr[j]}>{text}</td>" for j, (text, _) in enumerate(row)) + "</tr>" for row in cells
    )
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


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
