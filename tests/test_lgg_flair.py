"""The whole pipeline on the real LGG FLAIR slices in ../shared (skipped when absent).

The backbone is tiny and random, so only that the pipeline runs and writes sane outputs is checked, never quality.
"""

import csv

import numpy as np
from PIL import Image

from normdino.cli import main


def test_fit_and_predict_on_real_slices(lgg_flair, tiny_dinov2_dir, tmp_path):
    train = sorted((lgg_flair / "train" / "good").glob("*.png"))[::45]  # 30 slices across the patients
    val = sorted((lgg_flair / "valid" / "good" / "img").glob("*.png"))[::43]
    tumours = sorted((lgg_flair / "valid" / "Ungood" / "img").glob("*.png"))[::60]
    model = tmp_path / "lgg.normdino"
    assert main(["fit", *map(str, train), "--val", *map(str, val), "-o", str(model), "--backbone", str(tiny_dinov2_dir),
                 "--image-size", "112", "--epochs", "2", "--components", "32", "--no-cache", "--quiet"]) == 0
    out = tmp_path / "out"
    assert main(["predict", str(model), *map(str, tumours), "-o", str(out), "--quiet"]) == 0
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert [r["input"] for r in rows] == [str(p) for p in tumours]
    for row in rows:
        anomaly = np.load(out / row["anomaly_map"].replace(".png", ".npy"))
        assert anomaly.shape == (256, 256) and np.isfinite(anomaly).all()
        assert 0.0 <= anomaly.min() and anomaly.max() <= 2.0  # cosine distances
        mask = np.asarray(Image.open(out / row["mask"]))
        assert mask.shape == (256, 256)
        assert float(row["score"]) >= float(np.median(anomaly))
        assert Image.open(out / row["overlay"]).size[1] >= 256
