"""The command line checks everything it can before any work, and every failure is one sentence (issue 11)."""

import errno
import json
import subprocess
import sys

import numpy as np
import pytest

from normdino.cli import main
from normdino.errors import NormdinoError, WeightsNotFoundError
from normdino.io.phantoms import write_phantom_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("checks-data"), n_train=4, n_valid=2,
                                 n_test_normal=1, n_test_anomalous=1, size=32, seed=5)


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if the detector loads, fits or saves: the command must stop before any work."""
    from normdino.detector import AnomalyDetector

    def refuse(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    for name in ("fit", "load", "save"):
        monkeypatch.setattr(AnomalyDetector, name, refuse)


def _model_file(path, fprs=(0.01, 0.05, 0.1)):
    """A minimal model file (header + calibration tables), written with safetensors' numpy API."""
    from safetensors.numpy import save_file

    grid = np.geomspace(1e-4, 0.5, 20)
    header = {"format": "normdino-model", "format_version": "2.0", "normdino_version": "test",
              "method": {"name": "dpmm", "params": {"n_components": 8}},
              "backbone": {"name": "random", "identifier": "x", "is_random": True, "patch_size": 14, "embed_dim": 32,
                           "image_size": 56, "layers": [-1]},
              "detector": {"fprs": list(fprs), "sigma": 0.0}, "training": {"n_prototypes": 5}, "checksum": "-"}
    tensors = {"calibration.fprs": grid, "calibration.pixel_thresholds": 1.0 - grid,
               "calibration.image_thresholds": 2.0 - grid}
    save_file(tensors, str(path), metadata={"normdino": json.dumps(header)})
    return path, grid


# ---------------------------------------------------------------------- arguments


@pytest.mark.parametrize("argv, message", [
    (["predict", "m", "x", "-o", "o", "--batch-size", "0"], "--batch-size: must be at least 1"),
    (["predict", "m", "x", "-o", "o", "--batch-size", "-1"], "--batch-size: must be at least 1"),
    (["predict", "m", "x", "-o", "o", "--max-megapixels", "0"], "--max-megapixels: must be greater than 0"),
    (["predict", "m", "x", "-o", "o", "--min-foreground", "1.5"], "--min-foreground: must lie between 0 and 1"),
    (["evaluate", "m", "d", "--sigma", "-2"], "--sigma: must be a finite number >= 0"),
    (["evaluate", "m", "d", "--sigma", "nan"], "--sigma: must be a finite number >= 0"),
    (["evaluate", "m", "d", "--batch-size", "0"], "--batch-size: must be at least 1"),
    (["demo", "--epochs", "0"], "--epochs: must be at least 1"),
    (["demo", "--components", "0"], "--components: must be at least 1"),
])
def test_bad_numbers_are_usage_errors_before_any_work(argv, message, capsys, no_work):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("option, value", [("--batch-size", "0"), ("--batch-size", "-1"), ("--sigma", "-2"),
                                           ("--sigma", "nan"), ("--epochs", "0"), ("--components", "0")])
def test_bad_fit_settings_stop_before_any_work(option, value, data, tmp_path, capsys, no_work):
    out = tmp_path / "m.normdino"
    try:
        code = main(["fit", str(data / "train" / "good"), "-o", str(out), "--backbone", "random", option, value])
    except SystemExit as exit_info:  # argparse's usage error
        code = exit_info.code
    assert code in (1, 2)
    err = capsys.readouterr().err
    assert option.lstrip("-").split("-")[0] in err and "Traceback" not in err
    assert not out.exists()


# ---------------------------------------------------------------------- outputs


