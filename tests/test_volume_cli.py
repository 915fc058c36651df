"""Volumes through the command line: NIfTI in, NIfTI maps out in exactly the input's geometry; volume evaluation."""

import csv
import json

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")

from normdino.cli import main  # noqa: E402
from normdino.io.phantoms import make_phantom  # noqa: E402


def _oblique_affine():
    angle = np.deg2rad(12)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.9, 0.9, 3.0])
    affine[:3, 3] = [-20.0, 15.0, 7.5]
    return affine


def _write_scan(path, seed, lesions=0, n_slices=6, size=48, with_mask=True):
    rng = np.random.default_rng(seed)
    planes, masks = zip(*(make_phantom(rng, size=size, lesions=lesions if k in (2, 3) else 0) for k in range(n_slices)))
    volume = (np.stack(planes, axis=2) * 1000).astype(np.int16)
    nib.save(nib.Nifti1Image(volume, _oblique_affine()), path)
    if not with_mask:
        return path
    mask_path = path.parent / path.name.replace(".nii.gz", "_mask.nii.gz")
    nib.save(nib.Nifti1Image(np.stack(masks, axis=2).astype(np.uint8), _oblique_affine()), mask_path)
    return path


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    root = tmp_path_factory.mktemp("scans")
    (root / "train").mkdir()
    (root / "test").mkdir()
    for i in range(3):
        _write_scan(root / "train" / f"healthy{i}.nii.gz", seed=i, with_mask=False)
    _write_scan(root / "test" / "patient.nii.gz", seed=10, lesions=2)
    return root


@pytest.fixture(scope="module")
def volume_model(scans, tiny_dinov2_dir, tmp_path_factory):
    model = tmp_path_factory.mktemp("vm") / "model.normdino"
    assert main(["fit", str(scans / "train"), "-o", str(model), "--backbone", str(tiny_dinov2_dir),
                 "--image-size", "56", "--epochs", "1", "--components", "8", "--no-cache", "--quiet"]) == 0
    return model


def test_predict_writes_nifti_maps_with_the_input_geometry(volume_model, scans, tmp_path):
    scan = scans / "test" / "patient.nii.gz"
    assert main(["predict", str(volume_model), str(scan), "-o", str(tmp_path), "--slices", "1:5", "--quiet"]) == 0
    source = nib.load(scan)
    anomaly = nib.load(tmp_path / "patient_anomaly.nii.gz")
    mask = nib.load(tmp_path / "patient_mask.nii.gz")
    for out, dtype in ((anomaly, np.float32), (mask, np.uint8)):
        assert out.shape == source.shape
        np.testing.assert_array_equal(out.affine, source.affine)
        assert out.get_data_dtype() == dtype
    data = anomaly.get_fdata()
    assert (data[..., [0, 5]] == 0).all()  # outside --slices 1:5
    assert (data[..., 1:5] > 0).any()
    rows = list(csv.DictReader((tmp_path / "scores.csv").open()))
    assert rows[0]["kind"] == "volume" and rows[0]["anomaly_map"] == "patient_anomaly.nii.gz"
    kept = data[..., 1:5]
    top = np.sort(kept.ravel())[-int(round(0.01 * kept.size)):]
    assert float(rows[0]["score"]) == pytest.approx(top.mean(), rel=1e-4)


def test_evaluate_on_volumes(volume_model, scans, tmp_path):
    assert main(["evaluate", str(volume_model), str(scans / "test"), "--layout", "volumes", "-o", str(tmp_path),
                 "--quiet"]) == 0
    payload = json.loads((tmp_path / "results.json").read_text())
    row = payload["rows"][0]
    assert 0 <= row["pixel_auroc"] <= 1 and row["n_volumes"] == 1 and row["n_slices"] == 6
    assert payload["per_item"][0]["volume"] == "patient.nii.gz"
    assert payload["per_item"][0]["mask_voxels"] > 0


