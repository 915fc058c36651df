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
                 "--timing-images", "3", "--quiet"]) == 0
    row = json.loads((tmp_path / "ev" / "results.json").read_text(),
                     parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))["rows"][0]
    # runtime as for images (batch 1, backbone and scoring apart, 3 slices), the batched throughput apart
    assert row["timing_images"] == 3 and row["backbone_ms"] > 0 and row["scoring_ms"] > 0
    assert row["ms_per_sample"] == pytest.approx(row["backbone_ms"] + row["scoring_ms"], abs=2e-3)
    assert row["evaluation_ms_per_slice"] > 0 and row["peak_memory_mb"] > 0
    assert row["scoring_state_mb"] == round(row["n_prototypes"] * 32 * 4 / 2**20, 4)  # active means, dim 32
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


# ---------------------------------------------------------------------- masks said, checked, undefined shown (issue 21)
@pytest.fixture(scope="module")
def volume_model(tiny_dinov2_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("volume-model")
    (root / "train").mkdir()
    for i in range(2):
        _write_scan(root / "train" / f"healthy{i}.nii.gz", seed=i, with_mask=False)
    model = root / "model.normdino"
    assert main(["fit", str(root / "train"), "-o", str(model), "--backbone", str(tiny_dinov2_dir),
                 "--image-size", "56", "--epochs", "1", "--components", "8", "--no-cache", "--quiet"]) == 0
    return model


def _evaluate_in_a_process(model, data, out):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "normdino.cli", "evaluate", str(model), str(data), "--layout",
                           "volumes", "-o", str(out)], capture_output=True, text=True, timeout=300)


def test_scans_without_masks_are_named_and_undefined_metrics_are_shown_as_undefined(volume_model, tmp_path):
    data = tmp_path / "test"
    data.mkdir()
    _write_scan(data / "healthy.nii.gz", seed=12)  # a mask with no lesion voxel
    _write_scan(data / "forgotten.nii.gz", seed=13, lesions=2, with_mask=False)
    done = _evaluate_in_a_process(volume_model, data, tmp_path / "ev")
    assert done.returncode == 0, done.stderr
    assert "1 of 2 scans have no mask (*_mask): forgotten.nii.gz" in done.stderr
    assert "MetricUndefinedWarning" not in done.stderr and "metrics.py" not in done.stderr
    assert "AUROC is undefined when only one class is present" in done.stderr  # said once, as a plain line
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    row = results["rows"][0]
    assert row["pixel_auroc"] is None and row["dice_fpr5"] is None and row["dice_fpr1"] is None  # not 0.0
    assert "| dpmm | — | — | — | — | — |" in (tmp_path / "ev" / "results.md").read_text()
    assert "forgotten.nii.gz" in json.dumps(results)


@pytest.mark.parametrize("values, message", [((np.nan, 1.0), "holds NaN or infinite voxels"),
                                             ((7.5, 1.0), "is not binary (it holds 0 and 1, 7.5)"),
                                             ((2, 4), "is not binary (it holds 0 and 2, 4)")])
def test_masks_that_are_not_binary_are_refused(volume_model, tmp_path, capsys, values, message):
    data = tmp_path / "test"
    data.mkdir()
    _write_scan(data / "patient.nii.gz", seed=10, lesions=2)
    mask_path = data / "patient_mask.nii.gz"
    mask_image = nib.load(mask_path)
    mask = np.asarray(mask_image.dataobj).astype(np.float32)
    mask[..., 1][mask[..., 1] > 0] = values[0]
    mask[..., 2][mask[..., 2] > 0] = values[1]
    nib.save(nib.Nifti1Image(mask, mask_image.affine), mask_path)
    capsys.readouterr()
    assert main(["evaluate", str(volume_model), str(data), "--layout", "volumes", "-o", str(tmp_path / "ev"),
                 "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "patient_mask.nii.gz" in err[0], err
