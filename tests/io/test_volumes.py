"""Volumes: NIfTI / DICOM reading into slices, normalisation, and geometry-preserving write-back."""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")
pydicom = pytest.importorskip("pydicom")

from normdino.io import slabs, slicing, volumes  # noqa: E402
from normdino.errors import InputError  # noqa: E402
from normdino.io.intensity import parse_window  # noqa: E402
from normdino.io.nifti import VolumeWriter, write_volume_like  # noqa: E402
from normdino.io.slicing import SliceOptions, parse_slice_range  # noqa: E402
from normdino.io.volumes import (  # noqa: E402
    Volume,
    is_volume,
    list_volumes,
    read_mask_volume,
    volume_stem,
)


# --------------------------------------------------------------------------- helpers


def rotation(axis: int, degrees: float) -> np.ndarray:
    """3x3 rotation about a world axis."""
    t = np.deg2rad(degrees)
    c, s = np.cos(t), np.sin(t)
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def oblique_affine() -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = rotation(0, 17) @ rotation(2, -23) @ np.diag([0.9, 1.1, 2.5])
    affine[:3, 3] = [-40.5, 12.25, 70.0]
    return affine


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray, slope_inter=None) -> Path:
    image = nib.Nifti1Image(data, affine)
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=2)
    if slope_inter is not None:
        image.header.set_slope_inter(*slope_inter)
    nib.save(image, path)
    return path


