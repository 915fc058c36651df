"""PACS exports (issue 23): every series of a nested export, with a DICOMDIR and files without extension, is one
volume; filters pick series; non-image objects are skipped with a sentence; broken series get one sentence each."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("nibabel")

from dicom_series import write_export, write_series  # noqa: E402

from normdino.errors import InputError  # noqa: E402
from normdino.io.dicom_tree import SeriesFilter, export_name, find_series, known_series  # noqa: E402
from normdino.io.inputs import resolve_inputs  # noqa: E402
from normdino.io.volumes import Volume  # noqa: E402


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    root = tmp_path_factory.mktemp("pacs")
    uids = write_export(root / "export", root / "staging")
    return root / "export", uids


def _uid(path) -> str:
    return str(path).rsplit("#", 1)[1]


def test_every_series_of_an_export_is_found_and_non_images_are_skipped(export):
    root, uids = export
    assert (root / "DICOMDIR").is_file() and not list(root.rglob("*.dcm"))  # DICOMDIR layout, no extensions
    series = {s.uid: s for s in find_series(root)}
    assert set(series) == set(uids.values())
    assert series[uids["localizer"]].not_image == "a localizer (scout)"
    assert series[uids["sr"]].not_image == "a structured report (SR)"
    inputs = resolve_inputs([root])
    assert sorted(_uid(v) for v in inputs.volumes) == sorted(uids[k] for k in ("flair", "t1", "ct"))
    reasons = {_uid(source): message for source, message in inputs.unusable}
    assert set(reasons) == {uids["localizer"], uids["sr"]}
    assert "'Localizer'" in reasons[uids["localizer"]] and "is a localizer (scout), not an image volume" in \
        reasons[uids["localizer"]]
    assert "is a structured report (SR)" in reasons[uids["sr"]]


def test_a_series_of_an_export_reads_like_the_same_series_in_its_own_folder(export, tmp_path):
    root, uids = export
    flair = next(v for v in resolve_inputs([root]).volumes if _uid(v) == uids["flair"])
    assert not Path(flair).exists()
    alone = tmp_path / "flair"
    alone.mkdir()
    for path in known_series(flair).files:
        shutil.copy(path, alone / f"{path.name}.dcm")
    with Volume.open(flair) as volume, Volume.open(alone) as reference:
        assert volume.kind == "dicom" and volume.shape == reference.shape == (16, 16, 5)
        np.testing.assert_allclose(volume.affine, reference.affine)
        assert volume.info["series_uid"] == uids["flair"] and volume.info["series_description"] == "AX FLAIR"
        for (k, a), (_, b) in zip(volume.iter_slices(volume_options()), reference.iter_slices(volume_options())):
            np.testing.assert_array_equal(a, b)


def volume_options():
    from normdino.io.slicing import SliceOptions

    return SliceOptions(window=(0, 1000))


def test_series_and_modality_filters(export):
    root, uids = export
    assert [_uid(v) for v in resolve_inputs([root], SeriesFilter(description="flair")).volumes] == [uids["flair"]]
    assert [_uid(v) for v in resolve_inputs([root], SeriesFilter(modality="ct")).volumes] == [uids["ct"]]
    assert sorted(_uid(v) for v in resolve_inputs([root], SeriesFilter(description="^AX ")).volumes) == sorted(
        [uids["flair"], uids["t1"]])
    with pytest.raises(InputError, match=r"none of the 5 DICOM series in .* matches --series 'DWI' --modality MR "
                                         r"\(found: MR 'AX FLAIR'"):
        resolve_inputs([root], SeriesFilter(description="DWI", modality="MR"))
    with pytest.raises(InputError, match="--modality 'M/R' is not a DICOM modality"):
        SeriesFilter(modality="m/r")
    with pytest.raises(InputError, match=r"no input can be read: .*#[0-9.]+ is a structured report \(SR\)"):
        resolve_inputs([root], SeriesFilter(description="Report"))


def test_a_single_series_folder_keeps_its_name_and_a_mixed_folder_is_split(tmp_path):
    rng = np.random.default_rng(0)
    one = tmp_path / "one"
    write_series(one, (rng.random((8, 8, 3)) * 900).astype(np.int16))
    assert resolve_inputs([one]).volumes == [one]
    mixed = tmp_path / "mixed"
    write_series(mixed, (rng.random((8, 8, 3)) * 900).astype(np.int16), names="a{k}.dcm", description="A")
    write_series(mixed, (rng.random((8, 8, 4)) * 900).astype(np.int16), names="b{k}.dcm", description="B")
    volumes = resolve_inputs([mixed]).volumes
    assert len(volumes) == 2
    assert sorted(Volume.open(v).shape[2] for v in volumes) == [3, 4]


def test_export_names_group_by_patient_study_series_and_anonymize_numbers_them(export):
    root, uids = export
    series = {s.uid: s for s in find_series(root)}
    assert export_name(series[uids["flair"]]) == "PID-0042/20240102_ACC42/S003_AX_FLAIR"  # date, accession
    pseudonyms: dict[str, str] = {}
    assert export_name(series[uids["flair"]], True, pseudonyms) == "patient-001/study-001/S003_AX_FLAIR"
    assert export_name(series[uids["t1"]], True, pseudonyms) == "patient-001/study-001/S004_AX_T1"
    assert export_name(series[uids["ct"]], True, pseudonyms) == "patient-002/study-002/S002_CT_HEAD"


def test_broken_series_get_one_sentence_each(tmp_path, caplog):
    rng = np.random.default_rng(1)
    gap = tmp_path / "gap"
    files = write_series(gap, (rng.random((8, 8, 6)) * 900).astype(np.int16))
    files[3].unlink()
    with pytest.raises(InputError, match=r"misses slices: .* are 5 mm apart where its other slices are 2.5 mm apart"):
        Volume.open(gap)
    sizes = tmp_path / "sizes"
    uid = pydicom.uid.generate_uid()
    write_series(sizes, (rng.random((8, 8, 3)) * 900).astype(np.int16), series_uid=uid, names="a{k}.dcm")
    write_series(sizes, (rng.random((8, 10, 1)) * 900).astype(np.int16), series_uid=uid, names="b{k}.dcm",
                 origin=(-100.0, -80.0, 37.5))
    with pytest.raises(InputError, match="mixes slice sizes: .* is 8x10 pixels but .* is 8x8"):
        Volume.open(sizes)
    duplicated = tmp_path / "dup"
    files = write_series(duplicated, (rng.random((8, 8, 4)) * 900).astype(np.int16))
    shutil.copy(files[2], duplicated / "copy_of_slice.dcm")
    caplog.set_level(logging.WARNING)
    with Volume.open(duplicated) as volume:
        assert volume.shape == (8, 8, 4)
    assert "1 file(s) repeat an instance already read" in caplog.text
