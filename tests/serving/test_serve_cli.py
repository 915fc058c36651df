"""``normdino serve``: arguments reach the server's settings; model names; slice orientation for display."""

from __future__ import annotations

import numpy as np
import pytest

from normdino.cli import main
from normdino.errors import InputError
from normdino.serving.models import model_name
from normdino.serving.results import ResultStore, slice_orientation


def test_serve_arguments_become_settings(monkeypatch):
    import normdino.serving.app as app_module

    seen = {}
    monkeypatch.setattr(app_module, "serve", lambda models, **kw: seen.update(models=models, **kw))
    monkeypatch.setenv("NORMDINO_TOKEN", "from-env")
    assert main(["serve", "a.normdino", "liver=b.normdino", "--port", "8123", "--max-upload-mb", "2",
                 "--concurrency", "2", "--max-queue", "3", "--result-ttl", "30", "-q"]) == 0
    settings = seen["settings"]
    assert seen["models"] == ["a.normdino", "liver=b.normdino"] and seen["host"] == "127.0.0.1" and seen["port"] == 8123
    assert settings.max_upload_bytes == 2 * 2**20 and settings.concurrency == 2 and settings.max_queue == 3
    assert settings.result_ttl_s == 30 and settings.token == "from-env"
    main(["serve", "a.normdino", "--token", "given", "-q"])
    assert seen["settings"].token == "given"


def test_a_missing_model_file_is_one_line(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "nope.normdino"), "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]


def test_model_names():
    assert model_name("models/brain.normdino")[0] == "brain"
    assert model_name("liver=x/y.normdino") == ("liver", pytest.importorskip("pathlib").Path("x/y.normdino"))
    with pytest.raises(InputError, match="NAME=PATH"):
        model_name("my model.normdino")


def test_axial_slices_turn_to_the_radiological_view():
    # RAS-aligned volume: array axes are x (towards Right), y (Anterior), z (Superior)
    o = slice_orientation(np.diag([1.0, 1.0, 3.0, 1.0]), axis=2)
    assert o.plane == "axial" and o.transpose
    assert o.labels == ("A", "P", "R", "L")  # anterior up, patient's right on the screen's left
    plane = np.arange(12).reshape(3, 4)  # rows: x, columns: y
    shown = o.apply(plane)
    # screen rows run anterior -> posterior (y descending), columns right -> left (x descending)
    np.testing.assert_array_equal(shown, plane.T[::-1, ::-1])
    # LPS-stored (DICOM-like) volume, already x to the left: only the transpose
    lps = np.diag([-1.0, -1.0, 2.5, 1.0])
    o = slice_orientation(lps, axis=2)
    assert o.transpose and not o.flip_rows and not o.flip_cols
    # an identity affine records no geometry: shown as stored, no letters
    assert slice_orientation(np.eye(4), axis=2) == type(o)()
    # a coronal slice of an anisotropic volume: superior up, and its pixels 3x taller than wide
    o = slice_orientation(np.diag([1.0, 1.0, 3.0, 1.0]), axis=1)
    assert o.plane == "coronal" and o.labels[:2] == ("S", "I") and o.pixel_aspect == pytest.approx(3.0)


def test_result_store_expiry_is_by_its_clock(tmp_path):
    now = [0.0]
    store = ResultStore(10, tmp_path / "s", clock=lambda: now[0])
    result_id, folder = store.new_result()
    (folder / "a.png").write_bytes(b"x")
    assert store.file(result_id, "a.png") is None  # not published yet
    store.publish(result_id, {"a.png"})
    assert store.file(result_id, "a.png") == folder / "a.png"
    assert store.file(result_id, "b.png") is None and store.file("../" + result_id, "a.png") is None
    now[0] = 10.5
    assert store.sweep() == 1 and not folder.exists()
    store.close()
    assert not (tmp_path / "s").exists()