def random_volume(shape=(12, 10, 8), seed=0, dtype=np.int16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(-300, 900, size=shape).astype(dtype)


def load(path: Path) -> tuple[np.ndarray, np.ndarray, object]:
    image = nib.load(path)
    return np.asarray(image.dataobj), image.affine, image.header


IOP = np.concatenate([(rotation(0, -8) @ rotation(2, 10))[:, 0], (rotation(0, -8) @ rotation(2, 10))[:, 1]])  # oblique


def write_dicom_series(folder: Path, pixels: np.ndarray, *, origin=(-100.0, -80.0, 30.0), spacing=(0.7, 0.8),
                       step=2.5, orientation=IOP, slopes=None, intercepts=None, series_uid=None, seed=0,
                       name="slice", photometric="MONOCHROME2", shift=(0.0, 0.0, 0.0)) -> list[np.ndarray]:
    """Write pixels[:, :, k] as slice k of a series, files named in shuffled order; return the positions."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    rows, cols, n = pixels.shape
    orientation = np.asarray(orientation, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    series_uid = series_uid or generate_uid()
    order = np.random.default_rng(seed).permutation(n)
    positions = []
    for k in range(n):
        position = np.asarray(origin) + k * step * normal + k * np.asarray(shift)  # shift: gantry tilt
        positions.append(position)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID = series_uid
        ds.Modality = "CT"
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in orientation]
        ds.PixelSpacing = [str(spacing[0]), str(spacing[1])]
        ds.SliceThickness = str(step)
        ds.RescaleSlope = str(1.0 if slopes is None else slopes[k])
        ds.RescaleIntercept = str(0.0 if intercepts is None else intercepts[k])
        ds.PixelData = np.ascontiguousarray(pixels[:, :, k].astype("<i2")).tobytes()
        ds.save_as(folder / f"{name}{order[k]:03d}.dcm", enforce_file_format=True)
    return positions


# --------------------------------------------------------------------------- paths and parsing


def test_parse_slice_range_and_window():
    assert parse_slice_range("60:100") == slice(60, 100)
    assert parse_slice_range(":5") == slice(None, 5)
    assert parse_slice_range("2:10:3") == slice(2, 10, 3)
    for bad in ("60", "a:b", "1:2:0", "1:2:3:4"):
        with pytest.raises(InputError, match="--slices"):
            parse_slice_range(bad)
    assert parse_window("-200,250") == (-200.0, 250.0)
    with pytest.raises(InputError, match="--window"):
        parse_window("250,-200")
    with pytest.raises(InputError, match="--window"):
        parse_window("-200")


def test_slice_options_resolve_normalization():
    assert SliceOptions().normalization == "percentile"
    assert SliceOptions(window=(-200, 250)).normalization == "window"
    assert SliceOptions(window="-200,250", slices="1:3").slices == slice(1, 3)
    with pytest.raises(InputError, match="window"):
        SliceOptions(normalization="percentile", window=(-200, 250))
    with pytest.raises(InputError, match="needs a window"):
        SliceOptions(normalization="window")
    with pytest.raises(InputError, match="normalization"):
        SliceOptions(normalization="zscore")
    with pytest.raises(InputError, match="percentiles"):
        SliceOptions(percentiles=(99, 1))


def test_is_volume_list_and_stem(tmp_path):
    nifti = save_nifti(tmp_path / "scan.nii.gz", random_volume(), np.eye(4))
    (tmp_path / "notes.txt").write_text("x")
    series = tmp_path / "series"
    write_dicom_series(series, random_volume((4, 5, 3)))
    no_suffix = tmp_path / "series2"
    no_suffix.mkdir()
    for f in series.iterdir():  # DICOM files without the .dcm suffix are found by their magic
        (no_suffix / f.stem).write_bytes(f.read_bytes())
    assert is_volume(nifti) and is_volume(series) and is_volume(no_suffix)
    assert not is_volume(tmp_path / "notes.txt") and not is_volume(tmp_path / "missing.nii")
    assert list_volumes(tmp_path) == [nifti, series, no_suffix]
    assert list_volumes(nifti) == [nifti]
    assert volume_stem(nifti) == "scan" and volume_stem(tmp_path / "a.b.nii") == "a.b" and volume_stem(series) == "series"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="empty"):
        list_volumes(empty)
    with pytest.raises(InputError, match="single DICOM file"):
        Volume.open(next(series.iterdir()))


# --------------------------------------------------------------------------- NIfTI geometry


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_nifti_round_trip_oblique(tmp_path, suffix, axis):
    data = random_volume()
    affine = oblique_affine()
    path = save_nifti(tmp_path / f"scan{suffix}", data, affine)
    out = tmp_path / f"out{suffix}"
    options = SliceOptions(axis=axis, normalization="none")
    with Volume.open(path) as volume:
        assert volume.shape == data.shape
        np.testing.assert_array_equal(volume.affine, nib.load(path).affine)
        slices = list(volume.iter_slices(options))
        assert [k for k, _ in slices] == list(range(data.shape[axis]))
        for k, s in slices:
            assert s.dtype == np.float32
            np.testing.assert_array_equal(s, np.take(data, k, axis=axis))
        write_volume_like(volume, iter(slices), options, out)
    written, written_affine, header = load(out)
    reference = nib.load(path).header
    assert written.dtype == np.float32 and written.shape == data.shape
    np.testing.assert_array_equal(written, data.astype(np.float32))
    np.testing.assert_array_equal(written_affine, nib.load(path).affine)
    np.testing.assert_array_equal(header.get_qform(), reference.get_qform())
    np.testing.assert_array_equal(header.get_sform(), reference.get_sform())
    assert (int(header["qform_code"]), int(header["sform_code"])) == (1, 2)
    np.testing.assert_array_equal(header["pixdim"][:4], reference["pixdim"][:4])
    assert not list(tmp_path.glob(".*tmp"))
    if suffix == ".nii.gz":
        with open(out, "rb") as f:
            assert f.read(2) == b"\x1f\x8b"


@pytest.mark.parametrize("axis", [0, 1])
def test_non_native_axis_through_blocked_scratch(tmp_path, monkeypatch, axis):
    """Small blocks (the last one partial): the temp-file scratch and writer buffer give the same voxels."""
    monkeypatch.setattr(slabs, "SLAB_BYTES", 3 * 12 * 10 * 2)  # 3 planes per block, 8 planes in all
    data = random_volume(seed=4)
    path = save_nifti(tmp_path / "scan.nii.gz", data, oblique_affine())
    options = SliceOptions(axis=axis, percentiles=(0, 100))
    with Volume.open(path) as volume:
        slices = dict(volume.iter_slices(options))
        assert list(volume._stores) == [axis]
        write_volume_like(volume, slices, options, tmp_path / "map.nii.gz")
    expected = (data - data.min()) / float(data.max() - data.min())
    for k, s in slices.items():
        np.testing.assert_allclose(s, np.take(expected, k, axis=axis), atol=1e-6)
    written, affine, _ = load(tmp_path / "map.nii.gz")
    np.testing.assert_allclose(written, expected, atol=1e-6)
    np.testing.assert_array_equal(affine, nib.load(path).affine)


@pytest.mark.parametrize("dtype, slope_inter", [(np.int16, None), (np.float32, None), (np.int16, (2.0, 1.0))])
def test_axial_slices_free_each_slab_before_reading_the_next(tmp_path, monkeypatch, dtype, slope_inter):
    """Along the stored axis the slices come slab by slab, and no slab is still held while the next one is read:
    memory stays one slab whatever the volume's length (issue 22); the slices outlive their slabs unchanged."""
    import weakref

    from nibabel.arrayproxy import ArrayProxy

    data = random_volume(seed=5).astype(dtype)
    path = save_nifti(tmp_path / "scan.nii.gz", data, np.eye(4), slope_inter)
    expected = nib.load(path).get_fdata().astype(np.float32)
    monkeypatch.setattr(slabs, "SLAB_BYTES", 3 * 12 * 10 * np.dtype(dtype).itemsize)  # 3 planes per slab unscaled
    read, held_at_read = [], []
    real_getitem = ArrayProxy.__getitem__

    def recording(self, key):
        held_at_read.append(sum(ref() is not None for ref in read))
        block = np.array(real_getitem(self, key))  # owns its memory: every view of the slab keeps this array alive
        read.append(weakref.ref(block))
        return block

    monkeypatch.setattr(ArrayProxy, "__getitem__", recording)
    with Volume.open(path) as volume:
        slices = list(volume.iter_slices(SliceOptions(normalization="none")))
    assert len(read) >= 3 and held_at_read == [0] * len(read)
    assert [k for k, _ in slices] == list(range(8))
    for k, plane in slices:
        np.testing.assert_array_equal(plane, expected[:, :, k])


def test_interleaved_axes_on_one_volume(tmp_path):
    data = random_volume(seed=7)
    with Volume.open(save_nifti(tmp_path / "scan.nii.gz", data, np.eye(4))) as volume:
        none0, none1 = SliceOptions(axis=0, normalization="none"), SliceOptions(axis=1, normalization="none")
        for (i, a), (j, b) in zip(volume.iter_slices(none0), volume.iter_slices(none1)):
            np.testing.assert_array_equal(a, data[i])
            np.testing.assert_array_equal(b, data[:, j])
    assert volume._stores == {}


def test_iteration_after_slice_indices_reads_only_kept_slices(tmp_path):
    data = np.zeros((8, 8, 6), dtype=np.int16)
    data[:, :, 2:4] = 100
    with Volume.open(save_nifti(tmp_path / "scan.nii.gz", data, np.eye(4))) as volume:
        options = SliceOptions(min_foreground=0.5, window=(0, 100))
        assert volume.slice_indices(options) == [2, 3]
        read = []
        original = volume._source.iter_raw_planes

        def counting(indices):
            for k, plane in original(indices):
                read.append(k)
                yield k, plane

        volume._source.iter_raw_planes = counting
        assert [k for k, _ in volume.iter_slices(options)] == [2, 3]
        assert read == [2, 3]


def test_normalised_map_lands_on_its_voxel(tmp_path):
    """Voxel (i, j, k) of the written map is the normalised value of input voxel (i, j, k)."""
    data = random_volume((9, 7, 6), seed=3)
    path = save_nifti(tmp_path / "scan.nii.gz", data, oblique_affine())
    options = SliceOptions(axis=1, percentiles=(2.0, 98.0))
    with Volume.open(path) as volume:
        write_volume_like(volume, dict(volume.iter_slices(options)), options, tmp_path / "map.nii")
    low, high = np.percentile(data.astype(np.float32), (2.0, 98.0))
    expected = np.clip((data - low) / (high - low), 0, 1)
    written, affine, _ = load(tmp_path / "map.nii")
    np.testing.assert_allclose(written, expected, atol=1e-6)
    np.testing.assert_array_equal(affine, nib.load(path).affine)


def test_named_axes_resolved_from_affine(tmp_path):
    # array axis 0 -> world S (slightly oblique), axis 1 -> L (flipped R), axis 2 -> A
    columns = np.array([[0, 0, 1.0], [-1.0, 0, 0], [0, 1.0, 0]]).T
    affine = np.eye(4)
    affine[:3, :3] = rotation(1, 12) @ columns @ np.diag([2.0, 1.0, 1.5])
    data = random_volume((5, 6, 7))
    path = save_nifti(tmp_path / "scan.nii", data, affine)
    with Volume.open(path) as volume:
        assert volume.axcodes == ("S", "L", "A")
        assert volume.resolve_axis("axial") == 0
        assert volume.resolve_axis("Sagittal") == 1
        assert volume.resolve_axis("coronal") == 2
        assert volume.resolve_axis("2") == 2 and volume.resolve_axis(-1) == 2
        assert volume.slice_shape("axial") == (6, 7)
        k, first = next(volume.iter_slices(SliceOptions(axis="axial", normalization="none")))
        np.testing.assert_array_equal(first, data[0])
        np.testing.assert_allclose(volume.spacing, (2.0, 1.0, 1.5))
        with pytest.raises(InputError, match="slicing axis"):
            volume.resolve_axis("transverse")
        with pytest.raises(InputError, match="out of range"):
            volume.resolve_axis(3)


def test_slice_range_and_read_slice(tmp_path):
    data = random_volume((6, 5, 10))
    path = save_nifti(tmp_path / "scan.nii.gz", data, np.eye(4))
    with Volume.open(path) as volume:
        options = SliceOptions(slices=parse_slice_range("3:7"), normalization="none")
        assert volume.slice_indices(options) == [3, 4, 5, 6]
        assert [k for k, _ in volume.iter_slices(options)] == [3, 4, 5, 6]
        assert volume.slice_indices(SliceOptions(slices=slice(8, 20))) == [8, 9]
        assert volume.slice_indices(SliceOptions(slices=slice(1, 9, 3))) == [1, 4, 7]
        with pytest.raises(InputError, match=r"--slices 20:30 selects no slice of .*scan\.nii\.gz, which has 10 slices"):
            volume.slice_indices(SliceOptions(slices=slice(20, 30)))
        np.testing.assert_array_equal(volume.read_slice(7, options), data[:, :, 7])
        assert [k for k, _ in volume.iter_slices(options, indices=[9, 0])] == [0, 9]
        with pytest.raises(InputError, match="out of range"):
            list(volume.iter_slices(options, indices=[10]))


def test_foreground_rule_skips_slices_and_writes_zeros(tmp_path):
    data = np.zeros((10, 10, 6), dtype=np.int16)
    data[:, :, 1][:5] = 100          # 50 % foreground
    data[:, :, 3][:1, :5] = 100      # 5 %
    data[:, :, 4][:2] = 100          # 20 %
    data[:, :, 5] = 3                # dim: 3 % of the range, not foreground
    path = save_nifti(tmp_path / "scan.nii.gz", data, oblique_affine())
    options = SliceOptions(min_foreground=0.1, normalization="percentile", percentiles=(0, 100))
    with Volume.open(path) as volume:
        assert volume.slice_indices(options) == [1, 4]
        kept = dict(volume.iter_slices(options))
        assert sorted(kept) == [1, 4]
        assert volume.slice_indices(SliceOptions(min_foreground=0.04, percentiles=(0, 100))) == [1, 3, 4]
        none = SliceOptions(min_foreground=0.1, normalization="none")
        assert volume.slice_indices(none) == [1, 4]
        write_volume_like(volume, kept, options, tmp_path / "map.nii.gz")
    written, _, _ = load(tmp_path / "map.nii.gz")
    expected = np.where(np.isin(np.arange(6), [1, 4])[None, None, :], data / 100.0, 0.0)
    np.testing.assert_allclose(written, expected, atol=1e-6)


# --------------------------------------------------------------------------- normalisation


def test_percentile_normalisation_exact_and_subsampled(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    data = (rng.gamma(2.0, 300.0, size=(40, 40, 20))).astype(np.float32)
    path = save_nifti(tmp_path / "scan.nii.gz", data, np.eye(4))
    exact = np.percentile(data, (0.5, 99.5))
    with Volume.open(path) as volume:
        stats = volume.statistics((0.5, 99.5))
        np.testing.assert_allclose((stats["p_low"], stats["p_high"]), exact, rtol=1e-5)
        assert stats["min"] == data.min() and stats["max"] == data.max()
        _, s = next(volume.iter_slices(SliceOptions(slices=slice(4, 5))))
        np.testing.assert_allclose(s, np.clip((data[:, :, 4] - exact[0]) / (exact[1] - exact[0]), 0, 1), atol=1e-6)
        assert s.min() >= 0 and s.max() <= 1
    monkeypatch.setattr(volumes, "_MAX_STAT_SAMPLES", 5000)  # estimate on ~5000 of 32000 voxels
    with Volume.open(path) as volume:
        estimate = volume.statistics((0.5, 99.5))
        # the estimate is a good quantile: the fraction of all voxels below it is close to 99.5 % / 0.5 %
        assert abs(np.mean(data <= estimate["p_high"]) - 0.995) < 0.003
        assert abs(np.mean(data <= estimate["p_low"]) - 0.005) < 0.003
        assert estimate["max"] == data.max()


def test_window_dtype_and_eight_bit(tmp_path):
    hu = np.linspace(-1000, 1000, 5 * 4 * 3).reshape(5, 4, 3).astype(np.int16)
    path = save_nifti(tmp_path / "ct.nii.gz", hu, np.eye(4))
    with Volume.open(path) as volume:
        _, s = next(volume.iter_slices(SliceOptions(window=(-200, 250))))
        np.testing.assert_allclose(s, np.clip((hu[:, :, 0] + 200) / 450.0, 0, 1), atol=1e-6)
        _, q = next(volume.iter_slices(SliceOptions(window=(-200, 250), eight_bit=True)))
        np.testing.assert_allclose(q, np.round(np.clip((hu[:, :, 0] + 200) / 450.0, 0, 1) * 255) / 255, atol=1e-6)
        with pytest.raises(InputError, match="unsigned"):
            next(volume.iter_slices(SliceOptions(normalization="dtype")))
    gray = np.arange(5 * 4 * 3, dtype=np.uint8).reshape(5, 4, 3) * 4
    path = save_nifti(tmp_path / "mr.nii", gray, np.eye(4))
    with Volume.open(path) as volume:
        _, s = next(volume.iter_slices(SliceOptions(normalization="dtype")))
        np.testing.assert_allclose(s, gray[:, :, 0] / 255.0, atol=1e-7)


def test_nifti_scaling_applied(tmp_path):
    data = random_volume((4, 4, 3))
    path = save_nifti(tmp_path / "scaled.nii.gz", data, np.eye(4), slope_inter=(0.5, -10.0))
    with Volume.open(path) as volume:
        _, s = next(volume.iter_slices(SliceOptions(normalization="none", slices=slice(2, 3))))
        np.testing.assert_allclose(s, data[:, :, 2] * 0.5 - 10.0)
        np.testing.assert_allclose(s, np.asarray(nib.load(path).dataobj)[:, :, 2])


def test_4d_needs_volume_index(tmp_path):
    data = random_volume((5, 4, 3, 3))
    affine = oblique_affine()
    path = save_nifti(tmp_path / "fmri.nii.gz", data, affine)
    with pytest.raises(InputError, match=r"fmri\.nii\.gz.*--volume-index 0\.\.2"):
        Volume.open(path)
    with pytest.raises(InputError, match="out of range"):
        Volume.open(path, volume_index=3)
    with Volume.open(path, volume_index=1) as volume:
        assert volume.shape == (5, 4, 3)
        options = SliceOptions(normalization="none", axis=0)
        slices = dict(volume.iter_slices(options))
        for k, s in slices.items():
            np.testing.assert_array_equal(s, data[k, :, :, 1])
        write_volume_like(volume, slices, options, tmp_path / "map.nii.gz")
    written, written_affine, _ = load(tmp_path / "map.nii.gz")
    assert written.shape == (5, 4, 3)
    np.testing.assert_array_equal(written, data[..., 1])
    np.testing.assert_array_equal(written_affine, nib.load(path).affine)
    path3 = save_nifti(tmp_path / "single.nii.gz", random_volume((3, 3, 2, 1)), np.eye(4))
    assert Volume.open(path3).shape == (3, 3, 2)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_truncated_nifti_names_the_file(tmp_path, suffix):
    path = save_nifti(tmp_path / f"scan{suffix}", random_volume((20, 20, 10), seed=5), np.eye(4))
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) * 2 // 3])
    with pytest.raises(InputError, match=r"scan\.nii.*truncated"):
        with Volume.open(path) as volume:
            list(volume.iter_slices(SliceOptions()))
    path.write_bytes(blob[:100])
    with pytest.raises(InputError, match=r"scan\.nii"):
        Volume.open(path)


def test_corrupt_gzip_payload_names_the_file(tmp_path):
    path = tmp_path / "scan.nii.gz"
    raw = save_nifti(tmp_path / "scan.nii", random_volume((20, 20, 10), seed=6), np.eye(4)).read_bytes()
    blob = bytearray(gzip.compress(raw))
    blob[len(blob) // 2: len(blob) // 2 + 64] = bytes(64)  # damage the middle of the deflate stream
    path.write_bytes(bytes(blob))
    with pytest.raises(InputError, match=r"scan\.nii\.gz"):
        with Volume.open(path) as volume:
            list(volume.iter_slices(SliceOptions(normalization="none")))


# --------------------------------------------------------------------------- DICOM


def test_dicom_series_geometry_rescale_and_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 2000, size=(6, 7, 5)).astype(np.int16)
    spacing, step, origin = (0.7, 0.8), 2.5, np.array([-100.0, -80.0, 30.0])
    positions = write_dicom_series(tmp_path / "ct", pixels, spacing=spacing, step=step, origin=origin,
                                   slopes=[2.0] * 5, intercepts=[-1024.0] * 5)
    with Volume.open(tmp_path / "ct") as volume:
        assert volume.kind == "dicom" and volume.shape == (6, 7, 5)
        assert [p.name for p in volume.files] != sorted(p.name for p in volume.files)  # shuffled names, sorted by position
        # world position of voxel (i=row, j=column, k) from DICOM's definition, LPS -> RAS
        row_cos, col_cos = IOP[:3], IOP[3:]
        for i, j, k in [(0, 0, 0), (5, 6, 4), (2, 3, 1), (5, 0, 2)]:
            lps = positions[k] + i * spacing[0] * col_cos + j * spacing[1] * row_cos
            np.testing.assert_allclose(volume.affine @ [i, j, k, 1], [-lps[0], -lps[1], lps[2], 1], atol=1e-4)
        np.testing.assert_allclose(volume.spacing, (0.7, 0.8, 2.5), atol=1e-5)
        options = SliceOptions(normalization="none")
        assert volume.resolve_axis("axial") == 2
        slices = dict(volume.iter_slices(options))
        for k in range(5):
            np.testing.assert_array_equal(slices[k], pixels[:, :, k] * 2.0 - 1024.0)
        write_volume_like(volume, slices, options, tmp_path / "ct_map.nii.gz")
        sagittal = SliceOptions(axis=1, window=(-1024, 3000))
        for j, s in volume.iter_slices(sagittal):
            np.testing.assert_allclose(s, np.clip((pixels[:, j, :] * 2.0 - 1024 + 1024) / 4024, 0, 1), atol=1e-6)
    written, affine, header = load(tmp_path / "ct_map.nii.gz")
    np.testing.assert_allclose(affine, volume.affine, atol=1e-5)
    assert int(header["sform_code"]) == 1 and int(header["qform_code"]) == 1
    np.testing.assert_array_equal(written, pixels * 2.0 - 1024.0)


def test_dicom_rescale_per_slice(tmp_path):
    pixels = np.full((3, 4, 3), 100, dtype=np.int16)
    write_dicom_series(tmp_path / "s", pixels, slopes=[1.0, 2.0, 0.5], intercepts=[0.0, -50.0, 10.0])
    with Volume.open(tmp_path / "s") as volume:
        values = [float(s[0, 0]) for _, s in volume.iter_slices(SliceOptions(normalization="none"))]
    assert values == [100.0, 150.0, 60.0]


def test_dicom_mixed_series_and_sizes(tmp_path):
    folder = tmp_path / "mixed"
    write_dicom_series(folder, random_volume((4, 4, 3)), name="a", seed=1)
    write_dicom_series(folder, random_volume((4, 4, 3)), name="b", origin=(0, 0, 90.0), seed=2)
    with pytest.raises(InputError, match=r"mixed.*2 DICOM series"):
        Volume.open(folder)
    folder = tmp_path / "sizes"
    write_dicom_series(folder, random_volume((4, 4, 3)), name="a", series_uid="1.2.3.4")
    write_dicom_series(folder, random_volume((5, 4, 1)), name="b", series_uid="1.2.3.4", origin=(0, 0, 90.0))
    with pytest.raises(InputError, match=r"b000\.dcm|a00\d\.dcm"):
        Volume.open(folder)
    folder = tmp_path / "echoes"
    write_dicom_series(folder, random_volume((4, 4, 2)), name="a", series_uid="1.2.3.5")
    write_dicom_series(folder, random_volume((4, 4, 2)), name="b", series_uid="1.2.3.5")
    with pytest.raises(InputError, match="same position"):
        Volume.open(folder)


def test_dicom_truncated_pixel_data_names_the_file(tmp_path):
    write_dicom_series(tmp_path / "s", random_volume((8, 8, 3)))
    victim = sorted((tmp_path / "s").iterdir())[1]
    victim.write_bytes(victim.read_bytes()[:-40])
    with Volume.open(tmp_path / "s") as volume:
        with pytest.raises(InputError, match=victim.name):
            list(volume.iter_slices(SliceOptions(normalization="none")))


# --------------------------------------------------------------------------- masks and writer


def test_read_mask_volume_checks_grid(tmp_path):
    affine = oblique_affine()
    image = Volume.open(save_nifti(tmp_path / "img.nii.gz", random_volume(), affine))
    mask_data = (random_volume() > 500).astype(np.uint8)
    good = save_nifti(tmp_path / "good_mask.nii.gz", mask_data, affine)
    mask = read_mask_volume(good, image)
    kept = [2, 5]
    got = dict(mask.iter_slices(SliceOptions(normalization="none"), indices=kept))
    np.testing.assert_array_equal(got[5], mask_data[:, :, 5])
    with pytest.raises(InputError, match=r"small_mask\.nii\.gz.*shape"):
        read_mask_volume(save_nifti(tmp_path / "small_mask.nii.gz", mask_data[:, :, :4], affine), image)
    shifted = affine.copy()
    shifted[0, 3] += 1.0
    with pytest.raises(InputError, match=r"shifted_mask\.nii\.gz.*affine"):
        read_mask_volume(save_nifti(tmp_path / "shifted_mask.nii.gz", mask_data, shifted), image)


def test_writer_uint8_errors_and_atomicity(tmp_path):
    data = random_volume((6, 5, 4))
    volume = Volume.open(save_nifti(tmp_path / "img.nii.gz", data, oblique_affine()))
    out = tmp_path / "mask.nii.gz"
    with VolumeWriter(volume, out, axis=2, dtype=np.uint8) as writer:
        writer.write(1, np.ones((6, 5), dtype=bool))
        writer.write(3, np.ones((6, 5), dtype=bool))
    written, _, header = load(out)
    assert written.dtype == np.uint8 and header.get_data_dtype() == np.uint8
    assert written[:, :, [1, 3]].all() and not written[:, :, [0, 2]].any()
    with pytest.raises(InputError, match="increasing slice order"):
        with VolumeWriter(volume, tmp_path / "bad.nii.gz") as writer:
            writer.write(2, np.zeros((6, 5)))
            writer.write(1, np.zeros((6, 5)))
    with pytest.raises(InputError, match="shape"):
        write_volume_like(volume, {0: np.zeros((5, 6))}, SliceOptions(axis=2), tmp_path / "bad.nii")
    with pytest.raises(InputError, match=r"\.nii"):
        VolumeWriter(volume, tmp_path / "bad.png")
    assert not (tmp_path / "bad.nii.gz").exists() and not (tmp_path / "bad.nii").exists()
    assert not list(tmp_path.glob(".*.tmp"))
    # a dict in any order is fine along the streamed axis
    write_volume_like(volume, {3: np.full((6, 5), 3.0), 0: np.full((6, 5), 1.0)}, SliceOptions(axis=2), tmp_path / "d.nii")
    written, _, _ = load(tmp_path / "d.nii")
    assert written[0, 0, :].tolist() == [1.0, 0.0, 0.0, 3.0]


def test_writer_non_streamed_axis_leaves_unwritten_slices_zero(tmp_path, monkeypatch):
    data = random_volume((6, 5, 4))
    volume = Volume.open(save_nifti(tmp_path / "img.nii", data, oblique_affine()))
    monkeypatch.setattr(slabs, "SLAB_BYTES", 6 * 5 * 4 * 3)  # blocks of 3 float32 planes
    with VolumeWriter(volume, tmp_path / "part.nii", axis=1) as writer:
        writer.write(3, np.full((6, 4), 7.0))
    written, _, _ = load(tmp_path / "part.nii")
    assert (written[:, 3, :] == 7.0).all() and written.sum() == 7.0 * 24
    options = SliceOptions(axis=0, normalization="none")
    write_volume_like(volume, volume.iter_slices(options), options, tmp_path / "m.nii.gz")
    written, affine, _ = load(tmp_path / "m.nii.gz")
    np.testing.assert_array_equal(written, data)
    np.testing.assert_array_equal(affine, volume.affine)


def test_missing_nibabel_says_how_to_install(tmp_path, monkeypatch):
    path = save_nifti(tmp_path / "img.nii", random_volume((3, 3, 2)), np.eye(4))
    monkeypatch.setitem(sys.modules, "nibabel", None)
    with pytest.raises(InputError, match=r'pip install "normdino\[medical\]"'):
        Volume.open(path)
    monkeypatch.setitem(sys.modules, "pydicom", None)
    write_dicom_series_folder = tmp_path / "s"
    write_dicom_series_folder.mkdir()
    (write_dicom_series_folder / "x.dcm").write_bytes(b"\0" * 132)
    with pytest.raises(InputError, match=r'pip install "normdino\[medical\]"'):
        Volume.open(write_dicom_series_folder)


# --------------------------------------------------------------------------- real data


def test_lgg_flair_volume_round_trip(lgg_flair, tmp_path):
    from PIL import Image

    path = sorted((lgg_flair / "volumes" / "valid").glob("*_flair.nii.gz"))[0]
    patient = volume_stem(path)[: -len("_flair")]
    options = SliceOptions(normalization="dtype")
    with Volume.open(path) as volume:
        assert volume.resolve_axis("axial") == 2
        slices = dict(volume.iter_slices(options))
        assert sorted(slices) == list(range(volume.shape[2]))
        write_volume_like(volume, slices, options, tmp_path / f"{patient}_anomaly.nii.gz")
        mask = read_mask_volume(path.with_name(f"{patient}_mask.nii.gz"), volume)
        assert mask.shape == volume.shape
    image = nib.load(path)
    written = nib.load(tmp_path / f"{patient}_anomaly.nii.gz")
    assert written.shape == image.shape
    np.testing.assert_array_equal(written.affine, image.affine)
    np.testing.assert_allclose(np.asarray(written.dataobj), np.asarray(image.dataobj) / 255.0, atol=1e-6)
    # axial slice k is the BMAD PNG numbered k + 1, pixel for pixel
    pngs = sorted((lgg_flair / "valid").glob(f"*/img/{patient}_*.png"))
    assert pngs
    number = int(pngs[0].stem.rsplit("_", 1)[1])
    png = np.asarray(Image.open(pngs[0]), dtype=np.float32) / 255.0
    np.testing.assert_allclose(slices[number - 1], png, atol=1e-6)


# --------------------------------------------------------------------------- issue 11: hardening


def test_two_d_nifti_is_one_slice_whatever_the_axis(tmp_path):
    coronal = np.array([[1.0, 0, 0, 0], [0, 0, 1.0, 0], [0, 1.0, 0, 0], [0, 0, 0, 1]])  # array axis 1 points S
    plane = random_volume((20, 24), seed=3)
    path = save_nifti(tmp_path / "slice.nii.gz", plane, coronal)
    with Volume.open(path) as volume:
        slices = list(volume.iter_slices(SliceOptions(axis="axial", normalization="none")))
        assert [k for k, _ in slices] == [0] and slices[0][1].shape == (20, 24)
        np.testing.assert_array_equal(slices[0][1], plane)
        assert volume.slice_shape("sagittal") == (20, 24)
        write_volume_like(volume, dict(slices), SliceOptions(axis="axial"), tmp_path / "map.nii.gz")
    data, affine, _ = load(tmp_path / "map.nii.gz")
    assert data.shape == (20, 24)  # the input's own shape, not (20, 24, 1) (issue 21)
    np.testing.assert_array_equal(data, plane)
    np.testing.assert_allclose(affine, coronal)


def test_rgb_and_complex_nifti_are_refused_in_one_sentence(tmp_path):
    rgb_dtype = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb = np.zeros((20, 20, 3), dtype=rgb_dtype)
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), tmp_path / "colour.nii")
    with pytest.raises(InputError, match=r"colour\.nii stores colour \(RGB/RGBA\) voxels"):
        Volume.open(tmp_path / "colour.nii")
    values = (random_volume((20, 20, 3)) + 1j * random_volume((20, 20, 3), seed=1)).astype(np.complex64)
    nib.save(nib.Nifti1Image(values, np.eye(4)), tmp_path / "phase.nii.gz")
    with pytest.raises(InputError, match=r"phase\.nii\.gz stores complex voxels"):
        Volume.open(tmp_path / "phase.nii.gz")


