"""Dataset readers on tiny fixtures of each layout, and their errors."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from normdino.evaluation.datasets import Dataset, detect_layout, load_dataset, load_folders
from normdino.errors import InputError


def _png(path: Path, size=(12, 10), value=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0]), value, dtype=np.uint8)).save(path)
    return path


def _make(root: Path, train: str, splits: dict[str, tuple[str, str, str]], n_train=3, n_good=2, n_bad=2) -> dict:
    """Write images under the given relative folders; return the expected file sets."""
    expected = {"train": {_png(root / train / f"t{i}.png") for i in range(n_train)}}
    for split, (good, bad, label) in splits.items():
        expected[f"{split}_good"] = {_png(root / good / f"{split}_g{i}.png") for i in range(n_good)}
        bad_images = {_png(root / bad / f"{split}_b{i}.png") for i in range(n_bad)}
        expected[f"{split}_bad"] = {(p, _png(root / label / p.name, value=255)) for p in bad_images}
    return expected


def _check(dataset: Dataset, expected: dict, split_names=("valid", "test")) -> None:
    assert set(dataset.train) == expected["train"]
    for split, key in zip(("valid", "test"), split_names):
        samples = getattr(dataset, split)
        assert {s.image for s in samples if s.label == 0} == expected[f"{key}_good"]
        assert all(s.mask is None for s in samples if s.label == 0)
        assert {(s.image, s.mask) for s in samples if s.label == 1} == expected[f"{key}_bad"]


def test_bmad_brain(tmp_path):
    expected = _make(tmp_path, "train/good", {s: (f"{s}/good/img", f"{s}/Ungood/img", f"{s}/Ungood/label") for s in ("valid", "test")})
    assert detect_layout(tmp_path) == "bmad-brain"
    dataset = load_dataset(tmp_path)
    _check(dataset, expected)
    assert dataset.layout == "bmad-brain" and dataset.name == tmp_path.name
    assert dataset.summary() == {"train": 3, "valid_normal": 2, "valid_anomalous": 2, "test_normal": 2, "test_anomalous": 2}
    assert dataset.evaluation == dataset.test and {s.image for s in dataset.healthy_validation} == expected["valid_good"]


def test_bmad_brain_with_train_img_subfolder_and_valid_only(tmp_path):
    expected = _make(tmp_path, "train/good/img", {"valid": ("valid/good/img", "valid/Ungood/img", "valid/Ungood/label")})
    dataset = load_dataset(tmp_path, layout="bmad-brain")
    assert set(dataset.train) == expected["train"] and dataset.test == []
    assert dataset.evaluation == dataset.valid  # lgg-flair: thresholds and metrics both on valid


def test_bmad_liver(tmp_path):
    expected = _make(tmp_path, "train/good", {s: (f"{s}/img/good", f"{s}/img/Ungood", f"{s}/label/Ungood") for s in ("valid", "test")})
    assert detect_layout(tmp_path) == "bmad-liver"
    _check(load_dataset(tmp_path), expected)


def test_bmad_resc(tmp_path):
    expected = _make(
        tmp_path,
        "Train/train/good",
        {"val": ("Val/val/good", "Val/val/Ungood", "Val/val_label/Ungood"),
         "test": ("Test/test/good", "Test/test/Ungood", "Test/test_label/Ungood")},
    )
    assert detect_layout(tmp_path) == "bmad-resc"
    _check(load_dataset(tmp_path), expected, split_names=("val", "test"))


def test_folders_layout_and_mask_name_matching(tmp_path):
    train = {_png(tmp_path / "train" / f"t{i}.png") for i in range(2)}
    normal = {_png(tmp_path / "normal" / f"n{i}.png") for i in range(2)}
    a = _png(tmp_path / "anomalous" / "a.png")
    b = _png(tmp_path / "anomalous" / "b.jpg")
    c = _png(tmp_path / "anomalous" / "c.png")
    masks = {a: _png(tmp_path / "masks" / "a.png"), b: _png(tmp_path / "masks" / "b.png"), c: _png(tmp_path / "masks" / "c_mask.png")}
    assert detect_layout(tmp_path) == "folders"
    dataset = load_dataset(tmp_path)
    assert set(dataset.train) == train and dataset.valid == []
    assert {s.image for s in dataset.test if s.label == 0} == normal
    assert {s.image: s.mask for s in dataset.test if s.label == 1} == masks
    assert {s.image for s in dataset.healthy_validation} == normal
    direct = load_folders(tmp_path / "normal", tmp_path / "anomalous", tmp_path / "masks")
    assert direct.train == [] and direct.test == dataset.test


def test_missing_mask_names_the_image(tmp_path):
    _make(tmp_path, "train/good", {"valid": ("valid/good/img", "valid/Ungood/img", "valid/Ungood/label")})
    orphan = _png(tmp_path / "valid" / "Ungood" / "img" / "orphan.png")
    with pytest.raises(InputError, match="orphan.png has no mask"):
        load_dataset(tmp_path)


def test_size_mismatch_names_both_files(tmp_path):
    _png(tmp_path / "train" / "good" / "t.png")
    image = _png(tmp_path / "test" / "img" / "Ungood" / "x.png", size=(12, 10))
    mask = _png(tmp_path / "test" / "label" / "Ungood" / "x.png", size=(10, 12))
    with pytest.raises(InputError) as info:
        load_dataset(tmp_path, layout="bmad-liver")
    assert str(image) in str(info.value) and str(mask) in str(info.value)
    assert load_dataset(tmp_path, layout="bmad-liver", check_sizes=False).test[0].mask == mask


def test_unreadable_mask_header(tmp_path):
    _png(tmp_path / "anomalous" / "x.png")
    bad = tmp_path / "masks" / "x.png"
    bad.parent.mkdir()
    bad.write_bytes(b"not an image")
    with pytest.raises(InputError, match="x.png"):
        load_folders(None, tmp_path / "anomalous", tmp_path / "masks")


def test_errors_for_bad_roots(tmp_path):
    with pytest.raises(InputError, match="not a folder"):
        load_dataset(tmp_path / "missing")
    with pytest.raises(InputError, match="Cannot tell the layout"):
        load_dataset(tmp_path)
    with pytest.raises(InputError, match="Unknown layout"):
        load_dataset(tmp_path, layout="mvtec")
    (tmp_path / "train" / "good").mkdir(parents=True)
    with pytest.raises(InputError, match="No images found"):
        load_dataset(tmp_path, layout="bmad-brain")
    _png(tmp_path / "anomalous" / "a.png")
    with pytest.raises(InputError, match="need masks"):
        load_folders(None, tmp_path / "anomalous")


@pytest.mark.shared_data
def test_lgg_flair(lgg_flair):
    dataset = load_dataset(lgg_flair)
    assert dataset.layout == "bmad-brain"
    assert dataset.summary() == {"train": 1338, "valid_normal": 429, "valid_anomalous": 233, "test_normal": 0, "test_anomalous": 0}
    assert all(s.mask is not None and s.mask.name == s.image.name for s in dataset.valid if s.label == 1)
