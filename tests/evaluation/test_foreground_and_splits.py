"""The foreground rule on a phantom and on edge cases; patient grouping and out-of-sample calibration folds."""

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from normdino.errors import InputError
from normdino.evaluation.foreground import Foreground, auto_foreground, foreground_from_option
from normdino.evaluation.splits import calibration_folds, drop_training_groups, group_key
from normdino.io.phantoms import phantom


def test_auto_foreground_is_the_head_of_a_phantom():
    rng = np.random.default_rng(0)
    for _ in range(3):
        p = phantom(rng, size=96, lesions=2)
        fg = auto_foreground(p.image)
        assert fg[p.brain].all() and fg[p.mask > 0].all()  # dark skull and lesions inside stay foreground
        assert not fg[:6, :6].any() and not fg[-6:, -6:].any()  # air in the corners is background
        # the head ellipse (semi-axes 0.7-0.93 of the half-size) covers about half the image; outside it only dark noise
        assert 0.4 < fg.mean() < 0.75 and p.image[~fg].mean() < 0.05 and p.image[fg].mean() > 0.2
        assert ndimage.label(fg)[1] == 1


def test_auto_foreground_edge_cases():
    assert auto_foreground(np.zeros((20, 20))).all()  # all dark: everything, never nothing
    image = np.zeros((40, 40), np.float32)
    image[10:30, 10:30] = 0.8
    image[0, 0] = 1.0  # a lone bright speck is dropped (< 1 % of the image)
    fg = auto_foreground(image)
    assert fg[15, 15] and not fg[0, 0] and not fg[35, 35]
    assert auto_foreground(np.stack([image] * 3, -1)).sum() == fg.sum()  # colour: mean of the channels


def test_foreground_from_a_mask_folder(tmp_path):
    (tmp_path / "fg").mkdir()
    mask = np.zeros((8, 8), np.uint8)
    mask[2:6, 2:6] = 255
    Image.fromarray(mask).save(tmp_path / "fg" / "a_mask.png")
    rule = foreground_from_option(str(tmp_path / "fg"))
    assert rule.mask_for(tmp_path / "a.png").sum() == 16
    with pytest.raises(InputError, match="no foreground mask for b.png"):
        rule.mask_for(tmp_path / "b.png")
    assert foreground_from_option("none") is None and foreground_from_option("auto").mode == "auto"
    with pytest.raises(InputError, match="not a folder"):
        Foreground("folder", tmp_path / "missing")


@pytest.mark.parametrize("name, group", [
    ("TCGA_CS_4942_19970222_12.png", "TCGA_CS_4942_19970222"),
    ("BraTS2021_00012_slice_60.png", "BraTS2021_00012"),
    ("liver_7-103.png", "liver_7"),
    ("case.png", "case"),
    ("scan.nii.gz#z=12", "scan.nii.gz"),
])
def test_group_key(name, group):
    assert group_key(name) == group


def test_folds_never_calibrate_a_patient_on_itself():
    healthy = [f"P{p}_2000_{s}.png" for p in range(5) for s in range(p + 2)]
    evaluation = healthy + [f"P{p}_2000_{s}.png" for p in range(5) for s in range(50, 53)]
    folds = calibration_folds(healthy, evaluation, seed=1)
    assert folds.n_folds == 2
    for k in range(2):
        calibrating = {group_key(h) for i, h in enumerate(healthy) if folds.calibrates(i, k)}
        evaluated = {group_key(e) for e, f in zip(evaluation, folds.evaluation) if f == k}
        assert calibrating and evaluated and not calibrating & evaluated
    counts = [sum(f == k for f in folds.healthy) for k in range(2)]
    assert abs(counts[0] - counts[1]) <= 6  # balanced by healthy images
    disjoint = calibration_folds(["A_1.png"], ["B_1.png"])
    assert disjoint.n_folds == 1 and disjoint.calibrates(0, 0)


def test_training_patients_are_dropped_from_calibration(tmp_path):
    from normdino.evaluation.datasets import Sample

    healthy = [Sample(tmp_path / n, None, 0) for n in ("P1_3.png", "P2_4.png")]
    assert [s.image.name for s in drop_training_groups(healthy, [tmp_path / "P1_9.png"])] == ["P2_4.png"]
    with pytest.raises(InputError, match="hold out whole patients"):
        drop_training_groups(healthy, [tmp_path / "P1_1.png", tmp_path / "P2_1.png"])


def test_without_training_patients_keeps_lesions_and_other_patients(tmp_path):
    from normdino.evaluation.datasets import Dataset, Sample
    from normdino.evaluation.splits import without_training_patients

    valid = [Sample(tmp_path / "P1_3.png", None, 0), Sample(tmp_path / "P2_4.png", None, 0),
             Sample(tmp_path / "P1_5.png", tmp_path / "m.png", 1)]
    dataset = Dataset("d", [tmp_path / "P1_9.png"], valid)
    trimmed = without_training_patients(dataset, dataset.train)
    assert [s.image.name for s in trimmed.valid] == ["P2_4.png", "P1_5.png"] and len(dataset.valid) == 3
    with pytest.raises(InputError, match="hold out whole patients"):
        without_training_patients(dataset, [tmp_path / "P1_1.png", tmp_path / "P2_1.png"])