def test_selections_that_select_nothing_are_errors(tmp_path):
    data = np.zeros((20, 20, 20), dtype=np.uint8)
    data[5:15, 5:15, :] = 200  # a quarter of every slice is foreground
    path = save_nifti(tmp_path / "scan.nii.gz", data, np.eye(4))
    with Volume.open(path) as volume:
        with pytest.raises(InputError, match=r"--slices 100:200 selects no slice of .*scan\.nii\.gz, which has 20"):
            list(volume.iter_slices(SliceOptions(slices="100:200", normalization="dtype")))
        with pytest.raises(InputError, match=r"No slice of .*scan\.nii\.gz .* at least 0\.99 \(--min-foreground\)"):
            list(volume.iter_slices(SliceOptions(min_foreground=0.99, normalization="dtype")))
        with pytest.raises(InputError, match=r"at least 0\.99"):
            volume.slice_indices(SliceOptions(min_foreground=0.99, normalization="dtype"))
        assert len(list(volume.iter_slices(SliceOptions(min_foreground=0.2, normalization="dtype")))) == 20


def test_volume_smaller_than_a_patch_warns_once(tmp_path, caplog):
    path = save_nifti(tmp_path / "tiny.nii.gz", random_volume((3, 3, 10)), np.eye(4))
    with caplog.at_level("WARNING", logger="normdino"), Volume.open(path) as volume:
        assert len(list(volume.iter_slices(SliceOptions()))) == 10
        list(volume.iter_slices(SliceOptions()))
    assert caplog.text.count("tiny.nii.gz (slices along axis 2) is 3x3 pixels, smaller than one DINO patch") == 1


