"""Reading images into float arrays and finding them on disk."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from normdino.errors import InputError
from normdino.io.reading import IMAGE_SUFFIXES, find_images, read_image


def _save(path, array, mode=None):
    image = Image.fromarray(array, mode=mode) if mode else Image.fromarray(array)
    image.save(path)
    return path


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_8bit_gray_keeps_absolute_scale(tmp_path, rng):
    pixels = rng.integers(0, 256, size=(7, 9), dtype=np.uint8)
    image = read_image(_save(tmp_path / "g.png", pixels))
    assert image.dtype == np.float32 and image.shape == (7, 9)
    np.testing.assert_array_equal(image, pixels.astype(np.float32) / 255)


def test_rgb_and_rgba_drop_alpha(tmp_path, rng):
    rgba = rng.integers(0, 256, size=(5, 6, 4), dtype=np.uint8)
    rgb = read_image(_save(tmp_path / "c.png", np.ascontiguousarray(rgba[..., :3])))
    with_alpha = read_image(_save(tmp_path / "a.png", rgba))
    assert rgb.shape == with_alpha.shape == (5, 6, 3)
    np.testing.assert_array_equal(with_alpha, rgba[..., :3] / np.float32(255))
    np.testing.assert_array_equal(rgb, with_alpha)


def test_gray_with_alpha_is_gray(tmp_path, rng):
    la = rng.integers(0, 256, size=(4, 4, 2), dtype=np.uint8)
    image = read_image(_save(tmp_path / "la.png", la, mode="LA"))
    assert image.shape == (4, 4)
    np.testing.assert_array_equal(image, la[..., 0] / np.float32(255))


def test_palette_image_becomes_its_colours(tmp_path):
    palette_image = Image.new("P", (3, 2))
    palette_image.putpalette([255, 0, 0, 0, 128, 255] + [0] * 762)
    palette_image.putdata([0, 1, 0, 1, 1, 0])
    palette_image.save(tmp_path / "p.png")
    image = read_image(tmp_path / "p.png")
    assert image.shape == (2, 3, 3)
    np.testing.assert_allclose(image[0, 1], [0, 128 / 255, 1.0])
    np.testing.assert_allclose(image[0, 0], [1.0, 0, 0])


def test_16bit_png_is_min_max_rescaled(tmp_path, rng):
    pixels = rng.integers(100, 4096, size=(8, 8)).astype(np.uint16)  # 12-bit data in a 16-bit file
    image = read_image(_save(tmp_path / "s.png", pixels))
    expected = (pixels - pixels.min()) / (pixels.max() - pixels.min())
    assert image.dtype == np.float32 and image.shape == (8, 8)
    np.testing.assert_allclose(image, expected, atol=1e-6)
    assert image.min() == 0.0 and image.max() == 1.0


def test_float_tiff_is_min_max_rescaled_and_constant_is_zero(tmp_path):
    values = np.array([[-3.0, 0.0], [1.0, 5.0]], dtype=np.float32)
    np.testing.assert_allclose(read_image(_save(tmp_path / "f.tif", values)), (values + 3) / 8)
    constant = np.full((3, 3), 1000, dtype=np.uint16)
    np.testing.assert_array_equal(read_image(_save(tmp_path / "k.png", constant)), np.zeros((3, 3)))


def test_one_bit_and_one_pixel_images(tmp_path):
    bits = Image.new("1", (2, 2))
    bits.putpixel((1, 0), 1)
    bits.save(tmp_path / "b.png")
    np.testing.assert_array_equal(read_image(tmp_path / "b.png"), [[0, 1], [0, 0]])
    single = read_image(_save(tmp_path / "one.png", np.array([[200]], dtype=np.uint8)))
    assert single.shape == (1, 1) and single[0, 0] == pytest.approx(200 / 255)


@pytest.mark.parametrize("content", [b"", b"definitely not an image", b"\x89PNG\r\n\x1a\n" + b"\0" * 20])
def test_corrupt_file_is_a_clear_error(tmp_path, content):
    bad = tmp_path / "broken.png"
    bad.write_bytes(content)
    with pytest.raises(InputError, match="broken.png"):
        read_image(bad)


def test_truncated_png_is_a_clear_error(tmp_path, rng):
    good = _save(tmp_path / "full.png", rng.integers(0, 256, size=(64, 64), dtype=np.uint8))
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[:200])
    with pytest.raises(InputError, match="cut.png"):
        read_image(cut)


def test_missing_path_and_folder_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(InputError, match="is a folder"):
        read_image(tmp_path)


def test_find_images_folder_is_sorted_top_level_and_filtered(tmp_path):
    pixels = np.zeros((2, 2), dtype=np.uint8)
    for name in ["b.png", "a.PNG", "c.jpg", ".hidden.png"]:
        _save(tmp_path / name, pixels)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "sub").mkdir()
    _save(tmp_path / "sub" / "d.png", pixels)
    assert [p.name for p in find_images([tmp_path])] == ["a.PNG", "b.png", "c.jpg"]


def test_find_images_globs_files_and_duplicates(tmp_path):
    pixels = np.zeros((2, 2), dtype=np.uint8)
    (tmp_path / "sub").mkdir()
    for name in ["x1.png", "x2.png", "sub/y.png"]:
        _save(tmp_path / name, pixels)
    found = find_images([str(tmp_path / "x*.png"), tmp_path / "x1.png", str(tmp_path / "**" / "y.png")])
    assert [p.name for p in found] == ["x1.png", "x2.png", "y.png"]
    assert find_images(str(tmp_path / "x2.png")) == [tmp_path / "x2.png"]


def test_find_images_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        find_images([tmp_path / "missing"])
    (tmp_path / "empty" / "deeper").mkdir(parents=True)
    with pytest.raises(InputError, match=r"No images in .*empty \(looked for \.png.*not searched recursively"):
        find_images([tmp_path / "empty"])
    with pytest.raises(InputError, match="matches no images"):
        find_images([str(tmp_path / "*.png")])
    with pytest.raises(InputError, match="No input images"):
        find_images([])
    assert ".png" in IMAGE_SUFFIXES and ".tiff" in IMAGE_SUFFIXES


@pytest.mark.shared_data
def test_reads_real_lgg_flair_slices(lgg_flair):
    paths = find_images([lgg_flair / "train" / "good"])
    assert len(paths) > 1000 and paths == sorted(paths)
    image = read_image(paths[0])
    assert image.shape == (256, 256) and image.dtype == np.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
