"""The model file: schema, checksum and range checks turn every crafted or damaged file into one sentence."""

import json
import struct

import numpy as np
import pytest
import torch
from PIL import Image
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
    (lambda m: {**m, "extra": 1}, "1 unexpected header field"),
    (lambda m: {**m, "backbone": {k: v for k, v in m["backbone"].items() if k != "identifier"}}, "identifier"),
    (lambda m: {k: v for k, v in m.items() if k != "method"}, "'method' is missing"),
    (lambda m: {**m, "detector": {**m["detector"], "evil": 1}}, "1 unknown detector setting"),
    (lambda m: {**m, "detector": {**m["detector"], "sigma": 1e9}}, "invalid detector setting 'sigma'"),
    (lambda m: {**m, "detector": {**m["detector"], "sigma": "abc"}}, "invalid detector setting 'sigma'"),
    (lambda m: {**m, "method": {**m["method"], "params": {**m["method"]["params"], "score": "evil"}}},
     "invalid dpmm setting 'score'"),
    (lambda m: {**m, "method": {**m["method"], "params": {**m["method"]["params"], "update_rate": "abc"}}}, "update_rate"),
    (lambda m: {**m, "method": {**m["method"], "name": "evil"}}, "names an unknown method"),
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


# ---------------------------------------------------------------------- one schema for info and predict (issue 21)
INJECTED = "INJECTED\nWARNING: all clear"


def _without(mapping, key):
    return {k: v for k, v in mapping.items() if k != key}


def _widen(t, extra=8):
    """Every (K, D) tensor of the mixture D + ``extra`` wide, consistently (zero means, unit variances)."""
    for key in ("method.mixture.means", "method.prototypes", "method.mixture.stat_sum"):
        t[key] = torch.cat([t[key], torch.zeros(t[key].shape[0], extra, dtype=t[key].dtype)], 1)
    for key in ("method.mixture.covariances", "method.mixture.stat_square"):
        t[key] = torch.cat([t[key], torch.ones(t[key].shape[0], extra, dtype=t[key].dtype)], 1)


def _empty(t):
    for key in ("method.mixture.means", "method.mixture.covariances", "method.mixture.sticks", "method.mixture.stat_count",
                "method.mixture.stat_sum", "method.mixture.stat_square", "method.prototypes"):
        t[key] = t[key][:0]


def _truncated(saved, tmp_path):
    raw = saved.read_bytes()
    (tmp_path / "cut.normdino").write_bytes(raw[:len(raw) - 100])
    return tmp_path / "cut.normdino"


def _folder(saved, tmp_path):
    (tmp_path / "a-folder.normdino").mkdir()
    return tmp_path / "a-folder.normdino"


TAMPERED = {
    "missing detector key": (lambda s, p: _rewrite(s, p, change_header=lambda h: h["detector"].pop("top_fraction")),
                             "detector setting 'top_fraction' is missing"),
    "missing mixture setting": (lambda s, p: _rewrite(s, p, change_header=lambda h: h["method"]["params"].pop("alpha")),
                                "dpmm setting 'alpha' is missing"),
    "absurd image size": (lambda s, p: _rewrite(s, p, change_header=lambda h: h["backbone"].update(image_size=14 * 10**6)),
                          "impossible backbone input size"),
    "absurd detector image size": (lambda s, p: _rewrite(s, p, change_header=lambda h: h["detector"].update(
        image_size=10**9)), "invalid detector setting 'image_size'"),
    "bad volume-settings rule": (lambda s, p: _rewrite(s, p, change_header=lambda h: h["detector"].update(
        volume_settings={"normalization": INJECTED, "image_intensity": "dtype"})), "invalid volume settings"),
    "bad 2D intensity rule": (lambda s, p: _rewrite(s, p, change_header=lambda h: h["detector"].update(
        volume_settings={"image_intensity": INJECTED})), "invalid volume settings"),
    "missing tensor": (lambda s, p: _rewrite(s, p, change_tensors=lambda t: t.pop("method.prototypes")),
                       "state tensor 'prototypes' is missing"),
    "extra method tensor": (lambda s, p: _rewrite(s, p, change_tensors=lambda t: t.update({INJECTED: torch.zeros(1)})),
                            "no part of a normdino model"),
    "extra state tensor": (lambda s, p: _rewrite(s, p, change_tensors=lambda t: t.update({"method.x": torch.zeros(1)})),
                           "1 tensor(s) its dpmm state does not have"),
    "truncated file": (_truncated, "truncated or corrupt"),
    "missing backbone identifier": (lambda s, p: _rewrite(s, p, change_header=lambda h: h["backbone"].pop("identifier")),
                                    "backbone 'identifier' must be a str"),
    "prototypes of the wrong width": (lambda s, p: _rewrite(s, p, change_tensors=_widen),
                                      "cannot score the 32-wide tokens"),
    "absurd shape": (lambda s, p: _rewrite(s, p, change_tensors=lambda t: t.update(
        {"method.mixture.means": t["method.mixture.means"].reshape(8, 4, 8)})), "have shape (8, 4, 8)"),
    "empty prototypes": (lambda s, p: _rewrite(s, p, change_tensors=lambda t: t.update(
        {"method.prototypes": t["method.prototypes"][:0]})), "stored prototypes do not match"),
    "empty mixture": (lambda s, p: _rewrite(s, p, change_tensors=_empty), "has shape (0, 32), expected (8, 32)"),
    "a folder": (_folder, "is a folder, not a model file"),
}


@pytest.mark.parametrize("command", ["info", "predict"])
@pytest.mark.parametrize("case", list(TAMPERED))
def test_tampered_models_are_refused_by_info_and_predict_alike(case, command, saved, tmp_path, capsys):
    from normdino.cli import main

    make, message = TAMPERED[case]
    path = make(saved, tmp_path)
    (tmp_path / "in").mkdir()
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "in" / "x.png")  # the model is refused first
    argv = ["info", str(path)] if command == "info" else ["predict", str(path), str(tmp_path / "in"), "-o",
                                                          str(tmp_path / "out"), "-q"]
    capsys.readouterr()
    assert main(argv) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], captured.err
    assert "INJECTED" not in captured.err + captured.out and "Traceback" not in captured.err
    assert "Error(" not in lines[0] and "Error:" not in lines[0].removeprefix(f"normdino {command}: error:")
    assert not (tmp_path / "out").exists()


def test_random_backbone_of_another_architecture_is_refused_before_it_is_built(saved, monkeypatch):
    import normdino.features.backbone as backbone_module

    def never(*args, **kwargs):
        raise AssertionError("the backbone was built")

    monkeypatch.setattr(backbone_module.Backbone, "random", classmethod(never))
    with pytest.raises(ModelFileError, match="dinov2_vitg14 has patch 14 and 1536-wide tokens"):
        AnomalyDetector.load(saved, backbone="random:dinov2_vitg14", progress=False)
