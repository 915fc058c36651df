"""Volume evaluation against a direct computation: voxel AUROC/AUPR and Dice from predict's NIfTI maps."""

import json

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

nib = pytest.importorskip("nibabel")

from normdino.cli import main  # noqa: E402
from normdino.io.phantoms import make_phantom  # noqa: E402


def _write_scan(path, seed, lesions=0, n_slices=5, size=48, with_mask=True):
    rng = np.random.default_rng(seed)
    planes, masks = zip(*(make_phantom(rng, size=size, lesions=lesions if k in (1, 2, 3) else 0) for k in range(n_slices)))
    affine = np.diag([0.9, 0.9, 3.0, 1.0])
    nib.save(nib.Nifti1Image((np.stack(planes, axis=2) * 1000).astype(np.int16), affine), path)
    if with_mask:
        nib.save(nib.Nifti1Image(np.stack(masks, axis=2).astype(np.uint8), affine),
                 path.parent / path.name.replace(".nii.gz", "_mask.nii.gz"))


def test_volume_metrics_equal_a_direct_computation_on_the_predicted_maps(tiny_dinov2_dir, tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    for i in range(2):
        _write_scan(tmp_path / "train" / f"healthy{i}.nii.gz", seed=i, with_mask=False)
    _write_scan(tmp_path / "test" / "patient.nii.gz", seed=10, lesions=2)
    model = tmp_path / "model.normdino"
    assert main(["fit", str(tmp_path / "train"), "-o", str(model), "--backbone", str(tiny_dinov2_dir),
                 "--image-size", "56", "--epochs", "1", "--components", "8", "--no-cache", "--quiet"]) == 0
    assert main(["evaluate", str(model), str(tmp_path / "test"), "--layout", "volumes", "-o", str(tmp_path / "ev"),
                 "--quiet"]) == 0
    row = json.loads((tmp_path / "ev" / "results.json").read_text(),
                     parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))["rows"][0]
    assert main(["predict", str(model), str(tmp_path / "test" / "patient.nii.gz"), "-o", str(tmp_path / "pred"),
                 "--quiet"]) == 0
    anomaly = np.asarray(nib.load(tmp_path / "pred" / "patient_anomaly.nii.gz").dataobj, np.float32).ravel()
    truth = np.asarray(nib.load(tmp_path / "test" / "patient_mask.nii.gz").dataobj).ravel() > 0
    assert row["n_slices"] == 5 and truth.any()
    assert row["pixel_auroc"] == pytest.approx(roc_auc_score(truth, anomaly), abs=2e-3)
    assert row["pixel_aupr"] == pytest.approx(average_precision_score(truth, anomaly), abs=5e-3)
    from normdino.detector import AnomalyDetector

    threshold = AnomalyDetector.load(model).pixel_threshold(0.05)
    predicted = anomaly > threshold
    tp, fp, fn = (predicted & truth).sum(), (predicted & ~truth).sum(), (~predicted & truth).sum()
    assert row["dice_fpr5"] == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-6)
