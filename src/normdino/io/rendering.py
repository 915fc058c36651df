"""Pictures of anomaly maps: colour maps (matplotlib's inferno), overlay PNGs and 16-bit score-map PNGs."""

from __future__ import annotations

import functools
import logging
import math
import os
import threading
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from normdino.errors import InputError
from normdino.io import png

logger = logging.getLogger(__name__)

#: Contour colours in overlays: predicted mask and ground truth (red / cyan stay distinct for colour-blind readers).
PREDICTED_COLOR = (255, 59, 48)
TRUTH_COLOR = (0, 214, 255)
_BACKGROUND = (24, 26, 32)
_TEXT = (226, 228, 233)
_MUTED = (150, 155, 166)
#: 16-bit map PNGs store value = round((score - vmin) / (vmax - vmin) * 65535), clipped to 0..65535.
PNG16_MAX = 65535
#: Score-map pixels scaled at a time by ``scaled_levels`` (its float64 scratch: 8 MB).
_MAP_BLOCK_PIXELS = 1 << 20


#: matplotlib's inferno at 256 levels as RGB bytes in hex (a test checks it against matplotlib's own).
_INFERNO_256 = (
    "00000401000501010601010802010a02020c02020e03021004031204031405041706041907051b08051d09061f0a0722"
    "0b07240c08260d08290e092b10092d110a30120a32140b34150b37160b39180c3c190c3e1b0c411c0c431e0c451f0c48"
    "210c4a230c4c240c4f260c51280b53290b552b0b572d0b592f0a5b310a5c320a5e340a5f3609613809623909633b0964"
    "3d09653e0966400a67420a68440a68450a69470b6a490b6a4a0c6b4c0c6b4d0d6c4f0d6c510e6c520e6d540f6d550f6d"
    "57106e59106e5a116e5c126e5d126e5f136e61136e62146e64156e65156e67166e69166e6a176e6c186e6d186e6f196e"
    "71196e721a6e741a6e751b6e771c6d781c6d7a1d6d7c1d6d7d1e6d7f1e6c801f6c82206c84206b85216b87216b88226a"
    "8a226a8c23698d23698f24699025689225689326679526679727669827669a28659b29649d29649f2a63a02a63a22b62"
    "a32c61a52c60a62d60a82e5fa92e5eab2f5ead305dae305cb0315bb1325ab3325ab43359b63458b73557b93556ba3655"
    "bc3754bd3853bf3952c03a51c13a50c33b4fc43c4ec63d4dc73e4cc83f4bca404acb4149cc4248ce4347cf4446d04545"
    "d24644d34743d44842d54a41d74b3fd84c3ed94d3dda4e3cdb503bdd513ade5238df5337e05536e15635e25734e35933"
    "e45a31e55c30e65d2fe75e2ee8602de9612bea632aeb6429eb6628ec6726ed6925ee6a24ef6c23ef6e21f06f20f1711f"
    "f1731df2741cf3761bf37819f47918f57b17f57d15f67e14f68013f78212f78410f8850ff8870ef8890cf98b0bf98c0a"
    "f98e09fa9008fa9207fa9407fb9606fb9706fb9906fb9b06fb9d07fc9f07fca108fca309fca50afca60cfca80dfcaa0f"
    "fcac11fcae12fcb014fcb216fcb418fbb61afbb81dfbba1ffbbc21fbbe23fac026fac228fac42afac62df9c72ff9c932"
    "f9cb35f8cd37f8cf3af7d13df7d340f6d543f6d746f5d949f5db4cf4dd4ff4df53f4e156f3e35af3e55df2e661f2e865"
    "f2ea69f1ec6df1ed71f1ef75f1f179f2f27df2f482f3f586f3f68af4f88ef5f992f6fa96f8fb9af9fc9dfafda1fcffa4"
)