def test_all_nan_volume_is_refused_under_every_normalization(tmp_path):
    path = save_nifti(tmp_path / "nan.nii.gz", np.full((20, 20, 4), np.nan, np.float32), np.eye(4))
    for options in (SliceOptions(), SliceOptions(window=(0, 100))):
        with Volume.open(path) as volume, pytest.raises(InputError, match=r"nan\.nii\.gz holds no finite voxel value"):
            list(volume.iter_slices(options))


def test_dicom_monochrome1_is_inverted(tmp_path):
    pixels = np.random.default_rng(4).integers(0, 3000, size=(6, 7, 3)).astype(np.int16)
    write_dicom_series(tmp_path / "m2", pixels)
    write_dicom_series(tmp_path / "m1", pixels, photometric="MONOCHROME1")
    options = SliceOptions(normalization="none")
    with Volume.open(tmp_path / "m2") as m2, Volume.open(tmp_path / "m1") as m1:
        for (_, a), (_, b) in zip(m2.iter_slices(options), m1.iter_slices(options)):
            np.testing.assert_array_equal(b, -1.0 - a)  # signed 16-bit: -1 - stored maps the range onto itself
        assert m1.dtype == np.int16
        bright = SliceOptions(percentiles=(0, 100))
        for (_, a), (_, b) in zip(m2.iter_slices(bright), m1.iter_slices(bright)):
            np.testing.assert_allclose(b, 1.0 - a, atol=1e-6)


