"""Inputs as the CLI and the Python API take them: folders, globs, files, arrays; checked before any work."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from normdino.errors import InputError
from normdino.io.inputs import Inputs, expand_images, resolve_inputs, training_images


def _png(path: Path, value: int = 0, size=(20, 24)) -> Path:
    Image.fromarray(np.full(size, value, dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "train"
    root.mkdir()
    _png(root / "b.png", 20)
    _png(root / "a.png", 10)
    (root / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble, not a PNG")
    _png(root / ".x.png", 30)
    (root / "notes.txt").write_text("ignored")
    return root


def test_expand_images_takes_what_the_cli_takes(folder):
    expected = [folder / "a.png", folder / "b.png"]
    assert expand_images(str(folder)) == expected
    assert expand_images(folder) == expected
    assert expand_images(str(folder / "*.png")) == expected
    assert expand_images([str(folder / "b.png"), folder / "a.png"]) == [folder / "b.png", folder / "a.png"]


def test_folders_and_globs_skip_hidden_and_appledouble_files(folder):
    assert [p.name for p in resolve_inputs([folder]).images] == ["a.png", "b.png"]
    assert [p.name for p in resolve_inputs([str(folder / "*a.png")]).images] == ["a.png"]
    # a hidden file named explicitly is what the user asked for
    assert resolve_inputs([folder / ".x.png"]).images == [folder / ".x.png"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_is_refused_and_never_opened(tmp_path, folder):
    fifo = folder / "pipe.png"
    os.mkfifo(fifo)  # opening it for reading would block forever
    with pytest.raises(InputError, match=r"pipe\.png is not a regular file"):
        resolve_inputs([fifo])
    with pytest.raises(InputError, match=r"pipe\.png is not a regular file"):
        expand_images(str(folder / "p*.png"))
    assert [p.name for p in resolve_inputs([folder]).images] == ["a.png", "b.png"]  # skipped inside folders


def test_every_missing_path_is_named_in_one_error_before_any_work(folder, tmp_path):
    with pytest.raises(InputError, match=r"2 inputs .*nope1.*nope2"):
        resolve_inputs([tmp_path / "nope1", folder, tmp_path / "nope2"])
    with pytest.raises(InputError, match=r"nope3 does not exist"):
        expand_images([np.zeros((20, 20), np.float32), tmp_path / "nope3"])
    with pytest.raises(InputError, match=r"matches no file"):
        expand_images(str(tmp_path / "*.jpg"))


def test_arrays_and_generators_pass_through_with_their_sources(folder):
    arrays = [np.full((20, 20), v, np.float32) for v in (0.1, 0.2)]
    sources: list[str] = []
    assert expand_images(arrays[0], sources=sources)[0] is arrays[0]
    assert sources == ["<array 0>"]
    sources = []
    mixed = expand_images([arrays[0], str(folder), arrays[1]], sources=sources)
    assert mixed[0] is arrays[0] and mixed[1:3] == [folder / "a.png", folder / "b.png"] and mixed[3] is arrays[1]
    assert sources == ["<array 0>", str(folder / "a.png"), str(folder / "b.png"), "<array 3>"]
    sources = []
    stream = expand_images((a for a in arrays), sources=sources)
    assert sources == [] and [id(a) for a in stream] == [id(a) for a in arrays] and len(sources) == 2


def test_training_sources_name_the_volume_of_every_slice(folder, tmp_path):
    nib = pytest.importorskip("nibabel")
    from normdino.io.slicing import SliceOptions

    rng = np.random.default_rng(0)
    volumes = []
    for name, depth in (("p1.nii.gz", 3), ("p2.nii.gz", 2)):
        nib.save(nib.Nifti1Image(rng.integers(0, 255, (20, 20, depth)).astype(np.uint8), np.eye(4)), tmp_path / name)
        volumes.append(tmp_path / name)
    sources: list[str] = []
    stream = training_images(Inputs(images=[folder / "a.png"], volumes=volumes), SliceOptions(), sources)
    items = list(stream)
    assert len(items) == len(sources) == 6
    assert sources == [str(folder / "a.png")] + [str(volumes[0])] * 3 + [str(volumes[1])] * 2
    files: list[str] = []
    assert training_images(resolve_inputs([folder]), None, files) == [folder / "a.png", folder / "b.png"]
    assert files == [str(folder / "a.png"), str(folder / "b.png")]


def test_expand_images_says_what_the_model_must_record(folder, tmp_path):
    nib = pytest.importorskip("nibabel")
    from normdino.io.slicing import SliceOptions, merge_slice_settings

    settings: dict = {}
    expand_images(str(folder), settings=settings)
    assert settings == {"image_intensity": "dtype"}  # 2D only: volumes scored later get the same rule
    assert merge_slice_settings(settings, {})["normalization"] == "dtype"
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 2), np.uint8), np.eye(4)), tmp_path / "v.nii.gz")
    settings = {}
    expand_images([folder / "a.png", tmp_path / "v.nii.gz"], settings=settings)
    assert settings["normalization"] == "percentile" and settings["image_intensity"] == "dtype"
    options = SliceOptions(window=(-200, 250), axis=1)
    settings = {}
    expand_images(tmp_path / "v.nii.gz", options, settings=settings)
    assert settings == {"axis": 1, "normalization": "window", "window": [-200.0, 250.0], "percentiles": "0.5,99.5",
                        "image_intensity": "dtype"}
    assert merge_slice_settings(settings, {})["window"] == [-200.0, 250.0]


# ---------------------------------------------------------------------- entries that are no file (issue 21)
def add_unusable_entries(root: Path) -> dict[str, str]:
    """A FIFO, a looping link and a dangling link named like inputs, in ``root``; name -> what the reason says."""
    os.mkfifo(root / "f.png")
    os.symlink("loop.png", root / "loop.png")
    os.symlink(root / "gone.png.target", root / "gone.nii.gz")
    return {"f.png": "FIFO", "loop.png": "link that loops", "gone.nii.gz": "dangling symbolic link"}


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_folder_entries_that_are_no_file_are_listed_with_the_reason(folder, caplog):
    expected = add_unusable_entries(folder)
    inputs = resolve_inputs([folder])
    assert [p.name for p in inputs.images] == ["a.png", "b.png"] and inputs.volumes == []
    assert {p.name: why for p, why in inputs.unusable}.keys() == expected.keys()
    for path, why in inputs.unusable:
        assert expected[path.name] in why
    with caplog.at_level("WARNING"):
        assert expand_images(folder) == [folder / "a.png", folder / "b.png"]  # the API fit warns about each
    assert all(f"skipped {folder / name}: it " in caplog.text for name in expected)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_folder_of_nothing_but_unusable_entries_is_one_sentence(tmp_path):
    add_unusable_entries(tmp_path)
    with pytest.raises(InputError, match=r"no input can be read: .*f.png is not a regular file but a FIFO .*\(and 2 more such entries\)"):
        resolve_inputs([tmp_path])