@functools.lru_cache(maxsize=4)
def _cached_lut(n: int) -> np.ndarray:
    if n == 256:  # the overlays' table, stored: importing matplotlib costs every predict process ~0.15 s of CPU
        lut = np.frombuffer(bytes.fromhex(_INFERNO_256), dtype=np.uint8).reshape(256, 3).copy()
    else:
        from matplotlib import colormaps

        lut = np.rint(colormaps["inferno"](np.linspace(0.0, 1.0, n))[:, :3] * 255).astype(np.uint8)
    lut.setflags(write=False)
    return lut


def colormap_lut(n: int = 256) -> np.ndarray:
    """The (n, 3) uint8 lookup table of the heat-map colour scale: matplotlib's inferno (black -> purple -> red
    -> orange -> pale yellow; luminance rises monotonically, so it reads in grey scale and for colour-blind readers)."""
    return _cached_lut(int(n)).copy()


def _check_range(vmin: float, vmax: float, where: str) -> None:
    if not (math.isfinite(vmin) and math.isfinite(vmax)) or vmax <= vmin:
        raise InputError(f"{where}: the colour range vmin={vmin!r}, vmax={vmax!r} must be finite with vmax > vmin.")


def score_color_range(typical: float, high: float) -> tuple[float, float]:
    """A colour range (vmin, vmax) from a typical healthy score up to a high one, valid for scores of any sign.

    Scores such as a negative log-likelihood can be negative, so no rule may scale by a factor (``2·vmax``,
    ``1.25·threshold``); when ``high`` does not lie above ``typical`` the range is widened by a small step.
    """
    typical, high = float(typical), float(high)
    if not (math.isfinite(typical) and math.isfinite(high)):
        raise InputError(f"score_color_range: the scores {typical!r} and {high!r} must be finite.")
    step = 1e-6 * max(1.0, abs(typical))
    return typical, max(high, typical + step)


def map_png_range(vmin: float, vmax: float, known: tuple[float, float] | None,
                  observed: Sequence[float] | None) -> tuple[float, float]:
    """[low, high] a model's 16-bit score maps are stored over: every calibrated threshold must lie inside.

    ``known``: the method's score range when it is known a priori (cosine distances: [0, 1]); else four colour
    spans (``vmax − vmin``, healthy median to tail) on either side. Either is widened to ``observed``, the range
    the scores actually took on the healthy calibration pixels (recorded at fit; None for older model files), so
    no threshold falls where stored values are clipped (centred scores, e.g. ``--fusion pixel``, are negative).
    """
    span = float(vmax) - float(vmin)
    low, high = (float(known[0]), float(known[1])) if known is not None else (vmin - 4 * span, vmax + 4 * span)
    if observed is not None:
        low, high = min(low, float(observed[0])), max(high, float(observed[1]))
    return low, high


