"""GPU checks (skipped without CUDA): every method fits, predicts and benches on cuda; a CUDA model predicts on CPU."""

import json

import numpy as np
import pytest
import torch

from normdino import AnomalyDetector
from normdino.io.phantoms import write_phantom_dataset
from tiny_methods import TINY_METHOD_PARAMS as METHODS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("phantoms"), n_train=10, n_valid=6, n_test_normal=2,
                                 n_test_anomalous=3, size=64, seed=0)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_fit_on_cuda_predict_on_cuda_and_cpu(method, phantoms, tiny_dinov2_dir, tmp_path):
    train = sorted((phantoms / "train" / "good").glob("*.png"))
    val = sorted((phantoms / "valid" / "good" / "img").glob("*.png"))
    test = sorted((phantoms / "test" / "Ungood" / "img").glob("*.png"))
    detector = AnomalyDetector(method=method, backbone=str(tiny_dinov2_dir), image_size=56, device="cuda",
                               progress=False, **METHODS[method]).fit(train, val)
    assert detector.backbone_.device.type == "cuda"
    on_gpu = detector.predict(test)
    path = detector.save(tmp_path / "gpu.normdino")
    on_cpu = AnomalyDetector.load(path, device="cpu", progress=False).predict(test)  # bf16 fitted, fp32 now: warns
    for a, b in zip(on_gpu, on_cpu):
        assert a.pixel_map.shape == b.pixel_map.shape
        assert np.corrcoef(a.pixel_map.ravel(), b.pixel_map.ravel())[0, 1] > 0.9  # bf16 vs fp32 tokens


def test_bench_and_evaluate_on_cuda(phantoms, tiny_dinov2_dir, tmp_path):
    from normdino.cli import main

    assert main(["bench", str(phantoms), "--methods", ",".join(METHODS), "--backbone", str(tiny_dinov2_dir),
                 "--image-size", "56", "--epochs", "2", "--components", "8", "--layers", "1", "2", "--clusters", "4",
                 "--retrieve-k", "2", "--device", "cuda", "--no-cache",
                 "--timing-images", "2", "-o", str(tmp_path / "b"), "--quiet"]) == 0
    rows = json.loads((tmp_path / "b" / "results.json").read_text())["rows"]
    assert len(rows) == len(METHODS) and all(r["ms_per_sample"] > 0 for r in rows)


def test_bf16_on_cuda_runs_bf16_weights_at_any_size_and_keeps_the_fp32_model(tiny_dinov2_dir):
    from normdino.features.backbone import Backbone

    fp32 = Backbone.from_pretrained(tiny_dinov2_dir, image_size=56, device="cuda", precision="fp32")
    bf16 = Backbone.from_pretrained(tiny_dinov2_dir, image_size=56, device="cuda")
    assert bf16.precision == "bf16" and "precision=bf16/weights" in bf16.identifier
    assert next(bf16.model.parameters()).dtype == torch.float32  # the digest and derived backbones see fp32
    g = torch.Generator().manual_seed(0)
    for side in (56, 70):
        pixels = torch.randn(2, 3, side, side, generator=g)
        cos = torch.nn.functional.cosine_similarity(bf16(pixels), fp32(pixels), dim=-1)
        assert cos.shape == (2, side // 14, side // 14) and float(cos.mean()) > 0.999
