"""The normdino command line: outputs a person can open, and readable errors with non-zero exit codes."""

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from normdino.cli import main
from normdino.io.phantoms import write_phantom_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("cli-data"), n_train=10, n_valid=6,
                                 n_test_normal=2, n_test_anomalous=2, size=48, seed=1)


@pytest.fixture(scope="module")
def model(data, tiny_dinov2_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("cli-model") / "model.normdino"
    code = main(["fit", str(data / "train" / "good"), "-o", str(path), "--val", str(data / "valid" / "good" / "img"),
                 "--backbone", str(tiny_dinov2_dir), "--image-size", "112", "--epochs", "2", "--components", "8",
                 "--no-cache", "--quiet"])
    assert code == 0
    return path


def test_fit_writes_one_model_file(model):
    assert model.is_file()
    assert [p.name for p in model.parent.iterdir()] == ["model.normdino"]


def test_predict_writes_maps_masks_overlays_and_csv(model, data, tmp_path):
    out = tmp_path / "out"
    code = main(["predict", str(model), str(data / "test" / "Ungood" / "img"), str(data / "test" / "good" / "img" / "*.png"),
                 "-o", str(out), "--fpr", "5%", "--quiet"])
    assert code == 0
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert len(rows) == 4
    for row in rows:
        stem = row["anomaly_map"].removesuffix("_anomaly.png")
        png = Image.open(out / row["anomaly_map"])
        assert png.mode.startswith("I;16") and png.size == (48, 48)
        npy = np.load(out / f"{stem}_anomaly.npy")
        assert npy.shape == (48, 48) and npy.dtype == np.float32
        mask = np.asarray(Image.open(out / row["mask"]))
        assert set(np.unique(mask)) <= {0, 255}
        assert float(row["anomalous_fraction"]) == pytest.approx((mask > 0).mean(), abs=1e-6)
        overlay = Image.open(out / row["overlay"])
        assert overlay.mode == "RGB" and overlay.height >= 48
        assert float(row["fpr"]) == 0.05


def test_info_describes_the_model(model, capsys):
    assert main(["info", str(model)]) == 0
    text = capsys.readouterr().out
    assert "prototypes" in text and "FPR" in text


@pytest.mark.parametrize("make_input, message", [
    (lambda tmp: tmp / "nowhere", "does not exist"),
    (lambda tmp: tmp, "no images or volumes in"),
    (lambda tmp: (tmp / "broken.png").write_bytes(b"\x89PNG not really") and tmp / "broken.png", "broken.png"),
])
def test_fit_errors_are_readable(make_input, message, tmp_path, capsys):
    target = make_input(tmp_path)
    code = main(["fit", str(target), "-o", str(tmp_path / "m.normdino"), "--backbone", "random", "--quiet"])
    assert code == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "m.normdino").exists()


def test_predict_rejects_a_file_that_is_not_a_model(tmp_path, data, capsys):
    fake = tmp_path / "fake.normdino"
    fake.write_text("not a model")
    assert main(["predict", str(fake), str(data / "test" / "good" / "img"), "-o", str(tmp_path / "o")]) == 1
    assert "not a normdino model file" in capsys.readouterr().err


def test_bad_fpr_is_a_usage_error(model, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(model), str(tmp_path), "-o", str(tmp_path), "--fpr", "150%"])
    assert exit_info.value.code == 2


def test_demo_runs_with_a_random_backbone(tmp_path, capsys):
    code = main(["demo", "-o", str(tmp_path / "demo"), "--backbone", "random", "--image-size", "56",
                 "--epochs", "1", "--components", "8", "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    assert "pixel AUROC" in out and "random backbone weights" in out
    assert (tmp_path / "demo" / "model.normdino").is_file()
    assert len(list((tmp_path / "demo" / "predictions").glob("*_overlay.png"))) > 0


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="needs FIFOs")
def test_fifos_and_broken_links_in_an_input_folder_get_a_warning_and_a_skipped_row(model, data, tmp_path, capsys,
                                                                                    monkeypatch):
    import shutil

    from normdino.detector import AnomalyDetector
    from normdino.errors import InputError
    from tests.io.test_inputs import add_unusable_entries

    images = tmp_path / "images"
    shutil.copytree(data / "test" / "good" / "img", images)
    reasons = add_unusable_entries(images)
    assert main(["predict", str(model), str(images), "-o", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    rows = {Path(row["input"]).name: row for row in csv.DictReader((tmp_path / "out" / "scores.csv").open())}
    for name, reason in reasons.items():
        assert rows[name]["status"] == "skipped" and reason in rows[name]["message"]
        assert f"skipped {images / name}:" in err
    assert rows["gone.nii.gz"]["kind"] == "volume"
    assert sum(row["status"] == "ok" for row in rows.values()) == len(list(data.glob("test/good/img/*.png")))
    assert main(["predict", str(model), str(images), "-o", str(tmp_path / "strict"), "--strict"]) == 1
    assert "stopped by --strict before any work" in capsys.readouterr().err and not (tmp_path / "strict").exists()

    given = []

    def fit(self, train, val=None):
        given.append(list(train))
        raise InputError("stopped here")

    monkeypatch.setattr(AnomalyDetector, "fit", fit)
    assert main(["fit", str(images), "-o", str(tmp_path / "m.normdino"), "--backbone", "random"]) == 1
    assert given and [p.name for p in given[0]] == sorted(p.name for p in (data / "test" / "good" / "img").iterdir())
    err = capsys.readouterr().err
    assert all(f"skipped {images / name}: it " in err for name in reasons)