def normalize(score_map: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """Scores scaled to [0, 1] over [vmin, vmax] (clipped; NaN becomes 0)."""
    _check_range(vmin, vmax, "normalize")
    t = (np.asarray(score_map, dtype=np.float64) - vmin) / (vmax - vmin)
    return np.nan_to_num(np.clip(t, 0.0, 1.0), nan=0.0)


def scaled_levels(score_map: np.ndarray, vmin: float, vmax: float, levels: int, dtype=np.uint16) -> np.ndarray:
    """Integer levels of scores: round(clip((s − vmin) / (vmax − vmin), 0, 1) · levels), NaN → 0, as ``dtype``.

    The numbers of ``np.rint(normalize(s, vmin, vmax) * levels)`` (float64 throughout), computed in place in blocks
    of ``_MAP_BLOCK_PIXELS``, so the float64 scratch stays ~8 MB for any map.
    """
    _check_range(vmin, vmax, "scaled_levels")
    a = np.asarray(score_map)
    out = np.empty(a.shape, dtype=dtype)
    flat_in, flat_out = a.reshape(-1), out.reshape(-1)
    span = vmax - vmin
    scratch = np.empty(min(a.size, _MAP_BLOCK_PIXELS), dtype=np.float64)
    for start in range(0, a.size, _MAP_BLOCK_PIXELS):
        t = scratch[: min(_MAP_BLOCK_PIXELS, a.size - start)]
        np.subtract(flat_in[start : start + len(t)], vmin, out=t, dtype=np.float64)
        np.divide(t, span, out=t)
        np.fmax(t, 0.0, out=t)  # fmax/fmin ignore NaN: NaN -> 0, as nan_to_num after clip
        np.fmin(t, 1.0, out=t)
        np.multiply(t, levels, out=t)
        np.rint(t, out=t)
        flat_out[start : start + len(t)] = t
    return out


def colorize(score_map: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """Map scores to (…, 3) uint8 colours: vmin and below → black, vmax and above → pale yellow; NaN → black."""
    _check_range(vmin, vmax, "colorize")
    return np.take(_cached_lut(256), scaled_levels(score_map, vmin, vmax, 255, np.uint8), axis=0)


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


def _unit_image(image: np.ndarray) -> np.ndarray:
    """An image as float32 in [0, 1], gray (H, W) or colour (H, W, 3): accepts float in [0, 1] or uint8/uint16."""
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] != 3):
        raise InputError(f"overlay_image: image of shape {a.shape} must be gray (H, W) or colour (H, W, 3).")
    if a.dtype == np.uint8:
        a = a / 255.0
    elif a.dtype == np.uint16:
        a = a / 65535.0
    a = a.astype(np.float32)  # float32: overlays need no more
    np.fmax(a, 0.0, out=a)  # clip to [0, 1] with NaN -> 0 (fmax and fmin ignore NaN)
    return np.fmin(a, 1.0, out=a)


#: The fonts are loaded once and shared by the writer threads; FreeType faces are not safe to use from two
#: threads at once, so every use holds this lock (text is drawn once per run and reused, so it never waits long).
_FONT_LOCK = threading.Lock()


@functools.lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's default font at ``size`` pixels, loaded once (loading parses the font file)."""
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
        return np.asarray(Image.fromarray(a.astype(np.float32), mode="F").resize(size, resample), dtype=np.float32)
    return np.stack([_resize(a[:, :, c], shape, resample) for c in range(a.shape[2])], axis=2)


def _upscale_mask(mask: np.ndarray, scale: int) -> np.ndarray:
    m = np.asarray(mask).astype(bool, copy=False)
    return m if scale == 1 else np.repeat(np.repeat(m, scale, axis=0), scale, axis=1)