def test_mask_with_another_affine_is_refused(volume_model, scans, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    _write_scan(bad / "p.nii.gz", seed=4, lesions=1)
    mask = nib.load(bad / "p_mask.nii.gz")
    shifted = mask.affine.copy()
    shifted[0, 3] += 5
    nib.save(nib.Nifti1Image(np.asarray(mask.dataobj), shifted), bad / "p_mask.nii.gz")
    assert main(["evaluate", str(volume_model), str(bad), "--layout", "volumes", "-o", str(tmp_path / "o"), "--quiet"]) == 1
    assert "p_mask.nii.gz" in capsys.readouterr().err


def test_lgg_flair_volume_prediction_keeps_shape_and_affine(lgg_flair, volume_model, tmp_path):
    scan = sorted((lgg_flair / "volumes" / "valid").glob("*_flair.nii.gz"))[0]
    assert main(["predict", str(volume_model), str(scan), "-o", str(tmp_path), "--normalization", "dtype",
                 "--slices", "10:14", "--quiet"]) == 0
    source = nib.load(scan)
    out = nib.load(next(tmp_path.glob("*_anomaly.nii.gz")))
    assert out.shape == source.shape
    np.testing.assert_array_equal(out.affine, source.affine)


def test_a_dicom_series_in_gives_nifti_maps_out(volume_model, tmp_path):
    pytest.importorskip("pydicom")
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("io_test_volumes", Path(__file__).parent / "io" / "test_volumes.py")
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    write_dicom_series = helpers.write_dicom_series

    from normdino.io.volumes import Volume

    rng = np.random.default_rng(7)
    pixels = np.stack([make_phantom(rng, size=48, lesions=1)[0] for _ in range(4)], axis=2)
    series = tmp_path / "ct_series"
    write_dicom_series(series, (pixels * 1000).astype(np.int16))
    assert main(["predict", str(volume_model), str(series), "-o", str(tmp_path / "out"), "--window=0,1000",
                 "--quiet"]) == 0
    out = nib.load(tmp_path / "out" / "ct_series_anomaly.nii.gz")
    reference = Volume.open(series)
    assert out.shape == reference.shape == (48, 48, 4)
    np.testing.assert_allclose(out.affine, reference.affine, atol=1e-6)
    assert (out.get_fdata() > 0).all(axis=(0, 1)).any()


def test_predict_scales_volumes_as_the_training_volumes_were(scans, tiny_dinov2_dir, tmp_path):
    model = tmp_path / "windowed.normdino"
    assert main(["fit", str(scans / "train"), "-o", str(model), "--backbone", str(tiny_dinov2_dir), "--image-size", "56",
                 "--epochs", "1", "--components", "8", "--no-cache", "--window=0,600", "--quiet"]) == 0
    scan = str(scans / "test" / "patient.nii.gz")

    def predicted(*extra):
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        assert main(["predict", str(model), scan, "-o", str(out), "--quiet", *extra]) == 0
        return nib.load(out / "patient_anomaly.nii.gz").get_fdata()

    inherited = predicted()
    np.testing.assert_array_equal(inherited, predicted("--window=0,600"))
    assert not np.array_equal(inherited, predicted("--normalization", "percentile"))


# --------------------------------------------------------------------------- issue 11


def test_predict_axis_alone_keeps_the_models_window():
    from normdino.cli import build_parser
    from normdino.io.volume_flags import VolumeFlags

    def _slice_options(args, stored):
        return VolumeFlags(axis=args.axis, slices=args.slices, percentiles=args.percentiles, window=args.window,
                           normalization=args.normalization).slice_options(stored)

    stored = {"axis": "axial", "normalization": "window", "window": [-200.0, 250.0], "percentiles": "0.5,99.5",
              "image_intensity": "dtype"}
    args = build_parser().parse_args(["predict", "m.normdino", "scan.nii.gz", "-o", "out", "--axis", "1"])
    options = _slice_options(args, stored)
    assert options.axis == 1 and options.normalization == "window" and options.window == (-200.0, 250.0)
    args = build_parser().parse_args(["predict", "m.normdino", "scan.nii.gz", "-o", "out", "--percentiles", "2,98"])
    options = _slice_options(args, stored)
    assert options.normalization == "percentile" and options.window is None and options.percentiles == (2.0, 98.0)


def test_png_fitted_model_scores_uint8_volumes_on_the_png_scale(tiny_dinov2_dir, tmp_path, capsys):
    from PIL import Image

    from normdino.detector import AnomalyDetector
    from normdino.io.volume_flags import VolumeFlags
    from normdino.io.reading import read_image
    from normdino.io.volumes import Volume

    rng = np.random.default_rng(3)
    volume = (np.stack([make_phantom(rng, size=32)[0] for _ in range(4)], axis=2) * 255).round().astype(np.uint8)
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    for k in range(4):
        Image.fromarray(volume[:, :, k]).save(pngs / f"s{k}.png")
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "scan.nii.gz")
    model = tmp_path / "png.normdino"
    assert main(["fit", str(pngs), "-o", str(model), "--backbone", str(tiny_dinov2_dir), "--image-size", "28",
                 "--epochs", "1", "--components", "4", "--no-cache", "--quiet"]) == 0
    detector = AnomalyDetector.load(model)
    assert detector.volume_settings["image_intensity"] == "dtype"
    options = VolumeFlags().slice_options(detector.volume_settings)
    assert options.normalization == "dtype" and options.fallback == "percentile"
    with Volume.open(tmp_path / "scan.nii.gz") as scan:
        for k, plane in scan.iter_slices(options):  # exactly the values the model was trained on
            np.testing.assert_array_equal(plane, read_image(pngs / f"s{k}.png"))
    signed = tmp_path / "signed.nii.gz"
    nib.save(nib.Nifti1Image(volume.astype(np.int16), np.eye(4)), signed)
    capsys.readouterr()
    assert main(["predict", str(model), str(signed), "-o", str(tmp_path / "o"), "--no-overlays"]) == 0
    assert "signed.nii.gz stores int16 voxels, which have no fixed range" in capsys.readouterr().err


