"""normdino.io.png: files any reader decodes to exactly the array written, with valid chunks, written atomically."""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from normdino.io import png


def _chunks(data: bytes) -> list[tuple[bytes, bytes, int]]:
    """(type, data, stored CRC) of each chunk of a PNG file, parsed by hand."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    out, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        out.append((kind, body, crc))
        pos += 12 + length
    return out


def _unfilter(raw: bytes, height: int, row_bytes: int, bpp: int) -> np.ndarray:
    """PNG scanlines (filter types none, sub, up) back to rows: an independent decoder for the filters used."""
    lines = np.frombuffer(raw, dtype=np.uint8).reshape(height, row_bytes + 1)
    rows = np.zeros((height, row_bytes), dtype=np.uint8)
    for y in range(height):
        kind, line = lines[y, 0], lines[y, 1:].astype(np.int64)
        if kind == 0:
            rows[y] = line
        elif kind == 2:
            rows[y] = (line + (rows[y - 1] if y else 0)) % 256
        elif kind == 1:
            for x in range(row_bytes):
                rows[y, x] = (line[x] + (rows[y, x - bpp] if x >= bpp else 0)) % 256
        else:
            raise AssertionError(f"unexpected filter type {kind}")
    return rows


@pytest.fixture(params=["isal", "zlib"])
def deflate(request, monkeypatch):
    """Each test runs with ISA-L's deflate (the fast extra) and with zlib's (without it)."""
    if request.param == "isal":
        module = pytest.importorskip("isal.isal_zlib")
    else:
        module = zlib
    monkeypatch.setattr(png, "_deflate", module)
    return request.param


ARRAYS = {
    "gray": lambda rng: rng.integers(0, 256, (13, 17), dtype=np.uint8),
    "rgb": lambda rng: rng.integers(0, 256, (9, 11, 3), dtype=np.uint8),
    "rgba": lambda rng: rng.integers(0, 256, (5, 4, 4), dtype=np.uint8),
    "gray16": lambda rng: rng.integers(0, 65536, (12, 10), dtype=np.uint16),
    "one row": lambda rng: rng.integers(0, 256, (1, 40, 3), dtype=np.uint8),
    "one column": lambda rng: rng.integers(0, 65536, (30, 1), dtype=np.uint16),
    "one pixel": lambda rng: np.array([[7]], dtype=np.uint8),
    "gray16 big-endian": lambda rng: rng.integers(0, 65536, (6, 9)).astype(">u2"),
    "gray16 not contiguous": lambda rng: rng.integers(0, 65536, (8, 12), dtype=np.uint16)[::2, ::3],
    "constant": lambda rng: np.full((20, 20, 3), 200, dtype=np.uint8),
}


@pytest.mark.parametrize("filter_type", [png.FILTER_NONE, png.FILTER_SUB, png.FILTER_UP])
@pytest.mark.parametrize("name", sorted(ARRAYS))
def test_files_decode_to_the_array_with_valid_chunks(name, filter_type, deflate, tmp_path, monkeypatch):
    array = ARRAYS[name](np.random.default_rng(0))
    monkeypatch.setattr(png, "BLOCK_BYTES", 8)  # several blocks of rows: the "up" filter must cross them
    path = tmp_path / "a.png"
    png.write_png(path, array, {"normdino:vmin": "0.25"}, filter_type=filter_type)
    data = path.read_bytes()
    with Image.open(path) as im:
        np.testing.assert_array_equal(np.asarray(im), array)
        assert im.text == {"normdino:vmin": "0.25"}
    chunks = _chunks(data)
    assert [k for k, _, _ in chunks][:2] == [b"IHDR", b"tEXt"] and chunks[-1][0] == b"IEND"
    assert all(zlib.crc32(body, zlib.crc32(kind)) == crc for kind, body, crc in chunks)
    raw = zlib.decompress(b"".join(body for kind, body, _ in chunks if kind == b"IDAT"))
    height, width = array.shape[:2]
    bpp = array.itemsize * (array.shape[2] if array.ndim == 3 else 1)
    rows = _unfilter(raw, height, width * bpp, bpp)
    expected = array.astype(">u2").view(np.uint8) if array.dtype.itemsize == 2 else array
    np.testing.assert_array_equal(rows, expected.reshape(height, -1))
    assert {line[0] for line in np.frombuffer(raw, np.uint8).reshape(height, -1)} == {filter_type}
    assert data == png.encode_png(array, {"normdino:vmin": "0.25"}, filter_type=filter_type)


def test_the_rows_do_not_depend_on_the_block_size(deflate, monkeypatch):
    """The deflate stream is fed in blocks of rows; how it is split must not change the decoded rows."""
    array = np.random.default_rng(1).integers(0, 256, (64, 50, 3), dtype=np.uint8)
    whole = png.encode_png(array)
    monkeypatch.setattr(png, "BLOCK_BYTES", 300)
    split = png.encode_png(array)
    idat = [b"".join(body for kind, body, _ in _chunks(d) if kind == b"IDAT") for d in (whole, split)]
    assert zlib.decompress(idat[0]) == zlib.decompress(idat[1])


@pytest.mark.parametrize("array", [np.zeros((3, 3, 2), np.uint8), np.zeros((3, 3, 3), np.uint16),
                                   np.zeros((0, 4), np.uint8), np.zeros((4, 4), np.float32), np.zeros(5, np.uint8)])
def test_arrays_that_are_no_image_are_refused_before_any_file_exists(array, tmp_path):
    with pytest.raises(ValueError, match="PNG"):
        png.write_png(tmp_path / "x.png", array)
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_filter_is_refused_before_any_file_exists(tmp_path):
    with pytest.raises(ValueError, match="filter type"):
        png.write_png(tmp_path / "x.png", np.zeros((2, 2), np.uint8), filter_type=4)
    assert list(tmp_path.iterdir()) == []