def test_dicom_gantry_tilt_gives_a_sheared_affine_and_a_warning(tmp_path, caplog):
    pixels = np.random.default_rng(5).integers(0, 1000, size=(6, 7, 4)).astype(np.int16)
    orientation = [1, 0, 0, 0, 1, 0]  # axial slices: normal +z (LPS)
    shift = (0.0, 2.5 * np.tan(np.deg2rad(15)), 0.0)  # each slice moves along y as the gantry is tilted by 15 deg
    positions = write_dicom_series(tmp_path / "tilt", pixels, orientation=orientation, step=2.5, shift=shift)
    with caplog.at_level("WARNING", logger="normdino"), Volume.open(tmp_path / "tilt") as volume:
        step = np.diag([-1.0, -1.0, 1.0]) @ (positions[1] - positions[0])
        np.testing.assert_allclose(volume.affine[:3, 2], step, atol=1e-5)
        np.testing.assert_allclose(volume.affine[:3, 3], np.diag([-1.0, -1.0, 1.0]) @ positions[0], atol=1e-5)
        write_volume_like(volume, volume.iter_slices(SliceOptions()), SliceOptions(), tmp_path / "map.nii.gz")
    assert "gantry tilt" in caplog.text and "15.00 degrees" in caplog.text
    written = nib.load(tmp_path / "map.nii.gz")
    np.testing.assert_allclose(written.header.get_sform()[:3, 2], step, atol=1e-4)


