"""Token cache: computed once, reused bit-identically, invalidated by content, order and settings."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from normdino.features.backbone import Backbone
from normdino.features.cache import extract_tokens
from normdino.errors import InputError


@pytest.fixture
def images(tmp_path):
    """Four small 8-bit PNGs of different sizes."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    paths = []
    for i in range(4):
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, size=(20 + 3 * i, 24), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def backbone(tiny_dinov2_dir):
    return Backbone.from_pretrained(tiny_dinov2_dir, image_size=56)


def _count_computations(monkeypatch, backbone):
    """Record how many images the backbone encodes."""
    seen = []
    original = backbone.iter_encoded

    def counting(images, *args, **kwargs):
        seen.extend(images)
        return original(images, *args, **kwargs)

    monkeypatch.setattr(backbone, "iter_encoded", counting)
    return seen


def _npy_files(folder):
    return sorted(folder.glob("*.npy"))


def test_without_cache_returns_float16_of_embed_images(backbone, images):
    tokens = extract_tokens(backbone, images, progress=False, batch_size=3)
    assert tokens.shape == (4, 4, 4, 32) and tokens.dtype == np.float16
    expected = backbone.embed_images(images, batch_size=3, progress=False).half().numpy()
    np.testing.assert_array_equal(tokens, expected)


def test_cache_is_reused_bit_identically(backbone, images, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = np.array(extract_tokens(backbone, images, cache_dir=cache, progress=False))
    computed = _count_computations(monkeypatch, backbone)
    second = extract_tokens(backbone, images, cache_dir=cache, progress=False)
    assert computed == []
    assert isinstance(second, np.memmap) and not second.flags.writeable
    np.testing.assert_array_equal(second, first)
    assert first.tobytes() == np.asarray(second).tobytes()
    np.testing.assert_array_equal(first, extract_tokens(backbone, images, progress=False))
    assert len(_npy_files(cache)) == 1 and len(list(cache.glob("*.json"))) == 1
    assert not list(cache.glob(".*tmp"))  # atomic writes leave no temporaries


def test_renamed_files_keep_the_cache_changed_content_or_order_does_not(backbone, images, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    original = np.array(extract_tokens(backbone, images, cache_dir=cache, progress=False))
    computed = _count_computations(monkeypatch, backbone)

    renamed = images[0].with_name("renamed.png")
    images[0].rename(renamed)
    extract_tokens(backbone, [renamed, *images[1:]], cache_dir=cache, progress=False)
    assert computed == []

    reordered = extract_tokens(backbone, [*images[1:], renamed], cache_dir=cache, progress=False)
    assert len(computed) == 4
    np.testing.assert_array_equal(reordered[-1], original[0])

    Image.fromarray(np.zeros((20, 24), dtype=np.uint8)).save(images[1])
    changed = extract_tokens(backbone, [renamed, *images[1:]], cache_dir=cache, progress=False)
    assert len(computed) == 8 and len(_npy_files(cache)) == 3
    np.testing.assert_array_equal(changed[0], original[0])
    assert not np.array_equal(changed[1], original[1])


@pytest.mark.parametrize("setting", [dict(image_size=70), dict(layers=(1,)), dict(normalize=False)])
def test_a_changed_setting_recomputes(tiny_dinov2_dir, images, tmp_path, setting):
    cache = tmp_path / "cache"
    base = extract_tokens(Backbone.from_pretrained(tiny_dinov2_dir, image_size=56), images, cache, progress=False)
    other = Backbone.from_pretrained(tiny_dinov2_dir, **{"image_size": 56, **setting})
    changed = extract_tokens(other, images, cache, progress=False)
    assert len(_npy_files(cache)) == 2
    assert changed.shape != base.shape or not np.array_equal(changed, base)


def test_other_weights_recompute(tiny_dinov2_dir, tiny_dinov2_reg_dir, images, tmp_path):
    cache = tmp_path / "cache"
    extract_tokens(Backbone.from_pretrained(tiny_dinov2_dir, image_size=56), images, cache, progress=False)
    extract_tokens(Backbone.from_pretrained(tiny_dinov2_reg_dir, image_size=56), images, cache, progress=False)
    assert len(_npy_files(cache)) == 2


def test_corrupt_cache_file_is_recomputed(backbone, images, tmp_path, caplog):
    cache = tmp_path / "cache"
    good = np.array(extract_tokens(backbone, images, cache, progress=False))
    (target,) = _npy_files(cache)
    target.write_bytes(target.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="normdino.features.cache"):
        again = extract_tokens(backbone, images, cache, progress=False)
    assert "recomputing" in caplog.text
    np.testing.assert_array_equal(again, good)


def test_all_layers_are_cached_separately(tiny_dinov2_dir, images, tmp_path):
    backbone = Backbone.from_pretrained(tiny_dinov2_dir, image_size=56, layers=(1, 2))
    cache = tmp_path / "cache"
    last = extract_tokens(backbone, images, cache, progress=False)
    both = extract_tokens(backbone, images, cache, progress=False, all_layers=True)
    assert last.shape == (4, 4, 4, 32) and both.shape == (4, 2, 4, 4, 32)
    np.testing.assert_array_equal(both[:, 1], last)
    assert len(_npy_files(cache)) == 2


def test_bad_inputs_are_clear_errors(backbone, images, tmp_path):
    with pytest.raises(InputError, match="missing.png"):
        extract_tokens(backbone, [tmp_path / "missing.png"], tmp_path / "cache", progress=False)
    with pytest.raises(InputError, match="No images"):
        extract_tokens(backbone, [], progress=False)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"garbage")
    with pytest.raises(InputError, match="broken.png"):
        extract_tokens(backbone, [images[0], broken], tmp_path / "cache", progress=False)
    assert _npy_files(tmp_path / "cache") == []  # nothing half-written


@pytest.mark.shared_data
def test_real_slices_through_the_cache(backbone, lgg_flair, tmp_path):
    paths = sorted((lgg_flair / "train" / "good").glob("*.png"))[:3]
    tokens = extract_tokens(backbone, paths, tmp_path / "cache", progress=False)
    assert tokens.shape == (3, 4, 4, 32) and np.isfinite(tokens).all()
    np.testing.assert_allclose(np.linalg.norm(tokens.astype(np.float32), axis=-1), 1.0, atol=2e-3)