def _as_uint8(panel: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """A float32 panel in [0, 1] as uint8 (into ``out`` if given): round(panel · 255); ``panel`` is scratch."""
    np.multiply(panel, np.float32(255.0), out=panel)
    np.rint(panel, out=panel)
    if out is None:
        return panel.astype(np.uint8)
    np.copyto(out, panel, casting="unsafe")
    return out


@functools.lru_cache(maxsize=8)
def _heat_terms(alpha: float) -> np.ndarray:
    """alpha · colour / 255 for each of the 256 colours, float32 (256, 3): the heat map's share of a blend."""
    terms = alpha * (_cached_lut(256) / np.float32(255.0))
    terms.setflags(write=False)
    return terms


#: The float32 gray levels of 8-bit images as normdino reads them (k / 255).
_LEVELS = np.arange(256, dtype=np.float32) / np.float32(255.0)


@functools.lru_cache(maxsize=8)
def _blend_table(alpha: float) -> np.ndarray:
    """The heat-map panel's uint8 pixel for every 8-bit gray level k and colour i, row k · 256 + i (65536, 3):
    the per-pixel float32 steps, round(((1 − alpha) · k / 255 + alpha · colour / 255) · 255), done once."""
    blended = _heat_terms(alpha)[None, :, :] + ((1.0 - alpha) * _LEVELS)[:, None, None]
    table = _as_uint8(blended).reshape(-1, 3)
    table.setflags(write=False)
    return table


def _contour_value(color: tuple[int, int, int]) -> np.ndarray:
    """The uint8 pixel a contour colour becomes on a panel (float32 colour / 255, rounded back)."""
    return _as_uint8((np.array(color) / 255.0).astype(np.float32))


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
    alpha = float(alpha)  # a Python float: the blend is computed in float32
    unit = _unit_image(image)  # gray images stay one plane: the three channels of each panel are equal
    h, w = unit.shape[:2]
    scores = np.asarray(score_map, dtype=np.float32)
    if scores.ndim != 2:
        raise InputError(f"overlay_image: score_map of shape {scores.shape} must be 2-D.")
    for name, m in (("mask", mask), ("true_mask", true_mask)):
        if m is not None and np.shape(m) != (h, w):
            raise InputError(f"overlay_image: {name} of shape {np.shape(m)} must match the image's shape {(h, w)}.")
    has_masks = mask is not None or true_mask is not None
    layout = overlay_layout((h, w), 3 if has_masks else 2, scale)
    ph, pw = layout.panel_shape
    s = layout.scale

    base = _resize(unit, (ph, pw), Image.Resampling.BICUBIC).clip(0.0, 1.0)
    gray = base.ndim == 2
    # Heat map panel: (1 − alpha) · image + alpha · colour / 255 in float32, the colour's share from a table.
    index = scaled_levels(_resize(scores, (ph, pw), Image.Resampling.BILINEAR), vmin, vmax, 255, np.uint8)

    canvas = np.empty(layout.shape, dtype=np.uint8)  # filled row-wise: 60x faster than broadcasting an RGB triple
    canvas.reshape(layout.shape[0], -1)[:] = np.tile(np.asarray(_BACKGROUND, dtype=np.uint8), layout.shape[1])
    views = [canvas[top : top + ph, left : left + pw] for top, left in layout.panels]
    image8 = _as_uint8(base.copy())
    if gray:
        for channel in range(3):  # channel by channel: 5x faster than broadcasting (H, W, 1) into (H, W, 3)
            views[0][:, :, channel] = image8
    else:
        views[0][:] = image8
    eight_bit = gray and np.array_equal(_LEVELS[image8[:1]], base[:1]) and np.array_equal(_LEVELS[image8], base)
    if eight_bit:  # 8-bit gray levels, as images are read (the first row decides most others): blend by table
        combined = image8.astype(np.uint16)
        combined <<= 8
        combined |= index
        views[1][:] = np.take(_blend_table(alpha), combined, axis=0)
    elif gray:  # channel planes (3, H, W): adding the image's share broadcasts over whole planes
        planes = np.take(_heat_terms(alpha).T.copy(), index, axis=1)
        planes += (1.0 - alpha) * base
        planes = _as_uint8(planes)
        for channel in range(3):
            views[1][:, :, channel] = planes[channel]
    else:
        blended = np.take(_heat_terms(alpha), index, axis=0)
        blended += (1.0 - alpha) * base
        _as_uint8(blended, out=views[1])
    if has_masks:  # the image with the masks' contours over it
        views[2][:] = views[0]
        thickness = 1 if s <= 2 else 2
        for m, color in ((true_mask, TRUTH_COLOR), (mask, PREDICTED_COLOR)):
            if m is not None:
                contour, value = mask_contour(_upscale_mask(m, s), thickness), _contour_value(color)
                for channel in range(3):  # a masked copy per channel: ~4x faster than boolean indexing here
                    np.copyto(views[2][:, :, channel], value[channel], where=contour)

    # Colour bar under the heat map panel.
    top, left = layout.panels[1]
    bar_top = top + ph + 10
    bar_w = max(16, pw - 2 * max(24, pw // 6))
    bar_left = left + (pw - bar_w) // 2
    canvas[bar_top : bar_top + 8, bar_left : bar_left + bar_w] = colorize(np.linspace(0.0, 1.0, bar_w), 0.0, 1.0)[None]

    if titles is None:
        third = {
            (True, False): "Predicted mask",
            (False, True): "Ground truth",
            (True, True): "Predicted vs truth",
        }.get((mask is not None, true_mask is not None), "")
        titles = ("Image", "Anomaly score", third)
    items: list[tuple] = [("text", left + pw / 2, top - 8, title, _TEXT, 14, "ms")
                          for (top, left), title in zip(layout.panels, titles, strict=False)]
    label_y = bar_top + 4
    items += [("text", bar_left - 5, label_y, _fmt(vmin), _MUTED, 11, "rm"),
              ("text", bar_left + bar_w + 5, label_y, _fmt(vmax), _MUTED, 11, "lm")]
    if has_masks:
        top, left = layout.panels[2]
        entries = [
            (c, n)
            for m, c, n in ((mask, PREDICTED_COLOR, "predicted"), (true_mask, TRUTH_COLOR, "truth"))
            if m is not None
        ]
        widths = [22 + _text_length(name, 11) for _, name in entries]
        x = left + (pw - (sum(widths) + 14 * (len(entries) - 1))) / 2
        for (color, name), width in zip(entries, widths, strict=True):
            items.append(("line", x, label_y, x + 16, label_y, color, 3))
            items.append(("text", x + 22, label_y, name, _MUTED, 11, "lm"))
            x += width + 14
    _draw_items(canvas, items)
    return canvas


# ---------------------------------------------------------------------- text and lines on small patches


def _draw_item(draw: ImageDraw.ImageDraw, item: tuple) -> None:
    """Draw one ("text", x, y, text, fill, font size, anchor) or ("line", x0, y0, x1, y1, fill, width)."""
    if item[0] == "text":
        _, x, y, text, fill, size, anchor = item
        with _FONT_LOCK:
            draw.text((x, y), text, fill=fill, font=_font(size), anchor=anchor)
    else:
        _, x0, y0, x1, y1, fill, width = item
        draw.line([(x0, y0), (x1, y1)], fill=fill, width=width)


def _item_box(item: tuple, shape: tuple[int, ...]) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) of the pixels an item can touch, padded and clipped to the canvas; None when
    the font gives no reliable box (Pillow without FreeType): then the item is drawn on the whole canvas."""
    pad = 4
    if item[0] == "text":
        _, x, y, text, _, size, anchor = item
        bbox = _text_bbox(text, size, anchor)
        if bbox is None:
            return None
        x0, y0, x1, y1 = bbox
        xs, ys = (x + x0, x + x1, x), (y + y0, y + y1, y)
    else:
        _, ax, ay, bx, by, _, width = item
        xs, ys = (ax - width, bx + width, ax, bx), (ay - width, by + width, ay, by)
    left, top = max(0, math.floor(min(xs)) - pad), max(0, math.floor(min(ys)) - pad)
    right, bottom = min(shape[1], math.ceil(max(xs)) + pad), min(shape[0], math.ceil(max(ys)) + pad)
    if min(xs) < 0 or min(ys) < 0:  # Pillow truncates coordinates toward zero: keep negative ones unmoved
        left, top = 0, 0
    return (left, top, right, bottom) if right > left and bottom > top else (0, 0, 0, 0)


@functools.lru_cache(maxsize=256)
def _text_bbox(text: str, size: int, anchor: str) -> tuple[float, float, float, float] | None:
    """The box of ``text`` around its anchor point in the default font; None without FreeType."""
    font = _font(size)
    if not isinstance(font, ImageFont.FreeTypeFont):
        return None
    with _FONT_LOCK:
        return font.getbbox(text, anchor=anchor)


@functools.lru_cache(maxsize=256)
def _drawn_patch(item: tuple, shape: tuple[int, int, int], pixels: bytes) -> bytes:
    """The RGB bytes of a patch holding ``pixels`` after ``item`` is drawn on it (in the patch's coordinates)."""
    patch = Image.frombytes("RGB", (shape[1], shape[0]), pixels)
    _draw_item(ImageDraw.Draw(patch), item)
    return patch.tobytes()


def _draw_items(canvas: np.ndarray, items: Sequence[tuple]) -> None:
    """Draw text and lines on an RGB uint8 canvas in place, in order, exactly as Pillow draws them on the whole.

    Each item is drawn on a copy of the small patch it can touch (moved by whole pixels, so Pillow's sub-pixel
    placement is unchanged) and written back; a patch drawn once is reused (titles and labels repeat from image
    to image), which saves the text rendering and the conversions of the whole canvas to and from Pillow.
    """
    boxes = [_item_box(item, canvas.shape) for item in items]
    if any(box is None for box in boxes):
        pil = Image.fromarray(canvas)
        draw = ImageDraw.Draw(pil)
        for item in items:
            _draw_item(draw, item)
        canvas[:] = np.asarray(pil)
        return
    for item, (left, top, right, bottom) in zip(items, boxes, strict=True):
        if right <= left or bottom <= top:
            continue
        region = canvas[top:bottom, left:right]
        moved = (item[0], item[1] - left, item[2] - top, *item[3:]) if item[0] == "text" else \
            (item[0], item[1] - left, item[2] - top, item[3] - left, item[4] - top, *item[5:])
        drawn = _drawn_patch(moved, region.shape, region.tobytes())
        region[:] = np.frombuffer(drawn, dtype=np.uint8).reshape(region.shape)


@functools.lru_cache(maxsize=64)
def _text_length(text: str, size: int) -> float:
    """The advance width of ``text`` in the default font at ``size`` (as ImageDraw.textlength gives it on RGB)."""
    with _FONT_LOCK:
        return ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(text, font=_font(size))


def as_uint_image(array: np.ndarray) -> np.ndarray:
    a = np.asarray(array)
    if a.dtype == bool:
        return a.astype(np.uint8) * np.uint8(255)
    if np.issubdtype(a.dtype, np.floating):
        return np.rint(np.nan_to_num(np.clip(a, 0.0, 1.0)) * 255.0).astype(np.uint8)
    if a.dtype not in (np.uint8, np.uint16):
        raise InputError(f"save_png: array of dtype {a.dtype} must be uint8, uint16, bool or float in [0, 1].")
    return a


#: zlib level of every PNG normdino writes (see normdino.io.png: one "up" row filter, zlib level 1).
PNG_COMPRESS_LEVEL = png.COMPRESS_LEVEL


def save_png(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write an image array as PNG atomically: uint8/uint16 as is, bool as 0/255, float in [0, 1] as 8-bit."""
    a = as_uint_image(array)
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)) or (a.dtype == np.uint16 and a.ndim != 2):
        raise InputError(f"save_png: array of shape {a.shape} and dtype {a.dtype} is not an image for {path}.")
    png.write_png(path, a)


def save_map_png16(path: str | os.PathLike, score_map: np.ndarray, vmin: float, vmax: float) -> None:
    """Write a float map as a 16-bit gray PNG, atomically: value = round(clip((s−vmin)/(vmax−vmin), 0, 1)·65535).

    vmin and vmax are stored as PNG text chunks ``normdino:vmin`` / ``normdino:vmax``, so ``read_map_png16``
    recovers scores to within (vmax − vmin) / 131070.
    """
    _check_range(vmin, vmax, "save_map_png16")
    a = np.asarray(score_map)
    if a.ndim != 2:
        raise InputError(f"save_map_png16: score map of shape {a.shape} for {path} must be 2-D.")
    text = {"normdino:vmin": repr(float(vmin)), "normdino:vmax": repr(float(vmax)),
            "normdino:scale": "score = vmin + value / 65535 * (vmax - vmin)"}
    png.write_png(path, scaled_levels(a, vmin, vmax, PNG16_MAX, np.dtype(">u2")), text)  # PNG byte order: no copy


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


