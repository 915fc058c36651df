"""Visual outputs: colour maps, overlay PNGs, 16-bit score maps, inline SVG charts and self-contained HTML reports.

Only numpy and Pillow; charts are hand-written SVG so reports open anywhere without plotting libraries.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from normdino.errors import InputError
from normdino.files import atomic_path, atomic_write_text

logger = logging.getLogger(__name__)

# Anchor colours of an inferno-like map (black → purple → red → orange → pale yellow), evenly spaced in [0, 1];
# its luminance rises monotonically, so it reads correctly in grey scale and for colour-blind readers.
_INFERNO_ANCHORS = np.array(
    [
        (0, 0, 4),
        (22, 11, 57),
        (65, 12, 104),
        (106, 23, 110),
        (147, 38, 103),
        (188, 55, 84),
        (221, 81, 58),
        (243, 120, 25),
        (252, 165, 10),
        (246, 215, 70),
        (252, 255, 164),
    ],
    dtype=np.float64,
)

#: Contour colours in overlays: predicted mask and ground truth (red / cyan stay distinct for colour-blind readers).
PREDICTED_COLOR = (255, 59, 48)
TRUTH_COLOR = (0, 214, 255)
# Okabe–Ito palette for chart series.
SERIES_COLORS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")
_BACKGROUND = (24, 26, 32)
_TEXT = (226, 228, 233)
_MUTED = (150, 155, 166)
#: 16-bit map PNGs store value = round((score - vmin) / (vmax - vmin) * 65535), clipped to 0..65535.
PNG16_MAX = 65535


def colormap_lut(n: int = 256) -> np.ndarray:
    """The (n, 3) uint8 lookup table of the heat-map colour scale, interpolated from the anchor colours."""
    positions = np.linspace(0.0, 1.0, len(_INFERNO_ANCHORS))
    t = np.linspace(0.0, 1.0, n)
    lut = np.stack([np.interp(t, positions, _INFERNO_ANCHORS[:, c]) for c in range(3)], axis=1)
    return np.rint(lut).astype(np.uint8)


_LUT = colormap_lut()


def _check_range(vmin: float, vmax: float, where: str) -> None:
    if not (math.isfinite(vmin) and math.isfinite(vmax)) or vmax <= vmin:
        raise InputError(f"{where}: the colour range vmin={vmin!r}, vmax={vmax!r} must be finite with vmax > vmin.")


def normalize(score_map: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """Scores scaled to [0, 1] over [vmin, vmax] (clipped; NaN becomes 0)."""
    _check_range(vmin, vmax, "normalize")
    t = (np.asarray(score_map, dtype=np.float64) - vmin) / (vmax - vmin)
    return np.nan_to_num(np.clip(t, 0.0, 1.0), nan=0.0)


def colorize(score_map: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """Map scores to (…, 3) uint8 colours: vmin and below → black, vmax and above → pale yellow; NaN → black."""
    _check_range(vmin, vmax, "colorize")
    index = np.rint(normalize(score_map, vmin, vmax) * (len(_LUT) - 1)).astype(np.intp)
    return _LUT[index]


def mask_contour(mask: np.ndarray, thickness: int = 1) -> np.ndarray:
    """Inner boundary of a binary mask: mask pixels within ``thickness`` 4-neighbour steps of a non-mask pixel.

    Pixels outside the array count as non-mask, so a mask touching the border gets a contour there.
    """
    inner = np.asarray(mask).astype(bool)
    region = inner
    for _ in range(max(1, int(thickness))):
        padded = np.pad(inner, 1, constant_values=False)
        inner = inner & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return region & ~inner


def _gray_rgb(image: np.ndarray) -> np.ndarray:
    """An image as float (H, W, 3) in [0, 1]: accepts gray (H, W) or RGB (H, W, 3), float in [0, 1] or uint8/uint16."""
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] != 3):
        raise InputError(f"overlay_image: image of shape {a.shape} must be gray (H, W) or colour (H, W, 3).")
    if a.dtype == np.uint8:
        a = a / 255.0
    elif a.dtype == np.uint16:
        a = a / 65535.0
    a = np.nan_to_num(np.clip(a.astype(np.float64), 0.0, 1.0))
    return np.repeat(a[:, :, None], 3, axis=2) if a.ndim == 2 else a


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


@dataclass(frozen=True)
class OverlayLayout:
    """Where things are in an overlay: canvas shape, display scale, and the (top, left) corner of each panel."""

    shape: tuple[int, int, int]
    scale: int
    panel_shape: tuple[int, int]
    panels: tuple[tuple[int, int], ...]
    header: int
    footer: int


def overlay_layout(image_shape: tuple[int, ...], n_panels: int = 3, scale: int | None = None) -> OverlayLayout:
    """Geometry of ``overlay_image`` for an image of ``image_shape``; ``scale`` None upscales small images to ~256px."""
    h, w = int(image_shape[0]), int(image_shape[1])
    if scale is None:
        scale = int(min(8, max(1, round(256 / max(h, w)))))
    ph, pw = h * scale, w * scale
    margin, gap, header, footer = 14, 12, 30, 46
    width = 2 * margin + n_panels * pw + (n_panels - 1) * gap
    height = header + ph + footer
    panels = tuple((header, margin + i * (pw + gap)) for i in range(n_panels))
    return OverlayLayout((height, width, 3), scale, (ph, pw), panels, header, footer)


def _resize(a: np.ndarray, shape: tuple[int, int], resample: int) -> np.ndarray:
    """Resize a float (H, W) or (H, W, 3) array with Pillow, channel by channel in float precision."""
    if a.shape[:2] == shape:
        return a
    size = (shape[1], shape[0])
    if a.ndim == 2:
        return np.asarray(Image.fromarray(a.astype(np.float32), mode="F").resize(size, resample), dtype=np.float64)
    return np.stack([_resize(a[:, :, c], shape, resample) for c in range(a.shape[2])], axis=2)


def _upscale_mask(mask: np.ndarray, scale: int) -> np.ndarray:
    return np.repeat(np.repeat(np.asarray(mask).astype(bool), scale, axis=0), scale, axis=1)


def _fmt(value: float) -> str:
    return f"{value:.3g}"


def overlay_image(
    image: np.ndarray,
    score_map: np.ndarray,
    mask: np.ndarray | None,
    vmin: float,
    vmax: float,
    alpha: float = 0.5,
    true_mask: np.ndarray | None = None,
    scale: int | None = None,
    titles: Sequence[str] | None = None,
) -> np.ndarray:
    """A figure readable at a glance, (H', W', 3) uint8: image | heat map over the image | mask contours.

    The third panel shows the predicted mask's contour in red and the true mask's in cyan (either may be None;
    with neither, only two panels). A score map of another size is resized bilinearly to the image; masks must
    match the image. Small images are upscaled (see ``overlay_layout``); a colour bar shows [vmin, vmax].
    """
    _check_range(vmin, vmax, "overlay_image")
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"overlay_image: alpha={alpha!r} must lie in [0, 1].")
    rgb = _gray_rgb(image)
    h, w = rgb.shape[:2]
    scores = np.asarray(score_map, dtype=np.float64)
    if scores.ndim != 2:
        raise InputError(f"overlay_image: score_map of shape {scores.shape} must be 2-D.")
    for name, m in (("mask", mask), ("true_mask", true_mask)):
        if m is not None and np.shape(m) != (h, w):
            raise InputError(f"overlay_image: {name} of shape {np.shape(m)} must match the image's shape {(h, w)}.")
    has_masks = mask is not None or true_mask is not None
    layout = overlay_layout((h, w), 3 if has_masks else 2, scale)
    ph, pw = layout.panel_shape
    s = layout.scale

    base = _resize(rgb, (ph, pw), Image.Resampling.BICUBIC).clip(0.0, 1.0)
    heat = colorize(_resize(scores, (ph, pw), Image.Resampling.BILINEAR), vmin, vmax) / 255.0
    blended = (1.0 - alpha) * base + alpha * heat
    panels = [base, blended]
    if has_masks:
        contours = base.copy()
        thickness = 1 if s <= 2 else 2
        for m, color in ((true_mask, TRUTH_COLOR), (mask, PREDICTED_COLOR)):
            if m is not None:
                contours[mask_contour(_upscale_mask(m, s), thickness)] = np.array(color) / 255.0
        panels.append(contours)

    canvas = np.empty(layout.shape, dtype=np.uint8)
    canvas[:] = _BACKGROUND
    for (top, left), panel in zip(layout.panels, panels, strict=True):
        canvas[top : top + ph, left : left + pw] = np.rint(panel * 255.0).astype(np.uint8)

    # Colour bar under the heat map panel.
    top, left = layout.panels[1]
    bar_top = top + ph + 10
    bar_w = max(16, pw - 2 * max(24, pw // 6))
    bar_left = left + (pw - bar_w) // 2
    canvas[bar_top : bar_top + 8, bar_left : bar_left + bar_w] = colorize(np.linspace(0.0, 1.0, bar_w), 0.0, 1.0)[None]

    pil = Image.fromarray(canvas)
    draw = ImageDraw.Draw(pil)
    title_font, small = _font(14), _font(11)
    if titles is None:
        third = {
            (True, False): "Predicted mask",
            (False, True): "Ground truth",
            (True, True): "Predicted vs truth",
        }.get((mask is not None, true_mask is not None), "")
        titles = ("Image", "Anomaly score", third)
    for (top, left), title in zip(layout.panels, titles, strict=False):
        draw.text((left + pw / 2, top - 8), title, fill=_TEXT, font=title_font, anchor="ms")
    label_y = bar_top + 4
    draw.text((bar_left - 5, label_y), _fmt(vmin), fill=_MUTED, font=small, anchor="rm")
    draw.text((bar_left + bar_w + 5, label_y), _fmt(vmax), fill=_MUTED, font=small, anchor="lm")
    if has_masks:
        top, left = layout.panels[2]
        entries = [
            (c, n)
            for m, c, n in ((mask, PREDICTED_COLOR, "predicted"), (true_mask, TRUTH_COLOR, "truth"))
            if m is not None
        ]
        widths = [22 + draw.textlength(name, font=small) for _, name in entries]
        x = left + (pw - (sum(widths) + 14 * (len(entries) - 1))) / 2
        for (color, name), width in zip(entries, widths, strict=True):
            draw.line([(x, label_y), (x + 16, label_y)], fill=color, width=3)
            draw.text((x + 22, label_y), name, fill=_MUTED, font=small, anchor="lm")
            x += width + 14
    return np.asarray(pil)


def _as_uint_image(array: np.ndarray) -> np.ndarray:
    a = np.asarray(array)
    if a.dtype == bool:
        return a.astype(np.uint8) * np.uint8(255)
    if np.issubdtype(a.dtype, np.floating):
        return np.rint(np.nan_to_num(np.clip(a, 0.0, 1.0)) * 255.0).astype(np.uint8)
    if a.dtype not in (np.uint8, np.uint16):
        raise InputError(f"save_png: array of dtype {a.dtype} must be uint8, uint16, bool or float in [0, 1].")
    return a


PNG_COMPRESS_LEVEL = 1  # zlib level 1: ~4x faster than the default 6 for ~10-20 % larger files; prediction writes many


def save_png(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write an image array as PNG atomically: uint8/uint16 as is, bool as 0/255, float in [0, 1] as 8-bit."""
    a = _as_uint_image(array)
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)) or (a.dtype == np.uint16 and a.ndim != 2):
        raise InputError(f"save_png: array of shape {a.shape} and dtype {a.dtype} is not an image for {path}.")
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(a)).save(tmp, format="PNG", compress_level=PNG_COMPRESS_LEVEL)


