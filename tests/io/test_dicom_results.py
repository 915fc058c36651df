"""DICOM Segmentation and Parametric Map of a result: read back with highdicom and pydicom, checked against the
source series (references, geometry per frame), the arrays they were made from, and highdicom's validation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

hd = pytest.importorskip("highdicom")
pydicom = pytest.importorskip("pydicom")

from normdino.errors import InputError  # noqa: E402
from normdino.io import dicom_results  # noqa: E402
from normdino.io.dicom_results import Algorithm, parse_dicom_out, read_sources  # noqa: E402
from normdino.io.volumes import Volume  # noqa: E402

from dicom_series import PATIENT, write_series  # noqa: E402

ALGORITHM = Algorithm(method="dpmm", version="9.8.7", parameters={"fpr": "0.05"})


def validate(path: Path) -> None:
    """highdicom's own checks on a re-read object: its IOD's mandatory modules hold their type 1 and 2 attributes."""
    from highdicom._standard_utils import check_required_attributes  # highdicom's validator of module attributes

    standard = Path(hd.__file__).parent / "_standard"
    iods = json.loads((standard / "sop_class_iod_map.json").read_text())
    modules = json.loads((standard / "iod_module_map.json").read_text())
    ds = pydicom.dcmread(path)
    checked = 0
    for module in modules[iods[ds.SOPClassUID]]:
        if module["usage"] == "M":
            check_required_attributes(ds, module["key"], recursive=False)
            checked += 1
    assert checked >= 10


@pytest.fixture
def series(tmp_path):
    rng = np.random.default_rng(0)
    pixels = (rng.random((20, 24, 6)) * 1000).astype(np.int16)
    oblique = (np.cos(0.3), np.sin(0.3), 0.0, 0.0, np.cos(0.2), -np.sin(0.2))
    write_series(tmp_path / "series", pixels, orientation=oblique, names="{k}")  # files without extension
    return tmp_path / "series"


def frame_sources(obj) -> list[str]:
    """The SOPInstanceUID of the source slice of each frame, from the per-frame derivation references."""
    return [str(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
            for f in obj.PerFrameFunctionalGroupsSequence]


def test_segmentation_references_geometry_pixels_and_validation(series, tmp_path):
    volume = Volume.open(series)
    sources = read_sources(volume.files)
    mask = np.zeros(volume.shape, dtype=np.uint8)
    mask[3:7, 5:12, 1] = 1
    mask[0, 0, 4] = 1  # frames 0, 2, 3 and 5 are empty
    path = dicom_results.write_segmentation(tmp_path / "seg.dcm", sources, mask, ALGORITHM)
    validate(path)
    seg = hd.seg.segread(path)
    source = sources[0]
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert seg.SeriesInstanceUID != source.SeriesInstanceUID and seg.SOPInstanceUID not in {
        s.SOPInstanceUID for s in sources}
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    referenced = {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {s.SOPInstanceUID for s in sources}
    assert str(seg.PatientName) == PATIENT["PatientName"] and seg.PatientID == PATIENT["PatientID"]
    segment = seg.SegmentSequence[0]
    assert segment.SegmentLabel == "anomaly" and segment.SegmentAlgorithmType == "AUTOMATIC"
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("normdino", "9.8.7")
    assert "dpmm" in algorithm.AlgorithmParameters
    by_uid = {s.SOPInstanceUID: k for k, s in enumerate(sources)}
    frames = [by_uid[uid] for uid in frame_sources(seg)]
    assert sorted(frames) == [1, 4]  # empty slices left out; each frame says which slice it covers
    pixels = seg.pixel_array
    for n, k in enumerate(frames):
        groups = seg.PerFrameFunctionalGroupsSequence[n]
        np.testing.assert_allclose([float(v) for v in groups.PlanePositionSequence[0].ImagePositionPatient],
                                   [float(v) for v in sources[k].ImagePositionPatient], atol=1e-4)
        orientation = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
        np.testing.assert_allclose([float(v) for v in orientation],
                                   [float(v) for v in sources[k].ImageOrientationPatient], atol=1e-6)
        np.testing.assert_array_equal(pixels[n], mask[:, :, k])


def test_parametric_map_holds_the_exact_scores_of_the_scored_frames(series, tmp_path):
    volume = Volume.open(series)
    sources = read_sources(volume.files)
    scores = np.random.default_rng(1).normal(0.3, 0.1, volume.shape).astype(np.float32)
    path = dicom_results.write_parametric_map(tmp_path / "pmap.dcm", sources, scores, [1, 2, 3], ALGORITHM,
                                              (0.1, 0.6))
    validate(path)
    pmap = hd.pm.ParametricMap.from_file(path)
    assert pmap.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"
    assert pmap.StudyInstanceUID == sources[0].StudyInstanceUID
    assert pmap.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert pmap.SeriesInstanceUID != sources[0].SeriesInstanceUID
    by_uid = {s.SOPInstanceUID: k for k, s in enumerate(sources)}
    frames = [by_uid[uid] for uid in frame_sources(pmap)]
    assert sorted(frames) == [1, 2, 3]
    raw = pydicom.dcmread(path)
    assert "FloatPixelData" in raw  # 32-bit floats, no rescaling: the scores themselves
    values = raw.pixel_array
    assert values.dtype == np.float32
    for n, k in enumerate(frames):
        position = raw.PerFrameFunctionalGroupsSequence[n].PlanePositionSequence[0].ImagePositionPatient
        np.testing.assert_allclose([float(v) for v in position], [float(v) for v in sources[k].ImagePositionPatient],
                                   atol=1e-4)
        np.testing.assert_array_equal(values[n], scores[:, :, k])
    mapping = raw.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert float(mapping.RealWorldValueSlope) == 1.0 and float(mapping.RealWorldValueIntercept) == 0.0


def test_anonymize_empties_patient_data_and_keeps_the_references(series, tmp_path):
    volume = Volume.open(series)
    sources = read_sources(volume.files, anonymize=True)
    mask = np.zeros(volume.shape, dtype=np.uint8)
    mask[2, 2, 2] = 1
    seg_path = dicom_results.write_segmentation(tmp_path / "seg.dcm", sources, mask, ALGORITHM, anonymize=True)
    pmap_path = dicom_results.write_parametric_map(tmp_path / "pmap.dcm", sources, mask.astype(np.float32), [2],
                                                   ALGORITHM, anonymize=True)
    for path in (seg_path, pmap_path):
        validate(path)
        raw = path.read_bytes()
        for value in ("Doe", "PID-0042", "19700101", "ACC42", "Ref^Doc", "20240102"):
            assert value.encode() not in raw, value
        ds = pydicom.dcmread(path)
        assert ds.PatientIdentityRemoved == "YES" and ds.PatientName == "" and ds.PatientID == ""
        assert ds.StudyInstanceUID == sources[0].StudyInstanceUID


def test_bad_requests_get_one_sentence(series, tmp_path):
    assert parse_dicom_out(None) == ("seg", "pmap")
    assert parse_dicom_out("pmap,seg") == ("seg", "pmap")
    assert parse_dicom_out("none") == ()
    with pytest.raises(InputError, match="--dicom-out 'rtstruct' is not a choice"):
        parse_dicom_out("rtstruct")
    volume = Volume.open(series)
    sources = read_sources(volume.files)
    with pytest.raises(InputError, match="6 slices"):
        dicom_results.write_segmentation(tmp_path / "seg.dcm", sources, np.zeros((20, 24, 5)), ALGORITHM)
    with pytest.raises(InputError, match="No slice"):
        dicom_results.write_parametric_map(tmp_path / "p.dcm", sources, np.zeros(volume.shape), [], ALGORITHM)
    nan = np.zeros(volume.shape, dtype=np.float32)
    nan[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        dicom_results.write_parametric_map(tmp_path / "p.dcm", sources, nan, [0], ALGORITHM)
    assert not list(tmp_path.glob("*.dcm")) and not list(tmp_path.glob(".*"))
    ds = pydicom.dcmread(volume.files[0])
    del ds.FrameOfReferenceUID
    ds.save_as(volume.files[0])
    with pytest.raises(InputError, match="lacks FrameOfReferenceUID"):
        read_sources(volume.files)


def test_an_empty_mask_gives_a_segmentation_with_one_empty_frame(series, tmp_path):
    volume = Volume.open(series)
    sources = read_sources(volume.files)
    path = dicom_results.write_segmentation(tmp_path / "seg.dcm", sources, np.zeros(volume.shape), ALGORITHM)
    validate(path)
    seg = hd.seg.segread(path)
    assert seg.NumberOfFrames >= 1 and not seg.pixel_array.any()


def test_a_segmentation_reads_back_onto_its_series_grid_and_nowhere_else(series, tmp_path):
    volume = Volume.open(series)
    sources = read_sources(volume.files)
    mask = np.zeros(volume.shape, dtype=np.uint8)
    mask[3:7, 5:12, 1] = 1
    mask[0:2, 0:3, 4] = 1
    path = dicom_results.write_segmentation(tmp_path / "seg.dcm", sources, mask, ALGORITHM)
    assert dicom_results.is_segmentation(path) and not dicom_results.is_segmentation(volume.files[0])
    np.testing.assert_array_equal(dicom_results.read_segmentation_mask(path, volume.files, volume.shape), mask)
    other = write_series(tmp_path / "other", np.zeros((20, 24, 6), dtype=np.int16), origin=(0.0, 0.0, 500.0))
    with pytest.raises(InputError, match="belongs to no slice of its series"):
        dicom_results.read_segmentation_mask(path, other, (20, 24, 6))
    with pytest.raises(InputError, match="was not made on this series"):
        dicom_results.read_segmentation_mask(path, other, (10, 24, 6))