def test_dtype_fallback_scales_signed_volumes_by_percentile_with_a_warning(tmp_path, caplog):
    data = random_volume((20, 20, 4), seed=7)
    path = save_nifti(tmp_path / "ct.nii.gz", data, np.eye(4))
    with Volume.open(path) as volume:
        with pytest.raises(InputError, match="needs unsigned integer voxels"):
            list(volume.iter_slices(SliceOptions(normalization="dtype")))
        with caplog.at_level("WARNING", logger="normdino"):
            matched = dict(volume.iter_slices(SliceOptions(normalization="dtype", fallback="percentile")))
        percentile = dict(volume.iter_slices(SliceOptions()))
    assert "cannot be scaled like the model's training images" in caplog.text
    for k in percentile:
        np.testing.assert_array_equal(matched[k], percentile[k])


def test_unsigned_volume_matches_png_slices_exactly(tmp_path):
    data = np.random.default_rng(8).integers(0, 256, size=(20, 20, 3)).astype(np.uint8)
    path = save_nifti(tmp_path / "flair.nii.gz", data, np.eye(4))
    with Volume.open(path) as volume:
        slices = dict(volume.iter_slices(SliceOptions(normalization="dtype", fallback="percentile")))
    for k in range(3):
        np.testing.assert_array_equal(slices[k], data[:, :, k] / np.float32(255))