def save_map_png16(path: str | os.PathLike, score_map: np.ndarray, vmin: float, vmax: float) -> None:
    """Write a float map as a 16-bit gray PNG, atomically: value = round(clip((s−vmin)/(vmax−vmin), 0, 1)·65535).

    vmin and vmax are stored as PNG text chunks ``normdino:vmin`` / ``normdino:vmax``, so ``read_map_png16``
    recovers scores to within (vmax − vmin) / 131070.
    """
    _check_range(vmin, vmax, "save_map_png16")
    a = np.asarray(score_map)
    if a.ndim != 2:
        raise InputError(f"save_map_png16: score map of shape {a.shape} for {path} must be 2-D.")
    values = np.rint(normalize(a, vmin, vmax) * PNG16_MAX).astype(np.uint16)
    info = PngImagePlugin.PngInfo()
    info.add_text("normdino:vmin", repr(float(vmin)))
    info.add_text("normdino:vmax", repr(float(vmax)))
    info.add_text("normdino:scale", "score = vmin + value / 65535 * (vmax - vmin)")
    with atomic_path(path) as tmp:
        Image.fromarray(values).save(tmp, format="PNG", pnginfo=info, compress_level=PNG_COMPRESS_LEVEL)


def read_map_png16(path: str | os.PathLike) -> tuple[np.ndarray, float, float]:
    """Read a map written by ``save_map_png16``: (float32 scores, vmin, vmax)."""
    with Image.open(path) as im:
        values = np.asarray(im, dtype=np.float64)
        text = getattr(im, "text", {})
    try:
        vmin, vmax = float(text["normdino:vmin"]), float(text["normdino:vmax"])
    except (KeyError, ValueError) as exc:
        raise InputError(
            f"{path} has no normdino:vmin/vmax text chunks; it was not written by save_map_png16."
        ) from exc
    return (vmin + values / PNG16_MAX * (vmax - vmin)).astype(np.float32), vmin, vmax


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
    Image.fromarray(np.ascontiguousarray(_as_uint_image(array))).save(buffer, format="PNG", optimize=True)
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
