"""Visual outputs: colour map, overlays, PNG writers, SVG charts and HTML reports."""

import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image

from normdino.errors import InputError
from normdino.io.report import html_report, html_table, image_grid_html, png_data_uri, svg_curve, svg_histograms
from normdino.io.rendering import (
    PREDICTED_COLOR,
    TRUTH_COLOR,
    colorize,
    colormap_lut,
    mask_contour,
    overlay_image,
    overlay_layout,
    read_map_png16,
    save_map_png16,
    save_png,
)

SVG = "{http://www.w3.org/2000/svg}"


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float64) @ np.array([0.2126, 0.7152, 0.0722])


def test_colorize_ends_monotonic_clipping_and_nan():
    from matplotlib import colormaps

    lut = colormap_lut()
    assert lut.shape == (256, 3) and lut.dtype == np.uint8
    np.testing.assert_array_equal(lut, np.rint(colormaps["inferno"](np.linspace(0, 1, 256))[:, :3] * 255))
    assert np.all(np.diff(_luminance(lut)) > -0.5)  # monotonic up to uint8 rounding (inferno is, in CAM02-UCS)
    ramp = colorize(np.linspace(-1.0, 3.0, 401), 0.0, 2.0)
    assert ramp.shape == (401, 3) and ramp.dtype == np.uint8
    assert np.all(np.diff(_luminance(ramp)) > -0.5)
    np.testing.assert_array_equal(ramp[0], lut[0])  # below vmin clips to the low end
    np.testing.assert_array_equal(ramp[-1], lut[-1])  # above vmax clips to the high end
    np.testing.assert_array_equal(colorize(np.array([0.0, 2.0]), 0.0, 2.0), lut[[0, -1]])
    assert _luminance(lut[:1])[0] < 10 and _luminance(lut[-1:])[0] > 230
    np.testing.assert_array_equal(colorize(np.array([np.nan]), 0.0, 1.0)[0], lut[0])
    assert colorize(np.zeros((5, 7)), 0.0, 1.0).shape == (5, 7, 3)
    with pytest.raises(InputError, match="vmax > vmin"):
        colorize(np.zeros(3), 1.0, 1.0)