@pytest.mark.parametrize("stored, given, expected", [
    # fitted on 2D images (PNG): volumes get the same type-range rule, percentiles only as a warned fallback
    ({}, {}, {"normalization": "dtype", "fallback": "percentile", "window": None}),
    ({"image_intensity": "dtype"}, {"axis": "1"}, {"axis": "1", "normalization": "dtype", "fallback": "percentile"}),
    # fitted on CT volumes with a window: --axis alone keeps the window (was dropped before)
    ({"axis": "axial", "normalization": "window", "window": [-200, 250], "percentiles": "0.5,99.5"}, {"axis": "1"},
     {"axis": "1", "normalization": "window", "window": [-200, 250], "fallback": None}),
    # a window alone replaces a stored percentile rule; percentiles alone replace a stored window
    ({"normalization": "percentile", "percentiles": "1,99"}, {"window": "0,100"},
     {"normalization": "window", "window": "0,100"}),
    ({"normalization": "window", "window": [-200, 250]}, {"percentiles": "2,98"},
     {"normalization": "percentile", "window": None, "percentiles": "2,98"}),
    ({"normalization": "window", "window": [-200, 250]}, {"normalization": "window"},
     {"normalization": "window", "window": [-200, 250]}),
    # no model (fit): the defaults
    (None, {"axis": None}, {"axis": "axial", "normalization": None, "fallback": None}),
])
def test_merge_slice_settings_field_by_field(stored, given, expected):
    merged = slicing.merge_slice_settings(stored, given)
    assert {key: merged[key] for key in expected} == expected
    SliceOptions(normalization=merged["normalization"], window=merged["window"], fallback=merged["fallback"])