@pytest.mark.parametrize("selection", [["--slices", "100:200"], ["--min-foreground", "0.99"]])
def test_selections_that_select_nothing_exit_1(volume_model, scans, tmp_path, capsys, selection):
    scan = scans / "test" / "patient.nii.gz"
    assert main(["predict", str(volume_model), str(scan), "-o", str(tmp_path), "--quiet", *selection]) == 1
    err = capsys.readouterr().err
    assert "patient.nii.gz" in err and ("selects no slice" in err or "--min-foreground" in err)
    assert not list(tmp_path.glob("*_anomaly.nii.gz"))


def test_a_volume_fitted_model_warns_when_given_2d_files(volume_model, tmp_path, capsys):
    from PIL import Image

    image = tmp_path / "slice.png"
    Image.fromarray((np.random.default_rng(0).random((40, 40)) * 255).astype(np.uint8)).save(image)
    assert main(["predict", str(volume_model), str(image), "-o", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "fitted on volumes scaled by the 'percentile' rule" in err and "1 input(s) are 2D image files" in err


# ---------------------------------------------------------------------- issue 21
def test_a_two_d_nifti_gets_maps_of_its_own_shape(volume_model, tmp_path):
    plane = (make_phantom(np.random.default_rng(4), size=48)[0] * 1000).astype(np.int16)
    nib.save(nib.Nifti1Image(plane, np.eye(4)), tmp_path / "slice.nii.gz")
    assert main(["predict", str(volume_model), str(tmp_path / "slice.nii.gz"), "-o", str(tmp_path / "out"), "-q"]) == 0
    for name in ("slice_anomaly.nii.gz", "slice_mask.nii.gz"):
        assert nib.load(tmp_path / "out" / name).shape == (48, 48)


@pytest.mark.parametrize("field", ["pixdim", "sform"])
def test_a_nifti_with_nan_geometry_is_refused_in_one_sentence(volume_model, tmp_path, capsys, field):
    from tests.io.test_volumes import nifti_with_a_nan

    path = nifti_with_a_nan(tmp_path / "scan.nii", field)
    assert main(["predict", str(volume_model), str(path), "-o", str(tmp_path / "out"), "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "NaN or infinite voxel size or orientation" in err[0] and "LinAlgError" not in err[0]


def test_volume_maps_stream_through_the_detector_equal_to_each_slice_alone(volume_model, tmp_path, monkeypatch):
    """The NIfTI map of a volume is, slice for slice, bit for bit the map of predicting that slice on its own,
    and only a bounded number of slices is ever between reading and writing (issue 22)."""
    from normdino.detector import AnomalyDetector
    from normdino.io.volume_flags import VolumeFlags
    from normdino.io.volumes import Volume
    from normdino.io.writing import PredictionWriter

    scan = _write_scan(tmp_path / "long.nii.gz", seed=21, lesions=1, n_slices=40, size=32, with_mask=False)
    detector = AnomalyDetector.load(volume_model, progress=False, batch_size=2)
    options = VolumeFlags().slice_options(detector.volume_settings)
    read, written, most = [0], [0], [0]
    real_iter = Volume.iter_slices

    def counting_iter(self, *args, **kwargs):
        for item in real_iter(self, *args, **kwargs):
            read[0] += 1
            most[0] = max(most[0], read[0] - written[0])
            yield item

    monkeypatch.setattr(Volume, "iter_slices", counting_iter)
    writer = PredictionWriter(detector, tmp_path / "out", progress=False)
    writer.write_volume(scan, options, on_slice=lambda *a: written.__setitem__(0, written[0] + 1))
    monkeypatch.setattr(Volume, "iter_slices", real_iter)
    assert read[0] == written[0] == 40
    # the loader's look-ahead (2 x batch), the next two batches in the model (a CPU runs two at once) and the
    # one being scored, not the volume
    assert most[0] <= 2 * 2 + 2 * 2 + 2
    maps = np.asarray(nib.load(tmp_path / "out" / "long_anomaly.nii.gz").dataobj)
    with Volume.open(scan) as volume:
        for k, plane in volume.iter_slices(options):
            np.testing.assert_array_equal(maps[:, :, k], detector.predict_one(plane).pixel_map)


def test_a_uint8_volume_gets_the_maps_and_masks_of_its_slices_predicted_as_png_files(tiny_dinov2_dir, tmp_path):
    """The volume path changes no number: ``predict`` on a uint8 NIfTI (``--normalization dtype``) writes, slice
    for slice, bit for bit the maps and masks that ``predict`` writes for the same slices as PNG files, at the same
    batch size (another batch size may change the last bits; issue 22)."""
    from PIL import Image

    rng = np.random.default_rng(5)
    volume = (np.stack([make_phantom(rng, size=40, lesions=k % 2)[0] for k in range(7)], axis=2) * 255).round()
    volume = volume.astype(np.uint8)
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    for k in range(volume.shape[2]):
        Image.fromarray(volume[:, :, k]).save(pngs / f"s{k}.png")
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "scan.nii.gz")
    model = tmp_path / "png.normdino"
    assert main(["fit", str(pngs), "-o", str(model), "--backbone", str(tiny_dinov2_dir), "--image-size", "28",
                 "--epochs", "1", "--components", "4", "--no-cache", "--quiet"]) == 0
    assert main(["predict", str(model), str(pngs), "-o", str(tmp_path / "png-out"), "--batch-size", "2",
                 "--quiet"]) == 0
    assert main(["predict", str(model), str(tmp_path / "scan.nii.gz"), "-o", str(tmp_path / "nii-out"),
                 "--normalization", "dtype", "--batch-size", "2", "--quiet"]) == 0
    maps = np.asarray(nib.load(tmp_path / "nii-out" / "scan_anomaly.nii.gz").dataobj)
    masks = np.asarray(nib.load(tmp_path / "nii-out" / "scan_mask.nii.gz").dataobj)
    assert maps.dtype == np.float32 and masks.dtype == np.uint8
    for k in range(volume.shape[2]):
        np.testing.assert_array_equal(maps[:, :, k], np.load(tmp_path / "png-out" / f"s{k}_anomaly.npy"))
        np.testing.assert_array_equal(masks[:, :, k] * 255, np.asarray(Image.open(tmp_path / "png-out" / f"s{k}_mask.png")))