@pytest.mark.parametrize("make_output, message", [
    (lambda tmp: tmp, "is a folder"),
    (lambda tmp: (tmp / "f").write_text("x") and tmp / "f" / "m.normdino", "which is not a folder"),
    (lambda tmp: "/proc/m.normdino", "not writable"),
])
def test_fit_output_is_checked_before_any_work(make_output, message, data, tmp_path, capsys, no_work):
    code = main(["fit", str(data / "train" / "good"), "-o", str(make_output(tmp_path)), "--backbone", "random"])
    err = capsys.readouterr().err
    assert code == 1 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_fit_refuses_to_write_the_model_over_a_training_image(data, tmp_path, capsys, no_work):
    image = sorted((data / "train" / "good").glob("*.png"))[0]
    before = image.read_bytes()
    assert main(["fit", str(data / "train" / "good"), "-o", str(image), "--backbone", "random"]) == 1
    assert "one of the training or validation inputs" in capsys.readouterr().err
    assert image.read_bytes() == before


@pytest.mark.parametrize("make_output, message", [
    (lambda tmp: (tmp / "f").write_text("x") and tmp / "f" / "out", "lies under the file"),
    (lambda tmp: (tmp / "f").write_text("x") and tmp / "f", "is a file"),
    (lambda tmp: "/proc/normdino-out", "not writable"),
])
def test_predict_output_is_checked_before_the_model_loads(make_output, message, data, tmp_path, capsys, no_work):
    code = main(["predict", str(tmp_path / "any.normdino"), str(data / "test" / "good" / "img"),
                 "-o", str(make_output(tmp_path))])
    err = capsys.readouterr().err
    assert code == 1 and message in err and "Traceback" not in err


def test_predict_reports_missing_inputs_before_the_model_loads(tmp_path, capsys, no_work):
    code = main(["predict", str(tmp_path / "any.normdino"), str(tmp_path / "nowhere"), "-o", str(tmp_path / "o")])
    assert code == 1 and "nowhere does not exist" in capsys.readouterr().err