def test_hidden_files_are_skipped_and_fifos_refused(tmp_path):
    import os

    pixels = np.random.default_rng(9).integers(0, 1000, size=(6, 7, 3)).astype(np.int16)
    write_dicom_series(tmp_path / "series", pixels)
    (tmp_path / "series" / "._slice000.dcm").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    assert Volume.open(tmp_path / "series").shape == (6, 7, 3)
    root = tmp_path / "volumes"
    root.mkdir()
    save_nifti(root / "a.nii.gz", random_volume(), np.eye(4))
    (root / "._a.nii.gz").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    assert list_volumes(root) == [root / "a.nii.gz"]
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "pipe.nii.gz")
        with pytest.raises(InputError, match="not a regular file"):
            Volume.open(tmp_path / "pipe.nii.gz")


@pytest.mark.shared_data
def test_lgg_flair_volume_slices_equal_its_png_slices_under_the_png_rule(lgg_flair):
    import re

    from normdino.io.reading import read_image

    patient = "TCGA_CS_4942_19970222"
    pngs = sorted((lgg_flair / "valid").glob(f"*/img/{patient}_*.png"))
    assert len(pngs) > 10
    with Volume.open(lgg_flair / "volumes" / "valid" / f"{patient}_flair.nii.gz") as volume:
        slices = dict(volume.iter_slices(SliceOptions(normalization="dtype", fallback="percentile")))
    matched = 0
    for png in pngs:
        k = int(re.search(r"_(\d+)\.png$", png.name).group(1))
        image = read_image(png)
        matched += any(np.array_equal(slices.get(j), image) for j in (k - 1, k))  # 1- or 0-based names
    assert matched == len(pngs)


# --------------------------------------------------------------------------- issue 21: NaN geometry
def nifti_with_a_nan(path, field: str):
    """An uncompressed NIfTI-1 file with NaN written into one header field: ``pixdim`` (pixdim[1], with qform only,
    or ``pixdim+sform``: with a valid sform) or ``sform`` (srow_x[0])."""
    import struct

    nib = pytest.importorskip("nibabel")
    image = nib.Nifti1Image(random_volume((12, 14, 3), seed=5).astype(np.int16), np.diag([1.0, 1.0, 2.0, 1.0]))
    image.set_qform(image.affine, code=1)
    image.set_sform(image.affine, code=0 if field == "pixdim" else 1)
    nib.save(image, path)
    raw = bytearray(path.read_bytes())
    offset = {"pixdim": 80, "pixdim+sform": 80, "sform": 280}[field]
    raw[offset:offset + 4] = struct.pack("<f", float("nan"))
    path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize("field", ["pixdim", "pixdim+sform", "sform"])
def test_a_nan_in_the_geometry_is_one_sentence(tmp_path, field):
    path = nifti_with_a_nan(tmp_path / "scan.nii", field)
    with pytest.raises(InputError, match=r"scan.nii has a NaN or infinite voxel size or orientation in its header"):
        Volume.open(path)


# --------------------------------------------------------------------------- issue 21: 8-bit values in uint16 DICOM
@pytest.mark.parametrize("bits_stored", [16, 8])
def test_uint16_dicom_of_8bit_values_is_scaled_by_its_bits_stored_or_warned_about(tmp_path, caplog, bits_stored):
    pytest.importorskip("pydicom")
    from tests.io.dicom_series import write_series

    pixels = np.random.default_rng(2).integers(0, 256, size=(20, 24, 3)).astype(np.uint16)
    write_series(tmp_path / "series", pixels, unsigned=True, bits_stored=bits_stored)
    options = SliceOptions(normalization="dtype", fallback="percentile")  # a model fitted on 2D images
    with caplog.at_level("WARNING", logger="normdino"), Volume.open(tmp_path / "series") as volume:
        slices = dict(volume.iter_slices(options))
    top = 255.0 if bits_stored == 8 else 65535.0
    for k, plane in slices.items():
        np.testing.assert_allclose(plane, pixels[:, :, k] / np.float32(top), rtol=1e-6)
    dark = "all lie in 0..255, so scaled like the model's 2D training images (by the type's range, value / 65535)"
    assert (dark in caplog.text) == (bits_stored == 16)
    assert caplog.text.count("nearly black") == (bits_stored == 16)
