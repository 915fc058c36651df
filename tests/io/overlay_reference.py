"""The overlay as normdino first drew it, kept as a plain reference for tests: float arithmetic on every channel
(float64 colour index, float32 blend), the whole figure drawn on one Pillow canvas, Pillow's own PNG encoder.

``rendering.overlay_image`` computes the same pixels with fewer passes (uint8 panels, a per-alpha colour table,
text drawn on small patches); tests compare the two on many inputs.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from normdino.io.rendering import PREDICTED_COLOR, TRUTH_COLOR, colormap_lut, mask_contour, overlay_layout

BACKGROUND, TEXT, MUTED = (24, 26, 32), (226, 228, 233), (150, 155, 166)


def colorize(scores, vmin, vmax):
    t = np.nan_to_num(np.clip((np.asarray(scores, dtype=np.float64) - vmin) / (vmax - vmin), 0.0, 1.0), nan=0.0)
    return colormap_lut()[np.rint(t * 255).astype(np.intp)]


def unit_rgb(image):
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.dtype == np.uint8:
        a = a / 255.0
    elif a.dtype == np.uint16:
        a = a / 65535.0
    a = np.nan_to_num(np.clip(a.astype(np.float32), 0.0, 1.0))
    return np.repeat(a[:, :, None], 3, axis=2) if a.ndim == 2 else a


def resize(a, shape, resample):
    if a.shape[:2] == shape:
        return a
    if a.ndim == 2:
        plane = Image.fromarray(a.astype(np.float32), mode="F").resize((shape[1], shape[0]), resample)
        return np.asarray(plane, dtype=np.float32)
    return np.stack([resize(a[:, :, c], shape, resample) for c in range(a.shape[2])], axis=2)


def font(size):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def reference_overlay(image, score_map, mask, vmin, vmax, alpha=0.5, true_mask=None, scale=None, titles=None):
    rgb = unit_rgb(image)
    h, w = rgb.shape[:2]
    scores = np.asarray(score_map, dtype=np.float32)
    has_masks = mask is not None or true_mask is not None
    layout = overlay_layout((h, w), 3 if has_masks else 2, scale)
    ph, pw = layout.panel_shape
    s = layout.scale
    base = resize(rgb, (ph, pw), Image.Resampling.BICUBIC).clip(0.0, 1.0)
    heat = colorize(resize(scores, (ph, pw), Image.Resampling.BILINEAR), vmin, vmax) / np.float32(255.0)
    panels = [base, (1.0 - alpha) * base + alpha * heat]
    if has_masks:
        contours = base.copy()
        for m, color in ((true_mask, TRUTH_COLOR), (mask, PREDICTED_COLOR)):
            if m is not None:
                big = np.repeat(np.repeat(np.asarray(m).astype(bool), s, axis=0), s, axis=1)
                contours[mask_contour(big, 1 if s <= 2 else 2)] = np.array(color) / 255.0
        panels.append(contours)
    canvas = np.empty(layout.shape, dtype=np.uint8)
    canvas[:] = BACKGROUND
    for (top, left), panel in zip(layout.panels, panels):
        canvas[top : top + ph, left : left + pw] = np.rint(panel * 255.0).astype(np.uint8)
    top, left = layout.panels[1]
    bar_top = top + ph + 10
    bar_w = max(16, pw - 2 * max(24, pw // 6))
    bar_left = left + (pw - bar_w) // 2
    canvas[bar_top : bar_top + 8, bar_left : bar_left + bar_w] = colorize(np.linspace(0.0, 1.0, bar_w), 0.0, 1.0)[None]
    pil = Image.fromarray(canvas)
    draw = ImageDraw.Draw(pil)
    title_font, small = font(14), font(11)
    if titles is None:
        third = {(True, False): "Predicted mask", (False, True): "Ground truth", (True, True): "Predicted vs truth"}
        titles = ("Image", "Anomaly score", third.get((mask is not None, true_mask is not None), ""))
    for (top, left), title in zip(layout.panels, titles):
        draw.text((left + pw / 2, top - 8), title, fill=TEXT, font=title_font, anchor="ms")
    label_y = bar_top + 4
    draw.text((bar_left - 5, label_y), f"{vmin:.3g}", fill=MUTED, font=small, anchor="rm")
    draw.text((bar_left + bar_w + 5, label_y), f"{vmax:.3g}", fill=MUTED, font=small, anchor="lm")
    if has_masks:
        top, left = layout.panels[2]
        entries = [(c, n) for m, c, n in ((mask, PREDICTED_COLOR, "predicted"), (true_mask, TRUTH_COLOR, "truth"))
                   if m is not None]
        widths = [22 + draw.textlength(name, font=small) for _, name in entries]
        x = left + (pw - (sum(widths) + 14 * (len(entries) - 1))) / 2
        for (color, name), width in zip(entries, widths):
            draw.line([(x, label_y), (x + 16, label_y)], fill=color, width=3)
            draw.text((x + 22, label_y), name, fill=MUTED, font=small, anchor="lm")
            x += width + 14
    return np.asarray(pil)
