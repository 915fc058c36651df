"""Reading images into float arrays and finding them on disk."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from normdino.errors import InputError
from normdino.io.reading import IMAGE_SUFFIXES, find_images, image_shape, read_image


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


def test_16bit_png_keeps_its_type_range_whatever_else_is_in_the_image(tmp_path, rng):
    pixels = rng.integers(100, 4096, size=(20, 20)).astype(np.uint16)  # 12-bit data in a 16-bit file
    image = read_image(_save(tmp_path / "s.png", pixels))
    assert image.dtype == np.float32 and image.shape == (20, 20)
    np.testing.assert_allclose(image, pixels / 65535.0, rtol=1e-6)
    # a bright lesion must not change the values of the healthy pixels (per-image min-max did)
    lesioned = pixels.copy()
    lesioned[:4, :4] = 30000
    with_lesion = read_image(_save(tmp_path / "l.png", lesioned))
    np.testing.assert_array_equal(with_lesion[4:], image[4:])


def test_signed_integer_images_are_refused_in_one_sentence(tmp_path):
    """By the int32 range, values 0..255000 all land in 0.5..0.50006: a 100 % mask, silently (issue 21)."""
    values = (np.arange(400, dtype=np.int32).reshape(20, 20) * 639)  # 0 .. 255 000
    with pytest.raises(InputError, match=r"s\.tif stores 32-bit signed integers \(values 0 to 254961\), which the 2D "
                                         r"intensity rule cannot fit"):
        read_image(_save(tmp_path / "s.tif", values))


def test_a_16bit_image_of_8bit_values_reads_dark_with_a_warning(tmp_path, caplog):
    values = np.arange(400, dtype=np.uint16).reshape(20, 20) % 256
    with caplog.at_level("WARNING", logger="normdino"):
        image = read_image(_save(tmp_path / "eight.png", values))
    np.testing.assert_allclose(image, values / 65535.0, rtol=1e-6)  # the rule itself is unchanged
    assert "eight.png is a 16-bit image whose values all lie in 0..255" in caplog.text and "nearly black" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="normdino"):
        read_image(_save(tmp_path / "twelve.png", values * 16))  # 12-bit data: dark by design, documented, no warning
    assert caplog.text == ""


def test_float_tiff_must_lie_in_unit_range_and_nan_counts_as_zero(tmp_path):
    values = np.linspace(0, 1, 400, dtype=np.float32).reshape(20, 20)
    values[3, 4] = np.nan
    image = read_image(_save(tmp_path / "f.tif", values))
    assert image[3, 4] == 0.0
    np.testing.assert_array_equal(np.delete(image.ravel(), 3 * 20 + 4), np.delete(values.ravel(), 3 * 20 + 4))
    with pytest.raises(InputError, match=r"wide\.tif is a float image with values from -3 to 5"):
        read_image(_save(tmp_path / "wide.tif", np.full((20, 20), 5.0, np.float32) - 8 * (np.arange(20) == 0)[:, None]))


def test_all_nan_tiff_is_refused_naming_the_file(tmp_path):
    with pytest.raises(InputError, match=r"nan\.tif holds no finite pixel value"):
        read_image(_save(tmp_path / "nan.tif", np.full((20, 20), np.nan, np.float32)))


def test_images_smaller_than_a_patch_are_read_with_a_warning(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="normdino"):
        read_image(_save(tmp_path / "five.png", np.zeros((5, 5), np.uint8)))
        assert "five.png is 5x5 pixels, smaller than one DINO patch" in caplog.text
        caplog.clear()
        read_image(_save(tmp_path / "ok.png", np.zeros((16, 40), np.uint8)))
        assert caplog.text == ""


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_is_refused_without_being_opened(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="not a regular file"):
        read_image(fifo)
    with pytest.raises(InputError, match="not a regular file"):
        image_shape(fifo)


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


# ---------------------------------------------------------------------- megapixel limit (issue 21)
def header_only_png(path, width, height):
    """A PNG whose header declares ``width`` x ``height`` 8-bit gray pixels and holds none: costs nothing to write,
    and is all PIL reads before its decompression-bomb check."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def test_a_decompression_bomb_is_the_megapixel_limit_speaking(tmp_path):
    bomb = header_only_png(tmp_path / "bomb.png", 30000, 30000)
    for read in (image_shape, read_image):
        with pytest.raises(InputError, match=r"bomb.png is larger than 179 megapixels, above the limit of 64 "
                                             r"megapixels") as caught:
            read(bomb, 64)
        assert "DecompressionBomb" not in str(caught.value) and "corrupt" not in str(caught.value)


def test_the_limit_is_checked_from_the_header_without_pil_warnings(tmp_path):
    import warnings

    big = header_only_png(tmp_path / "big.png", 12000, 12000)  # 144 MP: PIL only warns
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning would fail here
        with pytest.raises(InputError, match=r"12000x12000 \(144 megapixels\), above the limit of 64 megapixels"):
            image_shape(big, 64)
        with pytest.raises(InputError, match="above the limit of 64 megapixels"):
            read_image(big, 64)
        assert image_shape(big) == (12000, 12000)  # no limit of ours: the header is all it reads
