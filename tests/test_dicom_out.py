"""predict on a DICOM series writes a DICOM Segmentation and Parametric Map beside the NIfTI maps (issue 23):
the objects hold exactly the NIfTI mask and scores, frame by frame, on the source slices."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest

hd = pytest.importorskip("highdicom")
pydicom = pytest.importorskip("pydicom")
nib = pytest.importorskip("nibabel")

sys.path.insert(0, str(Path(__file__).parent / "io"))
from dicom_series import write_export, write_series  # noqa: E402

from normdino.io.phantoms import make_phantom  # noqa: E402
from normdino.io.slicing import SliceOptions  # noqa: E402
from normdino.io.writing import PredictionWriter  # noqa: E402


@pytest.fixture(scope="module")
def detector(tiny_dinov2_dir):
    from normdino.detector import AnomalyDetector

    rng = np.random.default_rng(0)
    images = [make_phantom(rng, size=32)[0] for _ in range(6)]
    return AnomalyDetector(method="anomalydino", backbone=str(tiny_dinov2_dir), image_size=28, cache_dir=None,
                           progress=False, val_fraction=0.34).fit(images)


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    rng = np.random.default_rng(1)
    pixels = np.stack([make_phantom(rng, size=32, lesions=1)[0] for _ in range(5)], axis=2)
    folder = tmp_path_factory.mktemp("dicom") / "flair"
    write_series(folder, (pixels * 1000).astype(np.int16))
    return folder


def _rows(folder: Path) -> list[dict]:
    with (folder / "scores.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def _frame_slices(ds, sources) -> list[int]:
    by_uid = {s.SOPInstanceUID: k for k, s in enumerate(sources)}
    return [by_uid[f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
            for f in ds.PerFrameFunctionalGroupsSequence]


def test_dicom_series_gets_a_segmentation_and_a_parametric_map_equal_to_the_nifti_maps(detector, series, tmp_path):
    from normdino.io.volumes import Volume

    out = tmp_path / "out"
    writer = PredictionWriter(detector, out, fpr=0.2, progress=False)
    writer.write_volume(series, SliceOptions(window=(0, 1000), slices=slice(1, 5)))
    writer.finish()
    row = _rows(out)[0]
    assert row["status"] == "ok" and row["dicom_seg"] == "flair_seg.dcm" and row["dicom_pmap"] == "flair_pmap.dcm"
    mask = np.asarray(nib.load(out / row["mask"]).dataobj)
    scores = np.asarray(nib.load(out / row["anomaly_map"]).dataobj)
    assert mask.any()
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in Volume.open(series).files]

    seg = hd.seg.segread(out / row["dicom_seg"])
    frames = _frame_slices(seg, sources)
    assert sorted(frames) == [k for k in range(5) if mask[:, :, k].any()]
    for n, k in enumerate(frames):
        np.testing.assert_array_equal(seg.pixel_array[n], mask[:, :, k])
        position = seg.PerFrameFunctionalGroupsSequence[n].PlanePositionSequence[0].ImagePositionPatient
        np.testing.assert_allclose([float(v) for v in position], [float(v) for v in sources[k].ImagePositionPatient])
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    from normdino import __version__

    assert algorithm.AlgorithmName == "normdino" and algorithm.AlgorithmVersion == __version__
    assert "anomalydino" in algorithm.AlgorithmParameters and "random_weights" in algorithm.AlgorithmParameters

    pmap = pydicom.dcmread(out / row["dicom_pmap"])
    frames = _frame_slices(pmap, sources)
    assert sorted(frames) == [1, 2, 3, 4]  # the scored slices (--slices 1:5)
    for n, k in enumerate(frames):
        np.testing.assert_array_equal(pmap.pixel_array[n], scores[:, :, k].astype(np.float32))
    assert pmap.StudyInstanceUID == seg.StudyInstanceUID == sources[0].StudyInstanceUID
    index = (out / "index.html").read_text()
    assert 'href="flair_seg.dcm">DICOM seg</a>' in index and 'href="flair_pmap.dcm">DICOM pmap</a>' in index


def test_dicom_out_none_and_nifti_inputs_write_no_dicom(detector, series, tmp_path):
    writer = PredictionWriter(detector, tmp_path / "none", progress=False, dicom_out=())
    writer.write_volume(series, SliceOptions(window=(0, 1000)))
    writer.finish()
    assert not list((tmp_path / "none").glob("*.dcm")) and _rows(tmp_path / "none")[0]["dicom_seg"] == ""
    nifti = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image((np.random.default_rng(0).random((32, 32, 3)) * 1000).astype(np.int16), np.eye(4)), nifti)
    writer = PredictionWriter(detector, tmp_path / "nifti", progress=False)
    writer.write_volume(nifti, SliceOptions())
    writer.finish()
    assert not list((tmp_path / "nifti").glob("*.dcm"))


def test_predict_writes_grouped_outputs_uid_columns_and_skipped_rows(detector, tmp_path_factory, tmp_path):
    from normdino.io.dicom_tree import SeriesFilter, known_series
    from normdino.io.inputs import resolve_inputs

    staging = tmp_path_factory.mktemp("pacs")
    root = staging / "export"
    uids = write_export(root, staging / "staging")
    inputs = resolve_inputs([root], SeriesFilter(modality="MR"))
    writer = PredictionWriter(detector, tmp_path / "out", progress=False, anonymize=True)
    writer.assign_names(inputs.volumes)
    writer.skip_unusable(inputs.unusable)
    for volume in inputs.volumes:
        writer.write_volume(volume, SliceOptions(window=(0, 1000)))
    writer.finish()
    with (tmp_path / "out" / "scores.csv").open(newline="") as f:
        rows = {r["series_uid"]: r for r in csv.DictReader(f)}
    assert set(rows) == {uids[k] for k in ("flair", "t1", "localizer")}  # the SR and the CT are not MR
    flair = rows[uids["flair"]]
    assert flair["status"] == "ok" and flair["anomaly_map"] == "patient-001/study-001/S003_AX_FLAIR_anomaly.nii.gz"
    assert (tmp_path / "out" / "patient-001" / "study-001" / "S003_AX_FLAIR_seg.dcm").is_file()
    assert flair["study_uid"] == known_series(next(v for v in inputs.volumes if str(v).rsplit("#", 1)[1] == uids["flair"])).study_uid
    assert rows[uids["localizer"]]["status"] == "skipped" and "localizer" in rows[uids["localizer"]]["message"]
    seg = pydicom.dcmread(tmp_path / "out" / flair["dicom_seg"])
    assert seg.PatientName == "" and seg.PatientIdentityRemoved == "YES"


def test_cli_fit_and_predict_on_a_pacs_export(tiny_dinov2_dir, tmp_path, capsys):
    from normdino.cli import main

    staging = tmp_path / "pacs"
    uids = write_export(staging / "export", staging / "staging")
    model = tmp_path / "m.normdino"
    assert main(["fit", str(staging / "export"), "-o", str(model), "--backbone", str(tiny_dinov2_dir),
                 "--image-size", "28", "--method", "anomalydino", "--series", "FLAIR", "--window=0,1000",
                 "--no-cache", "--quiet"]) == 0
    out = tmp_path / "out"
    assert main(["predict", str(model), str(staging / "export"), "-o", str(out), "--modality", "MR",
                 "--dicom-out", "seg", "--anonymize", "--strict", "--quiet"]) == 0  # the localizer is no failure
    rows = _rows(out)
    by_uid = {r["series_uid"]: r for r in rows}
    assert set(by_uid) == {uids["flair"], uids["t1"], uids["localizer"]}
    assert by_uid[uids["localizer"]]["status"] == "skipped" and by_uid[uids["localizer"]]["kind"] == "dicom"
    flair = by_uid[uids["flair"]]
    assert flair["dicom_seg"] == "patient-001/study-001/S003_AX_FLAIR_seg.dcm" and flair["dicom_pmap"] == ""
    assert pydicom.dcmread(out / flair["dicom_seg"]).PatientID == ""
    assert not list(out.rglob("*_pmap.dcm"))
    assert main(["predict", str(model), str(staging / "export"), "-o", str(tmp_path / "o2"), "--series", "DWI",
                 "--quiet"]) == 1
    assert "none of the 5 DICOM series" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(model), str(staging / "export"), "-o", str(tmp_path / "o3"), "--dicom-out", "rtstruct"])
    assert exit_info.value.code == 2 and "is not a choice" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


def test_evaluate_pairs_each_series_of_an_export_with_the_segmentation_that_references_it(detector, tmp_path):
    import json

    from pydicom.fileset import FileSet

    from normdino.evaluation.volumes import evaluate_volumes
    from normdino.io import dicom_results
    from normdino.io.volumes import Volume

    rng = np.random.default_rng(2)
    flair = write_series(tmp_path / "staging" / "flair", (np.stack(
        [make_phantom(rng, size=32, lesions=1)[0] for _ in range(4)], axis=2) * 1000).astype(np.int16))
    ct = write_series(tmp_path / "staging" / "ct", (rng.random((32, 32, 3)) * 900).astype(np.int16), modality="CT",
                      description="CT HEAD", series_number=2)
    with Volume.open(tmp_path / "staging" / "flair") as volume:
        truth = np.zeros(volume.shape, dtype=np.uint8)
        truth[10:20, 8:16, 1:3] = 1
        sources = dicom_results.read_sources(volume.files)
    seg = dicom_results.write_segmentation(tmp_path / "staging" / "truth.dcm", sources, truth,
                                           dicom_results.Algorithm(method="manual", version="1"))
    fileset = FileSet()
    for path in [*flair, *ct, seg]:
        fileset.add(pydicom.dcmread(path))
    fileset.write(tmp_path / "export")
    paths, rows = evaluate_volumes(detector, tmp_path / "export", SliceOptions(window=(0, 1000)), tmp_path / "report",
                                   progress=False)
    per_item = {item["volume"]: item for item in json.loads(paths["json"].read_text())["per_item"]}
    assert per_item["PID-0042/20240102_ACC42/S003_AX_FLAIR"]["mask_voxels"] == int(truth.sum())
    assert per_item["PID-0042/20240102_ACC42/S002_CT_HEAD"]["mask"] == ""
    assert 0 <= rows[0]["pixel_auroc"] <= 1 and rows[0]["n_volumes"] == 2


def test_a_series_without_the_uids_to_reference_gets_nifti_only_unless_dicom_was_asked_for(detector, tmp_path, caplog):
    import logging

    rng = np.random.default_rng(4)
    files = write_series(tmp_path / "bare", (rng.random((32, 32, 3)) * 900).astype(np.int16))
    for path in files:  # an export stripped of its frame of reference
        ds = pydicom.dcmread(path)
        del ds.FrameOfReferenceUID
        ds.save_as(path)
    with caplog.at_level(logging.WARNING, logger="normdino"):
        writer = PredictionWriter(detector, tmp_path / "default", progress=False)
        writer.write_volume(tmp_path / "bare", SliceOptions(window=(0, 1000)))
        writer.finish()
    row = _rows(tmp_path / "default")[0]
    assert row["status"] == "ok" and row["dicom_seg"] == "" and (tmp_path / "default" / row["anomaly_map"]).is_file()
    assert "lacks FrameOfReferenceUID" in caplog.text
    writer = PredictionWriter(detector, tmp_path / "asked", progress=False, dicom_out=("seg",))
    writer.write_volume(tmp_path / "bare", SliceOptions(window=(0, 1000)))
    writer.finish()
    row = _rows(tmp_path / "asked")[0]
    assert row["status"] == "skipped" and "lacks FrameOfReferenceUID" in row["message"]
    assert not list((tmp_path / "asked").glob("bare_*"))  # nothing half-written