def test_drawing_an_overlay_imports_no_matplotlib(tmp_path):
    """The 256-colour table is stored in the module: importing matplotlib cost each predict process ~0.15 s."""
    import subprocess
    import sys

    code = ("import sys, numpy as np; from normdino.io import rendering; "
            "out = rendering.overlay_image(np.zeros((8, 8)), np.ones((8, 8)), np.eye(8, dtype=bool), 0.0, 1.0); "
            "rendering.save_png(sys.argv[1], out); print('matplotlib' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "o.png")], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "False"


def test_mask_contour_is_the_inner_boundary():
    mask = np.zeros((9, 9), dtype=bool)
    mask[2:7, 3:8] = True
    contour = mask_contour(mask)
    expected = mask.copy()
    expected[3:6, 4:7] = False
    np.testing.assert_array_equal(contour, expected)
    # Touching the border: border pixels are contour too.
    full = np.ones((4, 4), dtype=bool)
    assert mask_contour(full).sum() == 12
    assert mask_contour(np.zeros((4, 4))).sum() == 0


def _scene(size=64, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.random((size, size)).astype(np.float32) * 0.5
    yy, xx = np.mgrid[:size, :size]
    pred = (yy - 20) ** 2 + (xx - 30) ** 2 < 100
    truth = (yy - 40) ** 2 + (xx - 40) ** 2 < 64
    scores = np.exp(-((yy - 20) ** 2 + (xx - 30) ** 2) / 200.0)
    return image, scores, pred, truth


def test_overlay_shape_panels_and_predicted_contour_on_mask_boundary():
    image, scores, pred, _ = _scene(size=256)  # scale 1: panel pixels map one to one
    out = overlay_image(image, scores, pred, 0.0, 1.0)
    layout = overlay_layout(image.shape, 3)
    assert layout.scale == 1
    assert out.shape == layout.shape and out.dtype == np.uint8
    top, left = layout.panels[0]
    gray = np.rint(np.asarray(image, np.float64) * 255).astype(np.uint8)
    np.testing.assert_array_equal(out[top : top + 256, left : left + 256, 0], gray)
    top, left = layout.panels[2]
    panel = out[top : top + 256, left : left + 256]
    red = np.all(panel == PREDICTED_COLOR, axis=2)
    np.testing.assert_array_equal(red, mask_contour(pred))
    # Outside the contour, the third panel is the plain image.
    np.testing.assert_array_equal(panel[~red, 0], gray[~red])
    # The heat-map panel is a blend: where the score is high it is warmer than the gray image.
    top, left = layout.panels[1]
    heat = out[top : top + 256, left : left + 256].astype(int)
    assert heat[20, 30, 0] > gray[20, 30] + 40


def test_overlay_upscales_small_images_and_draws_truth_in_its_own_colour():
    image, scores, pred, truth = _scene(size=64)
    out = overlay_image(image, scores[::4, ::4], pred, 0.0, 1.0, true_mask=truth)  # patch-sized map is resized
    layout = overlay_layout(image.shape, 3)
    assert layout.scale == 4 and out.shape == layout.shape
    top, left = layout.panels[2]
    ph, pw = layout.panel_shape
    panel = out[top : top + ph, left : left + pw]
    big_pred = np.kron(pred, np.ones((4, 4), dtype=bool))
    big_truth = np.kron(truth, np.ones((4, 4), dtype=bool))
    red = np.all(panel == PREDICTED_COLOR, axis=2)
    cyan = np.all(panel == TRUTH_COLOR, axis=2)
    assert red.any() and cyan.any()
    np.testing.assert_array_equal(red, mask_contour(big_pred, thickness=2))
    np.testing.assert_array_equal(cyan, mask_contour(big_truth, thickness=2))  # the masks do not touch
    # Without any mask: two panels only.
    two = overlay_image(image, scores, None, 0.0, 1.0)
    assert two.shape == overlay_layout(image.shape, 2).shape


def test_overlay_accepts_rgb_and_uint8_and_rejects_bad_input():
    image, scores, pred, _ = _scene(size=32)
    rgb = np.repeat((image * 255).astype(np.uint8)[:, :, None], 3, axis=2)
    assert overlay_image(rgb, scores, pred, 0.0, 1.0).ndim == 3
    with pytest.raises(InputError, match="mask"):
        overlay_image(image, scores, pred[:10], 0.0, 1.0)
    with pytest.raises(InputError, match="alpha"):
        overlay_image(image, scores, pred, 0.0, 1.0, alpha=2.0)
    with pytest.raises(InputError, match="vmax"):
        overlay_image(image, scores, pred, 1.0, 0.0)


def test_save_png_round_trip_and_atomic(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (10, 12, 3), dtype=np.uint8)
    save_png(tmp_path / "sub" / "a.png", rgb)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "sub" / "a.png")), rgb)
    save_png(tmp_path / "m.png", np.eye(4, dtype=bool))
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "m.png")), np.eye(4, dtype=np.uint8) * 255)
    with pytest.raises(InputError):
        save_png(tmp_path / "bad.png", np.zeros((2, 2, 2, 2), dtype=np.uint8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.png", "sub"]


def test_map_png16_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    scores = rng.uniform(0.1, 0.6, (20, 30))
    scores[0, 0], scores[0, 1] = -5.0, 9.0  # clipped to the range
    path = tmp_path / "map.png"
    save_map_png16(path, scores, 0.1, 0.6)
    with Image.open(path) as im:
        assert im.mode == "I;16" and im.size == (30, 20)
        raw = np.asarray(im)
    expected = np.rint(np.clip((scores - 0.1) / 0.5, 0, 1) * 65535).astype(np.uint16)
    np.testing.assert_array_equal(raw, expected)
    assert raw[0, 0] == 0 and raw[0, 1] == 65535
    back, vmin, vmax = read_map_png16(path)
    assert (vmin, vmax) == (0.1, 0.6)
    inner = np.ones_like(scores, dtype=bool)
    inner[0, :2] = False
    assert np.abs(back[inner] - scores[inner]).max() <= 0.5 / 65535 * 0.5 + 1e-7
    save_png(tmp_path / "plain.png", np.zeros((2, 2), np.uint8))
    with pytest.raises(InputError, match="save_map_png16"):
        read_map_png16(tmp_path / "plain.png")


def test_map_png16_values_in_blocks_with_nan_inf_and_a_constant_map(tmp_path, monkeypatch):
    """The 16-bit values are the float64 formula's, in place block by block: NaN -> 0, -inf -> 0, inf -> 65535."""
    import normdino.io.rendering as rendering

    monkeypatch.setattr(rendering, "_MAP_BLOCK_PIXELS", 7)  # many blocks, the last one short
    rng = np.random.default_rng(2)
    scores = rng.uniform(-0.2, 1.2, (9, 13)).astype(np.float32)
    scores[0, :4] = [np.nan, np.inf, -np.inf, 0.5]
    for array, (lo, hi) in ((scores, (0.0, 1.0)), (np.full((4, 5), 0.3, np.float32), (0.1, 0.6)),
                            (scores[:1], (-0.5, 2.0)), (scores[:, :1], (0.2, 0.3))):
        save_map_png16(tmp_path / "m.png", array, lo, hi)
        with Image.open(tmp_path / "m.png") as im:
            raw = np.asarray(im)
        t = np.nan_to_num(np.clip((array.astype(np.float64) - lo) / (hi - lo), 0.0, 1.0), nan=0.0)
        np.testing.assert_array_equal(raw, np.rint(t * 65535).astype(np.uint16))
    assert raw.shape == (9, 1)
    save_map_png16(tmp_path / "m.png", scores, 0.0, 1.0)
    with Image.open(tmp_path / "m.png") as im:
        assert list(np.asarray(im)[0, :4]) == [0, 65535, 0, 32768]


def _edge_scenes():
    """(name, image, score map, mask, true mask) of images that stress the overlay's arithmetic and layout."""
    rng = np.random.default_rng(3)
    image, scores, pred, truth = _scene(size=48)
    nan_map = scores.copy()
    nan_map[::3, ::2] = np.nan
    nan_map[1, :5] = [np.inf, -np.inf, np.nan, 2.0, -1.0]
    row = rng.random((1, 9)).astype(np.float32)
    levels = rng.integers(0, 256, image.shape).astype(np.float32) / np.float32(255.0)
    big_levels = rng.integers(0, 256, (200, 180)).astype(np.float32) / np.float32(255.0)
    return [
        ("scene", image, scores, pred, truth),
        ("constant map", image, np.full(image.shape, 0.37), pred, None),
        ("nan and inf in the map", image, nan_map, pred, truth),
        ("tiny 1xN image", row, row * 0.8, row > 0.5, None),
        ("tiny Nx1 image", row.T, row.T, None, row.T > 0.3),
        ("empty mask", image, scores, np.zeros(image.shape, bool), None),
        ("mask everywhere", image, scores, np.ones(image.shape, bool), np.ones(image.shape, bool)),
        ("no masks", image, scores, None, None),
        ("uint8 image", (image * 255).astype(np.uint8), scores, pred, None),
        ("8-bit levels as read_image gives them, at scale 1", big_levels, rng.random((200, 180)) * 0.4,
         rng.random((200, 180)) > 0.8, rng.random((200, 180)) > 0.9),
        ("8-bit levels, no masks", big_levels, np.full((200, 180), np.nan), None, None),
        ("8-bit levels upscaled", levels, scores, pred, truth),
        ("8-bit levels, tiny 1xN", levels[:1, :5], scores[:1, :5], None, None),
        ("8-bit levels upscaled, NaN map", levels[:20, :20], nan_map[:20, :20], pred[:20, :20], None),
        ("uint16 image with NaN-free map", (image * 65535).astype(np.uint16), scores, pred, truth),
        ("float image with NaN and out-of-range values", np.where(pred, np.nan, image * 3 - 1), scores, pred, None),
        ("RGB image", rng.random((40, 30, 3)).astype(np.float32), rng.random((40, 30)), None, rng.random((40, 30)) > 0.7),
        ("patch-sized map", rng.random((96, 96)).astype(np.float32), rng.random((7, 7)), rng.random((96, 96)) > 0.9, None),
        ("wide image at scale 1", rng.random((20, 300)).astype(np.float32), rng.random((20, 300)), None, None),
    ]


@pytest.mark.parametrize("alpha", [0.5, 0.0, 1.0, 0.3])
def test_overlay_pixels_equal_the_plain_float_drawing(alpha, monkeypatch):
    """Every pixel equals the overlay drawn the plain way (float channels, one Pillow canvas): tests/io/overlay_reference.
    Images of 8-bit levels take the blend table, the others the float blend: both are covered."""
    import normdino.io.rendering as rendering
    from tests.io.overlay_reference import reference_overlay

    tables = []
    monkeypatch.setattr(rendering, "_blend_table", lambda a, real=rendering._blend_table: tables.append(a) or real(a))

    for name, image, scores, mask, truth in _edge_scenes():
        for vmin, vmax in ((0.0, 1.0), (0.2, 0.25), (-3.0, 1e-3)):
            out = overlay_image(image, scores, mask, vmin, vmax, alpha=alpha, true_mask=truth)
            expected = reference_overlay(image, scores, mask, vmin, vmax, alpha=alpha, true_mask=truth)
            assert out.shape == expected.shape and out.dtype == np.uint8, name
            assert np.array_equal(out, expected), (name, vmin, vmax, int((out != expected).any(axis=2).sum()))
    assert 0 < len(tables) < 3 * len(_edge_scenes())


def test_overlays_drawn_by_many_threads_at_once_equal_the_plain_drawing():
    """The fonts and drawn labels are shared between writer threads: drawing at once must change no pixel."""
    import sys
    from concurrent.futures import ThreadPoolExecutor

    from tests.io.overlay_reference import reference_overlay

    rng = np.random.default_rng(4)
    jobs = [(rng.random((24 + i % 5, 30)).astype(np.float32), rng.random((24 + i % 5, 30)), 0.01 * i, 0.5 + 0.37 * i)
            for i in range(48)]  # new labels (vmin, vmax) and sizes: most patches are drawn, not reused

    def draw(job):
        image, scores, vmin, vmax = job
        return overlay_image(image, scores, scores > 0.7, vmin, vmax, true_mask=scores > 0.9)

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        with ThreadPoolExecutor(8) as pool:
            at_once = list(pool.map(draw, jobs))
    finally:
        sys.setswitchinterval(old_interval)
    for (image, scores, vmin, vmax), out in zip(jobs, at_once):  # against fonts and text of its own, drawn serially
        np.testing.assert_array_equal(out, reference_overlay(image, scores, scores > 0.7, vmin, vmax,
                                                             true_mask=scores > 0.9))


def _parse_svg(text: str) -> ET.Element:
    root = ET.fromstring(text)
    assert root.tag == SVG + "svg"
    return root


def _group(root: ET.Element, gid: str) -> ET.Element:
    return next(g for g in root.iter(SVG + "g") if g.get("id") == gid)


def _path_points(group: ET.Element) -> np.ndarray:
    """The (x, y) vertices of the first path in a matplotlib SVG group (commands M/L, SVG coordinates)."""
    d = next(group.iter(SVG + "path")).get("d")
    numbers = [float(v) for v in d.replace("M", " ").replace("L", " ").replace("z", " ").split()]
    return np.array(numbers).reshape(-1, 2)


def test_svg_curve_is_well_formed_with_legend_and_curves_in_data_order():
    x = np.linspace(0, 1, 500)
    svg = svg_curve(x, x**0.3, "ROC <pixels> & more", "false positive rate", "true positive rate", diagonal=True,
                    label="dpmm", series=[("memory bank", x, x**0.5)], xlim=(0, 1), ylim=(0, 1))
    root = _parse_svg(svg)
    texts = [t.text for t in root.iter(SVG + "text")]
    assert "ROC <pixels> & more" in texts and "dpmm" in texts and "memory bank" in texts
    assert "false positive rate" in texts and "1.0" in texts
    chance, first, second = (_path_points(_group(root, g)) for g in ("chance", "curve-0", "curve-1"))
    # the chance line runs from the plot's bottom-left to its top-right corner: the frame of the data
    (left, bottom), (right, top) = chance[0], chance[-1]
    assert left < right and top < bottom  # SVG y grows downwards
    for points in (first, second):
        assert points[:, 0].min() >= left - 0.05 and points[:, 0].max() <= right + 0.05
        assert points[:, 1].min() >= top - 0.05 and points[:, 1].max() <= bottom + 0.05
        assert points[0] == pytest.approx([left, bottom], abs=0.06)
    # at x = 0.25, x**0.3 = 0.66 and x**0.5 = 0.5 of the plot's height (matplotlib may thin the vertices)
    at = left + 0.25 * (right - left)
    for points, expected in ((first, 0.25**0.3), (second, 0.5)):
        y = np.interp(at, points[:, 0], points[:, 1])
        assert (bottom - y) / (bottom - top) == pytest.approx(expected, abs=0.01)
    # Non-finite points are dropped, an empty chart still renders; no date or XML prolog in the markup.
    _parse_svg(svg_curve([0, np.nan, 1], [0, 1, np.inf], "t", "x", "y"))
    _parse_svg(svg_curve(None, None, "empty", "x", "y"))
    assert svg.startswith("<svg") and "<metadata>" not in svg
    with pytest.raises(InputError, match="same length"):
        svg_curve([0, 1], [0], "t", "x", "y")


def test_svg_histograms_well_formed():
    edges = np.linspace(0, 1, 11)
    root = _parse_svg(svg_histograms(np.arange(10), np.arange(10)[::-1], edges, "scores"))
    texts = [t.text for t in root.iter(SVG + "text")]
    assert "normal pixels (n=45)" in texts and "anomalous pixels (n=45)" in texts
    normal, anomalous = (_path_points(_group(root, f"histogram-{i}")) for i in range(2))
    # rising vs falling fractions: the normal histogram's last step is higher (smaller y) than its first
    tops_normal = np.unique(np.round(normal[:, 1], 3))
    assert normal[:, 1].min() < normal[:, 1].max() and anomalous[:, 1].min() < anomalous[:, 1].max()
    assert len(tops_normal) >= 10
    with pytest.raises(InputError, match="bin edges"):
        svg_histograms(np.ones(3), np.ones(3), edges, "bad")


def test_html_table_formats_escapes_and_aligns():
    rows = [{"method": "dpmm<1>", "auroc": 0.91234, "n": 137}, {"method": "bank", "auroc": None, "n": 43008}]
    table = html_table(rows, ["method", "auroc", "n"], {"auroc": ".3f"})
    assert "0.912" in table and "dpmm&lt;1&gt;" in table and "&mdash;" in table
    assert '<td class="num">43008</td>' in table and "<td>bank</td>" in table
    ET.fromstring(table.replace("&mdash;", "-"))


def test_html_report_contains_sections_warning_images_and_is_atomic(tmp_path):
    thumb = np.zeros((8, 8, 3), dtype=np.uint8)
    grid = image_grid_html([("case <1>", thumb)])
    assert png_data_uri(thumb) in grid and "case &lt;1&gt;" in grid
    chart = svg_curve([0, 1], [0, 1], "curve", "x", "y")
    path = tmp_path / "out" / "report.html"
    html_report(
        path,
        "Bench & co",
        [("Results", "<p>table</p>"), ("Curves", chart), ("Cases", grid)],
        warning="random backbone weights: quality numbers are meaningless",
    )
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and "<title>Bench &amp; co</title>" in text
    assert "random backbone weights: quality numbers are meaningless" in text and 'class="warning"' in text
    for heading in ("Results", "Curves", "Cases"):
        assert f"<h2>{heading}</h2>" in text
    assert "<svg" in text and "data:image/png;base64," in text
    assert not re.findall(r"(?:src|href)=\"https?://", text)  # self-contained: nothing fetched
    assert "http://" not in re.sub(r"http://www\.w3\.org/[\w/]+", "", text)  # only XML namespace names
    html_report(tmp_path / "plain.html", "t", [("Only", "<p>x</p>")])
    assert 'class="warning"' not in (tmp_path / "plain.html").read_text()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.html"]
