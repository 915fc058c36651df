"""Finding the three BMAD sets under one root, in each layout variant seen in the wild (tiny tmp fixtures)."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from normdino.errors import InputError
from normdino.evaluation.datasets import find_bmad, load_dataset


def _png(path: Path, value=0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 6), value, np.uint8)).save(path)


def _brats(root: Path) -> Path:
    base = root / "BraTS2021_slice"
    _png(base / "train/good/b_1.png")
    for split in ("valid", "test"):
        _png(base / f"{split}/good/img/g_1.png")
        _png(base / f"{split}/good/label/g_1.png")  # BMAD ships empty labels for normal slices too
        _png(base / f"{split}/Ungood/img/u_1.png")
        _png(base / f"{split}/Ungood/label/u_1.png", 255)
    return base


def _liver(base: Path) -> Path:
    _png(base / "train/good/l_1.png")
    for split in ("valid", "test"):
        _png(base / f"{split}/img/good/g_1.png")
        _png(base / f"{split}/img/Ungood/u_1.png")
        _png(base / f"{split}/label/Ungood/u_1.png", 255)
    return base


def _resc(root: Path) -> Path:
    base = root / "RESC"
    _png(base / "Train/train/good/r_1.png")
    for upper, lower in (("Val", "val"), ("Test", "test")):
        _png(base / f"{upper}/{lower}/good/g_1.png")
        _png(base / f"{upper}/{lower}/Ungood/u_1.png")
        _png(base / f"{upper}/{lower}_label/Ungood/u_1.png", 255)
    return base


def test_all_three_sets_are_found_and_read(tmp_path):
    brats, liver, resc = _brats(tmp_path), _liver(tmp_path / "Liver"), _resc(tmp_path)
    found = find_bmad(tmp_path)
    assert found == {"brats": (brats, "bmad-brain"), "liver": (liver, "bmad-liver"), "resc": (resc, "bmad-resc")}
    for folder, layout in found.values():
        dataset = load_dataset(folder, layout)
        assert dataset.summary() == {"train": 1, "valid_normal": 1, "valid_anomalous": 1, "test_normal": 1,
                                     "test_anomalous": 1}
        assert all(s.mask is not None and s.mask.name == "u_1.png" for s in dataset.test if s.label == 1)


@pytest.mark.parametrize("where", ["Liver/hist_DIY", "hist_DIY"])
def test_liver_hist_diy_variant(tmp_path, where):
    liver = _liver(tmp_path / where)
    (tmp_path / "Liver").mkdir(exist_ok=True)  # a Liver folder without the layout itself
    assert find_bmad(tmp_path, ("liver",)) == {"liver": (liver, "bmad-liver")}


def test_plain_liver_wins_over_hist_diy_and_root_can_be_a_set(tmp_path):
    plain = _liver(tmp_path / "Liver")
    _liver(tmp_path / "Liver" / "hist_DIY")
    assert find_bmad(tmp_path, ("liver",))["liver"][0] == plain
    assert find_bmad(plain, ("liver",))["liver"][0] == plain


def test_missing_sets_are_named(tmp_path):
    _brats(tmp_path)
    with pytest.raises(InputError, match="no liver, resc data set under"):
        find_bmad(tmp_path)
    with pytest.raises(InputError, match="unknown BMAD set 'chest'"):
        find_bmad(tmp_path, ("chest",))