def _stop_fit(monkeypatch, error):
    from normdino.detector import AnomalyDetector

    def fit(self, *args, **kwargs):
        raise error

    monkeypatch.setattr(AnomalyDetector, "fit", fit)


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"), "safetensors"])
def test_a_full_disk_during_the_model_save_is_one_sentence(error, data, tmp_path, capsys, monkeypatch):
    from normdino.detector import AnomalyDetector

    if error == "safetensors":
        from safetensors import SafetensorError

        error = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    def fit(self, *args, **kwargs):
        return self

    def save(self, path):
        raise error

    monkeypatch.setattr(AnomalyDetector, "fit", fit)
    monkeypatch.setattr(AnomalyDetector, "save", save)
    out = tmp_path / "m.normdino"
    assert main(["fit", str(data / "train" / "good"), "-o", str(out), "--backbone", "random", "-q"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("normdino fit: error: cannot write the model file") and "No space left" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_validation_equal_to_training_warns_about_optimistic_fpr(data, tmp_path, capsys, monkeypatch):
    _stop_fit(monkeypatch, NormdinoError("stopped after the checks"))
    train = str(data / "train" / "good")
    assert main(["fit", train, "--val", train, "-o", str(tmp_path / "m.normdino"), "--backbone", "random"]) == 1
    err = capsys.readouterr().err
    assert "4 of the 4 validation inputs are also training inputs" in err and "optimistic" in err
    assert main(["fit", train, "--val", train, "-o", str(tmp_path / "m.normdino"), "--backbone", "random", "-q"]) == 1
    assert capsys.readouterr().err.strip() == "normdino fit: error: stopped after the checks"  # -q: errors only


def test_fit_without_weights_points_to_the_random_backbone(data, tmp_path, capsys, monkeypatch):
    _stop_fit(monkeypatch, WeightsNotFoundError("facebook/dinov2-small is not cached and the hub is offline."))
    assert main(["fit", str(data / "train" / "good"), "-o", str(tmp_path / "m.normdino"), "-q"]) == 1
    assert "'normdino fit --backbone random'" in capsys.readouterr().err


# ---------------------------------------------------------------------- info


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, tiny_dinov2_dir):
    """A real (tiny) model file: info checks the whole file as predict does, so a header alone no longer passes."""
    from normdino import AnomalyDetector

    rng = np.random.default_rng(0)
    images = [rng.random((48, 48)).astype(np.float32) for _ in range(8)]
    detector = AnomalyDetector(backbone=str(tiny_dinov2_dir), image_size=56, n_components=4, epochs=1, progress=False)
    return detector.fit(images[:5], images[5:]).save(tmp_path_factory.mktemp("info") / "m.normdino")


def test_info_prints_the_thresholds_interpolated_in_log_fpr(fitted):
    from safetensors.numpy import load_file

    done = subprocess.run([sys.executable, "-m", "normdino.cli", "info", str(fitted)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    tables = load_file(str(fitted))
    expected = np.interp(np.log(0.05), np.log(tables["calibration.fprs"]), tables["calibration.pixel_thresholds"])
    assert f"FPR  5.0%   pixel threshold {expected:.4f}" in done.stdout
    assert f"{tables['method.prototypes'].shape[0]} prototypes" in done.stdout


def test_info_json_into_a_closed_pipe_ends_quietly(fitted):
    process = subprocess.Popen([sys.executable, "-m", "normdino.cli", "info", "--json", str(fitted)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # like `| head` that has read enough
    _, err = process.communicate(timeout=120)
    assert b"Traceback" not in err and b"BrokenPipe" not in err
    assert process.returncode in (0, 141)


def test_info_of_a_malformed_header_is_one_sentence(tmp_path, capsys):
    path, _ = _model_file(tmp_path / "m.normdino")
    from safetensors.numpy import load_file, save_file

    save_file(load_file(str(path)), str(path), metadata={"normdino": json.dumps(
        {"format": "normdino-model", "format_version": "2.0", "method": {"name": "dpmm", "params": {}}})})
    assert main(["info", str(path)]) == 1
    err = capsys.readouterr().err
    assert "incomplete normdino model file" in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["evaluate", "bench"])
def test_report_folders_are_checked_before_any_work(command, data, tmp_path, capsys, no_work):
    (tmp_path / "f").write_text("x")
    argv = [command, *([str(tmp_path / "any.normdino")] if command == "evaluate" else []), str(data),
            "-o", str(tmp_path / "f" / "report")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "lies under the file" in err and "Traceback" not in err


# ---------------------------------------------------------------------- one megapixel limit (issue 21)
@pytest.mark.parametrize("command", ["fit", "predict"])
@pytest.mark.parametrize("side, message", [(12000, "(144 megapixels), above the limit of 64 megapixels"),
                                           (30000, "is larger than 179 megapixels, above the limit of 64")])
def test_images_above_the_megapixel_limit_are_refused_before_any_work(command, side, message, data, tmp_path, capsys,
                                                                      no_work):
    import shutil

    from tests.io.test_reading import header_only_png

    images = tmp_path / "images"
    shutil.copytree(data / "train" / "good", images)
    header_only_png(images / "huge.png", side, side)
    argv = (["fit", str(images), "-o", str(tmp_path / "m.normdino"), "--backbone", "random", "-q"]
            if command == "fit" else
            ["predict", str(tmp_path / "m.normdino"), str(images), "-o", str(tmp_path / "out"), "--strict", "-q"])
    assert main(argv) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "huge.png" in lines[0], lines
    assert not (tmp_path / "m.normdino").exists() and not (tmp_path / "out").exists()


def test_fit_applies_the_limit_to_volume_slices(tmp_path, capsys, monkeypatch):
    import nibabel as nib

    from normdino.detector import AnomalyDetector

    def fit(self, train, val=None):
        list(train)  # the stream of slices is read as the real fit would
        raise AssertionError("a slice above the limit was read")

    monkeypatch.setattr(AnomalyDetector, "fit", fit)
    nib.save(nib.Nifti1Image(np.ones((40, 50, 3), np.uint8), np.eye(4)), tmp_path / "scan.nii.gz")
    assert main(["fit", str(tmp_path / "scan.nii.gz"), "-o", str(tmp_path / "m.normdino"), "--backbone", "random",
                 "--max-megapixels", "0.001", "-q"]) == 1
    err = capsys.readouterr().err
    assert "the slices of" in err and "50x40 (0.002 megapixels)" in err
    assert "above the limit of 0.001 megapixels" in err
