"""The model file: schema, checksum and range checks turn every crafted or damaged file into one sentence."""

import json
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from normdino import AnomalyDetector
from normdino.errors import ModelFileError
from normdino.model_file import read_header, read_model_file, write_model_file


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_dinov2_dir):
    rng = np.random.default_rng(0)
    images = [rng.random((48, 48)).astype(np.float32) for _ in range(10)]
    detector = AnomalyDetector(backbone=str(tiny_dinov2_dir), image_size=56, n_components=8, epochs=2, batch_images=4,
                               progress=False)
    detector.fit(images[:6], images[6:])
    return detector.save(tmp_path_factory.mktemp("model") / "m.normdino")


def _parts(path):
    header, _ = read_model_file(path)
    return header, load_file(str(path))


def _rewrite(saved, tmp_path, change_header=None, change_tensors=None, name="crafted.normdino"):
    """A file with a changed header/tensors and a *recomputed* checksum: only the range checks can catch it."""
    header, tensors = _parts(saved)
    header = {k: v for k, v in header.items() if k not in ("format", "format_version", "normdino_version", "checksum")}
    if change_header:
        change_header(header)
    if change_tensors:
        change_tensors(tensors)
    return write_model_file(tmp_path / name, header, tensors)


def _raw_header(saved, tmp_path, change, name="raw.normdino"):
    """Edit the JSON header in place, keeping the stored checksum (a hand-edited file)."""
    raw = saved.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    outer = json.loads(raw[8:8 + n])
    meta = json.loads(outer["__metadata__"]["normdino"])
    meta = change(meta)
    outer["__metadata__"]["normdino"] = json.dumps(meta)
    blob = json.dumps(outer).encode()
    blob += b" " * (-len(blob) % 8)
    out = tmp_path / name
    out.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])
    return out


def test_a_flipped_byte_in_a_threshold_fails_the_checksum(saved, tmp_path):
    raw = bytearray(saved.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    outer = json.loads(raw[8:8 + n])
    start, _ = outer["calibration.pixel_thresholds"]["data_offsets"]
    raw[8 + n + start + 20 * 8 + 7] ^= 0x40  # the sign/exponent byte of one float64 threshold
    (tmp_path / "flipped.normdino").write_bytes(bytes(raw))
    with pytest.raises(ModelFileError, match="fails its checksum"):
        AnomalyDetector.load(tmp_path / "flipped.normdino", progress=False)


@pytest.mark.parametrize("key,value", [
    ("method.mixture.sticks", lambda t: t + 2.0),
    ("method.mixture.covariances", lambda t: -t),
    ("method.mixture.stat_count", lambda t: t - 1.0),
    ("method.prototypes", lambda t: t * float("nan")),
])
def test_crafted_mixture_states_are_refused(saved, tmp_path, key, value):
    path = _rewrite(saved, tmp_path, change_tensors=lambda t: t.update({key: value(t[key])}))
    with pytest.raises(ModelFileError):
        AnomalyDetector.load(path, progress=False)


@pytest.mark.parametrize("change,message", [
    (lambda t: t.update({"calibration.fprs": t["calibration.fprs"][:-3]}), "equal 1-D tables"),
    (lambda t: t.update({"calibration.fprs": t["calibration.fprs"][None]}), "equal 1-D tables"),
    (lambda t: t.update({k: t[k][:0] for k in ("calibration.fprs", "calibration.pixel_thresholds",
                                               "calibration.image_thresholds")}), "equal 1-D tables"),
    (lambda t: t.update({"calibration.pixel_thresholds": t["calibration.pixel_thresholds"].flip(0)}), "rise with"),
    (lambda t: t.update({"calibration.image_thresholds": t["calibration.image_thresholds"] * float("nan")}), "NaN"),
])
def test_crafted_calibration_tables_are_refused(saved, tmp_path, change, message):
    path = _rewrite(saved, tmp_path, change_tensors=change)
    with pytest.raises(ModelFileError, match=message):
        AnomalyDetector.load(path, progress=False)


@pytest.mark.parametrize("change,message", [
    (lambda m: {**m, "format_version": "abc"}, "unreadable format version"),
    (lambda m: {**m, "format_version": "x.y"}, "unreadable format version"),
    (lambda m: [m], "malformed normdino header"),
    (lambda m: {**m, "detector": [1, 2]}, "'detector' must be a dict"),
    (lambda m: {**m, "extra": 1}, "unexpected header fields extra"),
    (lambda m: {**m, "backbone": {k: v for k, v in m["backbone"].items() if k != "identifier"}}, "identifier"),
    (lambda m: {k: v for k, v in m.items() if k != "method"}, "'method' is missing"),
    (lambda m: {**m, "detector": {**m["detector"], "evil": 1}}, "unknown detector settings evil"),
    (lambda m: {**m, "detector": {**m["detector"], "sigma": 1e9}}, "sigma must be at most"),
    (lambda m: {**m, "detector": {**m["detector"], "sigma": "abc"}}, "sigma must be of type float"),
    (lambda m: {**m, "method": {**m["method"], "params": {**m["method"]["params"], "score": "evil"}}}, "score must be one of"),
    (lambda m: {**m, "method": {**m["method"], "params": {**m["method"]["params"], "update_rate": "abc"}}}, "update_rate"),
    (lambda m: {**m, "method": {**m["method"], "name": "evil"}}, "unknown method"),
])
def test_tampered_headers_give_one_sentence(saved, tmp_path, change, message):
    with pytest.raises(ModelFileError, match=message):
        AnomalyDetector.load(_raw_header(saved, tmp_path, change), progress=False)


def test_header_is_read_without_torch_and_cli_reports_errors(saved, tmp_path, capsys):
    from normdino.cli import main

    assert read_header(saved)["method"]["name"] == "dpmm"
    bad = _raw_header(saved, tmp_path, lambda m: {**m, "format_version": "abc"})
    assert main(["info", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "unreadable format version" in err and "Traceback" not in err


def test_other_precision_warns_but_loads(saved, tmp_path, caplog):
    path = _rewrite(saved, tmp_path, change_header=lambda h: h["backbone"].update(precision="bf16"))
    detector = AnomalyDetector.load(path, progress=False)
    assert "calibrated with backbone precision bf16" in caplog.text
    assert detector.method_.n_prototypes > 0


def test_format_1_files_are_read(saved, tmp_path):
    header, tensors = _parts(saved)
    old = {"format": "normdino-model", "format_version": "1.0", "normdino_version": "0.1.0",
           "backbone": header["backbone"], "mixture": {"n_components": 8, "weight_threshold": 1e-6},
           "detector": {**header["detector"], **{k: header["method"]["params"][k] for k in
                                                 ("n_components", "covariance_type", "epochs", "batch_images",
                                                  "update_rate", "alpha", "score", "layer")}},
           "training": header["training"]}
    old_tensors = {k.removeprefix("method."): v for k, v in tensors.items()}
    from safetensors.torch import save_file

    save_file(old_tensors, str(tmp_path / "v1.normdino"), metadata={"normdino": json.dumps(old)})
    new = AnomalyDetector.load(saved, progress=False)
    v1 = AnomalyDetector.load(tmp_path / "v1.normdino", progress=False)
    x = torch.randn(2, 4, 4, new.backbone_.embed_dim)
    assert torch.equal(v1.patch_maps(x), new.patch_maps(x))
