"""Synthetic phantoms: determinism, ranges, lesion placement and masks, BMAD data set layout."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from normdino.errors import InputError
from normdino.io.phantoms import MIN_LESION_CONTRAST, make_phantom, phantom, write_phantom_dataset


def test_same_seed_same_phantom_and_different_seeds_differ():
    a, ma = make_phantom(np.random.default_rng(7), size=96, lesions=2)
    b, mb = make_phantom(np.random.default_rng(7), size=96, lesions=2)
    c, _ = make_phantom(np.random.default_rng(8), size=96, lesions=2)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ma, mb)
    assert np.abs(a - c).mean() > 0.01


@pytest.mark.parametrize("size", [64, 128])
def test_shapes_dtypes_ranges(size):
    image, mask = make_phantom(np.random.default_rng(0), size=size, lesions=1)
    assert image.shape == (size, size) and image.dtype == np.float32
    assert mask.shape == (size, size) and mask.dtype == np.uint8
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert set(np.unique(mask)) == {0, 1}


def test_healthy_phantom_has_empty_mask_and_head_like_structure():
    image, mask = make_phantom(np.random.default_rng(1), size=128)
    assert mask.sum() == 0
    # Dark background around a brighter head: corners are near zero, the centre region is tissue.
    assert image[:8, :8].mean() < 0.1
    assert image[48:80, 48:80].mean() > 0.2


def test_healthy_anatomy_varies():
    images = np.stack([make_phantom(np.random.default_rng(s), size=64)[0] for s in range(8)])
    assert images.std(axis=0).mean() > 0.03


@pytest.mark.parametrize("seed", range(6))
def test_lesions_inside_brain_and_mask_is_exactly_the_changed_pixels(seed):
    p = phantom(np.random.default_rng(seed), size=128, lesions=3)
    changed = p.image != p.healthy
    assert p.mask.sum() > 0
    np.testing.assert_array_equal(changed, p.mask.astype(bool))
    assert not (p.mask.astype(bool) & ~p.brain).any()
    # Every lesion pixel changes by enough to survive 8-bit quantisation.
    diff = np.abs(p.image - p.healthy)[p.mask.astype(bool)]
    assert diff.min() >= MIN_LESION_CONTRAST - 1e-6
    as8 = lambda a: np.rint(a * 255).astype(np.uint8)  # noqa: E731
    np.testing.assert_array_equal(as8(p.image) != as8(p.healthy), p.mask.astype(bool))


def test_lesions_leave_the_healthy_slice_unchanged():
    healthy, _ = make_phantom(np.random.default_rng(3), size=96, lesions=0)
    p = phantom(np.random.default_rng(3), size=96, lesions=2)
    np.testing.assert_array_equal(p.healthy, healthy)
    np.testing.assert_array_equal(p.image[p.mask == 0], healthy[p.mask == 0])


def test_invalid_arguments_raise_input_error():
    with pytest.raises(InputError, match="size"):
        make_phantom(np.random.default_rng(0), size=8)
    with pytest.raises(InputError, match="lesions"):
        make_phantom(np.random.default_rng(0), lesions=-1)
    with pytest.raises(InputError, match="n_train"):
        write_phantom_dataset(Path("/nonexistent"), n_train=-1)


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.png"))


def test_dataset_layout_counts_masks_and_determinism(tmp_path):
    counts = dict(n_train=5, n_valid=3, n_test_normal=2, n_test_anomalous=4, size=64)
    root = write_phantom_dataset(tmp_path / "a", seed=11, **counts)
    assert root == tmp_path / "a"
    expected = {
        "train/good": 5,
        "valid/good/img": 3,
        "valid/Ungood/img": 3,
        "valid/Ungood/label": 3,
        "test/good/img": 2,
        "test/Ungood/img": 4,
        "test/Ungood/label": 4,
    }
    for folder, n in expected.items():
        assert len(_names(root / folder)) == n, folder
    for split in ("valid", "test"):
        assert _names(root / split / "Ungood" / "img") == _names(root / split / "Ungood" / "label")
        for name in _names(root / split / "Ungood" / "label"):
            img = Image.open(root / split / "Ungood" / "img" / name)
            label = np.asarray(Image.open(root / split / "Ungood" / "label" / name))
            assert img.mode == "L" and img.size == (64, 64) and label.shape == (64, 64)
            assert set(np.unique(label)) == {0, 255}
    good = np.asarray(Image.open(root / "train" / "good" / _names(root / "train" / "good")[0]))
    assert good.dtype == np.uint8 and good.shape == (64, 64)

    again = write_phantom_dataset(tmp_path / "b", seed=11, **counts)
    other = write_phantom_dataset(tmp_path / "c", seed=12, **counts)
    files = sorted(p.relative_to(root) for p in root.rglob("*.png"))
    assert files == sorted(p.relative_to(again) for p in again.rglob("*.png"))
    for rel in files:
        assert (root / rel).read_bytes() == (again / rel).read_bytes(), rel
    assert any((root / rel).read_bytes() != (other / rel).read_bytes() for rel in files)
    assert not list(root.rglob("*.tmp"))
